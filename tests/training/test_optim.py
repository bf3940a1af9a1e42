"""Optimizers by name: the right class and settings, SGD's momentum by hand, torchao's low-bit AdamW close to AdamW."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mytune.errors import ConfigError
from mytune.training.optim import build_optimizer


def test_adamw_and_sgd_settings():
    params = [torch.nn.Parameter(torch.randn(3))]
    adamw = build_optimizer(params, "adamw", lr=1e-3, weight_decay=0.1, device="cpu")
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["lr"] == 1e-3 and adamw.defaults["weight_decay"] == 0.1
    assert not adamw.defaults["fused"]  # fused only when device and parameters are CUDA
    sgd = build_optimizer(params, "sgd", lr=0.1, weight_decay=0.0, device="cpu")
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="optimizer='adam' is not known; use one of adamw, sgd, adamw8bit"):
        build_optimizer(params, "adam", lr=1e-3, weight_decay=0.0, device="cpu")


def test_sgd_momentum_and_weight_decay_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer([p], "sgd", lr=0.1, weight_decay=0.5, device="cpu")
    expected, buf = torch.tensor([1.0, -2.0]), None
    for _ in range(3):
        opt.zero_grad()
        (p ** 2).sum().backward()  # grad 2p
        opt.step()
        d = 2 * expected + 0.5 * expected
        buf = d if buf is None else 0.9 * buf + d
        expected = expected - 0.1 * buf
    torch.testing.assert_close(p.detach(), expected)


def run_steps(name: str, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: the smallest that torchao quantizes
    start = weight.detach().clone()
    opt = build_optimizer([weight], name, lr=1e-2, weight_decay=0.01, device="cpu")
    for _ in range(steps):
        opt.zero_grad()
        ((weight - target) ** 2).sum().backward()
        opt.step()
    return start, weight.detach(), opt


@pytest.mark.parametrize("name, state_class, min_cosine", [("adamw8bit", "OptimState8bit", 0.999),
                                                           ("adamw4bit", "OptimState4bit", 0.9)])
def test_low_bit_adamw_follows_adamw(name, state_class, min_cosine, monkeypatch):
    """Eager here (torch.compile stubbed out: inductor on CPU takes ~10 s per shape); compiled in the slow test.

    The quantized moments make each update differ a little from AdamW's (8-bit: ~1% relative, 4-bit: ~30% on this
    random problem) but it points the same way and lowers the loss as much.
    """
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    start, reference, _ = run_steps("adamw")
    _, got, opt = run_steps(name)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert type(state["exp_avg"]).__name__ == state_class and type(state["exp_avg_sq"]).__name__ == state_class
    ref_update, got_update = (reference - start).flatten(), (got - start).flatten()
    assert torch.nn.functional.cosine_similarity(got_update, ref_update, dim=0) > min_cosine
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    loss = {key: float(((w - target) ** 2).sum()) for key, w in [("start", start), ("ref", reference), ("got", got)]}
    assert loss["start"] - loss["got"] > 0.9 * (loss["start"] - loss["ref"])


def test_torchao_import_is_quiet():
    """In a fresh process (torchao not yet imported): its import-time log lines do not reach stderr."""
    script = textwrap.dedent("""
        import torch
        from mytune.training.optim import build_optimizer
        opt = build_optimizer([torch.nn.Parameter(torch.ones(64, 64))], "adamw8bit", lr=0.1, weight_decay=0.0,
                              device="cpu")
        print(type(opt).__name__)
    """)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "AdamW8bit", result.stderr
    for noise in ("Failed to load", "Enum subclass"):
        assert noise not in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MYTUNE_TEST_INDUCTOR"),
                    reason="inductor compiles for 10-30 s on a CPU; set MYTUNE_TEST_INDUCTOR=1 to run")
def test_low_bit_adamw_compiled_step():
    """The real (torch.compile'd) torchao update, and its compile-time warning silenced."""
    import warnings

    w = torch.nn.Parameter(torch.ones(64, 64))
    opt = build_optimizer([w], "adamw4bit", lr=0.1, weight_decay=0.0, device="cpu")
    w.sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import mytune.training.optim as optim_module

        optim_module._import_torchao_optim()  # re-install the filter inside the recording context
        opt.step()
    assert torch.allclose(w.detach(), torch.full((64, 64), 0.9), atol=1e-3)  # first step: lr against the sign
    assert not [c for c in caught if "_stable_hash_for_caching" in str(c.message)]
