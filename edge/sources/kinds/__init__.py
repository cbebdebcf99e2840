"""One module a kind of capture source, each registered with ``@register_source``; every module here is
imported on the registry's first lookup (``edge.sources.registry``), so adding a kind is adding a file."""
