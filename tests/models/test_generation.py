"""KV-cached decoding against transformers' generate and against cache-free recomputation."""

import pytest
import torch

from mytune.generation import generate, sample_next
from tests.models.hf_reference import make_hf_model, ours_from_hf, random_tokens


@pytest.mark.parametrize("family, prompt_len, new_tokens", [
    ("llama3_gqa_scaled_rope", 12, 32),
    # prompt 20 + 30 new tokens with a 16-token window: both the prefill and the decoding steps cut the window
    ("mistral_sliding", 20, 30),
    ("qwen2_sliding", 20, 30),
])
def test_greedy_matches_transformers_generate(family, prompt_len, new_tokens):
    hf = make_hf_model(family)
    ours = ours_from_hf(hf)
    prompt = random_tokens(batch=2, seq=prompt_len)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    actual = generate(ours, prompt, max_new_tokens=new_tokens)
    assert actual.shape == (2, prompt_len + new_tokens)
    assert torch.equal(actual, expected)


def test_greedy_with_cache_equals_recomputing_everything():
    hf = make_hf_model("qwen3_qk_norm_head_dim")
    ours = ours_from_hf(hf)
    prompt = random_tokens(batch=1, seq=5)[0].tolist()
    generated = generate(ours, prompt, max_new_tokens=10)[0].tolist()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            tokens.append(int(ours(torch.tensor([tokens]))[0, -1].argmax()))
    assert generated == tokens


def test_stop_ids_end_generation_and_pad_finished_rows():
    hf = make_hf_model("mistral")
    ours = ours_from_hf(hf)
    prompt = random_tokens(batch=1, seq=6)
    free = generate(ours, prompt, max_new_tokens=12)[0, 6:].tolist()
    stop = free[3]
    stopped = generate(ours, prompt, max_new_tokens=12, stop_ids=[stop])[0, 6:].tolist()
    assert stopped == free[:free.index(stop) + 1]


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), greedy)
    top5 = logits.topk(5, dim=-1).indices
    for seed in range(20):
        ids = sample_next(logits, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(seed))
        assert all(int(i) in row.tolist() for i, row in zip(ids, top5))
    probs = logits.softmax(-1)
    for seed in range(20):  # top_p=0.5: only the smallest set of most likely tokens whose mass reaches 0.5
        ids = sample_next(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(seed))
        for row, i in enumerate(ids.tolist()):
            assert probs[row][probs[row] > probs[row, i]].sum() < 0.5
    a = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
