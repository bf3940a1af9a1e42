"""What a run may do to its output_dir (full_finetune_single_device, in process, tiny): a fresh run refuses an
output_dir holding another run's checkpoints unless told (overwrite_output_dir=true), a second run is refused while
the first holds the lock, and a resumed run cleans up what the killed run left and logs each step once."""

import os
import shutil
from pathlib import Path

import pytest

from mytune.errors import MytuneError
from mytune.training.metrics import read_metrics
from mytune.training.recipe_state import latest_checkpoint
from mytune.training.run_dir import lock_output_dir
from recipes import full_finetune_single_device as recipe
from tests.support import tiny_full_params

@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished 4-step run saving every 2 steps: step_2, step_4 and four metrics rows."""
    root = tmp_path_factory.mktemp("earlier")
    recipe.recipe_main(tiny_full_params(root / "out", root / "cache", "max_steps_per_epoch=4", "save_every_n_steps=2"))
    return root


def copy_of(earlier_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(earlier_run / "out", tmp_path / "out")
    return tmp_path / "out"


def test_a_fresh_run_refuses_another_runs_checkpoints_and_overwrite_replaces_them(earlier_run, tmp_path):
    """The issue's case: a shorter fresh run with keep_last_n_checkpoints=1 used to save step_2, prune it itself
    (keeping the older run's step_4) and exit 0, so `latest` picked the other run's checkpoint."""
    out, cache = copy_of(earlier_run, tmp_path), earlier_run / "cache"
    shorter = ("max_steps_per_epoch=2", "keep_last_n_checkpoints=1", "lr=1e-4")
    with pytest.raises(MytuneError, match=r"already holds checkpoints of another run \(step_2, step_4\): continue it "
                                          r"with resume_from_checkpoint=latest, start over with overwrite_output_dir"):
        recipe.recipe_main(tiny_full_params(out, cache, *shorter))
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2", "step_4"]  # untouched

    saved = recipe.recipe_main(tiny_full_params(out, cache, *shorter, "overwrite_output_dir=true"))
    assert saved == out / "step_2" and latest_checkpoint(out) == saved
    assert [p.name for p in out.glob("step_*")] == ["step_2"]
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2]  # this run's rows only
    assert all(row["lr"] == 1e-4 for row in read_metrics(out / "metrics.jsonl"))


def test_a_second_run_into_a_locked_output_dir_is_refused_naming_the_holder(earlier_run, tmp_path):
    lock = lock_output_dir(tmp_path / "out")  # another run holds it (an flock: any other open of the file conflicts)
    try:
        with pytest.raises(MytuneError, match=rf"output_dir .* is in use by another run \(pid {os.getpid()} on "):
            recipe.recipe_main(tiny_full_params(tmp_path / "out", earlier_run / "cache", "max_steps_per_epoch=2"))
        assert [p.name for p in (tmp_path / "out").iterdir()] == [".mytune.lock"]  # the refused run wrote nothing
    finally:
        lock.release()


def test_a_resume_removes_a_killed_saves_leftovers_and_logs_each_step_once(earlier_run, tmp_path):
    """As if killed while saving step_4: the complete step_2, the save's temporary dir, and rows for steps 3-4."""
    out = copy_of(earlier_run, tmp_path)
    os.replace(out / "step_4", out / ".tmp-step_4-99999999")
    (out / "step_2" / ".recipe_state.pt.tmp-99999999").write_bytes(b"torn")
    recipe.recipe_main(tiny_full_params(out, earlier_run / "cache", "max_steps_per_epoch=4", "save_every_n_steps=2",
                              "resume_from_checkpoint=latest"))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step_2", "step_4"]
    assert not (out / "step_2" / ".recipe_state.pt.tmp-99999999").exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    earlier = read_metrics(earlier_run / "out" / "metrics.jsonl")
    assert [row["loss"] for row in rows] == [row["loss"] for row in earlier]  # the resumed steps, bitwise
