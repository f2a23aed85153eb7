"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class LtDistillError(Exception):
    """A problem the user can fix (bad path, bad config value, incompatible store ...)."""


class ConfigError(LtDistillError, ValueError):
    """A configuration value or key is invalid."""
