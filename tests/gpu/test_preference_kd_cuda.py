"""The preference and distillation recipes on CUDA against the same runs on the CPU (skipped without a GPU).

benchmarks/gpu_suite.sh runs these (`pytest -m gpu tests`). fp32 on both devices, random tiny starts, the same
pairs and steps: CUDA's matmuls and reductions differ from the CPU's only in rounding.
"""

import importlib
from pathlib import Path

import pytest
import torch

from mytune.config import TuneArgumentParser
from mytune.training.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COMMON = ["epochs=1", "max_steps_per_epoch=6", "log_every_n_steps=1", "shuffle=false", "batch_size=2",
          "lr_scheduler=constant", "dtype=fp32", "max_seq_len=128", "val_fraction=0", "eval_every_n_steps=0"]
# The shipped DPO tiny_demo starts from the SFT demo's checkpoint; here both devices start from the seeded tiny Llama.
RANDOM_START = ["checkpoint_dir=", "model=llama_tiny"]


def run(recipe_name: str, out: Path, device: str, *overrides: str) -> list[dict]:
    recipe = importlib.import_module(f"recipes.{recipe_name}")
    params_class = recipe.recipe_main.__annotations__["params"]
    parser = TuneArgumentParser(params_class, recipe=recipe_name)
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={out}",
                                  f"dataset_cache_dir={out.parent / 'cache'}", f"device={device}", *COMMON,
                                  *overrides])
    try:
        recipe.recipe_main(params)
    finally:
        if recipe_name.endswith("_distributed"):
            from mytune.training.distributed import destroy_distributed

            destroy_distributed()
    return read_metrics(out / "metrics.jsonl")


def max_diff(a: list[dict], b: list[dict], names: tuple[str, ...]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[name] - y[name]) for x, y in zip(a, b) for name in names)


@pytest.mark.parametrize("recipe_name, loss_type", [("lora_dpo_single_device", "dpo"),
                                                     ("lora_dpo_single_device", "simpo"),
                                                     ("full_dpo_distributed", "dpo")])
def test_preference_recipe_on_cuda_follows_the_cpu(recipe_name, loss_type, tmp_path):
    overrides = [*RANDOM_START, f"loss_type={loss_type}", "lr=1e-3"]
    cuda = run(recipe_name, tmp_path / "cuda", "cuda", *overrides)
    cpu = run(recipe_name, tmp_path / "cpu", "cpu", *overrides)
    diff = max_diff(cuda, cpu, ("loss", "rewards/margins"))
    print(recipe_name, loss_type, "max diff of loss and margins, cuda vs cpu", diff)
    assert diff < 1e-4


@pytest.mark.parametrize("student", ["full", "lora"])
def test_distillation_on_cuda_follows_the_cpu(student, tmp_path):
    overrides = ["lr=1e-3"] + (["lora_target_modules=[q_proj,v_proj]"] if student == "lora" else [])
    cuda = run("knowledge_distillation_single_device", tmp_path / "cuda", "cuda", *overrides)
    cpu = run("knowledge_distillation_single_device", tmp_path / "cpu", "cpu", *overrides)
    diff = max_diff(cuda, cpu, ("loss", "ce_loss", "kd_loss"))
    print(student, "student: max diff of the losses, cuda vs cpu", diff)
    assert diff < 1e-4
