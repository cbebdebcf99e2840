"""Discovery for the registries (backends, capture source kinds, sinks): each module of a registry's package
registers itself when imported, so importing every module once makes adding one a new file and nothing else."""

from __future__ import annotations

import importlib
import pkgutil

_IMPORTED: set[str] = set()


def import_all_modules(package: str) -> None:
    """Import every module of ``package`` (a dotted name) once; modules named ``_*`` are private and skipped."""
    if package in _IMPORTED:
        return
    paths = importlib.import_module(package).__path__
    for info in pkgutil.iter_modules(paths):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _IMPORTED.add(package)
