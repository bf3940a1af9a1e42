"""Optimizers by name, so a recipe's `optimizer:` key picks one without the recipe knowing each one's constructor.

- `adamw`: `torch.optim.AdamW`, fused kernel when every parameter is on a CUDA device (one launch per step instead of
  several per tensor); the default and the reference the others are measured against.
- `sgd`: `torch.optim.SGD` with momentum 0.9 (one state tensor per parameter instead of AdamW's two).
- `adamw8bit` / `adamw4bit`: torchao's low-bit AdamW (`torchao.optim.AdamW8bit` / `AdamW4bit`): both moment tensors
  are block-quantized, so optimizer state takes ~2 (8-bit) or ~1 (4-bit) bytes per parameter instead of 8. Tensors
  with fewer than 4096 elements (norms, biases) keep float32 state. torchao `torch.compile`s the update of each
  parameter shape; in torchao 0.18 this runs on CUDA and on CPU (CPU needs a C++ compiler for inductor and the
  first step compiles for several seconds per distinct shape). Their state dicts hold torchao tensor subclasses
  that torchao allows for `torch.load(weights_only=True)`, so recipe checkpoints load them.

Weight decay applies to every parameter, as the recipes did before this module (no norm/bias exclusion).
"""

import warnings
from collections.abc import Iterable
from typing import Literal

import torch

from mytune.config.names import check_optimizer  # torch-free: the params checks use it too
from mytune.errors import MytuneError
from mytune.torchao_import import quiet_torchao_import

OptimizerName = Literal["adamw", "sgd", "adamw8bit", "adamw4bit"]
SGD_MOMENTUM = 0.9


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    name: OptimizerName,
    lr: float,
    weight_decay: float,
    device: torch.device | str,
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (parameters or param-group dicts) with `lr` and decoupled `weight_decay`.

    `device` is the training device; AdamW uses its fused kernel only when that is CUDA *and* every parameter lives
    there (FSDP CPU offload keeps parameters on the CPU, where the fused CUDA kernel cannot run).
    """
    check_optimizer(name)
    params = list(params)
    device = torch.device(device)
    if name == "adamw":
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        fused = device.type == "cuda" and all(p.device.type == "cuda" for p in tensors)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    low_bit = _import_torchao_optim()
    cls = low_bit.AdamW8bit if name == "adamw8bit" else low_bit.AdamW4bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def _import_torchao_optim():
    """`torchao.optim`, imported with torchao's import-time noise filtered out and its compile warning silenced."""
    try:
        with quiet_torchao_import():
            import torchao.optim
    except ImportError as err:
        raise MytuneError(f"the low-bit AdamW optimizers need torchao: pip install torchao ({err})") from err
    # Emitted by torch.compile for torchao's optimizer-state tensor subclasses on the first step: not actionable.
    warnings.filterwarnings(
        "ignore", message=r"OptimState\w+ does not implement _stable_hash_for_caching", category=UserWarning
    )
    return torchao.optim
