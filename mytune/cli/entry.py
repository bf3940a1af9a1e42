"""Run a recipe given as `pkg.module:function`: import the module and call `function(argv)`.

    python -m mytune.cli.entry my_pkg.my_recipes:my_recipe --config my.yaml --override lr=1e-4

This is what torchrun starts in every process for `mytune [torchrun flags] pkg.module:function ...`; the in-process
`mytune pkg.module:function ...` calls the same `call_recipe_function`. The contract (see docs/launching.md):
`function` receives the recipe's arguments as a list of strings (everything after the recipe on the command line);
returning None or 0 means success, another int is the exit code; a `MytuneError` is printed as one line, exit code 2.
"""

import importlib
import sys

from mytune.errors import MytuneError


def call_recipe_function(module_name: str, function_name: str, argv: list[str]) -> int:
    """Import `module_name` (the current directory first on sys.path, as `python -m`) and call its function."""
    from mytune.cli.recipes import cwd_on_sys_path, did_you_mean

    with cwd_on_sys_path():
        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        functions = [name for name, obj in vars(module).items() if callable(obj) and not name.startswith("_")
                     and getattr(obj, "__module__", None) == module.__name__]
        hint = did_you_mean(function_name, functions, f"its functions: {', '.join(functions) or 'none'}")
        raise MytuneError(f"module `{module_name}` has no function `{function_name}`: {hint}")
    result = function(list(argv))
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or ":" not in argv[0]:
        print("usage: python -m mytune.cli.entry pkg.module:function [recipe args...]", file=sys.stderr)
        return 2
    module_name, _, function_name = argv[0].partition(":")
    try:
        return call_recipe_function(module_name, function_name, argv[1:])
    except MytuneError as err:
        print(f"{argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
