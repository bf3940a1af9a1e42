"""FSDP2 recipe end to end: 2 CPU processes (gloo) match the single-device recipe on the same global batch, and rank 0
writes a checkpoint that transformers loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
COMMON = ["shuffle=false", "dtype=fp32", "epochs=1", f"max_steps_per_epoch={STEPS}", "log_every_n_steps=1",
          "gradient_accumulation_steps=2", "warmup_steps=1"]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    result = subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "full_finetune_distributed",
         "--config", "tiny_demo", "--override", f"output_dir={out}", "batch_size=2", *COMMON],
        capture_output=True, text=True, env=torchrun_env(), cwd=out, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_ranks_match_single_device_on_the_same_global_batch(two_rank_run, tmp_path):
    out, _ = two_rank_run
    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    params = parser.parse_params(
        ["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "batch_size=4", *COMMON]
    )
    single_recipe.recipe_main(params)

    sharded = read_metrics(out / "metrics.jsonl")
    single = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in sharded] == list(range(1, STEPS + 1))
    assert [r["num_tokens"] for r in sharded] == [r["num_tokens"] for r in single]  # the same samples per step
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(sharded, single))
    norm_diff = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(sharded, single))
    assert loss_diff < 1e-5, (loss_diff, sharded, single)
    assert norm_diff < 1e-4, norm_diff
    assert sharded[-1]["loss"] < sharded[0]["loss"]  # it trains (and the later steps still agree)


@pytest.mark.slow
def test_rank_zero_writes_one_checkpoint_that_transformers_loads(two_rank_run):
    from transformers import AutoModelForCausalLM

    from mytune.checkpoint import load_hf_model

    out, result = two_rank_run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.jsonl", f"step_{STEPS}"]
    assert result.stdout.count("saved checkpoint to") == 1  # rank 0 only logs
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
                                  "max_steps_per_epoch=2", "epochs=1", "log_every_n_steps=1"])
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
