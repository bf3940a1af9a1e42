"""Packing: several samples in one row of `max_seq_len` tokens, kept apart by position ids and document ids.

Contract with the model (forward(tokens, position_ids=None, document_ids=None)):

- `position_ids` `[b, s]` restart at 0 at each sample's first token, so RoPE sees each sample as if alone.
- `document_ids` `[b, s]` number the samples of a row 0, 1, 2, ...; padding positions are -1. A query at position q
  may attend to key k iff `k <= q and document_ids[q] == document_ids[k]` (causal within a document). Every
  position attends at least to itself, so no attention row is empty (SDPA would return NaN for it).
  `document_attention_mask(document_ids)` builds exactly that as a bool `[b, 1, s, s]` tensor (True = attend) for
  `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`; build it once per forward and share it across layers.
  (Flex attention / flash-attn varlen can derive their block masks / `cu_seqlens` from the same ids.)
- labels of each sample's first position are -100, so the shifted loss never asks sample j's last token to predict
  sample j+1's first. With these three, the summed loss of a packed row equals the sum of its samples' losses run
  alone (tested in float64).

Unpacked batches carry neither key: plain causal attention over right-padded rows is already exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mytune.modules.attention import document_causal_mask as document_attention_mask  # noqa: F401  (re-exported)


def greedy_pack(lengths: Sequence[int], max_seq_len: int) -> np.ndarray:
    """Boundaries of packs over samples in order: pack p holds samples `bounds[p]:bounds[p+1]`.

    Greedy in dataset order: a sample joins the current pack if it still fits in `max_seq_len`, else it opens the next
    pack. Order is kept (so shuffling is the sampler's job, over packs); every sample must be <= max_seq_len.
    """
    bounds = [0]
    used = 0
    for index, length in enumerate(lengths):
        if length > max_seq_len:
            raise ValueError(f"sample {index} has {length} tokens, more than max_seq_len={max_seq_len}")
        if used + length > max_seq_len and used > 0:
            bounds.append(index)
            used = 0
        used += length
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)
