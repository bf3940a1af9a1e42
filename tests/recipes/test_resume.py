"""Resuming full_finetune_single_device: a run killed with SIGKILL, or stopped by SIGTERM (preemption), and resumed with
`resume_from_checkpoint=latest` logs bitwise the same per-step losses as a run that was never interrupted (CPU, fp32);
the same for lora_finetune_single_device stopped by a real SIGTERM. A diverging run (nan loss) stops with one error
line naming the last good checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mytune.training.metrics import read_metrics

STEPS_PER_EPOCH, EPOCHS = 6, 3  # 18 steps: a resume lands mid-epoch and crosses epoch boundaries
RUN = ["max_seq_len=128", f"max_steps_per_epoch={STEPS_PER_EPOCH}", f"epochs={EPOCHS}", "log_every_n_steps=1",
       "save_every_n_steps=4", "dtype=fp32"]


def command(out: Path, *overrides: str, recipe: str = "full_finetune_single_device", run: list[str] = RUN) -> list[str]:
    return [sys.executable, "-m", "mytune.cli.main", recipe, "--config", "tiny_demo",
            "--override", f"output_dir={out}", *run, *overrides]


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MYTUNE_DATA_CACHE": str(cache), "OMP_NUM_THREADS": "1"}  # one thread: fast on a busy machine


def losses_by_step(out: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (by the killed run after its last checkpoint, then by the resumed run)
    keeps the resumed run's value."""
    return {row["step"]: row["loss"] for row in read_metrics(out / "metrics.jsonl")}


