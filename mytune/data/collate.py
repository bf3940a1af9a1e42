"""Batch variable-length samples (or packed rows) into right-padded tensors."""

from __future__ import annotations

import torch

from mytune.data.packing import document_attention_mask
from mytune.data.sft import CROSS_ENTROPY_IGNORE_INDEX
from mytune.training.loss import label_positions

PAD_DOCUMENT_ID = -1


def padded_collate(batch: list[dict], *, pad_id: int, ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX,
                   pad_to: int | None = None, pad_to_multiple_of: int = 1,
                   attn_mask: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad each item's "tokens" with `pad_id` and "labels" with `ignore_index` to the longest item (or `pad_to`),
    rounded up to a multiple of `pad_to_multiple_of` (sequence parallel cuts the sequence in that many equal parts).

    Padding goes on the right so, with causal attention, real tokens never attend to padding and need no mask;
    padded label positions are ignored by the loss. Packed items also carry "position_ids" (padded with 0) and
    "document_ids" (padded with -1, so padding is a document of its own); with `attn_mask=True` the batch also gets
    "attn_mask", the bool `[b, 1, s, s]` mask of `document_attention_mask` (large: prefer letting the model build it).
    "seq_lens" holds each row's real length: the tokens a step processed (pad_id often equals eos_id, so counting
    `tokens != pad_id` would miss every sample's final eos). "label_positions" are the flat indices of the shifted
    labels the loss counts (`training.loss.label_positions`), found here on the CPU so the loss on the GPU selects
    them without waiting for the device.
    """
    max_len = max(len(item["tokens"]) for item in batch)
    if pad_to is not None:
        if max_len > pad_to:
            raise ValueError(f"an item has {max_len} tokens, more than pad_to={pad_to}")
        max_len = pad_to
    max_len = -(-max_len // pad_to_multiple_of) * pad_to_multiple_of
    packed = "document_ids" in batch[0]
    tokens = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), max_len), ignore_index, dtype=torch.long)
    if packed:
        position_ids = torch.zeros((len(batch), max_len), dtype=torch.long)
        document_ids = torch.full((len(batch), max_len), PAD_DOCUMENT_ID, dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item["tokens"])
        if length != len(item["labels"]):
            raise ValueError(f"batch item {row}: {length} tokens but {len(item['labels'])} labels")
        tokens[row, :length] = torch.as_tensor(item["tokens"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(item["labels"], dtype=torch.long)
        if packed:
            position_ids[row, :length] = torch.as_tensor(item["position_ids"], dtype=torch.long)
            document_ids[row, :length] = torch.as_tensor(item["document_ids"], dtype=torch.long)
    seq_lens = torch.tensor([len(item["tokens"]) for item in batch], dtype=torch.long)
    out = {"tokens": tokens, "labels": labels, "seq_lens": seq_lens,
           "label_positions": label_positions(labels, ignore_index)}
    if packed:
        out["position_ids"] = position_ids
        out["document_ids"] = document_ids
        if attn_mask:
            out["attn_mask"] = document_attention_mask(document_ids)
    return out
