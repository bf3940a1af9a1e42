"""The causal language-modelling loss, normalised the same way in every recipe.

Recipes sum the per-token loss of each micro-batch and divide by the number of label tokens in the *whole*
optimizer step (all micro-batches of a gradient-accumulation cycle). That makes the gradient independent of how a
batch is split into micro-batches or padded, which plain per-micro-batch means are not.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_label_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of positions that contribute to the loss once labels are shifted left by one."""
    return int((labels[:, 1:] != ignore_index).sum())


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of next-token cross-entropy over non-ignored positions, computed in float32.

    `logits` is [batch, seq, vocab] for inputs `tokens`; `labels` is aligned with `tokens` (not shifted): the
    logit at position t predicts label t+1.
    """
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index, reduction="sum")
