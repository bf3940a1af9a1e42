"""Find recipes, their configs and their params dataclasses by listing files (never importing torch).

`mytune <recipe>` resolves, in this order:
1. a shipped recipe name: `recipes/<name>.py`;
2. a path to a `.py` file, e.g. a copy made by `mytune cp` whose params live next to it in `<stem>_params.py`;
3. a module path `pkg.module` or `pkg.module:function` (a dot or a colon is required), looked up like
   `python -m` does, with the current directory first on `sys.path`.
"""

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from mytune.config import configs
from mytune.errors import MytuneError


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name -> its file."""
    root = configs.recipes_dir()
    return {} if root is None else {name: root / f"{name}.py" for name in configs.shipped_recipe_names()}


def closest(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """The candidates most like `name` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: list[str], otherwise: str, show: Callable[[str], str] = str) -> str:
    """The hint of an "unknown ..." error: "did you mean `a`, `b`?" for the closest candidates, else `otherwise`."""
    close = closest(name, candidates)
    return f"did you mean {', '.join(f'`{show(c)}`' for c in close)}?" if close else otherwise


class OneLineParser(argparse.ArgumentParser):
    """argparse for the small sub-commands: errors are one `MytuneError` line, not a usage dump."""

    def error(self, message: str):
        raise MytuneError(f"{self.prog}: {message}")


@dataclasses.dataclass(frozen=True)
class ModuleRecipe:
    """A recipe given as a module path: `pkg.mod` runs like `python -m pkg.mod`; `pkg.mod:fn` calls `fn(argv)`."""

    module: str
    function: str | None
    origin: Path | None  # the module's file, when it has one (used to find its params and configs)

    @property
    def name(self) -> str:
        return self.module if self.function is None else f"{self.module}:{self.function}"

    @property
    def stem(self) -> str:
        """The recipe name used for its configs and messages: the module's last component."""
        return self.module.rpartition(".")[2]


MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$")


def looks_like_module_path(name: str) -> bool:
    """`a.b`, `a.b:fn` or `a:fn` (a bare word is a recipe name, so that a typo gets "did you mean")."""
    return bool(MODULE_PATH.match(name)) and ("." in name or ":" in name)


def recipe_file(recipe: Path | ModuleRecipe) -> Path | None:
    """The .py file of a resolved recipe (a module recipe's origin), if it has one."""
    return recipe.origin if isinstance(recipe, ModuleRecipe) else recipe


def resolve_recipe(name_or_path: str) -> Path | ModuleRecipe:
    """A shipped recipe name -> `recipes/<name>.py`; else an existing `.py` path; else a module path;
    else `MytuneError` naming the closest shipped recipes."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    if path.suffix == ".py":
        raise MytuneError(f"recipe file {name_or_path} does not exist")
    if path.is_file():
        raise MytuneError(f"recipe file {name_or_path} must be a Python file ending in .py")
    if looks_like_module_path(name_or_path):
        return resolve_module_recipe(name_or_path)
    hint = did_you_mean(name_or_path, list(shipped), f"shipped recipes: {', '.join(shipped) or 'none'}")
    raise MytuneError(
        f"unknown recipe `{name_or_path}`: {hint} (or pass a recipe .py file or a module path pkg.module[:function]; "
        f"see `mytune ls`)"
    )


@contextmanager
def cwd_on_sys_path():
    """The current directory first on `sys.path` while inside, as `python -m` has it."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if sys.path and sys.path[0] == cwd:
            del sys.path[0]
        elif cwd in sys.path:
            sys.path.remove(cwd)


def resolve_module_recipe(spec_text: str) -> ModuleRecipe:
    """`pkg.mod[:function]` -> ModuleRecipe if the module can be found (its parent packages get imported)."""
    module, _, function = spec_text.partition(":")
    with cwd_on_sys_path():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as err:
            spec, reason = None, f" ({type(err).__name__}: {err})"
        else:
            reason = ""
    if spec is None:
        close = closest(module.rpartition(".")[2], list(shipped_recipes()))
        hint = f"; did you mean the shipped {', '.join(f'`{c}`' for c in close)}?" if close else ""
        raise MytuneError(
            f"unknown recipe `{spec_text}`: not a shipped recipe, not a file, and module `{module}` is not importable "
            f"from {os.getcwd()} or sys.path{reason}{hint}"
        )
    if spec.submodule_search_locations is not None and spec.origin is None:
        raise MytuneError(f"`{module}` is a namespace package, not a recipe module")
    origin = Path(spec.origin).resolve() if spec.origin and spec.has_location else None
    return ModuleRecipe(module=module, function=function or None, origin=origin)


def is_shipped(recipe_path: Path) -> bool:
    root = configs.recipes_dir()
    return root is not None and recipe_path.resolve().parent == root and recipe_path.stem in shipped_recipes()


def params_file(recipe_path: Path) -> Path:
    """The params file of a recipe: the `<name>_params` module it imports from its own directory (a `mytune cp`
    copy, even renamed), else `<stem>_params.py` next to it, else `params/<stem>.py` beside it (shipped layout)."""
    from mytune.cli.checks import imported_params_modules

    imported = [recipe_path.parent / f"{name}.py" for name, _ in imported_params_modules(recipe_path) if "." not in name]
    for candidate in (*imported, recipe_path.with_name(f"{recipe_path.stem}_params.py"),
                      recipe_path.parent / "params" / f"{recipe_path.stem}.py"):
        if candidate.is_file():
            return candidate
    raise MytuneError(
        f"no params file for recipe {recipe_path}: expected {recipe_path.stem}_params.py next to it (see `mytune cp`)"
    )


def load_params_class(recipe_path: Path) -> type:
    """The one dataclass defined in the recipe's params module (shipped ones are imported by module name)."""
    if is_shipped(recipe_path):
        module = importlib.import_module(f"recipes.params.{recipe_path.stem}")
        source = f"recipes/params/{recipe_path.stem}.py"
    else:
        path = params_file(recipe_path)
        module_name = path.stem if path.stem.endswith("_params") else f"{recipe_path.stem}_params"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        source = str(path)
    classes = [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
    ]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise MytuneError(f"{source} must define exactly one params dataclass, found {names}")
    return classes[0]
