"""The causal language-modelling loss, normalised the same way in every recipe.

Recipes sum the per-token loss of each micro-batch and divide by the number of label tokens in the *whole*
optimizer step (all micro-batches of a gradient-accumulation cycle). That makes the gradient independent of how a
batch is split into micro-batches or padded, which plain per-micro-batch means are not.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100


def count_label_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of positions that contribute to the loss once labels are shifted left by one."""
    return int((labels[:, 1:] != ignore_index).sum())


def label_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat indices (into the `[batch * (seq - 1)]` shifted positions) of the labels the loss counts.

    Why: the collate builds them on the CPU, so the chunked loss selects the labelled hidden states with
    `index_select` on the device; a boolean mask built there (`hidden[labels != ignore]`) makes the host wait for
    the GPU once per micro-batch to learn how many rows come out.
    """
    return (labels[:, 1:].reshape(-1) != ignore_index).nonzero().squeeze(-1)


def select_labelled(hidden: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label, `[n, hidden]`, the labels they predict, `[n]`, and their flat
    positions (`label_positions`): position t of `[batch, seq, hidden]` scores label t+1. `positions` from the
    collate saves the host sync that finding them here costs. The chunked losses project only these rows."""
    flat_hidden = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    targets = labels[:, 1:].reshape(-1)
    if positions is None:
        positions = label_positions(labels, ignore_index)
    return flat_hidden.index_select(0, positions), targets.index_select(0, positions), positions


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of next-token cross-entropy over non-ignored positions, computed in float32.

    `logits` is [batch, seq, vocab] for inputs `tokens`; `labels` is aligned with `tokens` (not shifted): the
    logit at position t predicts label t+1.
    """
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    positions: torch.Tensor | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """`cross_entropy_sum(hidden @ lm_head_weight.T, labels)` without ever holding the full logits.

    Why: for a 128k-256k vocabulary the `[batch, seq, vocab]` logits (plus their float32 copy, the log-softmax and
    its gradient) are the largest tensors of a training step, often larger than all activations of the layers.
    Here the output projection and the loss run `chunk_size` tokens at a time, each chunk under a non-reentrant
    `torch.utils.checkpoint`: the forward keeps only each chunk's scalar loss, the backward recomputes one chunk's
    logits at a time. Peak extra memory is ~`chunk_size * vocab` floats instead of `batch * seq * vocab`, for the
    price of a second `lm_head` matmul in the backward.

    `hidden` is `[batch, seq, hidden]` from `TransformerDecoder(tokens, return_hidden=True)`; `lm_head_weight` is
    `model.lm_head.weight` (`[vocab, hidden]`); `labels` is aligned with the tokens as for `cross_entropy_sum` (the
    hidden state at position t predicts label t+1). Positions labelled `ignore_index` are dropped before the
    projection, so prompt tokens masked out of the loss cost no `lm_head` compute: `positions` (from
    `label_positions`, e.g. the collate's `label_positions`, on the same device) says which, without a host sync;
    without it they are found here (one sync). Each chunk's logits are cast to float32 before the softmax, as in
    `cross_entropy_sum`; the returned sum is a float32 scalar.

    `compile=True` runs each chunk's projection + cross-entropy through `torch.compile` (one graph for all chunks;
    the shorter last chunk compiles once more with dynamic shapes): the float32 cast, log-softmax and gather fuse
    into the matmul's epilogue instead of materialising `chunk * vocab` float32 temporaries one op at a time.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden, targets, _ = select_labelled(hidden, labels, positions, ignore_index)
    chunk_loss = _compiled_chunk_cross_entropy_sum() if compile else _chunk_cross_entropy_sum
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # split (not a loop of slices): one backward node concatenates the chunks' input gradients once.
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss, hidden_chunk, lm_head_weight, target_chunk, ignore_index,
            use_reentrant=False, preserve_rng_state=False,
        )
    return total


def _chunk_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


_COMPILED_CHUNK = None


def _compiled_chunk_cross_entropy_sum():
    """`_chunk_cross_entropy_sum` under `torch.compile`, made on first use (importing this module compiles nothing)."""
    global _COMPILED_CHUNK
    if _COMPILED_CHUNK is None:
        _COMPILED_CHUNK = torch.compile(_chunk_cross_entropy_sum)
    return _COMPILED_CHUNK