def start_and_signal(out: Path, cache: Path, sig: signal.Signals, when_dir: str, cmd: list[str] | None = None) -> int:
    """Start a run (`cmd`, by default `command(out)`), send `sig` as soon as `out/when_dir` is a complete
    checkpoint, return the exit code."""
    proc = subprocess.Popen(cmd or command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(cache),
                            cwd=out.parent)
    deadline = time.monotonic() + 120
    while not (out / when_dir / "recipe_state.pt").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never saved " + when_dir
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    proc.stderr.close()
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's per-step losses."""
    root = tmp_path_factory.mktemp("reference")
    result = subprocess.run(command(root / "out"), capture_output=True, text=True, env=env(root / "cache"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_by_step(root / "out")
    assert sorted(losses) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    return root / "cache", losses


def test_sigkill_then_resume_latest_gives_bitwise_the_same_losses(reference, tmp_path):
    cache, expected = reference
    out = tmp_path / "out"
    returncode = start_and_signal(out, cache, signal.SIGKILL, "step_8")
    assert returncode == -signal.SIGKILL
    assert not (out / f"step_{STEPS_PER_EPOCH * EPOCHS}").exists()  # killed mid-way

    result = subprocess.run(command(out, "resume_from_checkpoint=latest"), capture_output=True, text=True,
                            env=env(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_at = int(result.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_at >= 8 and resumed_at % 4 == 0
    assert losses_by_step(out) == expected  # bitwise: == on floats, every step


def test_sigterm_saves_exits_zero_and_resumes_to_the_same_losses(reference, tmp_path):
    cache, expected = reference
    out = tmp_path / "out"
    assert start_and_signal(out, cache, signal.SIGTERM, "step_4") == 0  # saved at the next step boundary, exit 0
    saved = sorted(int(p.name[5:]) for p in out.glob("step_*"))
    assert saved and saved[-1] < STEPS_PER_EPOCH * EPOCHS
    state = torch.load(out / f"step_{saved[-1]}" / "recipe_state.pt", weights_only=True)
    assert state["global_step"] == saved[-1] and state["epoch"] == (saved[-1] - 1) // STEPS_PER_EPOCH
    assert state["dataloader_state"]["consumed"] == (saved[-1] - state["epoch"] * STEPS_PER_EPOCH) * 8

    result = subprocess.run(command(out, "resume_from_checkpoint=latest", "keep_last_n_checkpoints=1"),
                            capture_output=True, text=True, env=env(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses_by_step(out) == expected
    assert [p.name for p in out.glob("step_*")] == [f"step_{STEPS_PER_EPOCH * EPOCHS}"]  # pruned to the newest


def test_nan_loss_stops_with_one_line_naming_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(command(out, "lr=1e30", "warmup_steps=0", "lr_scheduler=constant", "save_every_n_steps=1", "max_grad_norm=null"),
                            capture_output=True, text=True, env=env(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()[-1:]
    assert "training diverged" in lines[0] and "lower lr (now 1e+30)" in lines[0], result.stderr[-2000:]
    last_good = Path(lines[0].split("the last good checkpoint is ")[1])
    assert (last_good / "recipe_state.pt").is_file() and (last_good / "model.safetensors").is_file()
    assert last_good == sorted(out.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]


def test_resume_from_a_path_that_is_no_checkpoint_is_one_error_line(tmp_path):
    result = subprocess.run(command(tmp_path / "out", f"resume_from_checkpoint={tmp_path}"), capture_output=True,
                            text=True, env=env(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2
    assert "is not a resumable checkpoint" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


LORA_RUN = ["max_seq_len=128", f"max_steps_per_epoch={STEPS_PER_EPOCH}", "epochs=2", "log_every_n_steps=1",
            "save_every_n_steps=4", "keep_last_n_checkpoints=null", "dtype=fp32"]


def test_lora_sigterm_saves_a_complete_step_and_resumes_to_the_same_losses(tmp_path):
    """lora_finetune_single_device, 12 steps saving every 4: SIGTERM once step_4 is complete; the run saves the next
    step (merged weights, adapter/, recipe_state.pt) and exits 0; `resume_from_checkpoint=latest` then logs bitwise
    the losses of an uninterrupted run (which runs alongside the interrupted one) and ends with the same adapters."""
    from safetensors.torch import load_file

    total = STEPS_PER_EPOCH * 2
    reference_out, out = tmp_path / "reference" / "out", tmp_path / "interrupted" / "out"
    for directory in (reference_out, out):
        directory.parent.mkdir()
    reference = subprocess.Popen(command(reference_out, recipe="lora_finetune_single_device", run=LORA_RUN),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(tmp_path / "ref-cache"),
                                 cwd=reference_out.parent)
    try:
        returncode = start_and_signal(out, tmp_path / "cache", signal.SIGTERM, "step_4",
                                      command(out, recipe="lora_finetune_single_device", run=LORA_RUN))
    finally:
        reference_stderr = reference.communicate(timeout=300)[1].decode()
    assert reference.returncode == 0, reference_stderr[-3000:]
    assert returncode == 0  # saved at the next step boundary, exit 0

    saved = sorted(int(p.name[5:]) for p in out.glob("step_*"))
    stopped_at = saved[-1]
    assert 4 < stopped_at < total and saved == [step for step in (4, 8) if step < stopped_at] + [stopped_at], saved
    step_dir = out / f"step_{stopped_at}"
    assert (step_dir / "model.safetensors").is_file() and (step_dir / "adapter" / "adapter_config.json").is_file()
    assert (step_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.load(step_dir / "recipe_state.pt", weights_only=True)["global_step"] == stopped_at
    assert max(losses_by_step(out)) == stopped_at

    result = subprocess.run(command(out, "resume_from_checkpoint=latest", recipe="lora_finetune_single_device",
                                    run=LORA_RUN), capture_output=True, text=True, env=env(tmp_path / "cache"),
                            cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {step_dir} at step {stopped_at}" in result.stdout
    expected = losses_by_step(reference_out)
    assert sorted(expected) == list(range(1, total + 1))
    assert losses_by_step(out) == expected  # bitwise: == on floats, every step
    a = load_file(reference_out / f"step_{total}" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / f"step_{total}" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
