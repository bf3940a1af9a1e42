"""What a run needs besides the model weights to resume exactly: optimizer, LR schedule, RNG streams, data position.

Layout: `output_dir/step_<N>/` is the Hugging Face checkpoint a recipe writes (atomically) at step N; the resume
state goes into the same directory as `recipe_state.pt`, written after the weights via a temporary file and a
rename. So a `step_<N>` with `recipe_state.pt` is complete, one without it is weights only (a final save, or a run
killed between the two writes), and `.tmp-*` / `.old-*` directories are in-flight atomic writes.

Everything is saved with `torch.save` and read back with `torch.load(weights_only=True)`: tensors, numbers,
strings, lists, tuples, dicts and None only (numpy's RNG state is converted to a tensor), so loading a checkpoint
never runs pickled code. `dataloader_state` and `extra` must keep to those types; `save_recipe_state` checks them.
"""

import contextlib
import io
import os
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mytune.checkpoint.atomic import describe_write_error
from mytune.errors import MytuneError, one_line

RECIPE_STATE_FILE = "recipe_state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class RecipeState:
    """What `load_recipe_state` hands back to the recipe (optimizer, scheduler and RNGs are restored in place)."""

    global_step: int
    epoch: int
    dataloader_state: Any = None
    extra: dict = field(default_factory=dict)


def save_recipe_state(
    checkpoint_dir: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    dataloader_state: Any,
    global_step: int,
    epoch: int,
    extra: dict | None = None,
    model: torch.nn.Module | None = None,
) -> Path | None:
    """Write `checkpoint_dir/recipe_state.pt`; returns its path (None on ranks other than 0).

    Holds the optimizer and LR-scheduler state dicts, the python / torch CPU / CUDA (all devices) / numpy RNG
    states, `global_step`, `epoch`, the recipe's `dataloader_state` (e.g. the epoch, batches consumed and the
    shuffling generator's `get_state()`) and `extra` (any other small values). Written to a temporary file and
    renamed, so the file is either absent or complete.

    Under FSDP pass `model`: the sharded optimizer state is gathered to rank 0 as a full, parameter-name-keyed state
    dict (a collective: every rank calls this) and only rank 0 writes, so a run can resume on another number of
    ranks. Every rank's RNG states are gathered too (ranks draw different dropout masks), so a resume on the same
    number of ranks restores each rank's own streams. Without `model`, `optimizer.state_dict()` is saved as is.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _check_weights_only_loadable({"dataloader_state": dataloader_state, "extra": extra or {}})
    rng, rng_per_rank = _rng_state(), None
    if model is not None and torch.distributed.is_initialized():
        rng_per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rng_per_rank, rng)
    if model is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if _rank() != 0:
            return None
    else:
        optimizer_state = optimizer.state_dict()
    state = {
        "format_version": FORMAT_VERSION,
        "global_step": int(global_step),
        "epoch": int(epoch),
        "optimizer": optimizer_state,
        "optimizer_full_state_dict": model is not None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "rng": rng,
        "rng_per_rank": rng_per_rank,
        "dataloader_state": dataloader_state,
        "extra": dict(extra or {}),
    }
    path = checkpoint_dir / RECIPE_STATE_FILE
    tmp = checkpoint_dir / f".{RECIPE_STATE_FILE}.tmp-{os.getpid()}"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save's writer reports a full disk as RuntimeError
        kept = " (the previous one is kept)" if path.is_file() else ""
        raise MytuneError(f"cannot write {path}{kept}: {describe_write_error(err, path)}") from None
    finally:
        with contextlib.suppress(OSError):  # (also when checkpoint_dir turned out to be a file)
            tmp.unlink(missing_ok=True)
    return path


def load_recipe_state(
    checkpoint_dir: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    model: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> RecipeState:
    """Restore the optimizer and scheduler in place (and the RNG streams with `restore_rng`); return the rest.

    Build the optimizer and scheduler exactly as for a fresh run (same parameters in the same order, same
    hyper-parameters) and load the model weights from the same `step_<N>` first. Under FSDP pass `model` on every
    rank (a collective): rank 0 reads the file and broadcasts the optimizer state shard by shard and the small
    values whole; other ranks need not see the file.
    """
    distributed = model is not None and torch.distributed.is_initialized()
    state, error = None, None
    if not distributed or _rank() == 0:
        try:
            state = _read_state(Path(checkpoint_dir), full_optimizer_state=model is not None)
        except MytuneError as err:
            if not distributed:
                raise
            error = str(err)
    optimizer_state = state.pop("optimizer") if state is not None else {}
    low_bit = _dequantize_low_bit_states(optimizer_state) if model is not None and state is not None else []
    if distributed:  # the small values (and any error) to every rank; the optimizer state goes shard by shard below
        box = [(state, error, low_bit)]
        torch.distributed.broadcast_object_list(box, src=0)
        state, error, low_bit = box[0]
        if error is not None:
            raise MytuneError(error)
    if model is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        _requantize_low_bit_states(model, optimizer, low_bit)
    else:
        optimizer.load_state_dict(optimizer_state)
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if restore_rng:
        per_rank = state.get("rng_per_rank")
        same_world = distributed and per_rank is not None and len(per_rank) == torch.distributed.get_world_size()
        # On another number of ranks, every rank continues rank 0's streams (dropout masks then differ from the
        # interrupted run; everything else resumes exactly).
        _set_rng_state(per_rank[_rank()] if same_world else state["rng"])
    return RecipeState(global_step=state["global_step"], epoch=state["epoch"],
                       dataloader_state=state["dataloader_state"], extra=state["extra"])


def _is_low_bit_state(value: Any) -> bool:
    """A torchao low-bit optimizer state (OptimState8bit / OptimState4bit / OptimStateFp8): codes plus scales."""
    return isinstance(value, torch.Tensor) and type(value).__name__.startswith("OptimState")


def _dequantize_low_bit_states(optimizer_state: dict) -> list[tuple[str, str, bool]]:
    """Replace torchao low-bit states in a full (name-keyed) optimizer state dict by their float values, in place.

    FSDP's loading broadcasts and splits each state tensor, which torchao's subclasses do not implement; the float
    values travel instead and `_requantize_low_bit_states` quantizes each rank's shard again. That is not bitwise:
    a signed block's absmax does not land exactly on a code, so some scales move by a rounding step (the next
    update differs by ~1e-5 relative; on one device the states load exactly). Returns (name, state key, signed).
    """
    converted = []
    for name, param_state in optimizer_state.get("state", {}).items():
        for key, value in param_state.items():
            if _is_low_bit_state(value):
                param_state[key] = value.dequantize()
                converted.append((name, key, bool(value.signed)))
    return converted


def _requantize_low_bit_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                               low_bit: list[tuple[str, str, bool]]) -> None:
    """Turn the float states loaded for `low_bit` back into torchao low-bit states of this rank's shards."""
    if not low_bit or not hasattr(optimizer, "_new_buffer"):
        return
    params = dict(model.named_parameters())
    for name, key, signed in low_bit:
        param = params[name]
        buffer = optimizer._new_buffer(param, signed)  # torchao's own constructor: DTensor-wrapped, right block size
        buffer.copy_(optimizer.state[param][key])  # quantizes
        optimizer.state[param][key] = buffer


