"""Reusable layers: attention, RoPE, RMSNorm, SwiGLU MLP and a KV cache."""

from mytune.modules.attention import Attention
from mytune.modules.kv_cache import KVCache
from mytune.modules.mlp import SwiGLUMLP
from mytune.modules.rms_norm import RMSNorm
from mytune.modules.rope import RotaryEmbedding, apply_rotary, rope_inv_freq, rotate_half

__all__ = ["Attention", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLUMLP", "apply_rotary", "rope_inv_freq",
           "rotate_half"]
from mytune.modules.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora  # noqa: E402

__all__ += ["LoRALinear", "apply_lora", "lora_state_dict", "merge_lora"]
