"""Resume precedence (full_finetune_single_device, in process, tiny): values given now (config, command line) beat
the checkpoint's, the run names what changed, an optimizer change and a checkpoint past the run's last step are
one-line errors, and the nan message's advice (resume the last good checkpoint with a lower lr) works."""

import shutil
from pathlib import Path

import pytest
import torch

from mytune.errors import MytuneError
from mytune.training.metrics import read_metrics
from recipes import full_finetune_single_device as recipe
from tests.support import tiny_full_params

@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A 2-step run with lr=1e-3 (AdamW, constant schedule), saved at step_2."""
    root = tmp_path_factory.mktemp("two_steps")
    recipe.recipe_main(tiny_full_params(root / "out", root / "cache", "max_steps_per_epoch=2", "lr=1e-3"))
    return root


def resume(two_steps: Path, tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "out"
    shutil.copytree(two_steps / "out", out)
    recipe.recipe_main(tiny_full_params(out, two_steps / "cache", "resume_from_checkpoint=latest", *overrides))
    return out


def test_lr_weight_decay_and_schedule_given_now_beat_the_checkpoints_and_the_run_names_them(two_steps, tmp_path,
                                                                                         capsys):
    out = resume(two_steps, tmp_path, "max_steps_per_epoch=4", "lr=1e-4", "weight_decay=0.01")
    printed = capsys.readouterr().out
    assert "changed since the checkpoint (the new values apply): lr 0.001 -> 0.0001, weight_decay 0.0 -> 0.01, " \
           "max_steps_per_epoch 2 -> 4, total_steps 2 -> 4" in printed, printed
    lrs = {row["step"]: row["lr"] for row in read_metrics(out / "metrics.jsonl")}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-4, 4: 1e-4}
    state = torch.load(out / "step_4" / "recipe_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    assert state["extra"]["params"]["lr"] == 1e-4 and state["lr_scheduler"]["base_lrs"] == [1e-4]


def test_a_new_schedule_applies_from_the_resumed_step(two_steps, tmp_path):
    out = resume(two_steps, tmp_path, "max_steps_per_epoch=4", "lr=1e-3", "lr_scheduler=linear")
    lrs = [row["lr"] for row in read_metrics(out / "metrics.jsonl")]
    assert lrs == [1e-3, 1e-3, 1e-3 * (1 - 2 / 4), 1e-3 * (1 - 3 / 4)]  # linear decay over the 4 steps, at steps 3-4


def test_another_optimizer_is_refused_in_one_line(two_steps, tmp_path):
    with pytest.raises(MytuneError, match=r"step_2 was saved with optimizer=adamw; its state cannot continue with "
                                          r"optimizer=sgd: resume with optimizer=adamw"):
        resume(two_steps, tmp_path, "max_steps_per_epoch=4", "optimizer=sgd")


def test_fewer_total_steps_than_the_checkpoint_did_is_an_error_and_as_many_says_nothing_is_left(two_steps, tmp_path,
                                                                                              capsys):
    with pytest.raises(MytuneError, match=r"step_2 is at step 2, past this run's last step \(1 = epochs x steps per "
                                          r"epoch\): nothing to train"):
        resume(two_steps, tmp_path / "fewer", "max_steps_per_epoch=1")
    out = resume(two_steps, tmp_path / "same", "max_steps_per_epoch=2")
    assert "step_2 is the last step (2): nothing left to train" in capsys.readouterr().out
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_the_nan_advice_works_resuming_the_last_good_checkpoint_with_a_lower_lr(two_steps, tmp_path):
    """Resumed from step_2 with lr=1e30 (before: the checkpoint's 1e-3 came back and nothing diverged), the loss turns
    nan and the message names step_2; resuming it again with a lower lr, as the message advises, trains with it."""
    out = tmp_path / "out"
    shutil.copytree(two_steps / "out", out)
    run = ("max_steps_per_epoch=5", "max_grad_norm=null", f"resume_from_checkpoint={out / 'step_2'}")
    with pytest.raises(MytuneError, match=r"training diverged; lower lr \(now 1e\+30\)") as err:
        recipe.recipe_main(tiny_full_params(out, two_steps / "cache", *run, "lr=1e30"))
    assert str(err.value).split("the last good checkpoint is ")[1].split()[0] == str(out / "step_2")
    recipe.recipe_main(tiny_full_params(out, two_steps / "cache", *run, "lr=1e-4"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(row["lr"] == 1e-4 and torch.tensor(row["loss"]).isfinite() for row in rows[2:])


def test_a_checkpoint_saved_before_params_were_recorded_still_refuses_sgd_after_adamw():
    from mytune.training.lr_schedule import build_lr_scheduler
    from mytune.training.recipe_state import apply_resume_precedence

    weight = torch.nn.Parameter(torch.ones(2))
    saved = torch.optim.AdamW([weight], lr=1e-3)
    sgd = torch.optim.SGD([weight], lr=1e-3, momentum=0.9)
    sgd.load_state_dict(saved.state_dict())  # what load_recipe_state does: no error until SGD's step (KeyError)
    scheduler = build_lr_scheduler(sgd, schedule="constant", warmup_steps=0, total_steps=4)
    current = {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 0.0, "total_steps": 4}
    with pytest.raises(MytuneError, match="saved with optimizer=adamw; its state cannot continue with optimizer=sgd"):
        apply_resume_precedence(sgd, scheduler, saved=None, current=current, checkpoint_dir="old/step_2", global_step=2)
