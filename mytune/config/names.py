"""The names some params fields choose from, torch-free so that `validate` and `--help` never import torch.

`mytune.training.optim` and `mytune.modules.lora` import torch at module level; the params checks only need
their name tables, which live here and which those modules import.
"""

import difflib
from collections.abc import Sequence

from mytune.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adamw8bit", "adamw4bit")

# Hugging Face module names LoRA can target, in model order.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Other spellings users bring along (Megatron-core names, torchtune's `output`) -> the HF modules they mean.
LORA_TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
    "output": ("lm_head",),
}


def check_optimizer(name: str) -> None:
    """Raise a ConfigError for an unknown optimizer name (for params validation, before the model is loaded)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r} is not known; use one of {', '.join(OPTIMIZERS)}")


def resolve_lora_targets(names: Sequence[str]) -> list[str]:
    """Target names (HF names or aliases) -> the HF module names they mean, in model order, without repeats.

    An unknown name raises ConfigError naming the closest known ones.
    """
    known = [*LORA_TARGETS, *LORA_TARGET_ALIASES]
    wanted: set[str] = set()
    for name in names:
        if name in LORA_TARGETS:
            wanted.add(name)
        elif name in LORA_TARGET_ALIASES:
            wanted.update(LORA_TARGET_ALIASES[name])
        else:
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"lora_target_modules: unknown module name {name!r}; {hint}known: {', '.join(known)}")
    if not wanted:
        raise ConfigError(f"lora_target_modules is empty: name at least one of {', '.join(known)}")
    return [name for name in LORA_TARGETS if name in wanted]
