"""`mytune <recipe> --help` and `mytune validate` parse without importing torch; misplaced torchrun flags."""

import subprocess
import sys
from pathlib import Path

import pytest

from mytune.cli.main import main

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
RECIPES = ["full_finetune_single_device", "full_finetune_distributed", "lora_finetune_single_device",
           "lora_finetune_distributed", "generate"]


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, then fail if it imported torch (or the recipe modules)."""
    check = "; heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    return subprocess.run([sys.executable, "-c", "import sys; " + code + check], capture_output=True, text=True,
                          env=ENV, cwd=REPO)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_help_does_not_import_torch_and_says_mytune(recipe):
    result = run_without_torch(f"from mytune.cli.main import main; assert main([{recipe!r}, '--help']) == 0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: mytune {recipe} [-h]"), result.stdout[:200]
    assert "params (set in the config or with --override key=value):" in result.stdout
    assert ".py" not in result.stdout.splitlines()[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_validate_does_not_import_torch(recipe):
    result = run_without_torch(
        f"from mytune.cli.main import main; assert main(['validate', {recipe!r}, '--config', 'tiny_demo']) == 0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"OK: {recipe} config valid\n")


def test_torchrun_flags_after_the_recipe_are_one_line(capsys):
    assert main(["full_finetune_distributed", "--nproc_per_node", "2", "--config", "tiny_demo"]) == 2
    assert capsys.readouterr().err == (
        "mytune: error: --nproc_per_node is a torchrun flag: put launcher flags before the recipe: "
        "mytune --nproc_per_node 2 full_finetune_distributed --config tiny_demo\n")


def test_torchrun_flags_after_the_recipe_under_the_launcher(capsys):
    pytest.importorskip("torch")
    assert main(["--nnodes", "1", "full_finetune_distributed", "--nproc-per-node=2", "--config", "tiny_demo"]) == 2
    expected = "mytune --nnodes 1 --nproc-per-node=2 full_finetune_distributed --config tiny_demo\n"
    assert capsys.readouterr().err.endswith("put launcher flags before the recipe: " + expected)


def test_a_script_without_params_keeps_its_own_launcher_named_flags(tmp_path, capsys):
    script = tmp_path / "plain_script.py"
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\n")
    assert main([str(script), "--log_dir", "logs"]) == 0
    assert "ARGS ['--log_dir', 'logs']" in capsys.readouterr().out
