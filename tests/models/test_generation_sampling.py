"""Sampling filters against float64 brute force, and sampled decoding's relations to greedy decoding."""

import numpy as np
import pytest
import torch

from mytune.generation import filter_logits, generate, sample_next, stream_generate
from mytune.models import ModelArgs, TransformerDecoder
from tests.models.hf_reference import randomize_, random_tokens

ROWS, VOCAB = 400, 64


def random_logits(seed: int, rows: int = ROWS, vocab: int = VOCAB) -> torch.Tensor:
    """Logit rows of varied sharpness, so nuclei range from one token to most of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=generator) * 6
    return torch.randn(rows, vocab, generator=generator) * scale


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


def brute_force_nucleus(probs: np.ndarray, top_p: float) -> tuple[set[int], float]:
    """The minimal set of most likely tokens whose float64 mass reaches top_p, and how far the decision was from
    flipping (the distance of the cumulative masses around the cut to top_p)."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    n = int(np.searchsorted(cumulative, top_p)) + 1  # first index whose cumulative mass >= top_p, plus one
    n = min(n, len(probs))
    margins = [abs(cumulative[n - 1] - top_p)] + ([abs(cumulative[n - 2] - top_p)] if n >= 2 else [])
    return set(order[:n].tolist()), min(margins)


@pytest.mark.parametrize("top_k", [1, 2, 7, 63, 64, 100])
def test_top_k_keeps_exactly_the_k_largest(top_k):
    logits = random_logits(top_k)
    filtered = filter_logits(logits, temperature=0.7, top_k=top_k)
    reference = np.argsort(-logits.double().numpy(), axis=-1)[:, :min(top_k, VOCAB)]
    assert kept(filtered) == [set(row.tolist()) for row in reference]
    # the kept tokens keep their temperature-scaled logits, so the renormalised distribution is exact
    finite = torch.isfinite(filtered)
    torch.testing.assert_close(filtered[finite], (logits / 0.7)[finite])


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_top_p_keeps_the_minimal_nucleus(top_p, temperature):
    logits = random_logits(int(top_p * 100) + int(temperature * 10))
    filtered = filter_logits(logits, temperature=temperature, top_p=top_p)
    probs = torch.softmax(logits.double() / temperature, dim=-1).numpy()
    ambiguous = 0
    for row, ours in zip(probs, kept(filtered)):
        expected, margin = brute_force_nucleus(row, top_p)
        if margin < 1e-6:  # float32 (cumsum error ~1e-7) cannot decide this row; it must be rare
            ambiguous += 1
            continue
        assert ours == expected
    assert ambiguous <= ROWS // 100


def test_top_k_then_top_p_renormalises_before_the_nucleus():
    logits = random_logits(7)
    filtered = filter_logits(logits, temperature=1.0, top_k=5, top_p=0.6)
    for row, ours in zip(logits.double().numpy(), kept(filtered)):
        top5 = np.argsort(-row)[:5]
        probs = np.zeros_like(row)
        probs[top5] = np.exp(row[top5] - row[top5].max())
        probs /= probs.sum()
        expected, margin = brute_force_nucleus(probs, 0.6)
        if margin >= 1e-6:
            assert ours == expected


def test_samples_follow_the_filtered_distribution():
    logits = random_logits(3, rows=1, vocab=16)[0] / 3
    draws = 20000
    ids = sample_next(logits.expand(draws, -1), temperature=1.3, top_k=6,
                      generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(ids, minlength=16).double() / draws
    expected = torch.softmax(filter_logits(logits[None], temperature=1.3, top_k=6)[0].double(), dim=-1)
    assert set(ids.unique().tolist()) <= set(torch.topk(logits, 6).indices.tolist())
    assert (frequencies - expected).abs().max() < 0.015  # ~4 standard errors at p = 0.5


def test_temperature_zero_is_argmax_and_tiny_temperature_tends_to_it():
    logits = random_logits(11)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=3, top_p=0.5), logits.argmax(-1))
    sampled = sample_next(logits, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, logits.argmax(-1))


def test_invalid_filters_are_rejected():
    logits = random_logits(0, rows=2)
    for kwargs in (dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            filter_logits(logits, **kwargs)


@pytest.fixture(scope="module")
def model():
    """A tiny GQA decoder with random weights large enough that greedy and sampled paths differ."""
    args = ModelArgs(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = TransformerDecoder(args)
    randomize_(model)
    return model.eval()


def test_seeded_sampling_is_reproducible(model):
    prompt = random_tokens(batch=2, seq=8)

    def sample(seed):
        return generate(model, prompt, max_new_tokens=16, temperature=1.0, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(5), sample(5))
    assert not torch.equal(sample(5), sample(6))


def test_sampling_with_top_k_1_equals_greedy(model):
    prompt = random_tokens(batch=2, seq=8, seed=3)
    greedy = generate(model, prompt, max_new_tokens=20)
    sampled = generate(model, prompt, max_new_tokens=20, temperature=1.5, top_k=1,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_a_batch_of_equal_length_prompts_matches_each_alone(model):
    prompt = random_tokens(batch=2, seq=10, seed=4)
    together = generate(model, prompt, max_new_tokens=24)
    for row in range(2):
        alone = generate(model, prompt[row].tolist(), max_new_tokens=24)
        assert torch.equal(together[row:row + 1], alone)


def test_stream_yields_what_generate_returns(model):
    prompt = random_tokens(batch=2, seq=6, seed=5)
    full = generate(model, prompt, max_new_tokens=12)
    steps = list(stream_generate(model, prompt, 12))
    assert len(steps) == 12
    assert torch.equal(torch.stack(steps, dim=1), full[:, 6:])
