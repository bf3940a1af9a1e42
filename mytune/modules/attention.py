"""Multi-head causal self-attention with grouped key/value heads, optional qkv bias, per-head q/k RMSNorm and a
sliding window; the masks it takes (dense bool for SDPA, `BlockMask` for flex attention) and the backend rule.

Three ways to attend, chosen per forward by `choose_backend` (overridable with `attention_backend`):
- SDPA `is_causal` (fused flash / memory-efficient kernels): unpacked rows, no sliding window in effect.
- SDPA with a dense bool mask (`document_causal_mask`, `causal_mask`): the reference path and the CPU path. With
  grouped kv heads on CUDA k/v are repeated first (`sdpa`), because the memory-efficient kernel does not take
  `enable_gqa` (torch 2.13), so a mask plus `enable_gqa` would fall back to the math kernel (fp32 scores, no
  tensor cores).
- `flex_attention` (compiled) with a `BlockMask` (`document_block_mask`, `causal_block_mask`): packed rows or a
  sliding window on CUDA. Blocks of 128x128 that the mask empties (most of them with several documents per row)
  are skipped instead of computed. flex has no CPU backward in torch 2.13, so "auto" never picks it on the CPU.
"""

import functools
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mytune.errors import MytuneError
from mytune.modules.kv_cache import KVCache
from mytune.modules.rms_norm import RMSNorm
from mytune.modules.rope import apply_rotary

