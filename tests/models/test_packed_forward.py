"""Packed rows: with document ids and restarting positions, each sample's logits equal running it alone."""

import pytest
import torch

from mytune.data.packing import document_attention_mask
from mytune.models import TransformerDecoder, model_args
from mytune.modules.attention import document_causal_mask
from tests.models.hf_reference import make_hf_model, ours_from_hf, random_tokens

TOLERANCE = 1e-5  # as the parity tests against transformers


def test_packed_logits_equal_samples_run_alone():
    torch.manual_seed(0)
    model = TransformerDecoder(model_args("llama_tiny")).eval()
    lengths = [5, 9, 3]
    samples = [torch.randint(0, model.args.vocab_size, (n,)) for n in lengths]
    pad = 4
    tokens = torch.cat([*samples, torch.zeros(pad, dtype=torch.long)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]
    with torch.no_grad():
        packed = model(tokens, position_ids=position_ids, document_ids=document_ids)[0]
        start = 0
        for sample in samples:
            alone = model(sample[None])[0]
            torch.testing.assert_close(packed[start:start + len(sample)], alone, rtol=1e-5, atol=1e-5)
            start += len(sample)
        # Without the document mask the later samples would see the earlier ones.
        leaky = model(tokens, position_ids=position_ids)[0]
        assert (leaky[lengths[0]:sum(lengths)] - packed[lengths[0]:sum(lengths)]).abs().max() > 1e-3


def test_mask_is_causal_within_documents_and_the_data_pipeline_uses_it():
    ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = document_causal_mask(ids)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert document_attention_mask is document_causal_mask


def pack(samples: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, position_ids, document_ids) `[1, s]` of `samples` packed into one row with `pad` padding tokens."""
    tokens = torch.cat([*samples, torch.zeros(pad, dtype=torch.long)])[None]
    position_ids = torch.cat([torch.arange(len(t)) for t in samples] + [torch.arange(pad)])[None]
    document_ids = torch.cat([torch.full((len(t),), i) for i, t in enumerate(samples)] + [torch.full((pad,), -1)])
    return tokens, position_ids, document_ids[None]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("family", ["mistral_sliding", "qwen2_sliding"])
def test_packed_sliding_window_logits_equal_transformers_on_each_sample(family, backend):
    """Samples longer than the 16-token window, packed: each sample's logits are transformers' for it alone (flex
    is forward-only on the CPU, compiled)."""
    hf = make_hf_model(family)
    ours = ours_from_hf(hf)
    ours.attention_backend = backend
    samples = [random_tokens(batch=1, seq=n, seed=n)[0] for n in (40, 7, 30)]
    tokens, position_ids, document_ids = pack(samples, pad=5)
    with torch.no_grad():
        packed = ours(tokens, position_ids=position_ids, document_ids=document_ids)[0]
        start = 0
        for sample in samples:
            expected = hf(sample[None]).logits[0]
            assert (packed[start:start + len(sample)] - expected).abs().max() < TOLERANCE
            start += len(sample)
