"""What a run needs besides the model weights to resume exactly: optimizer, LR schedule, RNG streams, data position.

Layout: `output_dir/step_<N>/` is the Hugging Face checkpoint a recipe writes (atomically) at step N; the resume
state goes into the same directory as `recipe_state.pt`, written after the weights via a temporary file and a
rename. So a `step_<N>` with `recipe_state.pt` is complete, one without it is weights only (a final save, or a run
killed between the two writes), and `.tmp-*` / `.old-*` directories are in-flight atomic writes.

Everything is saved with `torch.save` and read back with `torch.load(weights_only=True)`: tensors, numbers,
strings, lists, tuples, dicts and None only (numpy's RNG state is converted to a tensor), so loading a checkpoint
never runs pickled code. `dataloader_state` and `extra` must keep to those types; `save_recipe_state` checks them.
"""

import io
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mytune.errors import MytuneError

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
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / RECIPE_STATE_FILE
    tmp = checkpoint_dir / f".{RECIPE_STATE_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
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
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise MytuneError(f"{path} has format_version {state.get('format_version')}; this mytune reads {FORMAT_VERSION}")
    if full_optimizer_state != state["optimizer_full_state_dict"]:
        saved_as = "with" if state["optimizer_full_state_dict"] else "without"
        raise MytuneError(f"{path} was saved {saved_as} `model` (FSDP full optimizer state); load it the same way")
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


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` `step_<N>` directories; returns the deleted paths, oldest first.

    Call on rank 0 after a save. Each directory is first renamed to a `.old-` name and then removed, so a crash
    mid-delete never leaves a partial `step_<N>` that `latest_checkpoint` would pick.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    checkpoints = step_checkpoints(output_dir)
    deleted = []
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        doomed = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    return deleted


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
