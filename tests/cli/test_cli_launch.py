"""`mytune [torchrun flags] <recipe>`: torch's own flag parser, recipe resolution, the single-device refusal."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.run")

from mytune.cli.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

ENV_RECIPE = """import os, sys
with open(sys.argv[1], "w") as f:
    f.write(f"{os.environ['WORLD_SIZE']} {os.environ['RANK']} {sys.argv[2:]}")
"""


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "flags", [["--nproc_per_node", "2"], ["--nproc-per-node=4"], ["--nnodes", "1:2", "--nproc_per_node", "1"]]
)
def test_single_device_recipe_refuses_more_than_one_process(tmp_path, capsys, flags):
    recipe = tmp_path / "full_finetune_single_device.py"
    recipe.write_text("raise SystemExit('must not run')")
    assert main([*flags, str(recipe), "--config", "x"]) == 2
    assert one_error_line(capsys) == (
        "mytune: error: full_finetune_single_device runs on one device; use full_finetune_distributed for N processes"
    )


def test_unknown_recipe_and_bad_flags_are_one_line(capsys):
    assert main(["--nproc_per_node", "1", "no_such_recipe_xyz"]) == 2
    assert one_error_line(capsys).startswith("mytune: error: unknown recipe `no_such_recipe_xyz`")
    assert main(["--nproc_per_node"]) == 2
    assert "expected one argument" in one_error_line(capsys)
    assert main(["--no-such-torchrun-flag", "x"]) == 2
    assert one_error_line(capsys).startswith("mytune: error: unrecognized arguments: --no-such-torchrun-flag")


def test_torchrun_runs_the_resolved_recipe_with_its_args(tmp_path):
    recipe = tmp_path / "env_single_device.py"
    recipe.write_text(ENV_RECIPE)
    out = tmp_path / "out.txt"
    result = subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--standalone", "--nproc_per_node", "1", str(recipe), str(out),
         "--config", "c", "--override", "a=1"],
        capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "1 0 ['--config', 'c', '--override', 'a=1']"


def test_torchrun_failure_returns_the_recipes_exit_code(tmp_path):
    recipe = tmp_path / "failing.py"
    recipe.write_text("import sys\nprint('failing: error: boom', file=sys.stderr)\nsys.exit(2)\n")
    result = subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--standalone", "--nproc_per_node", "1", str(recipe)],
        capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert "failing: error: boom" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "mytune: error: failing failed on rank 0 with exit code 2"


def test_threads_per_process_are_set_once_and_said_in_one_line(monkeypatch, capsys):
    """Without OMP_NUM_THREADS, torchrun would set 1 and print its four-line banner for every multi-process run."""
    import os

    from mytune.cli.launch import set_threads_per_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    set_threads_per_process("4")
    assert os.environ["OMP_NUM_THREADS"] == "4"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OMP_NUM_THREADS=4 for each of the 4 processes" in err

    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands, silently
    set_threads_per_process("4")
    assert os.environ["OMP_NUM_THREADS"] == "3" and capsys.readouterr().err == ""
    monkeypatch.delenv("OMP_NUM_THREADS")
    set_threads_per_process("1")  # one process: nothing to share
    assert "OMP_NUM_THREADS" not in os.environ
