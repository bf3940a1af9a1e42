"""FSDP2 LoRA DPO end to end: 2 CPU processes (gloo) match `lora_dpo_single_device` on the same global batch
(losses, rewards and validation metrics within 1e-5); with precomputed reference log-probs a 2-process run stopped by
SIGTERM on one rank resumes (reading the cached log-probs) to bitwise the same losses; as a world of one the recipe
trains bf16 DoRA adapters only and runs reference-free SimPO."""

import math
import os
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
from recipes import lora_dpo_distributed as dist_recipe
from recipes import lora_dpo_single_device as single_recipe
from recipes.params.lora_dpo_distributed import LoRADPODistributedParams
from recipes.params.lora_dpo_single_device import LoRADPOParams

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
STEPS = 4
# Same data (unshuffled), seed and hyper-parameters; the distributed run has half the per-process batch on 2 ranks.
# 83 validation pairs of the 820 (odd: rank 1's last one is a wrap-around repeat that must not count), evaluated
# after steps 2 and 4. lm_head is an adapter target in tiny_demo: the unchunked log-probs path.
COMMON = ["checkpoint_dir=", "model=llama_tiny", "shuffle=false", "dtype=fp32", "epochs=1",
          f"max_steps_per_epoch={STEPS}", "log_every_n_steps=1", "gradient_accumulation_steps=2", "warmup_steps=1",
          "max_seq_len=96", "val_fraction=0.101", "eval_every_n_steps=2", "save_every_n_steps=0", "optimizer=sgd",
          "lr=0.5"]  # SGD: Adam's first steps divide by the gradients' own size, amplifying rounding in tiny entries
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")


def torchrun_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MYTUNE_DATA_CACHE": str(cache)}


def two_ranks_command(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "lora_dpo_distributed",
            "--config", "tiny_demo", "--override", f"output_dir={out}", "checkpoint_dir=", "model=llama_tiny",
            *overrides]