def _read_state(checkpoint_dir: Path, *, full_optimizer_state: bool) -> dict:
    path = checkpoint_dir / RECIPE_STATE_FILE
    if not path.is_file():
        raise MytuneError(f"{path} does not exist: {checkpoint_dir} is not a resumable checkpoint "
                          f"(it was saved without recipe state, or the save was interrupted)")
    state = _load_state_file(path)
    if state.get("format_version") != FORMAT_VERSION:
        raise MytuneError(f"{path} has format_version {state.get('format_version')}; this mytune reads {FORMAT_VERSION}")
    for key, (expected, name) in _STATE_FIELDS.items():
        if key not in state or not isinstance(state[key], expected) or isinstance(state[key], bool) != (expected is bool):
            raise MytuneError(f"{path}: {key} is missing or not {name}: the file is damaged; {_DAMAGED_STATE_ADVICE}")
    if state["global_step"] < 0 or state["epoch"] < 0 or not {"python", "torch"} <= state["rng"].keys():
        raise MytuneError(f"{path}: global_step, epoch or rng hold impossible values: the file is damaged; "
                          f"{_DAMAGED_STATE_ADVICE}")
    if full_optimizer_state != state["optimizer_full_state_dict"]:
        saved_as = "with" if state["optimizer_full_state_dict"] else "without"
        raise MytuneError(f"{path} was saved {saved_as} `model` (FSDP full optimizer state); load it the same way")
    return state


