"""Profiler trace on CPU, peak memory units, and the FLOPs-per-token formula against a hand count."""

import json
import os

import pytest
import torch

from mytune.models.transformer import ModelArgs, TransformerDecoder
from mytune.training.profiling import flops_per_token, matmul_params, maybe_profile, peak_memory_gib


def test_profiler_writes_one_chrome_trace_of_the_active_steps(tmp_path):
    model = torch.nn.Linear(16, 16)
    with maybe_profile(True, tmp_path, wait=1, warmup=1, active=2) as prof:
        for _ in range(6):
            model(torch.randn(4, 16)).sum().backward()
            prof.step()
    traces = list((tmp_path / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0_step4.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name") == "aten::addmm" for e in events)
    assert any(e.get("name") == "ProfilerStep#2" for e in events)  # steps 0-1 are wait/warmup, 2-3 recorded
    assert not any(e.get("name") == "ProfilerStep#1" for e in events)


def test_disabled_profiler_is_a_no_op(tmp_path):
    with maybe_profile(False, tmp_path) as prof:
        prof.step()
    assert not (tmp_path / "profile").exists()


def test_cpu_peak_memory_is_in_gib():
    with open("/proc/self/statm") as f:
        resident_gib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    peak = peak_memory_gib("cpu")
    assert 0.9 * resident_gib <= peak < 64  # ru_maxrss is updated lazily; a unit error would be 1024x off


def test_flops_per_token_matches_a_hand_count():
    # vocab 10, hidden 8, 2 heads of 4 (1 kv head), mlp 12, 3 layers, sequences of 5 tokens
    args = ModelArgs(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=1)
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 12  # q, k, v, o, gate/up/down = 480
    n = 3 * per_layer + 10 * 8  # + lm_head = 1520
    assert matmul_params(args) == n == 1520
    assert flops_per_token(args, seq_len=5) == 6 * 1520 + 12 * 3 * 2 * 4 * 5 == 10560


@pytest.mark.parametrize("family", [
    dict(model_type="llama"),
    dict(model_type="llama", attention_bias=True, tie_word_embeddings=True),
    dict(model_type="qwen2", attention_bias=True),
    dict(model_type="qwen3", qk_norm=True, head_dim=6),
])
def test_matmul_params_equal_the_models_linear_parameters(family):
    args = ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, **family)
    model = TransformerDecoder(args)
    linear = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    assert matmul_params(args) == sum(linear.values())
