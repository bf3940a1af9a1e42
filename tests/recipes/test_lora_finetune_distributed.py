"""FSDP2 LoRA recipe end to end: 2 CPU processes (gloo) match `lora_finetune_single_device` on the same global batch
(training and validation loss), and rank 0 writes a merged checkpoint plus a PEFT adapter that peft loads onto the
transformers base with the merged checkpoint's logits."""

import json
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
from recipes import lora_finetune_distributed as dist_recipe
from recipes import lora_finetune_single_device as single_recipe
from recipes.params.lora_finetune_distributed import LoRAFinetuneDistributedParams
from recipes.params.lora_finetune_single_device import LoRAFinetuneParams

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# Same data (unshuffled), seed and hyper-parameters; the distributed run has half the per-process batch on 2 ranks.
# 101 validation samples (odd: rank 1's last one is a wrap-around repeat that must not count), evaluated after
# steps 2 and 4.
COMMON = ["shuffle=false", "dtype=fp32", "epochs=1", f"max_steps_per_epoch={STEPS}", "log_every_n_steps=1",
          "gradient_accumulation_steps=2", "warmup_steps=1", "val_fraction=0.0505", "eval_every_n_steps=2"]


def torchrun_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MYTUNE_DATA_CACHE": str(cache)}


def two_ranks(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "lora_finetune_distributed",
         "--config", "tiny_demo", "--override", f"output_dir={out}", *overrides],
        capture_output=True, text=True, env=torchrun_env(out.parent / f"{out.name}-cache"), cwd=out.parent,
        timeout=300,
    )


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_lora")
    result = two_ranks(out, "batch_size=2", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_ranks_match_single_device_on_the_same_global_batch(two_rank_run, tmp_path):
    out, _ = two_rank_run
    parser = TuneArgumentParser(LoRAFinetuneParams, recipe="lora_finetune_single_device")
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
    print(f"FSDP vs single-device LoRA: max loss diff {loss_diff:.2e}, max grad-norm diff {norm_diff:.2e}")
    assert loss_diff < 1e-5, (loss_diff, sharded, single)
    assert norm_diff < 1e-4, norm_diff
    assert sharded[-1]["loss"] < sharded[0]["loss"]  # it trains (and the later steps still agree)
    assert [r["step"] for r in sharded if "val_loss" in r] == [r["step"] for r in single if "val_loss" in r] == [2, 4]
    for a, b in zip(sharded, single):
        if "val_loss" in a:
            assert a["val_tokens"] == b["val_tokens"]
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-5, (a, b)
    # The same random start (rank 0 builds it as the single-device recipe does) and the same trained adapter.
    base_a = load_file(out / "base_model" / "model.safetensors")
    base_b = load_file(tmp_path / "base_model" / "model.safetensors")
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_b)
    adapter_a = load_file(out / f"step_{STEPS}" / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(tmp_path / f"step_{STEPS}" / "adapter" / "adapter_model.safetensors")
    assert set(adapter_a) == set(adapter_b)
    # Adam's normalised update amplifies float-rounding differences of tiny gradients: a looser bound than the loss's.
    adapter_diff = max((adapter_a[k] - adapter_b[k]).abs().max().item() for k in adapter_b)
    print(f"FSDP vs single-device LoRA: max adapter weight diff {adapter_diff:.2e}")
    assert adapter_diff < 1e-4


@pytest.mark.slow
def test_rank_zero_writes_merged_checkpoint_and_a_peft_adapter_with_the_same_logits(two_rank_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, result = two_rank_run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "base_model", "metrics.jsonl", f"step_{STEPS}"]
    assert result.stdout.count("saved merged checkpoint to") == 1  # rank 0 only logs
    assert result.stdout.count("dataset_path: 1216 samples") == 1
    assert result.stdout.count("val_loss") == 2 + 1  # two validations and the closing summary
    assert result.stdout.count("finetune_distributed done:") == 1  # rank 0 alone prints the closing summary
    step_dir = out / f"step_{STEPS}"
    state = torch.load(step_dir / "recipe_state.pt", weights_only=True)
    assert state["global_step"] == STEPS and state["optimizer_full_state_dict"]
    assert state["dataloader_state"]["consumed"] == STEPS * 2 * 2 * 2  # steps x accumulation x batch x ranks
    # The gathered AdamW state holds the adapters only, keyed by parameter name.
    assert state["optimizer"]["state"] and all(".lora_" in name for name in state["optimizer"]["state"])
    config = json.loads((step_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve()) and config["r"] == 8
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                        "lm_head"]

    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
        peft_logits = PeftModel.from_pretrained(base, step_dir / "adapter").eval()(ids).logits
    diff = (merged - peft_logits).abs().max().item()
    print(f"merged checkpoint vs PEFT adapter on the base: {diff:.2e}")
    assert diff < 1e-5


def run_world_of_one(tmp_path: Path, *overrides: str):
    parser = TuneArgumentParser(LoRAFinetuneDistributedParams, recipe="lora_finetune_distributed")
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "epochs=1",
                                  "log_every_n_steps=1", f"dataset_cache_dir={tmp_path / 'cache'}", *overrides])
    return dist_recipe.LoRAFinetuneRecipeDistributed(params)


