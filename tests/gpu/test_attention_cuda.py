"""Attention on a CUDA device (skipped without one): the flex path (block mask) against the dense-mask SDPA reference,
forward and backward; the masked SDPA path without the math kernel; sliding windows on CUDA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from mytune.generation import generate
from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules import KVCache
from mytune.training.layer_wrappers import apply_activation_checkpointing, compile_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FUSED_ONLY = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def make_model(window: int | None = None, dtype: torch.dtype = torch.float32) -> TransformerDecoder:
    """qwen2 with GQA 8/2, head_dim 64; with `window`, layer 0 attends fully and layers 1-2 slide."""
    torch.manual_seed(0)
    args = ModelArgs(model_type="qwen2", attention_bias=True, vocab_size=256, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     sliding_window=window, max_window_layers=1 if window else 0)
    model = TransformerDecoder(args)
    with torch.no_grad():  # larger weights than the 0.02 init, so attention patterns matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.to("cuda", dtype)


def packed_batch(seq: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Rows of several documents of uneven lengths and trailing padding (-1), positions restarting per document."""
    generator = torch.Generator().manual_seed(seq)
    document_ids = torch.full((batch, seq), -1)
    position_ids = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        start, doc = 0, 0
        while start < seq - 16:
            length = int(torch.randint(8, seq // 3, (1,), generator=generator))
            length = min(length, seq - 16 - start)
            document_ids[row, start:start + length] = doc
            position_ids[row, start:start + length] = torch.arange(length)
            start, doc = start + length, doc + 1
        position_ids[row, start:] = torch.arange(seq - start)
    tokens = torch.randint(0, 256, (batch, seq), generator=generator)
    return {"tokens": tokens.cuda(), "position_ids": position_ids.cuda(), "document_ids": document_ids.cuda()}


def loss_and_grads(model: TransformerDecoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["tokens"].flatten())
    loss.backward()
    return logits.detach().float(), loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


def max_rel_error(actual: dict, expected: dict) -> float:
    return max(((actual[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in expected.items())


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("seq", [256, 320])  # a multiple of the 128 block and not
def test_flex_forward_backward_matches_dense_path_fp32(seq, window):
    reference = make_model(window)
    reference.attention_backend = "sdpa"
    fast = copy.deepcopy(reference)
    fast.attention_backend = "auto"
    batch = packed_batch(seq)
    masks = fast.attention_masks(seq, torch.device("cuda"), batch["document_ids"])
    assert all(isinstance(m, BlockMask) for m in masks.values())  # auto picks flex for packed rows on CUDA
    expected_logits, expected_loss, expected_grads = loss_and_grads(reference, batch)
    logits, loss, grads = loss_and_grads(fast, batch)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert max_rel_error(grads, expected_grads) < 1e-4


@pytest.mark.parametrize("window", [None, 100])
def test_flex_bf16_error_is_that_of_the_dense_path(window):
    """Against the fp32 dense reference, bf16 flex is no further off than bf16 dense SDPA (with some slack)."""
    batch = packed_batch(256)
    reference = make_model(window)
    reference.attention_backend = "sdpa"
    ref_logits, _, ref_grads = loss_and_grads(reference, batch)
    errors = {}
    for backend in ("sdpa", "flex"):
        model = copy.deepcopy(reference).to(torch.bfloat16)
        model.attention_backend = backend
        logits, _, grads = loss_and_grads(model, batch)
        errors[backend] = ((logits - ref_logits).abs().max().item(), max_rel_error(grads, ref_grads))
    print(f"bf16 (max logit error, max relative grad error) vs fp32: {errors}")
    assert errors["flex"][0] <= 2 * errors["sdpa"][0] + 1e-2
    assert errors["flex"][1] <= 2 * errors["sdpa"][1] + 1e-3


def test_flex_in_compiled_checkpointed_layers_trains_like_the_dense_path():
    """Per-layer torch.compile + non-reentrant activation checkpointing with the BlockMask passed to each layer; two
    sequence lengths (the second recompiles with dynamic shapes)."""
    reference = make_model(window=100)
    reference.attention_backend = "sdpa"
    fast = copy.deepcopy(reference)
    apply_activation_checkpointing(fast)
    compile_layers(fast)
    for seq in (256, 384):
        batch = packed_batch(seq)
        expected_logits, _, expected_grads = loss_and_grads(reference, batch)
        logits, _, grads = loss_and_grads(fast, batch)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
        assert max_rel_error(grads, expected_grads) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_with_gqa_does_not_need_the_math_kernel(dtype):
    """GQA on every SDPA path (packed rows' mask, a cutting window, a chunk after a KV cache, is_causal, one
    decoding step), fp32 included, runs with the math kernel excluded."""
    model = make_model(window=100, dtype=dtype)
    model.attention_backend = "sdpa"
    batch = packed_batch(256)
    with sdpa_kernel(FUSED_ONLY):
        loss_and_grads(model, batch)  # raises "No available kernel" if only math could take it
        with torch.no_grad():
            model(batch["tokens"])  # unpacked: is_causal + the window's mask
            cache = KVCache(batch_size=2, max_seq_len=300, num_layers=3, num_kv_heads=2, head_dim=64, dtype=dtype,
                            device="cuda")
            model(batch["tokens"][:, :200], kv_cache=cache)
            model(batch["tokens"][:, 200:240], kv_cache=cache)  # a chunk after a cached prefix: masked
            model(batch["tokens"][:, 240:241], kv_cache=cache)  # one token past the window


def test_sliding_window_on_cuda_matches_the_cpu_model():
    """Unpacked rows longer than the window (auto: flex on CUDA), and KV-cache decoding past the window."""
    model = make_model(window=48)
    cpu = copy.deepcopy(model).cpu()
    tokens = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(0))
    assert isinstance(model.attention_masks(200, torch.device("cuda"))[48], BlockMask)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens.cuda()).cpu(), cpu(tokens), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # KV-cache decoding past the window equals the full forward
        full = model(tokens[:, :80].cuda())
        cache = KVCache(batch_size=2, max_seq_len=80, num_layers=3, num_kv_heads=2, head_dim=64,
                        dtype=torch.float32, device="cuda")
        pieces = [model(tokens[:, :30].cuda(), kv_cache=cache)]
        pieces += [model(tokens[:, i:i + 1].cuda(), kv_cache=cache) for i in range(30, 80)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    generated = generate(model, tokens[:, :40].cuda(), max_new_tokens=40)  # runs past the window on CUDA
    assert generated.shape == (2, 80)
