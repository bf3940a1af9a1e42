"""Rotary position embeddings in Hugging Face's rotate-half convention, with linear and llama3 frequency scaling.

Checkpoints in HF layout store q/k projections for rotate-half RoPE, so using the same convention here means
no weight permutation when loading or saving.
"""

import math

import torch
from torch import nn

from mytune.errors import MytuneError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(rope_scaling: dict | None) -> str:
    """The scaling variant named by an HF `rope_scaling` dict (`rope_type`, or the older `type` key)."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def check_rope_scaling(rope_scaling: dict | None) -> None:
    """Raise a one-line MytuneError for a scaling variant or parameter set this model does not implement."""
    kind = rope_type(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise MytuneError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [key for key in required.get(kind, ()) if key not in rope_scaling]
    if missing:
        raise MytuneError(f"rope_scaling of type {kind!r} lacks {', '.join(missing)}")


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, *, factor: float, low_freq_factor: float,
                           high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1 scaling (HF `_compute_llama3_parameters`): long wavelengths divided by `factor`, short ones kept,
    the band between interpolated smoothly."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (float32, `[head_dim // 2]`) for the given base and optional scaling."""
    check_rope_scaling(rope_scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = rope_type(rope_scaling)
    if kind == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    elif kind == "llama3":
        inv_freq = llama3_scaled_inv_freq(
            inv_freq,
            factor=rope_scaling["factor"],
            low_freq_factor=rope_scaling["low_freq_factor"],
            high_freq_factor=rope_scaling["high_freq_factor"],
            original_max_position_embeddings=rope_scaling["original_max_position_embeddings"],
        )
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Computes `(cos, sin)` of shape `[batch, seq, head_dim]` for given position ids.

    `inv_freq` is a non-persistent float32 buffer (absent from the state dict, like HF's). A model built on the
    meta device must call `reset_parameters()` once it lives on a real device.
    """

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.rope_scaling = rope_scaling
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_scaling), persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recompute `inv_freq` on `device` (default: where the buffer lives now).

        Computed on the CPU and then moved, as Hugging Face does, so the values match whatever the target device.
        """
        device = self.inv_freq.device if device is None else device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.rope_scaling).to(device)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` would round the frequencies; keep them float32 (recomputed) whatever the model dtype."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.reset_parameters()
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[batch, heads, seq, head_dim]` by `cos`/`sin` `[batch, seq, head_dim]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
