"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """Bad input, config or environment; the message names the file and line, or the setting."""


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong."""


class DataError(UserError):
    """A data file or row is unusable."""
