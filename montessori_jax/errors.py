"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, a malformed file, an unknown config key.

    The message names the file (and line) or key and says what is wrong.
    """


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""
