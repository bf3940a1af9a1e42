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
    """Sorted names (file stems) of the YAML configs shipped for `recipe`."""
    configs = recipe_configs_dir(recipe)
    if configs is None or not configs.is_dir():
        return []
    return sorted(p.stem for p in configs.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def shipped_recipe_names() -> list[str]:
    """Sorted stems of `recipes/*.py`, without `__init__` and `interfaces`."""
    root = recipes_dir()
    if root is None:
        return []
    return sorted(p.stem for p in root.glob("*.py") if p.stem not in NOT_RECIPES)
