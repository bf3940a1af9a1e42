"""The one error type users can cause.

Anything a user can get wrong (a typo in a config key, a missing file, a bad dataset row, a NaN loss) raises a
`MytuneError`. The CLI and the recipes' `__main__` guards print it as one line and exit with code 2; everything
else is a bug and keeps its traceback.
"""


class MytuneError(Exception):
    """A user-caused error: printed as one line, exit code 2."""


class ConfigError(MytuneError):
    """A bad config key, value or combination of values."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message folded onto one line (at most `limit` characters), or its type name when it has none:
    for quoting a library's error inside a MytuneError."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


def run_or_exit(main, prog: str = "mytune") -> None:
    """Run a recipe's `main()`; a `MytuneError` becomes one line on stderr and exit code 2, Ctrl-C one line and 130.

    Recipes call this from their `if __name__ == "__main__":` guard, so a user error reads the same whether the
    recipe was started by `mytune`, by `python recipe.py` or by torchrun. Bugs keep their traceback.
    """
    import sys

    try:
        main()
    except MytuneError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves at the end of the step), or before training
        print(f"{prog}: stopped by Ctrl-C (nothing was saved since the last checkpoint)", file=sys.stderr)
        sys.exit(130)
