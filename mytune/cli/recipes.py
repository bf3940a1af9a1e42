"""Find recipes, their configs and their params dataclasses by listing files (never importing torch).

A recipe is a shipped name (`recipes/<name>.py`) or a path to a `.py` file, e.g. a copy made by `mytune cp`
whose params live next to it in `<stem>_params.py`.
"""

import dataclasses
import difflib
import importlib
import importlib.util
import sys
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


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe name -> `recipes/<name>.py`; else an existing `.py` path; else `MytuneError` with hints."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    if path.suffix == ".py":
        raise MytuneError(f"recipe file {name_or_path} does not exist")
    close = closest(name_or_path, list(shipped))
    hint = f"did you mean {', '.join(f'`{c}`' for c in close)}?" if close else f"shipped recipes: {', '.join(shipped) or 'none'}"
    raise MytuneError(f"unknown recipe `{name_or_path}`: {hint} (or pass a path to a recipe .py file; see `mytune ls`)")


def is_shipped(recipe_path: Path) -> bool:
    root = configs.recipes_dir()
    return root is not None and recipe_path.resolve().parent == root and recipe_path.stem in shipped_recipes()


def params_file(recipe_path: Path) -> Path:
    """The params file of a recipe: `<stem>_params.py` next to it, else `params/<stem>.py` beside it."""
    for candidate in (recipe_path.with_name(f"{recipe_path.stem}_params.py"), recipe_path.parent / "params" / f"{recipe_path.stem}.py"):
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
