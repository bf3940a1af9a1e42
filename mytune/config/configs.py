"""Where the shipped recipes and their YAML configs live, found without importing anything heavy.

The `recipes` package is located with `importlib.util.find_spec`, which reads no module code, so `mytune ls`,
`--help` and config-name resolution never import torch.
"""

import importlib.util
from functools import lru_cache
from pathlib import Path

NOT_RECIPES = frozenset({"__init__", "interfaces"})


@lru_cache(maxsize=1)
def recipes_dir() -> Path | None:
    """The directory of the importable `recipes` package, or None when there is none."""
    try:
        spec = importlib.util.find_spec("recipes")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def recipe_configs_dir(recipe: str) -> Path | None:
    """`recipes/configs/<recipe>/`, whether or not it exists; None when there is no recipes package."""
    root = recipes_dir()
    return None if root is None else root / "configs" / recipe


def config_names(recipe: str) -> list[str]:
    """Sorted names of the YAML configs shipped for `recipe`: file stems, with their subfolder for nested ones
    (`recipes/configs/<recipe>/experiments/long.yaml` -> `experiments/long`)."""
    configs = recipe_configs_dir(recipe)
    if configs is None or not configs.is_dir():
        return []
    return sorted(
        p.relative_to(configs).with_suffix("").as_posix()
        for p in configs.rglob("*")
        if p.suffix in (".yaml", ".yml") and p.is_file()
    )


def shipped_config(recipe: str, name: str) -> Path | None:
    """`recipes/configs/<recipe>/<name>.yaml` (or `.yml`, or `name` with its suffix), nested names included;
    None when there is no such shipped config. Names leaving the recipe's folder (`..`, absolute) are not configs."""
    configs = recipe_configs_dir(recipe)
    if configs is None or not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        return None
    for candidate in (configs / f"{name}.yaml", configs / f"{name}.yml", configs / name):
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    return None


def shipped_recipe_names() -> list[str]:
    """Sorted stems of `recipes/*.py`, without `__init__` and `interfaces`."""
    root = recipes_dir()
    if root is None:
        return []
    return sorted(p.stem for p in root.glob("*.py") if p.stem not in NOT_RECIPES)


COPY_MARKER = "# mytune: copied from "  # `mytune cp` writes it atop a copied recipe; its configs stay usable by name
COPY_MARKER_LINES = 5  # the marker is looked for in a recipe's first lines only


def copy_marker(recipe: str) -> str:
    """The marker line `mytune cp` puts atop a copy of the shipped `recipe`."""
    return f"{COPY_MARKER}{recipe} (its shipped configs work by name: --config NAME)\n"


def copied_from(recipe_file: str | Path) -> str | None:
    """The shipped recipe a `mytune cp` copy was made from (its marker line), or None for any other file."""
    try:
        with open(recipe_file, encoding="utf-8") as f:
            head = [f.readline() for _ in range(COPY_MARKER_LINES)]
    except (OSError, UnicodeDecodeError):
        return None
    for line in head:
        if line.startswith(COPY_MARKER):
            name = line.removeprefix(COPY_MARKER).partition(" ")[0].strip()
            return name if name.isidentifier() else None
    return None
