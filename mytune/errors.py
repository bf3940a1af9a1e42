"""The one error type users can cause.

Anything a user can get wrong (a typo in a config key, a missing file, a bad dataset row, a NaN loss) raises a
`MytuneError`. The CLI and the recipes' `__main__` guards print it as one line and exit with code 2; everything
else is a bug and keeps its traceback.
"""


class MytuneError(Exception):
    """A user-caused error: printed as one line, exit code 2."""


class ConfigError(MytuneError):
    """A bad config key, value or combination of values."""
