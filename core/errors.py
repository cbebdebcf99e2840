"""One exception type for everything a user can fix: the CLIs print it as one line and exit non-zero."""


class UserError(Exception):
    """A problem with input, configuration or environment, told in one line: what, where, what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file is missing, malformed, has an unknown key or a value of the wrong type."""


class BundleError(UserError):
    """A model bundle is missing, corrupt or incompatible with this runtime."""
