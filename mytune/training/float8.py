"""float8 training (torchao) for the full fine-tuning recipes: the decoder's matmuls in float8 on sm89+ GPUs.

`convert_to_float8` swaps the linear layers of the decoder blocks for torchao's `Float8Linear` (a subclass of
`nn.Linear`: the same `weight`/`bias` names, so state-dict keys, HF checkpoints and FSDP sharding are unchanged).
Their forward and backward matmuls run in float8 with dynamic per-tensor scales (e4m3 for inputs and weights, e5m2
for gradients) on the tensor cores of Ada / Hopper GPUs (compute capability 8.9+): up to ~2x the bf16 matmul rate,
while the weights, optimizer and everything outside the matmuls stay as they were. `lm_head` stays in bf16 (the
loss is sensitive to it), as do layers whose dimensions are not multiples of 16 (float8 GEMMs need them).

Order in a recipe: after the model is built (and loaded), before activation checkpointing, compile and sharding.
"""

import torch
from torch import nn

from mytune.errors import ConfigError

MIN_CAPABILITY = (8, 9)  # Ada (sm89) and Hopper (sm90) have float8 tensor cores


def check_float8_supported(device: torch.device) -> None:
    """Raise one ConfigError line unless `device` is a CUDA GPU with float8 tensor cores."""
    if device.type != "cuda":
        raise ConfigError(f"float8=true needs an NVIDIA GPU with compute capability 8.9+ (Ada, Hopper); this run is "
                          f"on {device.type}: set float8=false")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"float8=true needs compute capability 8.9+ (Ada, Hopper); {torch.cuda.get_device_name(device)} "
                          f"has {capability[0]}.{capability[1]}: set float8=false")


def is_float8_candidate(module: nn.Module, name: str) -> bool:
    """A linear layer inside a decoder block whose in and out features are multiples of 16 (not `lm_head`)."""
    return (isinstance(module, nn.Linear) and name.startswith("model.layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_float8(model: nn.Module, *, emulate: bool = False) -> int:
    """Swap the decoder blocks' linear layers for torchao `Float8Linear`s in place; returns how many were swapped.

    `emulate=True` runs the float8 casts with ordinary matmuls (any device, no speed-up): it lets a CPU test check
    the conversion and the numerics, and is never what a recipe uses.
    """
    from mytune.torchao_import import quiet_torchao_import

    with quiet_torchao_import():
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted: list[str] = []

    def choose(module: nn.Module, name: str) -> bool:
        if is_float8_candidate(module, name):
            converted.append(name)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=choose, config=Float8LinearConfig(emulate=emulate))
    return len(converted)
