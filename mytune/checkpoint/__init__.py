"""Hugging Face safetensors checkpoints in and out, written atomically."""

from mytune.checkpoint.atomic import atomic_directory
from mytune.checkpoint.hf import (
    KEY_RENAMES,
    hf_to_mytune_key,
    load_hf_model,
    mytune_to_hf_key,
    read_hf_config,
    read_hf_model_args,
    save_hf_checkpoint,
)

__all__ = ["KEY_RENAMES", "atomic_directory", "hf_to_mytune_key", "load_hf_model", "mytune_to_hf_key",
           "read_hf_config", "read_hf_model_args", "save_hf_checkpoint"]
from mytune.checkpoint.peft import load_peft_adapter, save_peft_adapter  # noqa: E402

__all__ += ["load_peft_adapter", "save_peft_adapter"]
