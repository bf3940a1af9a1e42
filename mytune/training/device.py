"""Device, dtype and seeding helpers used by every recipe."""

import os
import random

import torch

from mytune.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available (the local rank's GPU under torchrun), else cpu; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def check_device_available(name: str, field: str = "device") -> None:
    """Raise a ConfigError naming `field` when the requested device cannot be used on this machine."""
    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{field}={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}={name!r} but CUDA is not available on this machine; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{field}={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}={name!r} but MPS is not available on this machine; use device=cpu")


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`, copied without making the host wait.

    `non_blocking` copies from pinned memory (the recipes' loaders pin their batches on CUDA) are queued on the
    stream and return at once, so the host goes on to queue the forward; from pageable memory they are ordinary
    copies. A no-op on the CPU.
    """
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def set_seed(seed: int) -> None:
    """Seed the python and torch (and CUDA) RNGs: model init, adapter init and dropout. (The data order has its own
    seeded generator in the sampler.)"""
    random.seed(seed)
    torch.manual_seed(seed)
