"""Resume state: a bitwise round trip of optimizer, scheduler and RNG streams; finding and pruning step_N dirs."""

import copy
import random

import numpy as np
import pytest
import torch

from mytune.checkpoint.atomic import atomic_directory
from mytune.errors import MytuneError
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.recipe_state import (
    RECIPE_STATE_FILE,
    latest_checkpoint,
    load_recipe_state,
    prune_checkpoints,
    save_recipe_state,
)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = build_lr_scheduler(optimizer, schedule="cosine", warmup_steps=2, total_steps=10)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    x = torch.randn(5, 8)  # draws from the global torch RNG, like dropout or sampling would
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def draws():
    return random.random(), torch.rand(3), float(np.random.rand())


def test_round_trip_restores_optimizer_bitwise_and_continues_rng_streams(tmp_path):
    model, optimizer, scheduler = setup()
    random.seed(1), np.random.seed(1)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(5)
    torch.randperm(10, generator=generator)
    path = save_recipe_state(
        tmp_path / "step_3", optimizer=optimizer, lr_scheduler=scheduler, global_step=3, epoch=1,
        dataloader_state={"batches_consumed": 6, "generator": generator.get_state()}, extra={"best_loss": 0.5},
    )
    assert path == tmp_path / "step_3" / RECIPE_STATE_FILE and not list((tmp_path / "step_3").glob(".*"))
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_scheduler = copy.deepcopy(scheduler.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = draws()
    train_step(model, optimizer, scheduler)
    expected_after = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process: same construction, weights from the checkpoint, then the recipe state.
    model2, optimizer2, scheduler2 = setup(seed=123)
    model2.load_state_dict(weights)
    random.seed(99), np.random.seed(99)
    state = load_recipe_state(tmp_path / "step_3", optimizer=optimizer2, lr_scheduler=scheduler2)
    assert (state.global_step, state.epoch, state.extra) == (3, 1, {"best_loss": 0.5})
    assert state.dataloader_state["batches_consumed"] == 6
    restored = optimizer2.state_dict()
    assert restored["param_groups"] == saved_optimizer["param_groups"]
    for index, entry in saved_optimizer["state"].items():
        for name, value in entry.items():
            assert torch.equal(restored["state"][index][name], value), (index, name)
    assert scheduler2.state_dict() == saved_scheduler

    restored_generator = torch.Generator()
    restored_generator.set_state(state.dataloader_state["generator"])
    torch.testing.assert_close(torch.randperm(10, generator=restored_generator),
                               torch.randperm(10, generator=generator))
    got_draws = draws()
    assert got_draws[0] == expected_draws[0] and got_draws[2] == expected_draws[2]
    assert torch.equal(got_draws[1], expected_draws[1])
    train_step(model2, optimizer2, scheduler2)
    for key, value in expected_after.items():
        assert torch.equal(model2.state_dict()[key], value), key  # bitwise: same moments, same step, same lr


def test_unsafe_values_are_refused_at_save_time(tmp_path):
    _, optimizer, _ = setup()

    with pytest.raises(TypeError, match="weights_only"):
        save_recipe_state(tmp_path, optimizer=optimizer, lr_scheduler=None, dataloader_state={"x": tmp_path},
                          global_step=0, epoch=0)
    assert not (tmp_path / RECIPE_STATE_FILE).exists()
    with pytest.raises(MytuneError, match="not a resumable checkpoint"):
        load_recipe_state(tmp_path, optimizer=optimizer, lr_scheduler=None)


def make_step_dir(output_dir, step, resumable=True):
    with atomic_directory(output_dir / f"step_{step}") as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
    if resumable:
        (output_dir / f"step_{step}" / RECIPE_STATE_FILE).write_bytes(b"state")


def test_latest_checkpoint_skips_incomplete_and_temporary_dirs(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 4):
        make_step_dir(tmp_path, step)
    make_step_dir(tmp_path, 12, resumable=False)  # weights written, recipe state not yet
    (tmp_path / ".tmp-step_14-123").mkdir()  # an atomic write in flight
    (tmp_path / "step_13.bak").mkdir()
    (tmp_path / "step_15").write_text("a file, not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert latest_checkpoint(tmp_path, require_recipe_state=False) == tmp_path / "step_12"


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 10, 20):
        make_step_dir(tmp_path, step)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert deleted == [tmp_path / f"step_{n}" for n in (1, 2, 3)]  # numeric order: step_10 is newer than step_3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step_10", "step_20"]
    assert prune_checkpoints(tmp_path, keep_last=5) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_fsdp_full_optimizer_state_round_trip_as_a_world_of_one(tmp_path):
    """With `model`, the sharded optimizer state is saved as a full FQN-keyed state dict and loaded back into a
    freshly sharded model; the next step is then bitwise the step the original run takes (checked with 2 ranks too,
    by hand, under torchrun)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from mytune.models.transformer import ModelArgs, TransformerDecoder
    from mytune.training import distributed
    from mytune.training.loss import cross_entropy_sum

    args = ModelArgs(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        full = TransformerDecoder(args).state_dict()
        with torch.device("meta"):
            model = TransformerDecoder(args)
        distributed.shard_model(model, bf16=False, cpu_offload=False)
        distributed.load_full_state_dict(model, full, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, build_lr_scheduler(optimizer, schedule="linear", warmup_steps=1, total_steps=9)

    def step(model, optimizer, scheduler):
        cross_entropy_sum(model(tokens), tokens).backward()
        optimizer.step(), optimizer.zero_grad(), scheduler.step()

    def full_weights(model):
        return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    distributed.init_distributed("cpu")
    try:
        model, optimizer, scheduler = build()
        step(model, optimizer, scheduler)
        save_recipe_state(tmp_path, optimizer=optimizer, lr_scheduler=scheduler, dataloader_state=None,
                          global_step=1, epoch=0, model=model)
        weights = full_weights(model)
        step(model, optimizer, scheduler)

        model2, optimizer2, scheduler2 = build()
        set_model_state_dict(model2, weights, options=StateDictOptions(full_state_dict=True))
        with pytest.raises(MytuneError, match="saved with `model`"):
            load_recipe_state(tmp_path, optimizer=optimizer2, lr_scheduler=scheduler2)
        assert load_recipe_state(tmp_path, optimizer=optimizer2, lr_scheduler=scheduler2, model=model2).global_step == 1
        step(model2, optimizer2, scheduler2)
        expected, got = full_weights(model), full_weights(model2)
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    finally:
        distributed.destroy_distributed()


def test_resolve_resume_dir(tmp_path, capsys):
    from mytune.training.recipe_state import resolve_resume_dir

    assert resolve_resume_dir("", tmp_path) is None
    assert resolve_resume_dir("latest", tmp_path) is None and "starting fresh" in capsys.readouterr().out
    step = tmp_path / "step_4"
    step.mkdir()
    (step / "recipe_state.pt").write_bytes(b"")
    assert resolve_resume_dir("latest", tmp_path) == step
    assert resolve_resume_dir(str(step), tmp_path) == step
    with pytest.raises(MytuneError, match=r"with recipe_state.pt and adapter\); use latest"):
        resolve_resume_dir(str(step), tmp_path, needs=("adapter",))
    (step / "adapter").mkdir()
    assert resolve_resume_dir(str(step), tmp_path, needs=("adapter",)) == step