# The values every recipe_state.pt holds, and their types (`dataloader_state` may be anything weights-only).
_STATE_FIELDS = {"global_step": (int, "an integer"), "epoch": (int, "an integer"), "optimizer": (dict, "a dict"),
                 "optimizer_full_state_dict": (bool, "true or false"), "lr_scheduler": ((dict, type(None)), "a dict or None"),
                 "rng": (dict, "a dict"), "rng_per_rank": ((list, type(None)), "a list or None"), "extra": (dict, "a dict")}
_DAMAGED_STATE_ADVICE = "resume from another step_<N> (resume_from_checkpoint=<its path>) or start a fresh run"


def _load_state_file(path: Path) -> dict:
    """`torch.load(weights_only=True)` of a recipe_state.pt; a damaged or foreign file is one MytuneError line.

    A file holding pickled objects other than plain data is refused, never loaded another way: reading a checkpoint
    must not run code from it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise MytuneError(f"{path}: holds pickled objects other than tensors, numbers, strings, lists and dicts "
                              f"(not written by mytune, or damaged); mytune never runs code from a checkpoint, so it "
                              f"cannot resume from this one; {_DAMAGED_STATE_ADVICE}") from None
        raise MytuneError(f"{path}: not a torch checkpoint file: it is damaged; {_DAMAGED_STATE_ADVICE}") from None
    except MemoryError:
        raise
    except Exception as err:  # torch.load's errors for cut or scrambled files vary (EOFError, OSError, RuntimeError)
        raise MytuneError(f"{path}: cannot be read ({one_line(err)}): the file is incomplete or damaged (an interrupted "
                          f"copy?); {_DAMAGED_STATE_ADVICE}") from None
    if not isinstance(state, dict):
        raise MytuneError(f"{path}: holds a {type(state).__name__}, not a recipe state: the file is damaged; "
                          f"{_DAMAGED_STATE_ADVICE}")
    return state


def step_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """`(N, path)` of every `output_dir/step_<N>` directory, oldest first (temporary `.tmp-`/`.old-` dirs excluded)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path, *, require_recipe_state: bool = True) -> Path | None:
    """The `step_<N>` directory with the highest N that is complete, or None.

    Complete means it holds `recipe_state.pt` (it can be resumed from); with `require_recipe_state=False`, any
    `step_<N>` counts (the weights alone are always complete: they are written atomically).
    """
    for _, path in reversed(step_checkpoints(output_dir)):
        if not require_recipe_state or (path / RECIPE_STATE_FILE).is_file():
            return path
    return None


def resolve_resume_dir(resume_from_checkpoint: str, output_dir: str | Path, *,
                       needs: tuple[str, ...] = ()) -> Path | None:
    """The `step_<N>` a run resumes from, given the `resume_from_checkpoint` parameter; None for a fresh run.

    Empty: a fresh run. `latest`: the newest complete `step_<N>` in `output_dir`, or a fresh run when there is none
    yet (so a job script can always pass `latest`). Otherwise a path, which must hold `recipe_state.pt` and the
    entries in `needs` (e.g. a LoRA recipe's `adapter/`), else one MytuneError line.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            print(f"resume_from_checkpoint=latest: no complete step_<N> in {output_dir}; starting fresh", flush=True)
        return found
    path = Path(resume_from_checkpoint)
    required = (RECIPE_STATE_FILE, *needs)
    if not all((path / name).exists() for name in required):
        raise MytuneError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a resumable checkpoint (a "
                          f"step_<N> directory with {' and '.join(required)}); use latest for the newest one in "
                          f"output_dir")
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int, *, protect: str | Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` `step_<N>` directories; returns the deleted paths, oldest first.

    Call on rank 0 after a save, with `protect` the directory just saved: it is never deleted, whatever the step
    numbers of other directories there. Each directory is first renamed to a `.old-` name and then removed, so a
    crash mid-delete never leaves a partial `step_<N>` that `latest_checkpoint` would pick.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    checkpoints = step_checkpoints(output_dir)
    if protect is not None:
        protect = Path(protect).resolve()
        saved = [c for c in checkpoints if c[1].resolve() == protect]
        checkpoints = [c for c in checkpoints if c[1].resolve() != protect] + saved  # counted as the newest
    deleted = []
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        discard(path)
        deleted.append(path)
    return deleted


def discard(path: Path) -> None:
    """Delete a file or directory of an output_dir; a directory is first renamed to a `.old-<name>-<pid>` name, so a
    crash mid-delete leaves a leftover the next run's start removes, never a partial `step_<N>`."""
    if path.is_dir() and not path.name.startswith("."):
        doomed = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, doomed)
        path = doomed
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# The params a checkpoint records (in recipe_state.pt's `extra["params"]`), so a resume can tell what changed.
RESUMED_PARAMS = ("optimizer", "lr", "weight_decay", "lr_scheduler", "warmup_steps", "max_grad_norm", "epochs",
                  "max_steps_per_epoch", "batch_size", "gradient_accumulation_steps")


