"""Checks the launcher makes before it runs a recipe, so a mistake is one clear line, not a traceback per rank.

- `check_params_import`: a copied recipe imports its params (`from my_lora_params import ...`) from its own
  directory; when that file was moved or renamed, say which file is missing and where it was expected.
- `check_config_fits`: a `--config` whose keys are mostly not fields of the recipe's params was probably written
  for another recipe; say so and name the shipped recipe it fits, instead of reporting the first unknown key.
- `validate_recipe_args`: parse `--config`/`--override` once in the launcher (torchrun path), so a bad value is
  reported once, before any process starts.
"""

import argparse
import ast
import dataclasses
import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path

from mytune.errors import ConfigError, MytuneError


def imported_params_modules(recipe_path: Path) -> list[tuple[str, int]]:
    """(module, line) of the module-level imports of params modules: `<name>_params` or `recipes.params.<name>`."""
    try:
        tree = ast.parse(recipe_path.read_text(encoding="utf-8"), filename=str(recipe_path))
    except (OSError, SyntaxError, ValueError):
        return []  # the recipe itself will report it when it runs
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names if _is_params_module(name)]
    return found


def _is_params_module(name: str) -> bool:
    return name.endswith("_params") or name.startswith("recipes.params.")


def check_params_import(recipe_path: Path) -> None:
    """Raise MytuneError when the recipe imports a params module that cannot be found from where it will run."""
    for module, line in imported_params_modules(recipe_path):
        if "." not in module:
            # Run as a script, the recipe's directory is sys.path[0]: that is where `mytune cp` put the params.
            # (PathFinder looks at files only; importlib.util.find_spec would accept a stale sys.modules entry.)
            if PathFinder.find_spec(module, [str(recipe_path.parent), *sys.path]) is not None:
                continue
            raise MytuneError(
                f"{recipe_path.name} line {line} imports its params from `{module}`, but "
                f"{recipe_path.parent / f'{module}.py'} does not exist: move the params file back next to the recipe, "
                f"or fix the import"
            )
        if not _findable(module):
            raise MytuneError(
                f"{recipe_path.name} line {line} imports `{module}`, which does not exist: the recipe and its params "
                f"file do not match (a copy should import its own `<name>_params`; see `mytune cp`)"
            )


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def config_argument(recipe_args: list[str]) -> str | None:
    """The value of `--config` in the recipe's arguments (`--config x` or `--config=x`), if any."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    try:
        known, _ = parser.parse_known_args(recipe_args)
    except SystemExit:
        return None
    return known.config


def check_config_fits(recipe_name: str, params_cls: type, config_path: Path, *, this_recipe: Path | None = None) -> None:
    """Raise MytuneError when most keys of `config_path` are not fields of `params_cls` (a config for another recipe).

    One or two typos in an otherwise fitting config are left to the params parser ("did you mean").
    """
    from mytune.config.load import read_yaml

    try:
        keys = list(read_yaml(config_path))
    except ConfigError:
        return  # the recipe's parser reports a broken YAML itself
    fields = {f.name for f in dataclasses.fields(params_cls) if f.init}
    unknown = [key for key in keys if key not in fields]
    if len(unknown) < 2 or len(unknown) * 2 <= len(keys):
        return
    shown = ", ".join(f"`{k}`" for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    owner = _best_fitting_recipe(config_path, keys, exclude=this_recipe)
    hint = f"it looks like a config of `{owner}`" if owner else "it may be a config of another recipe"
    raise MytuneError(
        f"config {config_path} does not fit recipe {recipe_name}: {len(unknown)} of its {len(keys)} keys are not "
        f"params of {recipe_name} ({shown}); {hint} (see `mytune ls` and `mytune {recipe_name} --help`)"
    )


def _best_fitting_recipe(config_path: Path, keys: list[str], exclude: Path | None) -> str | None:
    """The shipped recipe this config belongs to: one of whose shipped configs it is a copy of, else the recipe
    whose params know every key with the fewest fields to spare; None when no recipe knows every key."""
    from mytune.cli.recipes import load_params_class, shipped_recipes
    from mytune.config import configs

    text = config_path.read_bytes()
    ranked = []
    for name, path in shipped_recipes().items():
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            fields = {f.name for f in dataclasses.fields(load_params_class(path)) if f.init}
        except Exception:  # a broken shipped params module is not this user's problem here
            continue
        if not all(key in fields for key in keys):
            continue
        configs_dir = configs.recipe_configs_dir(name)
        is_copy = configs_dir is not None and configs_dir.is_dir() and any(
            shipped.read_bytes() == text for shipped in configs_dir.rglob("*.y*ml")
        )
        ranked.append((not is_copy, len(fields) - len(keys), name))
    return min(ranked)[2] if ranked else None


def check_launcher_flags(recipe, shown_name: str, recipe_args: list[str], before: list[str] = ()) -> None:
    """Raise MytuneError when torchrun flags follow a recipe that parses its args with a params class: "put
    launcher flags before the recipe: mytune --nproc_per_node 2 <recipe> ...". A script without params may take
    any flag of its own, so it is left alone."""
    from mytune.cli import recipes
    from mytune.config.hints import misplaced_launcher_flags

    hint = misplaced_launcher_flags(shown_name, recipe_args, before)
    path = recipes.recipe_file(recipe)
    if hint is None or path is None:
        return
    try:
        recipes.load_params_class(path)
    except Exception:  # no params class: the recipe reads its own arguments
        return
    raise MytuneError(hint)


def precheck(recipe, recipe_args: list[str], *, validate: bool) -> None:
    """The checks before running `recipe` (a resolved recipe: a Path or a ModuleRecipe) with `recipe_args`.

    The params import and config-fit checks always run; with `validate` the whole `--config`/`--override` parse
    runs too (the torchrun path, so one process reports a bad value instead of every rank). Recipes without a
    params file (any script can be a recipe) are not checked.
    """
    from mytune.cli import recipes

    path = recipes.recipe_file(recipe)
    if path is None:
        return
    check_params_import(path)
    if "-h" in recipe_args or "--help" in recipe_args:
        return
    try:
        params_cls = recipes.load_params_class(path)
    except Exception:  # no params file, or one the recipe loads its own way: the recipe reports its own errors
        return
    from mytune.config import TuneArgumentParser, require_input_paths

    parser = TuneArgumentParser(params_cls, recipe=path, prog=recipe.stem)
    config = config_argument(recipe_args)
    if config:
        try:
            config_path = parser.resolve_config(config)
        except ConfigError:
            config_path = None  # reported by the parser below, or by the recipe
        if config_path is not None:
            check_config_fits(recipe.stem, params_cls, config_path, this_recipe=path)
    if validate:
        params = parser.parse_params(recipe_args)  # user errors: one line `<recipe>: error: ...`, SystemExit(2)
        require_input_paths(params)
