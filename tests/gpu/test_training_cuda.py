"""The CUDA paths of the training utilities and recipes against their reference paths (skipped without a GPU).

benchmarks/gpu_suite.sh runs these (`pytest -m gpu tests`) on a machine with one CUDA GPU.
"""

import copy
import os
from pathlib import Path

import pytest
import torch

from mytune.models.transformer import ModelArgs, TransformerDecoder
from mytune.training.layer_wrappers import activation_offloading
from mytune.training.loss import chunked_cross_entropy_sum, label_positions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[2]


def tiny_model(dtype: torch.dtype = torch.float32) -> TransformerDecoder:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2)
    return TransformerDecoder(args).to("cuda", dtype)


def batch(seq: int = 256, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (rows, seq), generator=generator)
    labels = tokens.clone()
    labels[:, : seq // 3] = -100  # a prompt
    return tokens, labels


def loss_and_grads(model, tokens, labels, **loss_kwargs):
    loss = chunked_cross_entropy_sum(model(tokens, return_hidden=True), model.lm_head.weight, labels, 64,
                                     **loss_kwargs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_activation_offloading_on_a_side_stream_gives_bitwise_equal_gradients():
    model = tiny_model()
    tokens, labels = (t.cuda() for t in batch())
    expected_loss, expected = loss_and_grads(model, tokens, labels)
    with activation_offloading(True) as offloader:
        hidden = model(tokens, return_hidden=True)
    loss = chunked_cross_entropy_sum(hidden, model.lm_head.weight, labels, 64)
    loss.backward()
    assert offloader.offloaded_tensors > 0
    assert torch.equal(loss.detach(), expected_loss)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, expected[name]), name


def test_pinned_batches_move_without_a_host_sync_and_the_loss_reads_no_device_value():
    from mytune.training.device import move_batch

    tokens, labels = batch()
    cpu_batch = {"tokens": tokens.pin_memory(), "labels": labels.pin_memory(),
                 "label_positions": label_positions(labels).pin_memory()}
    model = tiny_model()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host<->device synchronisation raises
    try:
        gpu = move_batch(cpu_batch, torch.device("cuda"))
        loss = chunked_cross_entropy_sum(model(gpu["tokens"], return_hidden=True), model.lm_head.weight,
                                         gpu["labels"], 64, positions=gpu["label_positions"])
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = chunked_cross_entropy_sum(model(tokens.cuda(), return_hidden=True), model.lm_head.weight,
                                          labels.cuda(), 64)
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_chunks_equal_eager(dtype):
    model = tiny_model(dtype)
    tokens, labels = (t.cuda() for t in batch(seq=300))
    expected_loss, expected = loss_and_grads(model, tokens, labels)
    loss, grads = loss_and_grads(model, tokens, labels, positions=label_positions(labels), compile=True)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.float(), expected[name].float(), **tolerance, msg=name)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 tensor cores need compute capability 8.9+")
def test_float8_training_follows_bf16():
    from mytune.training.float8 import convert_to_float8

    reference = tiny_model(torch.bfloat16)
    converted = copy.deepcopy(reference)
    assert convert_to_float8(converted) == 2 * 7
    tokens, labels = (t.cuda() for t in batch())
    losses = {}
    for name, model in (("bf16", reference), ("float8", converted)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(5):
            loss = chunked_cross_entropy_sum(model(tokens, return_hidden=True), model.lm_head.weight, labels, 64)
            (loss / 1000).backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    print("bf16", losses["bf16"], "float8", losses["float8"])
    assert losses["float8"][-1] < losses["float8"][0]
    for ours, ref in zip(losses["float8"], losses["bf16"]):
        assert abs(ours - ref) < 0.03 * ref


# --- the recipes: a few steps' losses with and without the fast paths ---------------------------------------------

RECIPE_COMMON = ["device=cuda", "epochs=1", "max_steps_per_epoch=6", "log_every_n_steps=1", "shuffle=false",
                 "packed=true", "max_seq_len=512", "batch_size=2", "lr_scheduler=constant"]


def run_single_device(recipe_name: str, out: Path, *overrides: str) -> list[float]:
    import importlib

    from mytune.config import TuneArgumentParser
    from mytune.training.metrics import read_metrics

    recipe = importlib.import_module(f"recipes.{recipe_name}")
    params_class = recipe.recipe_main.__annotations__["params"]
    parser = TuneArgumentParser(params_class, recipe=recipe_name)
    params = parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={out}",
                                  f"dataset_cache_dir={out.parent / 'cache'}", *RECIPE_COMMON, *overrides])
    recipe.recipe_main(params)
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("recipe_name", ["full_finetune_single_device", "lora_finetune_single_device"])
def test_single_device_recipe_losses_with_compile_equal_eager(recipe_name, tmp_path):
    eager = run_single_device(recipe_name, tmp_path / "eager", "dtype=fp32")
    compiled = run_single_device(recipe_name, tmp_path / "compiled", "dtype=fp32", "compile=true")
    print(recipe_name, "eager", eager, "compiled", compiled)
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4


@pytest.mark.parametrize("recipe_name", ["full_finetune_single_device", "lora_finetune_single_device"])
def test_single_device_recipe_bf16_fast_paths_train(recipe_name, tmp_path):
    """bf16 with compile (and the recipes' CUDA defaults: pinned batches, packed flex attention) trains and stays
    close to the fp32 run."""
    fp32 = run_single_device(recipe_name, tmp_path / "fp32", "dtype=fp32")
    bf16 = run_single_device(recipe_name, tmp_path / "bf16", "dtype=bf16", "compile=true")
    print(recipe_name, "fp32", fp32, "bf16+compile", bf16)
    assert bf16[-1] < bf16[0]
    assert max(abs(a - b) / b for a, b in zip(bf16, fp32)) < 0.05


@pytest.mark.parametrize("recipe_name", ["full_finetune_distributed", "lora_finetune_distributed"])
def test_distributed_recipe_on_one_gpu_equals_its_single_device_twin(recipe_name, tmp_path):
    """FSDP2 on one GPU (nccl, a world of one), fp32: the same losses as the single-device recipe."""
    import subprocess
    import sys

    from mytune.training.metrics import read_metrics

    out = tmp_path / "fsdp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MYTUNE_DATA_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "1", recipe_name, "--config", "tiny_demo",
         "--override", f"output_dir={out}", *RECIPE_COMMON, "dtype=fp32"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = [row["loss"] for row in read_metrics(out / "metrics.jsonl")]
    single = run_single_device(recipe_name.replace("distributed", "single_device"), tmp_path / "single", "dtype=fp32")
    print(recipe_name, "fsdp", sharded, "single", single)
    assert max(abs(a - b) for a, b in zip(sharded, single)) < 1e-4


@pytest.mark.parametrize("recipe_name", ["full_finetune_single_device", "lora_finetune_single_device"])
def test_single_device_recipe_losses_with_flex_attention_equal_the_dense_mask_path(recipe_name, tmp_path):
    """Packed rows: attention_backend=auto (compiled flex with a BlockMask on CUDA) against sdpa (dense mask), fp32."""
    dense = run_single_device(recipe_name, tmp_path / "sdpa", "dtype=fp32", "attention_backend=sdpa")
    flex = run_single_device(recipe_name, tmp_path / "flex", "dtype=fp32", "attention_backend=auto")
    print(recipe_name, "sdpa", dense, "flex", flex)
    assert max(abs(a - b) for a, b in zip(dense, flex)) < 1e-4
