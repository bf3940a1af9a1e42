"""A throwaway `recipes`-like layout in tmp_path, so the CLI tests do not depend on the shipped recipes."""

import sys
from pathlib import Path

import pytest

from mytune.config import configs

FAKE_RECIPE = '''"""A fake recipe: parses its params and prints them."""

import sys

from mytune import TuneArgumentParser
from mytune.errors import MytuneError
from recipes.params.fake_ft import FakeParams


def main() -> None:
    params = TuneArgumentParser(FakeParams, recipe=__file__, description="fake").parse_params()
    if params.fail:
        raise MytuneError("fake failure requested")
    print(f"RESULT {params} argv={sys.argv[1:]}")
    sys.exit(params.exit_code)


if __name__ == "__main__":
    main()
'''

FAKE_PARAMS = '''from dataclasses import dataclass
from typing import ClassVar


@dataclass
class FakeParams:
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("data_path",)

    lr: float = 0.1  # learning rate
    epochs: int = 1  # passes over the data
    data_path: str = ""  # training data file
    exit_code: int = 0  # the recipe exits with this code
    fail: bool = False  # raise a MytuneError
'''


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch) -> Path:
    """tmp_path/recipes with recipe `fake_ft` (configs: small), plus __init__/interfaces that are not recipes."""
    root = tmp_path / "recipes"
    (root / "params").mkdir(parents=True)
    (root / "configs" / "fake_ft").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "interfaces.py").write_text("")
    (root / "fake_ft.py").write_text(FAKE_RECIPE)
    (root / "params" / "fake_ft.py").write_text(FAKE_PARAMS)
    (root / "configs" / "fake_ft" / "small.yaml").write_text("lr: 0.5\nepochs: 2\n")
    monkeypatch.setattr(configs, "recipes_dir", lambda: root)
    return root


@pytest.fixture(autouse=True)
def forget_imported_params_modules():
    """Copied recipes import `<stem>_params` modules; drop them so each test imports its own files."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.endswith("_params"):
            del sys.modules[name]
