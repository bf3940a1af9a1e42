"""Configs in subfolders of recipes/configs/<recipe>/, and a `mytune cp` copy using its source's configs by name."""

import subprocess
import sys
from pathlib import Path

import pytest

from mytune.cli.main import main
from mytune.config import configs

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


@pytest.fixture
def importable(fake_recipes, monkeypatch) -> Path:
    """The fake layout's `recipes` package importable by name (the real one forgotten while the test runs)."""
    for name in [n for n in sys.modules if n == "recipes" or n.startswith("recipes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake_recipes.parent))
    return fake_recipes


def nest(fake_recipes: Path) -> Path:
    nested = fake_recipes / "configs" / "fake_ft" / "experiments" / "long.yaml"
    nested.parent.mkdir()
    nested.write_text("lr: 0.75\nepochs: 5\n")
    return nested


def test_ls_lists_nested_configs(fake_recipes, capsys):
    nest(fake_recipes)
    assert configs.config_names("fake_ft") == ["experiments/long", "small"]
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["fake_ft", "experiments/long,", "small"]


def test_nested_config_by_name_runs_validates_and_copies(importable, tmp_path, capsys):
    nested = nest(importable)
    for name in ("experiments/long", "experiments/long.yaml"):
        assert main(["fake_ft", "--config", name]) == 0
        assert "RESULT FakeParams(lr=0.75, epochs=5" in capsys.readouterr().out
    assert main(["validate", "fake_ft", "--config", "experiments/long"]) == 0
    assert main(["cp", "fake_ft/experiments/long", str(tmp_path)]) == 0
    assert (tmp_path / "long.yaml").read_text() == nested.read_text()
    capsys.readouterr()
    assert main(["fake_ft", "--config", "experiments/lnog"]) == 2
    assert "did you mean `experiments/long`?" in capsys.readouterr().err


def test_a_local_file_path_with_a_slash_wins_over_a_nested_name(importable, tmp_path, capsys, monkeypatch):
    nest(importable)
    local = tmp_path / "experiments" / "long.yaml"
    local.parent.mkdir()
    local.write_text("lr: 0.125\n")
    monkeypatch.chdir(tmp_path)
    assert main(["fake_ft", "--config", "experiments/long.yaml"]) == 0
    assert "RESULT FakeParams(lr=0.125" in capsys.readouterr().out


def test_copied_recipe_uses_its_sources_configs_by_name(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "x.py"
    nest(fake_recipes)
    assert main(["cp", "fake_ft", str(dest)]) == 0
    assert dest.read_text().splitlines()[0].startswith("# mytune: copied from fake_ft ")
    assert configs.copied_from(dest) == "fake_ft"
    capsys.readouterr()
    assert main([str(dest), "--config", "small"]) == 0
    assert "RESULT FakeParams(lr=0.5, epochs=2" in capsys.readouterr().out
    assert main([str(dest), "--config", "experiments/long", "--override", "epochs=6"]) == 0
    assert "RESULT FakeParams(lr=0.75, epochs=6" in capsys.readouterr().out
    assert main(["validate", str(dest), "--config", "small"]) == 0
    assert main([str(dest), "--help"]) == 0
    assert "configs for fake_ft (--config NAME): experiments/long, small" in capsys.readouterr().out


def test_copied_recipe_finds_shipped_configs_from_a_real_process(tmp_path):
    """The real layout: `mytune cp` a shipped recipe, then its copy validates `--config tiny_demo`."""
    copy = subprocess.run([sys.executable, "-m", "mytune.cli.main", "cp", "full_finetune_single_device",
                           str(tmp_path / "x.py")], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert copy.returncode == 0, copy.stderr
    result = subprocess.run([sys.executable, "-m", "mytune.cli.main", "validate", "./x.py", "--config", "tiny_demo"],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OK: x config valid\n"


def test_a_file_without_the_marker_has_no_source(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text('"""A recipe."""\n# mytune: copied from ../etc\n')
    assert configs.copied_from(plain) is None
    assert configs.copied_from(tmp_path / "missing.py") is None
