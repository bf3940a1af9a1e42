import math

import pytest
import torch

from mytune.training.lr_schedule import build_lr_scheduler, lr_multiplier


def test_warmup_then_cosine_reaches_min_ratio():
    kw = dict(schedule="cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    warm = [lr_multiplier(s, **kw) for s in range(4)]
    assert warm == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert lr_multiplier(4, **kw) == pytest.approx(1.0)
    assert lr_multiplier(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(14, **kw) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_multiplier(5, schedule="linear", warmup_steps=0, total_steps=10) == pytest.approx(0.5)
    assert lr_multiplier(9, schedule="constant", warmup_steps=0, total_steps=10) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(5, schedule="bogus", warmup_steps=0, total_steps=10)


def test_scheduler_drives_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_lr_scheduler(opt, schedule="linear", warmup_steps=0, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 0.375, 0.25, 0.125])
