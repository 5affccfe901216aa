"""The error of a run configuration that cannot run (its own module: config and presets both raise it)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""
