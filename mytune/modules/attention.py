"""Multi-head causal self-attention with grouped key/value heads, optional qkv bias and per-head q/k RMSNorm."""

import torch
import torch.nn.functional as F
from torch import nn

from mytune.modules.kv_cache import KVCache
from mytune.modules.rms_norm import RMSNorm
from mytune.modules.rope import apply_rotary


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool `[b, 1, s, s]` mask for packed rows: query q may attend key k iff `k <= q` and both share a document id.

    `document_ids` `[b, s]` number the samples packed into each row (padding gets its own id, e.g. -1). Every position
    sees itself, so no row of the mask is empty and SDPA never produces NaN.
    """
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


class Attention(nn.Module):
    """Self-attention with Hugging Face parameter names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`).

    - GQA: `num_kv_heads` divides `num_heads`; each kv head serves `num_heads // num_kv_heads` query heads.
    - `qkv_bias` (Qwen2) adds biases to q/k/v; `o_bias` to the output projection (Llama's `attention_bias` sets both).
    - `qk_norm` (Qwen3) applies RMSNorm over `head_dim` to q and k before RoPE.
    - Attention runs through `F.scaled_dot_product_attention(is_causal=True)` so fused kernels are used.
    """

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, layer_idx: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[batch, seq, hidden]` -> same shape; `cos`/`sin` `[batch, seq, head_dim]` for these positions.

        `attn_mask` (bool `[batch, 1, seq, seq]`, True = may attend) replaces the causal mask, e.g. the
        `document_causal_mask` of packed rows; it cannot be combined with a KV cache.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if attn_mask is not None:
            if kv_cache is not None:
                raise ValueError("attn_mask (packed sequences) cannot be combined with a kv_cache")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
        num_past = 0
        if kv_cache is not None:
            num_past = kv_cache.seq_len
            k, v = kv_cache.update(layer_idx, k, v)
        out = self._attend(q, k, v, num_past)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_past: int) -> torch.Tensor:
        """Causal attention of the new queries over past + new keys."""
        gqa = self.num_kv_heads != self.num_heads
        if num_past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if q.shape[2] == 1:  # one new token sees every cached position: no mask at all
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # Several new tokens after a cached prefix: is_causal would align the mask top-left, so build it bottom-right.
        seq, total = q.shape[2], k.shape[2]
        mask = torch.ones(seq, total, dtype=torch.bool, device=q.device).tril(diagonal=num_past)
        repeats = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
