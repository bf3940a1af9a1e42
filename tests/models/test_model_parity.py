"""TransformerDecoder against transformers (same weights -> same logits) and against float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from mytune.errors import MytuneError
from mytune.models import ModelArgs, TransformerDecoder, llama_tiny
from mytune.modules import KVCache, RMSNorm, rope_inv_freq
from mytune.modules.attention import Attention
from mytune.modules.rope import apply_rotary
from tests.models.hf_reference import (
    FAMILY_CONFIGS,
    SLIDING_CONFIGS,
    WINDOW,
    make_hf_model,
    ours_from_hf,
    random_tokens,
)

TOLERANCE = 1e-5


@pytest.mark.parametrize("family", [*FAMILY_CONFIGS, *SLIDING_CONFIGS])
def test_logits_match_transformers(family):
    hf = make_hf_model(family, attn_implementation="eager")  # eager: an independent attention implementation
    ours = ours_from_hf(hf)
    tokens = random_tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    assert actual.shape == expected.shape == (2, 48, 320)
    diff = (actual - expected).abs().max().item()
    print(f"{family}: max abs logit diff {diff:.2e}")
    assert diff < TOLERANCE
    assert expected.abs().max() > 0.5  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("family", ["llama3_gqa_scaled_rope", "qwen3_qk_norm_head_dim"])
def test_explicit_position_ids_match_transformers(family):
    hf = make_hf_model(family)
    ours = ours_from_hf(hf)
    tokens = random_tokens(seq=16)
    # restarting positions (as for packed samples): RoPE is relative, so a uniform shift alone would change nothing
    positions = torch.cat([torch.arange(8), torch.arange(100, 108)]).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        diff = (ours(tokens, positions) - hf(tokens, position_ids=positions).logits).abs().max().item()
    assert diff < TOLERANCE
    with torch.no_grad():  # and the positions do matter
        assert (ours(tokens, positions) - ours(tokens)).abs().max() > 1e-3


def test_state_dict_keys_are_transformers_keys():
    for family in FAMILY_CONFIGS:
        hf = make_hf_model(family)
        ours = ours_from_hf(hf)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


def test_tied_head_is_the_embedding_parameter():
    model = TransformerDecoder(ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))
    untied = llama_tiny()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_rms_norm_matches_float64_reference():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 48) * 3
    x64 = x.double()
    expected = norm.weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert (norm(x).double() - expected).abs().max() < 1e-5


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0,
                         rope_scaling=dict(scaling), max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    actual = rope_inv_freq(64, 500000.0, scaling)
    assert torch.equal(actual, expected)
    plain = rope_inv_freq(64, 500000.0)
    assert not torch.allclose(actual, plain)  # scaling changed the low frequencies...
    assert torch.equal(actual[:8], plain[:8])  # ...and kept the high ones


def naive_causal_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(d) + causal mask) v with kv heads repeated for GQA."""
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, 1).double(), v.repeat_interleave(repeats, 1).double()
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    seq = q.shape[2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_matches_float64_reference_with_gqa_and_qk_norm():
    torch.manual_seed(0)
    attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=12, qkv_bias=True, qk_norm=True)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, 32)
    cos, sin = (f(torch.randn(2, 9, 12)) for f in (torch.cos, torch.sin))
    q = attn.q_norm(attn.q_proj(x).view(2, 9, 4, 12)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(2, 9, 2, 12)).transpose(1, 2)
    v = attn.v_proj(x).view(2, 9, 2, 12).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    expected = attn.o_proj(naive_causal_attention(q, k, v).float().transpose(1, 2).reshape(2, 9, 48))
    assert (attn(x, cos, sin) - expected).abs().max() < 1e-5


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = llama_tiny(vocab_size=100).eval()
    tokens = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(batch_size=2, max_seq_len=32, num_layers=4, num_kv_heads=2, head_dim=32,
                        dtype=torch.float32, device="cpu")
        pieces = [model(tokens[:, :8], kv_cache=cache)]            # prefill
        pieces += [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(8, 12)]  # one token at a time
        pieces.append(model(tokens[:, 12:20], kv_cache=cache))     # a chunk after a cached prefix
    assert cache.seq_len == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["mistral_sliding", "qwen2_sliding"])
def test_sliding_window_is_modelled_on_the_right_layers(family):
    """The window cuts (48 tokens > 16): without it the logits differ; qwen2 slides only from max_window_layers on."""
    import dataclasses

    hf = make_hf_model(family)
    ours = ours_from_hf(hf)
    expected_windows = [None, WINDOW] if family.startswith("qwen") else [WINDOW, WINDOW]
    assert [layer.self_attn.sliding_window for layer in ours.model.layers] == expected_windows
    full = TransformerDecoder(dataclasses.replace(ours.args, sliding_window=None, max_window_layers=0)).eval()
    full.load_state_dict(ours.state_dict())
    tokens = random_tokens()
    with torch.no_grad():
        assert (ours(tokens)[:, WINDOW:] - full(tokens)[:, WINDOW:]).abs().max() > 1e-2
        torch.testing.assert_close(ours(tokens)[:, :WINDOW], full(tokens)[:, :WINDOW])  # inside the window: equal


def test_kv_cache_decoding_with_a_sliding_window_matches_full_forward():
    ours = ours_from_hf(make_hf_model("qwen2_sliding"))
    tokens = random_tokens(seq=40)
    with torch.no_grad():
        full = ours(tokens)
        cache = KVCache(batch_size=2, max_seq_len=48, num_layers=2, num_kv_heads=2, head_dim=16,
                        dtype=torch.float32, device="cpu")
        pieces = [ours(tokens[:, :20], kv_cache=cache)]            # a prefill longer than the window
        pieces += [ours(tokens[:, i:i + 1], kv_cache=cache) for i in range(20, 30)]  # decoding past the window
        pieces.append(ours(tokens[:, 30:40], kv_cache=cache))     # a chunk after a cached prefix
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_init_is_deterministic_and_hf_like():
    torch.manual_seed(3)
    a = llama_tiny()
    torch.manual_seed(3)
    b = llama_tiny()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.model.norm.weight, torch.ones(128))
    assert abs(a.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002


def test_forward_keeps_model_dtype():
    model = llama_tiny().to(torch.bfloat16)
    assert model(torch.randint(0, 512, (1, 5))).dtype == torch.bfloat16
    inv_freq = model.model.rotary_emb.inv_freq  # `.to(dtype)` must not round the RoPE frequencies
    assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, rope_inv_freq(32, 10000.0))


def test_gradients_flow_to_every_parameter():
    model = llama_tiny(vocab_size=64)
    tokens = torch.randint(0, 64, (2, 10))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = TransformerDecoder(ModelArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
    assert all(p.is_meta for p in model.parameters())


def test_inconsistent_family_options_are_user_errors():
    with pytest.raises(MytuneError, match="qwen2.*attention_bias=True"):
        ModelArgs(model_type="qwen2")
    with pytest.raises(MytuneError, match="qk_norm"):
        ModelArgs(model_type="llama", qk_norm=True)
    with pytest.raises(MytuneError, match="multiple of num_key_value_heads"):
        ModelArgs(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(MytuneError, match="rope_scaling type 'yarn' is not supported"):
        ModelArgs(rope_scaling={"rope_type": "yarn", "factor": 4.0})
