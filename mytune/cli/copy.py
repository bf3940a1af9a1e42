"""`mytune cp`: copy a shipped recipe (with its params file) or a config, to edit it.

A copied recipe `dest/my_ft.py` gets its params next to it as `my_ft_params.py`, and its import line
`from recipes.params.<recipe> import` is rewritten to `from my_ft_params import`, so the copy runs standalone
(`mytune dest/my_ft.py --config ...` or `python dest/my_ft.py ...`). Its first line names the source recipe
(`# mytune: copied from <recipe>`), so the source's shipped configs still work by name (`--config tiny_demo`).
"""

import os
import shutil
from pathlib import Path

from mytune.config import configs
from mytune.errors import MytuneError


def copy_recipe(recipe: str, recipe_file: Path, params_file: Path, dest: str | Path, *, force: bool = False) -> list[Path]:
    """Copy `recipe_file` to `dest` (a file, or a directory -> dest/<recipe>.py) plus its params file; returns both."""
    target = _target(dest, f"{recipe}.py")
    if target.suffix != ".py":
        raise MytuneError(f"recipe destination {dest} must end in .py (e.g. {target.name}.py)")
    if not target.stem.isidentifier():
        raise MytuneError(f"recipe destination {target.name} must be a valid Python module name (letters, digits, _)")
    params_target = target.with_name(f"{target.stem}_params.py")
    _refuse_overwrite([target, params_target], force)

    old_import = f"from recipes.params.{recipe} import"
    text = recipe_file.read_text()
    if old_import not in text:
        raise MytuneError(f"{recipe_file} does not contain `{old_import}`: cannot make a standalone copy")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_with_copy_marker(text.replace(old_import, f"from {target.stem}_params import"), recipe))
    shutil.copymode(recipe_file, target)
    shutil.copyfile(params_file, params_target)
    return [target, params_target]


def _with_copy_marker(text: str, recipe: str) -> str:
    """`text` with the line naming its source recipe on top (after a `#!` line), so the copy keeps the source's
    shipped configs by name (`mytune ./my_ft.py --config tiny_demo`; see `configs.copied_from`)."""
    marker = configs.copy_marker(recipe)
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith(configs.COPY_MARKER)]
    at = 1 if lines and lines[0].startswith("#!") else 0
    return "".join([*lines[:at], marker, *lines[at:]])


def copy_config(recipe: str, config: str, dest: str | Path, *, force: bool = False) -> Path:
    """Copy `recipes/configs/<recipe>/<config>.yaml` (nested names like `experiments/long` too) to `dest` (a file,
    or a directory -> dest/<file name>)."""
    source = configs.shipped_config(recipe, config)
    if source is None:
        from mytune.cli.recipes import did_you_mean

        names = configs.config_names(recipe)
        hint = did_you_mean(config, names, f"configs of {recipe}: {', '.join(names) or 'none'}",
                            show=lambda c: f"{recipe}/{c}")
        raise MytuneError(f"unknown config `{recipe}/{config}`: {hint}")
    target = _target(dest, source.name)
    _refuse_overwrite([target], force)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _target(dest: str | Path, default_name: str) -> Path:
    """A directory (existing, or written with a trailing slash) gets `default_name` inside it."""
    dest_text = str(dest)
    dest = Path(dest)
    if dest.is_dir() or dest_text.endswith(("/", os.sep)):
        return dest / default_name
    return dest


def _refuse_overwrite(targets: list[Path], force: bool) -> None:
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise MytuneError(f"{', '.join(existing)} already exists: pass --force to overwrite")
