"""FSDP2 recipe end to end: 2 CPU processes (gloo) match the single-device recipe on the same global batch (training
and validation loss), and rank 0 writes a checkpoint that transformers loads."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from mytune.config import TuneArgumentParser
from mytune.training.distributed import destroy_distributed
from mytune.training.metrics import read_metrics
from recipes import full_finetune_distributed as dist_recipe
from recipes import full_finetune_single_device as single_recipe
from recipes.params.full_finetune_distributed import FullFinetuneDistributedParams
from recipes.params.full_finetune_single_device import FullFinetuneParams

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# Same data (unshuffled), seed and hyper-parameters; the distributed run has half the per-process batch on 2 ranks.
# 101 validation samples (an odd number: rank 1's last one is a wrap-around repeat that must not count), evaluated
# after steps 2 and 4.
COMMON = ["shuffle=false", "dtype=fp32", "epochs=1", f"max_steps_per_epoch={STEPS}", "log_every_n_steps=1",
          "gradient_accumulation_steps=2", "warmup_steps=1", "val_fraction=0.0505", "eval_every_n_steps=2"]


def torchrun_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MYTUNE_DATA_CACHE": str(cache)}


def two_ranks(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "full_finetune_distributed",
         "--config", "tiny_demo", "--override", f"output_dir={out}", *overrides],
        capture_output=True, text=True, env=torchrun_env(out.parent / f"{out.name}-cache"), cwd=out.parent,
        timeout=300,
    )


def start_two_ranks(out: Path, *overrides: str) -> subprocess.Popen:
    """`two_ranks` without waiting: the launcher's Popen (text stdout and stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "full_finetune_distributed",
         "--config", "tiny_demo", "--override", f"output_dir={out}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=torchrun_env(out.parent / f"{out.name}-cache"), cwd=out.parent,
    )


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    result = two_ranks(out, "batch_size=2", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_ranks_match_single_device_on_the_same_global_batch(two_rank_run, tmp_path):
    out, _ = two_rank_run
    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    params = parser.parse_params(
        ["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "batch_size=4",
         f"dataset_cache_dir={tmp_path / 'cache'}", *COMMON]
    )
    single_recipe.recipe_main(params)

    sharded = read_metrics(out / "metrics.jsonl")
    single = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in sharded] == list(range(1, STEPS + 1))
    assert [r["num_tokens"] for r in sharded] == [r["num_tokens"] for r in single]  # the same samples per step
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(sharded, single))
    norm_diff = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(sharded, single))
    print(f"FSDP vs single-device full: max loss diff {loss_diff:.2e}, max grad-norm diff {norm_diff:.2e}")
    assert loss_diff < 1e-5, (loss_diff, sharded, single)
    assert norm_diff < 1e-4, norm_diff
    assert sharded[-1]["loss"] < sharded[0]["loss"]  # it trains (and the later steps still agree)
    # Validation: each rank evaluates its shard, the sums are all-reduced; the repeat on rank 1 is left out.
    assert [r["step"] for r in sharded if "val_loss" in r] == [r["step"] for r in single if "val_loss" in r] == [2, 4]
    for a, b in zip(sharded, single):
        if "val_loss" in a:
            assert a["val_tokens"] == b["val_tokens"]
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-5, (a, b)


@pytest.mark.slow
def test_rank_zero_writes_one_checkpoint_that_transformers_loads(two_rank_run):
    from transformers import AutoModelForCausalLM

    from mytune.checkpoint import load_hf_model

    out, result = two_rank_run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.jsonl", f"step_{STEPS}"]
    assert result.stdout.count("saved checkpoint to") == 1  # rank 0 only logs
    assert result.stdout.count("dataset_path: 1216 samples") == 1
    assert result.stdout.count("val_loss") == 2 + 1  # two validations and the closing summary
    assert result.stdout.count("finetune_distributed done:") == 1  # rank 0 alone prints the closing summary
    state = torch.load(out / f"step_{STEPS}" / "recipe_state.pt", weights_only=True)
    assert state["dataloader_state"]["consumed"] == STEPS * 2 * 2 * 2  # steps x accumulation x batch x ranks
    assert state["optimizer_full_state_dict"] and state["global_step"] == STEPS
    ckpt = out / f"step_{STEPS}"
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    ours = load_hf_model(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert (hf_model(ids).logits - ours(ids)).abs().max().item() < 1e-5


def test_bf16_keeps_fp32_sharded_params_and_runs_as_a_world_of_one(tmp_path):
    """Without torchrun the recipe is a 1-process group; bf16 means fp32 master params and bf16 compute."""
    parser = TuneArgumentParser(FullFinetuneDistributedParams, recipe="full_finetune_distributed")
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "dtype=bf16",
                                  "max_steps_per_epoch=2", "epochs=1", "log_every_n_steps=1",
                                  f"dataset_cache_dir={tmp_path / 'cache'}"])
    recipe = dist_recipe.FullFinetuneRecipeDistributed(params)
    try:
        recipe.setup()
        assert {p.dtype for p in recipe.model.parameters()} == {torch.float32}
        assert all(isinstance(p, DTensor) for p in recipe.model.parameters())
        with torch.no_grad():
            assert recipe.model(next(iter(recipe.dataloader))["tokens"]).dtype == torch.bfloat16
        recipe.train()
        out_dir = recipe.save_checkpoint()
        recipe.cleanup()
    finally:
        destroy_distributed()  # also when a step above failed
    assert (out_dir / "model.safetensors").is_file()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_params_refuse_what_fsdp_cannot_do():
    from mytune.errors import ConfigError

    base = {"model": "llama_tiny", "tokenizer_path": "t", "dataset_path": "d"}
    with pytest.raises(ConfigError, match="device must be auto, cpu or cuda"):
        FullFinetuneDistributedParams(**base, device="mps")
    with pytest.raises(ConfigError, match="cpu_offload=true needs a GPU run"):
        FullFinetuneDistributedParams(**base, device="cpu", cpu_offload=True)