def test_bf16_dora_keeps_a_bf16_base_and_fp32_adapters_trains_adapters_only_as_a_world_of_one(tmp_path):
    """Without torchrun the recipe is a 1-process group; the base is frozen, only adapters reach AdamW."""
    recipe = run_world_of_one(tmp_path, "dtype=bf16", "use_dora=true", "max_steps_per_epoch=2", "batch_size=2",
                              "max_seq_len=64", "lora_target_modules=[linear_qkv,linear_fc2]")
    try:
        recipe.setup()
        params = dict(recipe.model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        trainable = {name for name, p in params.items() if p.requires_grad}
        # bf16: the frozen base is stored in bf16 (half the memory of float32), the adapters are float32 masters.
        assert {p.dtype for n, p in params.items() if n in trainable} == {torch.float32}
        assert {p.dtype for n, p in params.items() if n not in trainable} == {torch.bfloat16}
        assert trainable and all(".lora_" in name for name in trainable)
        assert {id(p) for g in recipe.optimizer.param_groups for p in g["params"]} == {id(params[n]) for n in trainable}
        frozen_before = params["model.embed_tokens.weight"].full_tensor().clone()
        recipe.train()
        assert torch.equal(params["model.embed_tokens.weight"].full_tensor(), frozen_before)
        out_dir = recipe.save_checkpoint()
        recipe.cleanup()
    finally:
        destroy_distributed()  # also when a step above failed
    adapter = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector" in adapter
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # the fp32 master adapters, for an exact resume
    assert len(adapter) == 3 * 4 * 4  # (A, B, magnitude) x 4 layers x (q, k, v, down)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_packed_rows_train_and_validate_as_a_world_of_one(tmp_path):
    recipe = run_world_of_one(tmp_path, "dtype=fp32", "packed=true", "batch_size=2", "max_steps_per_epoch=3",
                              "max_eval_batches=2")
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


def test_params_refuse_what_fsdp_lora_cannot_do():
    from mytune.errors import ConfigError

    base = {"model": "llama_tiny", "tokenizer_path": "t", "dataset_path": "d"}
    with pytest.raises(ConfigError, match="device must be auto, cpu or cuda"):
        LoRAFinetuneDistributedParams(**base, device="mps")
    with pytest.raises(ConfigError, match="cpu_offload=true needs a GPU run"):
        LoRAFinetuneDistributedParams(**base, device="cpu", cpu_offload=True)
    with pytest.raises(ConfigError, match="unknown module name"):
        LoRAFinetuneDistributedParams(**base, lora_target_modules=["mlp_proj"])
    with pytest.raises(ConfigError, match="keep_last_n_checkpoints must be >= 1"):
        LoRAFinetuneDistributedParams(**base, keep_last_n_checkpoints=0)


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
            if rank and b"lora_finetune_distributed" in (Path("/proc") / str(child) / "cmdline").read_bytes():
                ranks[int(rank[0])] = child
    return ranks


@pytest.mark.slow
def test_two_ranks_sigterm_then_resume_latest_to_bitwise_the_same_losses(tmp_path):
    """bf16, dropout on, 2 processes. An 8-step reference run saving every 2 steps and keeping 3. A second run gets
    SIGTERM on rank 1 only once its step_2 exists: both ranks save the same step and the job exits 0. Resumed with
    resume_from_checkpoint=latest (fp32 adapters, gathered AdamW state scattered back into the shards, each rank's
    RNG streams, data position) it logs bitwise the reference's losses and ends with the same adapter."""
    run = ["batch_size=2", "dtype=bf16", "epochs=1", "max_steps_per_epoch=8", "log_every_n_steps=1",
           "warmup_steps=2", "val_fraction=0", "eval_every_n_steps=0", "max_seq_len=128", "lora_dropout=0.1",
           "lora_target_modules=[q_proj,v_proj]", "chunked_loss=true", "loss_chunk_size=100",
           "save_every_n_steps=2"]
    reference = two_ranks(tmp_path / "reference", *run, "keep_last_n_checkpoints=3")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # step_2 pruned; step_8 (the final save) kept with step_4 and step_6.
    assert sorted(p.name for p in (tmp_path / "reference").glob("step_*")) == ["step_4", "step_6", "step_8"]

    out = tmp_path / "preempted"
    command = [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "lora_finetune_distributed",
               "--config", "tiny_demo", "--override", f"output_dir={out}", *run]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=torchrun_env(tmp_path / "reference-cache"), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "step_2" / "recipe_state.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never saved step_2"
        time.sleep(0.005)
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("preemption signal at step") == 1
    saved = sorted(int(p.name[5:]) for p in out.glob("step_*"))
    assert 2 < saved[-1] < 8  # the step where both ranks stopped, not the end

    resumed = two_ranks(out, *run, "resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resumed from {out / f'step_{saved[-1]}'} at step {saved[-1]}") == 1  # rank 0 only
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}  # a re-logged step: the resumed value
    assert sorted(got) == list(range(1, 9))
    print(f"FSDP LoRA bf16 SIGTERM at step {saved[-1]} + resume: max |loss diff| = "
          f"{max(abs(got[s] - expected[s]) for s in got):.3g}")
    assert got == expected
    final_a = load_file(tmp_path / "reference" / "step_8" / "adapter" / "adapter_model.safetensors")
    final_b = load_file(out / "step_8" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_chunked_loss_activation_checkpointing_and_optimizers_as_a_world_of_one(tmp_path):
    def losses(name: str, *overrides: str) -> list[float]:
        recipe = run_world_of_one(tmp_path / name, "dtype=fp32", "max_steps_per_epoch=3", "max_seq_len=128",
                                  "lora_target_modules=[q_proj,v_proj]", *overrides)
        try:
            recipe.setup()
            recipe.train()
            recipe.cleanup()
        finally:
            destroy_distributed()
        return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]

    plain = losses("plain", "chunked_loss=false")
    chunked_ac = losses("ac", "chunked_loss=true", "loss_chunk_size=100", "activation_checkpointing=true",
                        "metric_loggers=[jsonl, tensorboard]")
    assert len(plain) == 3 and max(abs(a - b) for a, b in zip(plain, chunked_ac)) < 1e-5, (plain, chunked_ac)
    assert list((tmp_path / "ac" / "tensorboard").glob("events.out.tfevents.*"))
    sgd = losses("sgd", "optimizer=sgd", "lr=0.05")
    assert sgd[0] == pytest.approx(plain[0]) and sgd[1] != plain[1]  # same start, another update rule