AttentionBackend = Literal["auto", "sdpa", "flex"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
AttentionMask = torch.Tensor | BlockMask


def check_backend(requested: str) -> None:
    """One-line user error for an `attention_backend` that is not "auto", "sdpa" or "flex"."""
    if requested not in ATTENTION_BACKENDS:
        raise MytuneError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {requested!r}")


def choose_backend(requested: str, device: torch.device, *, packed: bool, sliding_window: int | None) -> str:
    """"sdpa" or "flex" for one mask: `requested` unless it is "auto", which picks flex exactly for packed rows or a
    sliding window on CUDA (a mask would rule out flash there) and SDPA otherwise (CPU: flex has no backward)."""
    check_backend(requested)
    if requested != "auto":
        return requested
    return "flex" if device.type == "cuda" and (packed or sliding_window is not None) else "sdpa"


def document_causal_mask(document_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Bool `[b, 1, s, s]` mask for packed rows: query q may attend key k iff `k <= q` and both share a document id
    (and, with `sliding_window`, `q - k < sliding_window`: the window counts the query itself, as in transformers).

    `document_ids` `[b, s]` number the samples packed into each row (padding gets its own id, e.g. -1). Every position
    sees itself, so no row of the mask is empty and SDPA never produces NaN.
    """
    seq = document_ids.shape[-1]
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    return (same & causal_mask(seq, seq, sliding_window, document_ids.device)).unsqueeze(1)


def causal_mask(q_len: int, kv_len: int, sliding_window: int | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool `[q_len, kv_len]`: the queries are the last `q_len` of `kv_len` positions (after a KV cache's prefix);
    each sees the keys at or before it, and with `sliding_window` only the last `sliding_window` of those."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(-1)
    k_pos = torch.arange(kv_len, device=device)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    return mask


def document_block_mask(document_ids: torch.Tensor, sliding_window: int | None = None) -> BlockMask:
    """The `document_causal_mask` as a flex-attention `BlockMask` (128x128 blocks; any sequence length: the mask is
    evaluated at the real length and padded to whole blocks, and the kernel clamps indices to it).

    Built once per forward and shared by the layers; the mask function reads `document_ids` by index.
    """
    batch, seq = document_ids.shape
    limit = _window_limit(sliding_window, seq, document_ids.device)

    def mask_mod(b, h, q_idx, kv_idx):
        same = document_ids[b, q_idx] == document_ids[b, kv_idx]
        return same & (kv_idx <= q_idx) & (q_idx - kv_idx < limit)

    return create_block_mask(mask_mod, batch, None, seq, seq, device=document_ids.device)


def causal_block_mask(seq: int, sliding_window: int | None = None,
                      device: torch.device | str = "cpu") -> BlockMask:
    """Causal (and sliding-window) `BlockMask` for unpacked rows, one for the whole batch (batch dimension 1)."""
    limit = _window_limit(sliding_window, seq, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < limit)

    return create_block_mask(mask_mod, None, None, seq, seq, device=device)


def _window_limit(sliding_window: int | None, seq: int, device: torch.device | str) -> torch.Tensor:
    """The window as a tensor (no window: `seq`, which cuts nothing), so that masks with and without a window are
    one mask function to `torch.compile`: a compiled layer then has one graph for all layers, not one per window."""
    return torch.tensor(seq if sliding_window is None else sliding_window, device=device)


@functools.cache
def _compiled_flex_attention():
    """`flex_attention` under `torch.compile`, made on first use (eager flex materialises the full score matrix)."""
    return torch.compile(flex_attention)


def fused_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """Compiled `flex_attention` of `q` `[b, h, s, d]` over `k`/`v` `[b, kv_h, s, d]` (grouped heads allowed).

    Inside an already compiled region (a `compile_layers` layer) flex is traced into that graph directly; outside,
    the module-level compiled function runs, so flex is fused either way.
    """
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
         is_causal: bool = False, repeat_kv: bool | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with grouped kv heads and an optional bool mask (True = attend).

    Grouped heads go in as `enable_gqa` where a fused kernel takes it (the CPU kernels; CUDA flash, which needs
    fp16/bf16 and no mask) and as repeated k/v otherwise (`repeat_kv`, default: that rule): on CUDA the
    memory-efficient kernel does not take `enable_gqa` (torch 2.13), so a mask plus `enable_gqa` would fall back to
    the math kernel (fp32 scores, no tensor cores).
    """
    repeats = q.shape[1] // k.shape[1]
    if repeat_kv is None:
        flash_dtype = q.dtype in (torch.float16, torch.bfloat16)
        repeat_kv = q.device.type != "cpu" and (mask is not None or not flash_dtype)
    if repeats > 1 and repeat_kv:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=repeats > 1 and not repeat_kv)


class Attention(nn.Module):
    """Self-attention with Hugging Face parameter names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`).

    - GQA: `num_kv_heads` divides `num_heads`; each kv head serves `num_heads // num_kv_heads` query heads.
    - `qkv_bias` (Qwen2) adds biases to q/k/v; `o_bias` to the output projection (Llama's `attention_bias` sets both).
    - `qk_norm` (Qwen3) applies RMSNorm over `head_dim` to q and k before RoPE.
    - `sliding_window` (Mistral, Qwen2/3 upper layers): a query sees only the last `sliding_window` positions up to
      and including itself. It is applied here when no mask is passed (unpacked rows, KV-cache decoding); a mask
      passed in must already contain it (`TransformerDecoder` builds one per window for all layers).
    """

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, layer_idx: int = 0,
                attn_mask: AttentionMask | None = None) -> torch.Tensor:
        """`x` `[batch, seq, hidden]` -> same shape; `cos`/`sin` `[batch, seq, head_dim]` for these positions.

        `attn_mask` replaces the causal mask, e.g. for packed rows: a bool `[batch, 1, seq, seq]` tensor (True = may
        attend; SDPA) or a `BlockMask` (flex attention). It cannot be combined with a KV cache.
        """
        batch, seq, _ = x.shape
        # The head counts come from the projections' widths (-1), not from num_heads / num_kv_heads: under tensor
        # parallelism each rank projects to its own share of the heads (`training.tensor_parallel`).
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if attn_mask is not None and kv_cache is not None:
            raise ValueError("attn_mask (packed sequences) cannot be combined with a kv_cache")
        if isinstance(attn_mask, BlockMask):
            out = fused_flex_attention(q, k, v, attn_mask)
        elif attn_mask is not None:
            out = sdpa(q, k, v, attn_mask)
        else:
            num_past = 0
            if kv_cache is not None:
                num_past = kv_cache.seq_len
                k, v = kv_cache.update(layer_idx, k, v)
            out = self._attend(q, k, v, num_past)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_past: int) -> torch.Tensor:
        """Causal (sliding-window) attention of the new queries over past + new keys."""
        seq, total, window = q.shape[2], k.shape[2], self.sliding_window
        if window is not None and seq == 1 and total > window:  # one new token: its window is the last keys
            k, v, total = k[:, :, -window:], v[:, :, -window:], window
        if window is None or total <= window:  # the window leaves every causal key in reach
            if num_past == 0:
                return sdpa(q, k, v, is_causal=True)
            if seq == 1:  # one new token sees every cached position: no mask at all
                return sdpa(q, k, v)
        # A window that cuts, or several new tokens after a cached prefix (is_causal would align the mask top-left):
        # a bottom-right aligned mask.
        return sdpa(q, k, v, causal_mask(seq, total, window, q.device))
