"""User-facing errors: each says what was wrong and what to do about it."""


class RecsysError(Exception):
    """An error caused by input or configuration; the CLI prints it on one line and exits 2."""


class DataError(RecsysError):
    """A missing, unreadable or malformed data file or dataset directory."""


class ConfigError(RecsysError):
    """An unknown configuration key or a value out of its allowed range."""
