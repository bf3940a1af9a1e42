"""Stopping a run cleanly: on a preemption signal (save, then exit 0) and on a non-finite loss (one-line error).

`PreemptionHandler` turns SIGTERM (what Slurm, Kubernetes and torchrun's agent send before killing a job) into a flag
the training loop reads between optimizer steps, so the recipe saves a resumable checkpoint at a step boundary instead
of dying mid-step. The handler itself only sets the flag: nothing that allocates, locks or does I/O runs inside a
signal handler.
"""

import math
import signal
from pathlib import Path
from types import FrameType

import torch

from mytune.errors import MytuneError


class PreemptionHandler:
    """Catch `signals` (SIGTERM by default) and record them; `should_stop` tells the loop to save and exit.

        handler = PreemptionHandler().install()        # in the main thread, once, before training
        ...after each optimizer step:
        if handler.should_stop:                        # distributed: all-reduce the flag with the step's loss
            save checkpoint + recipe state; return      # the process exits 0
        ...finally: handler.uninstall()

    Add `signal.SIGUSR1` to `signals` for Slurm's `--signal=USR1@120` early warning. `uninstall()` (or leaving the
    `with` block) restores the previous handlers.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def should_stop(self) -> bool:
        return self.received is not None

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)


def check_finite(loss: float | torch.Tensor, step: int, *, last_checkpoint: str | Path | None = None,
                 lr: float | None = None, model: torch.nn.Module | None = None) -> None:
    """Raise a one-line MytuneError when `loss` (the step's loss) is nan or inf; otherwise do nothing.

    The message names the step, the likely cause, what to change and where to restart from, e.g.
    "loss is nan at step 7: training diverged; lower lr (now 0.0002) or set max_grad_norm; the last good checkpoint
    is out/step_5". Given `model`, its weights are checked too (only then: the error path): weights that hold nan/inf
    before the run's first update mean a damaged checkpoint, which no lr fixes. A tensor `loss` is read with
    `.item()` (one device sync). Distributed: call it on every rank (the weight check is a collective).
    """
    value = float(loss.item() if isinstance(loss, torch.Tensor) else loss)
    if math.isfinite(value):
        return
    lr_text = f" (now {lr:g})" if lr is not None else ""
    where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
             else "no checkpoint was saved before it")
    bad = non_finite_weight(model) if model is not None else None
    if bad is None:
        raise MytuneError(f"loss is {value} at step {step}: training diverged; lower lr{lr_text} or set "
                          f"max_grad_norm; {where}")
    if step == 1 and last_checkpoint is None:
        raise MytuneError(f"loss is {value} at step {step}: the model's weights hold {bad} before any update: the "
                          f"checkpoint the run started from is damaged, and no lr fixes that; use an undamaged "
                          f"checkpoint (copy or download it again)")
    if last_checkpoint is not None and Path(last_checkpoint).name == f"step_{step - 1}":
        raise MytuneError(f"loss is {value} at step {step}: the model's weights hold {bad}, and so does the checkpoint "
                          f"{last_checkpoint} they came from: it is damaged (or was saved after training diverged); "
                          f"resume from an earlier checkpoint, or start again with a lower lr{lr_text}")
    raise MytuneError(f"loss is {value} at step {step}: training diverged in an earlier update (the weights hold "
                      f"{bad}); lower lr{lr_text} or set max_grad_norm; {where}")


def non_finite_weight(model: torch.nn.Module) -> str | None:
    """The first parameter holding nan or inf, as "nan in <name>" / "inf in <name>"; None when all are finite.

    Plain tensors only (FSDP: each rank's shard, the verdict shared by an all-reduce; quantized weights skipped).
    """
    found = None
    for name, param in model.named_parameters():
        tensor = (param.to_local() if hasattr(param, "to_local") else param).detach()
        if type(tensor) is torch.Tensor and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found = f"{'nan' if bool(torch.isnan(tensor).any()) else 'inf'} in {name}"
            break
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        nccl = "nccl" in str(torch.distributed.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([found is not None], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if found is None and bool(flag):
            found = "nan or inf (in another rank's shard)"
    return found
