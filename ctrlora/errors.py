"""Errors that name what the user must change."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the valid choices."""


class RunDirError(RuntimeError):
    """The run dir holds a finished run (or no checkpoint to resume from)."""


class DataError(ValueError):
    """A data file is missing or a row is malformed; the message names file, line and field."""