def test_low_bit_adamw_on_sharded_adapters_trains_saves_and_resumes(tmp_path, monkeypatch):
    """torchao's AdamW8bit over FSDP's DTensor adapters (a world of one): it trains, its quantized state goes through
    the gathered recipe_state.pt, and a run resumed from step 2 logs the same losses for steps 3-4 (step 4 to within
    the 8-bit resolution: FSDP cannot split torchao's state tensors, so they are re-quantized per shard). The compile of
    torchao's update is stubbed out (inductor takes ~40 s for it on a CPU; the math is the same eagerly)."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)

    def run(name: str, *overrides: str) -> dict[int, float]:
        recipe = run_world_of_one(tmp_path / name, "dtype=fp32", "max_steps_per_epoch=4", "max_seq_len=128",
                                  "optimizer=adamw8bit", "lora_rank=32", "save_every_n_steps=2",
                                  "lora_target_modules=[q_proj,v_proj,down_proj]", *overrides)
        try:
            recipe.setup()
            recipe.train()
            recipe.save_checkpoint()
            recipe.cleanup()
        finally:
            destroy_distributed()
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")}

    expected = run("reference")
    assert sorted(expected) == [1, 2, 3, 4] and expected[4] < expected[1]
    state = torch.load(tmp_path / "reference" / "step_2" / "recipe_state.pt", weights_only=True)["optimizer"]["state"]
    assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in state.values())
    got = run("resumed", f"resume_from_checkpoint={tmp_path / 'reference' / 'step_2'}")
    assert sorted(got) == [3, 4] and got[3] == expected[3]  # the adapters themselves are restored exactly
    # The 8-bit moments travel as float values and are quantized again (a signed block's absmax does not land on
    # a code exactly, so a scale moves by an ulp-sized step): step 4 agrees to well within the 8-bit resolution.
    assert abs(got[4] - expected[4]) < 1e-4, (got, expected)


@pytest.mark.slow
def test_two_rank_qlora_matches_single_device_qlora(tmp_path):
    """QLoRA sharded over 2 processes: the NF4 base is quantized whole by rank 0 and split by rows, so the losses
    equal single-device QLoRA's on the same global batch (fp32), and the saved adapter loads in peft."""
    run = ["shuffle=false", "dtype=fp32", "epochs=1", "max_steps_per_epoch=3", "log_every_n_steps=1",
           "warmup_steps=1", "val_fraction=0", "eval_every_n_steps=0", "max_seq_len=128", "quantize_base=true",
           "lora_target_modules=[q_proj,v_proj,down_proj]"]
    sharded_out = tmp_path / "sharded"
    result = two_ranks(sharded_out, "batch_size=2", *run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("QLoRA rank 8") == 1
    parser = TuneArgumentParser(LoRAFinetuneParams, recipe="lora_finetune_single_device")
    single_recipe.recipe_main(parser.parse_params(
        ["--config", "tiny_demo", "--override", f"output_dir={tmp_path / 'single'}", "batch_size=4",
         f"dataset_cache_dir={tmp_path / 'cache'}", *run]))
    sharded = read_metrics(sharded_out / "metrics.jsonl")
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(sharded, single))
    print(f"FSDP vs single-device QLoRA: max loss diff {diff:.2e}")
    assert len(sharded) == len(single) == 3 and diff < 1e-5, (sharded, single)
    config = json.loads((sharded_out / "step_3" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"]


def test_qlora_needs_two_processes(tmp_path):
    from mytune.errors import MytuneError

    recipe = run_world_of_one(tmp_path, "quantize_base=true", "max_steps_per_epoch=1", "max_seq_len=64")
    try:
        with pytest.raises(MytuneError, match="2\\+ processes|torchrun"):
            recipe.setup()
    finally:
        destroy_distributed()
