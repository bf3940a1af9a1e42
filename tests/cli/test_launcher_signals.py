"""Signals to `mytune` for real (CPU): SIGTERM or Ctrl-C to the launcher of a 2-process FSDP run saves a complete
checkpoint and exits 0 without a traceback; kill -9 of the launcher does not leave its workers training on; Ctrl-C
to an in-process single-device run saves and exits 0, and a second Ctrl-C stops at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mytune.training.lifetime import StopSignals

REPO = Path(__file__).resolve().parents[2]
RUN = ["--config", "tiny_demo", "--override", "max_seq_len=64", "max_steps_per_epoch=200", "save_every_n_steps=2",
       "val_fraction=0", "eval_every_n_steps=0", "dtype=fp32", "device=cpu", "keep_last_n_checkpoints=null"]


def start(tmp_path: Path, *launcher: str, recipe: str = "full_finetune_distributed") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MYTUNE_DATA_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "mytune.cli.main", *launcher, recipe, *RUN,
                             f"output_dir={tmp_path / 'out'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)


def wait_for_checkpoint(proc: subprocess.Popen, step_dir: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not (step_dir / "recipe_state.pt").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {step_dir.name} after {timeout_s} s"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def newest_step(out: Path) -> int:
    return max(int(p.name[5:]) for p in out.glob("step_*") if (p / "recipe_state.pt").is_file())


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_to_the_distributed_launcher_saves_and_exits_zero(tmp_path, sig):
    proc = start(tmp_path, "--nproc_per_node", "2")
    wait_for_checkpoint(proc, tmp_path / "out" / "step_2")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    assert f"mytune: {sig.name}: asking the 2 processes to save a checkpoint" in stderr
    step = newest_step(tmp_path / "out")
    assert f"saved checkpoint to {tmp_path / 'out' / f'step_{step}'}" in stdout and step < 200
    assert torch.load(tmp_path / "out" / f"step_{step}" / "recipe_state.pt", weights_only=True)["global_step"] == step
    assert not (tmp_path / "out" / ".mytune.lock").exists()  # released


def test_workers_do_not_outlive_a_launcher_killed_with_sigkill(tmp_path):
    proc = start(tmp_path, "--nproc_per_node", "2")
    wait_for_checkpoint(proc, tmp_path / "out" / "step_2")
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "the workers kept training after their launcher died"
    assert newest_step(tmp_path / "out") > 2  # they got SIGTERM: saved at the end of their step


def test_ctrl_c_saves_and_exits_zero_in_process(tmp_path):
    proc = start(tmp_path, recipe="full_finetune_single_device")
    wait_for_checkpoint(proc, tmp_path / "out" / "step_2")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    step = newest_step(tmp_path / "out")
    assert f"SIGINT at step {step}: saving a checkpoint" in stdout and step < 200
    assert "Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop at once)" in stderr


def test_a_second_ctrl_c_stops_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_the_launchers_handler_sends_sigterm_to_the_workers_and_sigkill_on_a_second_ctrl_c():
    """`WorkerStopper` with two stand-in workers (children leading their own session, as torchrun starts them)."""
    from argparse import Namespace

    from mytune.cli.launch import WorkerStopper

    worker = "import signal, time; signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True)); " \
             "print('up', flush=True); time.sleep(60)"
    workers = [subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True,
                                start_new_session=True) for _ in range(2)]
    args = Namespace(signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGUSR1")
    stopper = WorkerStopper(args)
    try:
        assert args.signals_to_handle == "SIGHUP,SIGUSR1"  # torchrun's agent leaves SIGTERM and SIGINT to it
        assert [w.stdout.readline().strip() for w in workers] == ["up", "up"]
        os.kill(os.getpid(), signal.SIGINT)
        assert [w.stdout.readline().strip() for w in workers] == ["TERM", "TERM"]  # asked to save and stop
        assert stopper.received == signal.SIGINT and not stopper.forced
        os.kill(os.getpid(), signal.SIGINT)
        assert [w.wait(timeout=30) for w in workers] == [-signal.SIGKILL, -signal.SIGKILL]
        assert stopper.forced
    finally:
        stopper.uninstall()
        for w in workers:
            w.kill()
            w.wait()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