def test_packed_rows_train_and_validate_as_a_world_of_one(tmp_path):
    parser = TuneArgumentParser(FullFinetuneDistributedParams, recipe="full_finetune_distributed")
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "dtype=fp32",
                                  "packed=true", "batch_size=2", "max_steps_per_epoch=3", "epochs=1",
                                  "log_every_n_steps=1", "max_eval_batches=2", f"dataset_cache_dir={tmp_path / 'c'}"])
    recipe = dist_recipe.FullFinetuneRecipeDistributed(params)
    try:
        recipe.setup()
        batch = next(iter(recipe.dataloader))
        assert {"position_ids", "document_ids"} <= set(batch) and int(batch["document_ids"].max()) > 0
        recipe.train()
        recipe.cleanup()
    finally:
        destroy_distributed()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert "val_loss" in rows[-1] and math.isfinite(rows[-1]["val_perplexity"])


@pytest.mark.slow
def test_a_bad_row_stops_every_rank_with_one_error_line(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = (REPO / "mytune" / "assets" / "demo" / "alpaca_demo.jsonl").read_text().splitlines()[:20]
    lines[6] = json.dumps({"instruction": "no output"})
    data.write_text("\n".join(lines) + "\n")
    result = two_ranks(tmp_path / "out", f"dataset_path={data}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors[0] == (f"full_finetune_distributed: error: {data} line 7: missing column 'output' (columns present: "
                         "instruction); each row needs string columns instruction, input, output (the input is "
                         "optional) (set skip_bad_rows=true to skip bad rows and count them)"), result.stderr
    assert errors[1:] == ["mytune: error: full_finetune_distributed failed on rank 0 with exit code 2"], result.stderr


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=`rank` among the launcher's descendant processes (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    stack = [launcher.pid]
    while stack:
        for pid in children.get(stack.pop(), []):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
            stack.append(pid)
    raise AssertionError(f"no process with RANK={rank} under the launcher (pid {launcher.pid})")


@pytest.mark.slow
def test_two_ranks_sigterm_resume_latest_and_keep_last_n(tmp_path):
    """Three 2-process runs of 8 steps saving every 2 steps and keeping the last 2 checkpoints:

    - uninterrupted: the reference losses; step_2 and step_4 were pruned, step_6 and step_8 remain;
    - interrupted (alongside the first): SIGTERM to rank 1 once step_2 is complete; rank 0 learns of it through the
      per-step all-reduce, both ranks save the same step N together (the save is a collective) and exit 0;
    - resumed with `resume_from_checkpoint=latest` after a step_<N+1> holding weights but no recipe_state.pt was
      planted (a save cut off between the two writes): it resumes from step_N (gathered full optimizer state
      scattered back into the shards) and logs the reference losses for steps N+1..8.
    """
    run = ["batch_size=2", "dtype=bf16", "epochs=1", "max_steps_per_epoch=8", "log_every_n_steps=1",
           "warmup_steps=2", "val_fraction=0", "eval_every_n_steps=0", "max_seq_len=128", "save_every_n_steps=2",
           "keep_last_n_checkpoints=2"]
    full, out = tmp_path / "full", tmp_path / "out"
    # Both jobs at once (they share the CPU, not their output or cache): 2 launches' wall time instead of 3.
    jobs = [start_two_ranks(full, *run), start_two_ranks(out, *run)]
    reference, interrupted = jobs
    try:
        deadline = time.monotonic() + 300
        while not (out / "step_2" / "recipe_state.pt").is_file():
            assert interrupted.poll() is None, interrupted.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never saved step_2"
            time.sleep(0.01)
        os.kill(rank_pid(interrupted, rank=1), signal.SIGTERM)
        stdout, stderr = interrupted.communicate(timeout=300)
        reference_stderr = reference.communicate(timeout=300)[1]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.communicate()
    assert reference.returncode == 0, reference_stderr[-3000:]
    assert sorted(p.name for p in full.glob("step_*")) == ["step_6", "step_8"]  # keep_last_n_checkpoints=2
    expected = {r["step"]: r["loss"] for r in read_metrics(full / "metrics.jsonl")}
    assert sorted(expected) == list(range(1, 9))

    assert interrupted.returncode == 0, stderr[-3000:]
    stopped_at = int(stdout.split("preemption signal at step ")[1].split(":")[0])  # printed by rank 0
    assert 2 < stopped_at < 6, stdout[-3000:]  # the next step boundary or so, not the end of the run
    saved = sorted({step for step in (2, 4) if step < stopped_at} | {stopped_at})
    assert sorted(int(p.name[5:]) for p in out.glob("step_*")) == saved[-2:]
    state = torch.load(out / f"step_{stopped_at}" / "recipe_state.pt", weights_only=True)
    assert state["global_step"] == stopped_at and state["optimizer_full_state_dict"]
    assert state["dataloader_state"]["consumed"] == stopped_at * 2 * 2  # steps x batch x ranks
    assert stdout.count("saved checkpoint to") == len(saved)  # rank 0 logs each save once
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == stopped_at

    planted = out / f"step_{stopped_at + 1}"  # newer, but incomplete: latest must skip it
    planted.mkdir()
    shutil.copy(out / f"step_{stopped_at}" / "model.safetensors", planted)
    shutil.copy(out / f"step_{stopped_at}" / "config.json", planted)
    resumed = two_ranks(out, *run, "resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1  # rank 0 only
    assert f"resumed from {out / f'step_{stopped_at}'} at step {stopped_at}" in resumed.stdout, resumed.stdout[-3000:]
    got = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}  # the resumed run's values win
    assert sorted(got) == list(range(1, 9))
    diff = max(abs(got[step] - expected[step]) for step in got)
    print(f"FSDP bf16 SIGTERM + resume: max |loss diff| over steps 1-8 = {diff:.3g}")
    assert got == expected  # bitwise in bf16 too: the checkpoint holds the float32 master weights
    weights = load_file(out / "step_8" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert sorted(p.name for p in out.glob("step_*")) == ["step_6", "step_8"]
    assert (out / "step_6" / "recipe_state.pt").is_file()


def world_of_one_losses(out: Path, *overrides: str) -> list[float]:
    parser = TuneArgumentParser(FullFinetuneDistributedParams, recipe="full_finetune_distributed")
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={out}", "dtype=fp32",
                                  "max_steps_per_epoch=3", "epochs=1", "log_every_n_steps=1", "val_fraction=0",
                                  "eval_every_n_steps=0", "max_seq_len=128", f"dataset_cache_dir={out.parent / 'c'}",
                                  *overrides])
    try:
        dist_recipe.recipe_main(params)
    finally:
        destroy_distributed()
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_chunked_loss_and_activation_checkpointing_under_fsdp_give_the_same_losses(tmp_path):
    plain = world_of_one_losses(tmp_path / "plain", "chunked_loss=false")
    chunked_ac = world_of_one_losses(tmp_path / "ac", "chunked_loss=true", "loss_chunk_size=100",
                                     "activation_checkpointing=true", "metric_loggers=[jsonl, tensorboard]")
    assert len(plain) == 3 and max(abs(a - b) for a, b in zip(plain, chunked_ac)) < 1e-5, (plain, chunked_ac)
    assert list((tmp_path / "ac" / "tensorboard").glob("events.out.tfevents.*"))
    assert world_of_one_losses(tmp_path / "sgd", "optimizer=sgd", "lr=0.05")[0] == pytest.approx(plain[0])


@pytest.mark.slow
def test_keeping_gathered_weights_from_forward_to_backward_changes_no_number(two_rank_run, tmp_path):
    """fsdp_reshard_after_forward=false (one all-gather per layer and step instead of two) trains the same run."""
    out, _ = two_rank_run
    result = two_ranks(tmp_path / "kept", "batch_size=2", *COMMON, "fsdp_reshard_after_forward=false")
    assert result.returncode == 0, result.stderr[-3000:]
    default, kept = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "kept" / "metrics.jsonl")
    assert [r["loss"] for r in kept] == [r["loss"] for r in default]
    assert [r["grad_norm"] for r in kept] == [r["grad_norm"] for r in default]
