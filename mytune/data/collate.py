"""Batch variable-length token/label lists into right-padded tensors."""

from __future__ import annotations

import torch

from mytune.data.instruct import CROSS_ENTROPY_IGNORE_INDEX


def padded_collate(batch: list[dict], *, pad_id: int,
                   ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Right-pad each item's "tokens" with `pad_id` and "labels" with `ignore_index` to the longest item.

    Padding goes on the right so, with causal attention, real tokens never attend to padding and need no mask;
    padded label positions are ignored by the loss.
    """
    max_len = max(len(item["tokens"]) for item in batch)
    tokens = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), max_len), ignore_index, dtype=torch.long)
    for row, item in enumerate(batch):
        if len(item["tokens"]) != len(item["labels"]):
            raise ValueError(f"batch item {row}: {len(item['tokens'])} tokens but {len(item['labels'])} labels")
        tokens[row, : len(item["tokens"])] = torch.as_tensor(item["tokens"], dtype=torch.long)
        labels[row, : len(item["labels"])] = torch.as_tensor(item["labels"], dtype=torch.long)
    return {"tokens": tokens, "labels": labels}
