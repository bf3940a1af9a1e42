"""How a training process ends when it is told to: Ctrl-C like SIGTERM, and never outliving its launcher.

- `StopSignals`: the recipes' preemption handler. SIGTERM and SIGINT (Ctrl-C) both ask the loop to save a checkpoint
  at the end of the step and exit 0; a second Ctrl-C raises KeyboardInterrupt at once (the step is not saved).
- `exit_with_launcher`: a torchrun worker asks the kernel for SIGTERM when its parent (the `mytune`/torchrun
  launcher, which is the elastic agent) dies, even by kill -9: the worker then saves at the end of its step like on
  any SIGTERM (or dies at once before training started) instead of training on, unwatched, to the end.
"""

import ctypes
import os
import signal
import sys
import threading
import time
from types import FrameType

from mytune.training.safety import PreemptionHandler

LAUNCHER_PID_ENV = "MYTUNE_LAUNCHER_PID"  # set by `mytune [torchrun flags] ...` for its workers
_PR_SET_PDEATHSIG = 1


class StopSignals(PreemptionHandler):
    """`PreemptionHandler` for SIGTERM and SIGINT; the second SIGINT raises KeyboardInterrupt (stop at once)."""

    def __init__(self):
        super().__init__(signals=(signal.SIGTERM, signal.SIGINT))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt("second Ctrl-C: stopped at once, the current step is not saved")
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        super()._handle(signum, frame)


def exit_with_launcher() -> None:
    """Under torchrun: get SIGTERM when the launcher process dies (Linux: prctl(PR_SET_PDEATHSIG); elsewhere a
    thread polls the parent pid). Does nothing outside torchrun. If the launcher is already gone, SIGTERM now."""
    launched = os.environ.get(LAUNCHER_PID_ENV) or os.environ.get("TORCHELASTIC_RUN_ID")
    if "LOCAL_RANK" not in os.environ or not launched:
        return  # not a torchrun worker (torchrun sets LOCAL_RANK for its workers, not in its own process)
    parent = int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid())
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="mytune-launcher-watch").start()
    if os.getppid() != parent:  # it died before the prctl above
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int, period_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(period_s)
    os.kill(os.getpid(), signal.SIGTERM)
