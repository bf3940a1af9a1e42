"""Attention masks and backends: compiled flex attention (block mask) against the dense-mask SDPA reference.

flex has no CPU backward in torch 2.13, so the CPU checks are forward-only; forward+backward runs in
tests/gpu/test_attention_cuda.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from mytune.errors import MytuneError
from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules.attention import (
    causal_mask,
    choose_backend,
    document_block_mask,
    document_causal_mask,
    fused_flex_attention,
    sdpa,
)
from mytune.training.layer_wrappers import apply_activation_checkpointing, compile_layers

TOLERANCE = 1e-5  # fp32


def packed_document_ids(seq: int) -> torch.Tensor:
    """Two rows `[2, seq]`: several documents of uneven lengths then padding (-1), and one long document."""
    lengths = [seq // 4, seq // 3, seq // 5, 7]
    first = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    first = torch.cat([first, torch.full((seq - len(first),), -1)])
    second = torch.cat([torch.zeros(seq - 9, dtype=torch.long), torch.full((9,), -1)])
    return torch.stack([first, second])


def packed_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at every document (and at the padding), as the collate builds them."""
    positions = torch.zeros_like(document_ids)
    for row, ids in enumerate(document_ids):
        for doc in ids.unique():
            where = (ids == doc).nonzero().squeeze(-1)
            positions[row, where] = torch.arange(len(where))
    return positions


# seq 200 is not a multiple of the 128-token block, 256 is (each compile costs seconds on the CPU: two cases)
@pytest.mark.parametrize(("seq", "window"), [(200, 37), (256, None)])
def test_compiled_flex_equals_dense_sdpa_on_packed_rows(seq, window):
    generator = torch.Generator().manual_seed(seq)
    q = torch.randn(2, 8, seq, 16, generator=generator)
    k, v = (torch.randn(2, 2, seq, 16, generator=generator) for _ in range(2))  # GQA: 4 query heads per kv head
    document_ids = packed_document_ids(seq)
    expected = sdpa(q, k, v, document_causal_mask(document_ids, window))
    actual = fused_flex_attention(q, k, v, document_block_mask(document_ids, window))
    assert (actual - expected).abs().max() < TOLERANCE
    assert expected.abs().max() > 0.5


def test_sdpa_repeats_kv_heads_like_enable_gqa():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 40, 8, generator=generator)
    k, v = (torch.randn(2, 2, 40, 8, generator=generator) for _ in range(2))
    mask = document_causal_mask(packed_document_ids(40), sliding_window=5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(sdpa(q, k, v, mask, repeat_kv=True), expected)  # the CUDA way
    torch.testing.assert_close(sdpa(q, k, v, mask), expected)  # the CPU default: enable_gqa


def test_document_mask_with_sliding_window():
    mask = document_causal_mask(torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]]), sliding_window=2)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_causal_mask_is_bottom_right_aligned_after_a_cache():
    # 2 new queries at positions 3 and 4 of 5; window 2: each sees itself and the position before it
    expected = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5, sliding_window=2), expected)
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


def test_backend_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_backend("auto", cuda, packed=True, sliding_window=None) == "flex"
    assert choose_backend("auto", cuda, packed=False, sliding_window=64) == "flex"
    assert choose_backend("auto", cuda, packed=False, sliding_window=None) == "sdpa"  # is_causal: flash
    assert choose_backend("auto", cpu, packed=True, sliding_window=64) == "sdpa"  # flex: no CPU backward
    assert choose_backend("flex", cpu, packed=False, sliding_window=None) == "flex"
    assert choose_backend("sdpa", cuda, packed=True, sliding_window=None) == "sdpa"
    with pytest.raises(MytuneError, match="attention_backend must be one of auto, sdpa, flex; got 'fast'"):
        choose_backend("fast", cpu, packed=True, sliding_window=None)
    with pytest.raises(MytuneError, match="attention_backend"):
        TransformerDecoder(ModelArgs(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2), attention_backend="fast")


def windowed_model(**kw) -> TransformerDecoder:
    """A qwen2 model whose first layer attends fully and second slides (window 37), GQA 4/2."""
    torch.manual_seed(0)
    args = ModelArgs(model_type="qwen2", attention_bias=True, vocab_size=64, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=37,
                     max_window_layers=1)
    return TransformerDecoder(args, **kw).eval()


def test_one_mask_per_window_built_by_the_backend():
    model = windowed_model()
    document_ids = packed_document_ids(50)
    masks = model.attention_masks(50, torch.device("cpu"), document_ids)  # auto on CPU: dense masks
    assert set(masks) == {None, 37} and all(isinstance(m, torch.Tensor) for m in masks.values())
    assert model.attention_masks(50, torch.device("cpu")) == {None: None, 37: None}  # unpacked: is_causal / own window
    short = model.attention_masks(30, torch.device("cpu"), document_ids[:, :30])
    assert short[None] is short[37]  # a window of 37 over 30 tokens cuts nothing: the full mask is shared
    model.attention_backend = "flex"
    flex = model.attention_masks(50, torch.device("cpu"), document_ids)
    assert all(isinstance(m, BlockMask) for m in flex.values())


def test_compiled_checkpointed_layers_with_flex_equal_the_dense_path():
    """Packed rows, GQA, a full and a sliding layer: flex inside per-layer compiled, checkpointed layers (forward)."""
    model = windowed_model()
    seq = 200
    document_ids = packed_document_ids(seq)
    position_ids = packed_position_ids(document_ids)
    tokens = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens, position_ids=position_ids, document_ids=document_ids)
        model.attention_backend = "flex"
        apply_activation_checkpointing(model)
        compile_layers(model)
        actual = model(tokens, position_ids=position_ids, document_ids=document_ids)
    assert (actual - expected).abs().max() < TOLERANCE