def two_ranks(out: Path, *overrides: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    cache = cache or out.parent / f"{out.name}-cache"
    return subprocess.run(two_ranks_command(out, *overrides), capture_output=True, text=True,
                          env=torchrun_env(cache), cwd=out.parent, timeout=600)


@pytest.mark.slow
def test_two_ranks_match_single_device_on_the_same_global_batch(tmp_path):
    result = two_ranks(tmp_path / "fsdp", "batch_size=2", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved merged checkpoint to") == 1  # rank 0 only logs
    assert result.stdout.count("lora_dpo_distributed done:") == 1  # rank 0 alone prints the closing summary
    parser = TuneArgumentParser(LoRADPOParams, recipe="lora_dpo_single_device")
    single_recipe.recipe_main(parser.parse_params(
        ["--config", "tiny_demo", "--override", f"output_dir={tmp_path / 'single'}", "batch_size=4",
         f"dataset_cache_dir={tmp_path / 'cache'}", *COMMON]))

    sharded = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in sharded] == list(range(1, STEPS + 1))
    assert [r["num_tokens"] for r in sharded] == [r["num_tokens"] for r in single]  # the same pairs per step
    # Differences relative to the value where it is over 1 (the summed log-probs are about -40).
    errors = {k: max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(sharded, single)) for k in COMPARED}
    val = [(a, b) for a, b in zip(sharded, single) if "val_loss" in a]
    assert [a["step"] for a, _ in val] == [b["step"] for b in single if "val_loss" in b] == [2, 4]
    assert all(a["val_pairs"] == b["val_pairs"] == 83 for a, b in val)
    errors.update({f"val_{k}": max(abs(a[f"val_{k}"] - b[f"val_{k}"]) / max(1.0, abs(b[f"val_{k}"]))
                                   for a, b in val) for k in COMPARED})
    print("FSDP vs single-device LoRA DPO, max differences: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOLERANCE, errors
    assert abs(sharded[-1]["grad_norm"] - single[-1]["grad_norm"]) < 1e-4
    assert len({round(r["loss"], 4) for r in sharded}) == STEPS  # the adapters moved
    adapter_a = load_file(tmp_path / "fsdp" / f"step_{STEPS}" / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(tmp_path / "single" / f"step_{STEPS}" / "adapter" / "adapter_model.safetensors")
    assert set(adapter_a) == set(adapter_b)
    adapter_diff = max((adapter_a[k] - adapter_b[k]).abs().max().item() for k in adapter_b)
    print(f"FSDP vs single-device LoRA DPO: max adapter weight difference {adapter_diff:.1e}")
    assert adapter_diff < TOLERANCE


def worker_pids(pid: int) -> dict[int, int]:
    """RANK -> pid of the recipe processes under `pid` (the mytune CLI, torchrun's agent, then its workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    ranks, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                environ = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [item[5:] for item in environ if item.startswith(b"RANK=")]
            if rank and b"lora_dpo_distributed" in (Path("/proc") / str(child) / "cmdline").read_bytes():
                ranks[int(rank[0])] = child
    return ranks


@pytest.mark.slow
def test_two_ranks_precomputed_sigterm_then_resume_latest_to_bitwise_the_same_losses(tmp_path):
    """Precomputed reference, dropout on, 2 processes. A 6-step reference run saving every 2 steps computes and
    caches the reference log-probs (a block per rank). A second run (reading that cache) gets SIGTERM on rank 1 once
    its step_2 exists: both ranks save the same step and the job exits 0. Resumed with
    resume_from_checkpoint=latest, it reads the cached log-probs and logs bitwise the reference's losses."""
    run = ["batch_size=2", "dtype=fp32", "epochs=1", "max_steps_per_epoch=6", "log_every_n_steps=1",
           "warmup_steps=2", "val_fraction=0", "eval_every_n_steps=0", "max_seq_len=96", "lora_dropout=0.1",
           "lora_target_modules=[q_proj,v_proj]", "save_every_n_steps=2", "keep_last_n_checkpoints=null",
           "precompute_reference_logps=true"]
    cache = tmp_path / "cache"
    reference = two_ranks(tmp_path / "reference", *run, cache=cache)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert reference.stdout.count("dataset_path: reference log-probs of 820 pairs cached in") == 1

    out = tmp_path / "preempted"
    proc = subprocess.Popen(two_ranks_command(out, *run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=torchrun_env(cache), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (out / "step_2" / "recipe_state.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never saved step_2"
        time.sleep(0.005)
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("preemption signal at step") == 1
    assert stdout.count("dataset_path: reference log-probs of 820 pairs read from") == 1
    saved = sorted(int(p.name[5:]) for p in out.glob("step_*"))
    assert 2 <= saved[-1] < 6  # the step where both ranks stopped, not the end

    resumed = two_ranks(out, *run, "resume_from_checkpoint=latest", cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"at step {saved[-1]}") == 1
    assert resumed.stdout.count("reference log-probs of 820 pairs read from") == 1
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}  # a re-logged step: the resumed value
    assert sorted(got) == list(range(1, 7)) and got == expected  # bitwise
    final_a = load_file(tmp_path / "reference" / "step_6" / "adapter" / "adapter_model.safetensors")
    final_b = load_file(out / "step_6" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def run_world_of_one(tmp_path: Path, *overrides: str):
    parser = TuneArgumentParser(LoRADPODistributedParams, recipe="lora_dpo_distributed")
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "epochs=1",
                                  "log_every_n_steps=1", f"dataset_cache_dir={tmp_path / 'cache'}", "max_seq_len=96",
                                  "checkpoint_dir=", "model=llama_tiny", *overrides])
    return dist_recipe.LoRADPORecipeDistributed(params)


def test_bf16_dora_trains_adapters_only_and_logs_every_metric_as_a_world_of_one(tmp_path):
    """Without torchrun the recipe is a 1-process group: bf16 frozen base, fp32 adapters, the base unchanged."""
    recipe = run_world_of_one(tmp_path, "dtype=bf16", "use_dora=true", "max_steps_per_epoch=2", "batch_size=2",
                              "lora_target_modules=[linear_qkv,linear_fc2]", "val_fraction=0.02", "max_eval_batches=2")
    try:
        recipe.setup()
        params = dict(recipe.model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        trainable = {name for name, p in params.items() if p.requires_grad}
        assert {p.dtype for n, p in params.items() if n in trainable} == {torch.float32}
        assert {p.dtype for n, p in params.items() if n not in trainable} == {torch.bfloat16}
        assert trainable and all(".lora_" in name for name in trainable)
        frozen_before = params["model.layers.0.self_attn.q_proj.weight"].full_tensor().clone()
        recipe.train()
        assert torch.equal(params["model.layers.0.self_attn.q_proj.weight"].full_tensor(), frozen_before)
        recipe.save_checkpoint()
        recipe.cleanup()
    finally:
        destroy_distributed()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(rows[-1][k]) for k in (*COMPARED, "grad_norm", "tokens_per_s"))
    assert rows[-1]["val_pairs"] == 4 and math.isfinite(rows[-1]["val_rewards/accuracies"])


def test_simpo_runs_no_reference_forward_as_a_world_of_one(tmp_path, monkeypatch):
    monkeypatch.setattr(dist_recipe.LoRADPORecipeDistributed, "reference_logps",
                        lambda self, batch: pytest.fail("simpo ran a reference forward"))
    recipe = run_world_of_one(tmp_path, "dtype=fp32", "loss_type=simpo", "max_steps_per_epoch=2", "batch_size=2",
                              "val_fraction=0", "eval_every_n_steps=0")
    try:
        recipe.setup()
        recipe.train()
        recipe.cleanup()
    finally:
        destroy_distributed()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_params_refuse_what_fsdp_lora_dpo_cannot_do():
    from mytune.errors import ConfigError

    base = {"model": "llama_tiny", "tokenizer_path": "t", "dataset_path": "d"}
    with pytest.raises(ConfigError, match="device must be auto, cpu or cuda"):
        LoRADPODistributedParams(**base, device="mps")
    with pytest.raises(ConfigError, match="cpu_offload=true needs a GPU run"):
        LoRADPODistributedParams(**base, device="cpu", cpu_offload=True)
    with pytest.raises(ConfigError, match="loss_type must be one of dpo, ipo, simpo"):
        LoRADPODistributedParams(**base, loss_type="orpo")
    with pytest.raises(ConfigError, match="dataset_path must name one source"):
        LoRADPODistributedParams(**base | {"dataset_path": "[a.jsonl, b.jsonl]"})
