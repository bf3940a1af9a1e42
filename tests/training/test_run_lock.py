"""The output_dir lock and the cleaning of killed runs' leftovers (mytune/training/run_dir.py), pruning that keeps
the checkpoint just saved, and metrics.jsonl cut back to the resumed step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mytune.errors import MytuneError
from mytune.training.metrics import read_metrics, truncate_metrics
from mytune.training.recipe_state import prune_checkpoints
from mytune.training.run_dir import (
    LOCK_FILE,
    check_checkpoints_ahead,
    lock_output_dir,
    remove_leftovers,
    remove_stale_cache_temps,
)

REPO = Path(__file__).resolve().parents[2]
HOLD_LOCK = "import sys, time; from mytune.training.run_dir import lock_output_dir; lock_output_dir(sys.argv[1]); " \
            "print('locked', flush=True); time.sleep(120)"


def hold_lock_in_subprocess(output_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holders_lock_is_reclaimed(tmp_path):
    holder = hold_lock_in_subprocess(tmp_path / "out")
    try:
        with pytest.raises(MytuneError, match=rf"in use by another run \(pid {holder.pid} on .+, started 20"):
            lock_output_dir(tmp_path / "out")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "out" / LOCK_FILE).is_file()  # kill -9 left the file; its flock died with the process
    lock = lock_output_dir(tmp_path / "out")
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    lock_output_dir(tmp_path / "out").release()  # free again after a release
    assert (tmp_path / "out").is_dir()  # it was there before: kept, although empty
    lock_output_dir(tmp_path / "new").release()
    assert not (tmp_path / "new").exists()  # created for a run that wrote nothing: removed again


def test_leftovers_of_killed_saves_are_removed_and_others_kept(tmp_path):
    for name in (".tmp-step_6-4242", ".old-step_4-4242", ".tmp-base_model-17", "step_4", ".keep-me", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_4" / ".recipe_state.pt.tmp-4242").write_bytes(b"half")
    (tmp_path / "step_4" / "model.safetensors").write_bytes(b"x")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".old-step_4-4242", ".recipe_state.pt.tmp-4242", ".tmp-base_model-17",
                                               ".tmp-step_6-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep-me", "notes", "step_4"]
    assert [p.name for p in (tmp_path / "step_4").iterdir()] == ["model.safetensors"]


def test_cache_temp_folders_are_removed_only_when_nothing_wrote_to_them_for_an_hour(tmp_path):
    stale, fresh, entry = tmp_path / ".tmp-abc-x1y2", tmp_path / ".tmp-def-z3w4", tmp_path / "abc"
    for folder in (stale, fresh, entry):
        folder.mkdir()
        (folder / "tokens.npy").write_bytes(b"0")
    old = time.time() - 2 * 3600
    for path in (stale / "tokens.npy", stale, entry / "tokens.npy", entry):
        os.utime(path, (old, old))
    assert remove_stale_cache_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "abc"]


def make_steps(output_dir: Path, *steps: int, complete: bool = True) -> None:
    for step in steps:
        (output_dir / f"step_{step}").mkdir(parents=True)
        if complete:
            (output_dir / f"step_{step}" / "recipe_state.pt").write_bytes(b"")


def test_checkpoints_ahead_of_the_start_are_refused_deleted_with_overwrite_or_with_latest_when_incomplete(tmp_path):
    make_steps(tmp_path, 2, 10)
    with pytest.raises(MytuneError, match=r"already holds checkpoints of another run \(step_2, step_10\): continue it "
                                          r"with resume_from_checkpoint=latest, start over with overwrite_output_dir"):
        check_checkpoints_ahead(tmp_path, None, overwrite=False, latest=False)
    with pytest.raises(MytuneError, match=r"checkpoints past .*step_2 \(step_10\)"):
        check_checkpoints_ahead(tmp_path, tmp_path / "step_2", overwrite=False, latest=False)
    check_checkpoints_ahead(tmp_path, tmp_path / "step_2", overwrite=True, latest=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    make_steps(tmp_path, 4, complete=False)  # a save killed before its recipe_state.pt
    check_checkpoints_ahead(tmp_path, tmp_path / "step_2", overwrite=False, latest=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    check_checkpoints_ahead(tmp_path, None, overwrite=True, latest=False)
    assert list(tmp_path.iterdir()) == []


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    make_steps(tmp_path, 4, 10)  # step_10: another run's; step_4: this run's newest
    assert prune_checkpoints(tmp_path, 1, protect=tmp_path / "step_4") == [tmp_path / "step_10"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_4"]
    make_steps(tmp_path, 2, 6)
    assert prune_checkpoints(tmp_path, 2, protect=tmp_path / "step_6") == [tmp_path / "step_2"]


def test_metrics_are_cut_back_to_the_resumed_step_and_a_torn_last_row_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, 7)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 7, "lo')
    truncate_metrics(path, 4)
    assert read_metrics(path) == rows[:4]
    truncate_metrics(path, 0)
    assert read_metrics(path) == []
    truncate_metrics(tmp_path / "missing.jsonl", 3)
    assert not (tmp_path / "missing.jsonl").exists()
