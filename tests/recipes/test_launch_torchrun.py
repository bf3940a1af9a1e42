"""`mytune [torchrun flags] <recipe>` for real: flags passed through, concurrent jobs on one node, two "nodes" on
loopback running the FSDP recipe, a copied recipe and a module-path recipe run from elsewhere, one-line errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mytune.cli.launch import parse_torchrun_args, use_free_port_on_one_node
from mytune.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
MYTUNE = [sys.executable, "-m", "mytune.cli.main"]

# A recipe that joins the process group, checks a collective, and records what torchrun gave it.
PROBE_RECIPE = """import json, os, sys, time
import torch, torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))  # hold the group, so concurrent jobs overlap
out = sys.argv[1]
with open(f"{out}.{dist.get_rank()}.json", "w") as f:
    json.dump({"argv": sys.argv[2:], "sum": total.item(), "master_port": os.environ["MASTER_PORT"],
               "env": {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                                        "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID")}}, f)
dist.destroy_process_group()
"""

MODULE_RECIPES = """import json, os, sys
from mytune.errors import MytuneError


def record(tag, argv):
    with open(f"{tag}.{os.environ.get('RANK', 'none')}.json", "w") as f:
        json.dump({"argv": argv, "world": os.environ.get("WORLD_SIZE")}, f)


def lr_sweep(argv):
    record("lr_sweep", argv)


def broken(argv):
    raise MytuneError("broken flavor")


if __name__ == "__main__":
    record("main", sys.argv[1:])
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], cwd: Path, timeout: int = 180, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MYTUNE, *argv], capture_output=True, text=True, cwd=cwd, env={**env(), **extra_env},
                          timeout=timeout)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("flags", "standalone"),
    [
        (["--nproc_per_node", "2"], True),                                  # one node, nothing given: a free port
        (["--nnodes", "1:1", "--nproc_per_node", "2"], True),
        (["--nproc_per_node", "2", "--master_port", "29500"], False),      # an explicit port is kept, even 29500
        (["--rdzv_backend", "c10d", "--rdzv_endpoint", "h:1"], False),
        (["--rdzv_endpoint", "h:1"], False),
        (["--nnodes", "2", "--master_addr", "h"], False),                  # several nodes must agree on a port
    ],
)
def test_free_port_only_when_no_rendezvous_is_given(flags, standalone):
    args = parse_torchrun_args([*flags, "recipe.py"])
    use_free_port_on_one_node(args)
    assert args.standalone is standalone
    assert args.master_port == 29500