def params_record(params: Any, *, total_steps: int) -> dict:
    """The values of `RESUMED_PARAMS` (and the run's `total_steps`) to save with a checkpoint."""
    record = {name: getattr(params, name) for name in RESUMED_PARAMS if hasattr(params, name)}
    return {**record, "total_steps": int(total_steps)}


def apply_resume_precedence(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                            *, saved: dict | None, current: dict, checkpoint_dir: str | Path,
                            global_step: int) -> list[str]:
    """After `load_recipe_state`: the values given now (config, command line) beat the checkpoint's.

    The optimizer state comes back, but its `lr` and `weight_decay` and the schedule's base lr are set from
    `current` (a `params_record`), and the lr of the next step is recomputed from the schedule built from the current
    params (warmup, decay, total steps), so e.g. resuming the last good checkpoint with a lower lr after a nan loss
    trains with the lower lr. Unchanged values give bitwise the same lr as the interrupted run. Returns the changes
    ("lr 0.001 -> 0.0001"; empty for a checkpoint saved without `saved`). One MytuneError line for an optimizer
    other than the checkpoint's (its state cannot carry over) and for fewer total steps than the checkpoint did.
    """
    saved_optimizer = (saved or {}).get("optimizer")
    if saved_optimizer is None:  # saved before params were recorded: SGD or the AdamW family, told by its groups
        saved_optimizer = "sgd" if "momentum" in optimizer.param_groups[0] else "adamw"
        changed_optimizer = (saved_optimizer == "sgd") != (current["optimizer"] == "sgd")
    else:
        changed_optimizer = saved_optimizer != current["optimizer"]
    if changed_optimizer:
        raise MytuneError(f"{checkpoint_dir} was saved with optimizer={saved_optimizer}; its state cannot continue "
                          f"with optimizer={current['optimizer']}: resume with optimizer={saved_optimizer}, or start a "
                          f"fresh run from its weights")
    if global_step > current["total_steps"]:
        raise MytuneError(f"{checkpoint_dir} is at step {global_step}, past this run's last step "
                          f"({current['total_steps']} = epochs x steps per epoch): nothing to train; raise epochs or "
                          f"max_steps_per_epoch, or resume another checkpoint")
    lr, weight_decay = float(current["lr"]), float(current["weight_decay"])
    # Of the checkpoint's type: torchao's low-bit AdamW keeps lr (so the schedule's base lr) as a float32 tensor.
    lr_scheduler.base_lrs = [torch.tensor(lr, dtype=base.dtype) if isinstance(base, torch.Tensor) else lr
                             for base in lr_scheduler.base_lrs]
    for group, base in zip(optimizer.param_groups, lr_scheduler.base_lrs):
        group["initial_lr"], group["weight_decay"] = base, weight_decay
    # The lr of the next step, by the schedule's own formula, as its step after the checkpoint's step computed it.
    lr_scheduler.last_epoch -= 1
    lr_scheduler._step_count -= 1
    lr_scheduler.step()
    return [f"{name} {saved[name]} -> {value}" for name, value in current.items()
            if saved is not None and name in saved and saved[name] != value]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    rng = {"python": (version, list(internal), gauss), "torch": torch.get_rng_state(), "cuda": None, "numpy": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return rng
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return rng


def _set_rng_state(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            torch.cuda.set_rng_state(rng["cuda"][torch.cuda.current_device() % len(rng["cuda"])])
    if rng["numpy"] is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _check_weights_only_loadable(values: dict) -> None:
    """Fail at save time, naming the value, rather than at resume time when the file will not load."""
    buffer = io.BytesIO()
    try:
        torch.save(values, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as err:
        raise TypeError(
            "dataloader_state and extra must hold only tensors, numbers, strings, lists, tuples, dicts and None "
            f"(torch.load(weights_only=True) refuses them otherwise): {err}"
        ) from err
