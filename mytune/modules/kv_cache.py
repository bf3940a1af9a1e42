"""A preallocated key/value cache for incremental decoding."""

import torch


class KVCache:
    """Keys and values of every layer, `[batch, kv_heads, max_seq_len, head_dim]` each, filled left to right.

    Layers call `update` with the new positions' keys/values and get back everything cached so far; the model
    calls `advance` once all layers have seen the new positions.
    """

    def __init__(self, *, batch_size: int, max_seq_len: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_seq_len = max_seq_len
        self.seq_len = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`/`v` `[batch, kv_heads, new, head_dim]` after the cached positions; return all positions so far."""
        end = self.seq_len + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KVCache holds {self.max_seq_len} positions; {end} requested")
        self.keys[layer_idx][:, :, self.seq_len:end] = k
        self.values[layer_idx][:, :, self.seq_len:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_new: int) -> None:
        self.seq_len += num_new