@pytest.mark.slow
def test_every_torchrun_flag_passes_through(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE_RECIPE)
    port = free_port()
    result = run(["--nnodes", "1", "--nproc-per-node=2", "--node_rank", "0", "--max_restarts", "1",
                  "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "job42",
                  "--monitor_interval", "0.1", "probe.py", str(tmp_path / "p"), "--config=x", "--override", "a=1"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        seen = load(tmp_path / f"p.{rank}.json")
        assert seen["argv"] == ["--config=x", "--override", "a=1"]
        assert seen["sum"] == 3.0
        assert seen["env"] == {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                               "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RUN_ID": "job42"}


@pytest.mark.slow
def test_two_jobs_without_endpoint_share_a_node(tmp_path):
    """Neither job names a port: each gets a free one, both finish (torchrun's default 29500 would collide)."""
    (tmp_path / "probe.py").write_text(PROBE_RECIPE)
    jobs = [
        subprocess.Popen([*MYTUNE, "--nproc_per_node", "2", "probe.py", str(tmp_path / name)],
                         cwd=tmp_path, env={**env(), "PROBE_SLEEP": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for name in ("a", "b")
    ]
    outputs = [job.communicate(timeout=180) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in outputs]
    ports = {load(tmp_path / f"{name}.{rank}.json")["master_port"] for name in ("a", "b") for rank in (0, 1)}
    assert len(ports) == 2 and "29500" not in ports


@pytest.mark.slow
def test_two_nodes_on_loopback_run_the_fsdp_recipe(tmp_path):
    """Two launchers, one per "node", meet at a c10d rendezvous on 127.0.0.1 and train one model together."""
    port = free_port()
    argv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", "loopback", "--local_addr", "127.0.0.1",
            "full_finetune_distributed", "--config", "tiny_demo",
            "--override", f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=2", "epochs=1", "log_every_n_steps=1"]
    nodes = [subprocess.Popen([*MYTUNE, *argv], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    stdout = "".join(out for out, _ in outputs)
    assert "sharded over 2 process(es)" in stdout and stdout.count("saved checkpoint to") == 1
    assert (tmp_path / "out" / "step_2" / "model.safetensors").is_file()
    assert [row["step"] for row in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_copied_recipe_runs_from_another_directory_in_process_and_under_torchrun(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run(["cp", "full_finetune_distributed", str(work / "my_ft.py")], cwd=tmp_path).returncode == 0
    assert run(["cp", "full_finetune_distributed/tiny_demo", "work/my.yaml"], cwd=tmp_path).returncode == 0
    short = ["max_steps_per_epoch=1", "epochs=1"]

    # Relative paths, in-process (a world of one), `--config PATH`.
    result = run(["../work/my_ft.py", "--config", "../work/my.yaml", "--override", "output_dir=rel", *short], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "rel" / "step_1" / "model.safetensors").is_file()
    # Absolute paths, under torchrun with 2 processes, `--config=PATH`: each rank imports my_ft_params from work/.
    result = run(["--nproc_per_node", "2", str(work / "my_ft.py"), f"--config={work / 'my.yaml'}",
                  "--override", "output_dir=abs", *short], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded over 2 process(es)" in result.stdout
    assert (elsewhere / "abs" / "step_1" / "model.safetensors").is_file()


@pytest.mark.slow
def test_module_path_recipe_under_torchrun(tmp_path):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "my_recipes.py").write_text(MODULE_RECIPES)
    result = run(["--nproc_per_node", "2", "my_pkg.my_recipes:lr_sweep", "--config=x", "--override", "lr=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert load(tmp_path / f"lr_sweep.{rank}.json") == {"argv": ["--config=x", "--override", "lr=1"], "world": "2"}
    result = run(["--nproc_per_node", "1", "my_pkg.my_recipes", "--config", "y"], tmp_path)  # python -m my_pkg.my_recipes
    assert result.returncode == 0, result.stderr[-3000:]
    assert load(tmp_path / "main.0.json") == {"argv": ["--config", "y"], "world": "1"}
    result = run(["--nproc_per_node", "1", "my_pkg.my_recipes:broken"], tmp_path)
    assert result.returncode == 2
    assert "my_pkg.my_recipes:broken: error: broken flavor" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "mytune: error: my_recipes failed on rank 0 with exit code 2"


def test_launcher_reports_user_errors_once_before_starting_processes(tmp_path, capsys, monkeypatch):
    """Checked in the launcher: one line, exit code 2, and no worker ever started (so no per-rank tracebacks)."""
    from torch.distributed import run as torchrun

    from mytune.cli.main import main

    monkeypatch.setattr(torchrun, "run", lambda args: pytest.fail("no process may start"))
    work = tmp_path / "work"
    assert main(["cp", "full_finetune_distributed", str(work / "my_ft.py")]) == 0
    (work / "my_ft_params.py").rename(work / "renamed.py")
    import_line = 1 + (work / "my_ft.py").read_text().splitlines().index(
        "from my_ft_params import FullFinetuneDistributedParams")
    other_recipe_config = tmp_path / "other.yaml"
    other_recipe_config.write_text("lora_rank: 8\nlora_alpha: 16\nlora_dropout: 0.05\nlr: 1e-4\n")
    cases = [
        (["full_finetune_distributed", "--config", "tiny_demo", "--override", "lrr=1"],
         "full_finetune_distributed: error: unknown key `lrr` on the command line; did you mean `lr`?"),
        (["full_finetune_distributed", "--config", str(other_recipe_config)],
         f"mytune: error: config {other_recipe_config} does not fit recipe full_finetune_distributed: 3 of its 4 keys"),
        (["full_finetune_distributed", "--config", "tiny_demo", "--override", "dataset_path=/no/such.jsonl"],
         "mytune: error: dataset_path: /no/such.jsonl does not exist"),
        ([str(work / "my_ft.py"), "--config", "tiny_demo"],
         f"mytune: error: my_ft.py line {import_line} imports its params from `my_ft_params`, but "
         f"{work / 'my_ft_params.py'} does not exist"),
        (["full_finetune_distribute"], "mytune: error: unknown recipe `full_finetune_distribute`: did you mean "
                                       "`full_finetune_distributed`"),
    ]
    capsys.readouterr()
    for recipe_argv, expected in cases:
        assert main(["--nproc_per_node", "2", *recipe_argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err
