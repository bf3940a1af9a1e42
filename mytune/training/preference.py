"""Preference-tuning losses (DPO, IPO, SimPO) and the per-sequence log-probabilities they compare.

A preference batch is the collate's `[2B, S]` rows: chosen responses in rows `[:B]`, rejected in `[B:]`, labels
aligned with the tokens (`-100` on the prompt and padding), one forward for both. `sequence_logps` turns the
model's hidden states into each row's summed response log-probability (chunked, as `training/loss.py` does for the
cross-entropy), `preference_loss` turns policy (and reference) log-probabilities into per-pair losses and rewards,
and `preference_metrics` into the logged batch means.

The definitions are TRL 1.16's, so a run reads the same as a `DPOTrainer` / `CPOTrainer` run
(tests/training/test_preference_loss.py checks them against TRL's own code):
- "dpo": `DPOTrainer` loss_type "sigmoid": `-logsigmoid(beta * delta)` with
  `delta = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)`. With `label_smoothing`
  eps > 0 it is the conservative DPO form `-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)`
  (TRL 1.16's "sigmoid" ignores eps; this is the label-smoothed sigmoid TRL writes in `CPOTrainer.cpo_loss` and in
  older `DPOTrainer`s, and torchtune's `DPOLoss`).
- "ipo": `DPOTrainer` loss_type "ipo": each log-ratio divided by its response's token count (at least 1), then
  `(chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2`.
- "simpo": `CPOTrainer` loss_type "simpo" with `cpo_alpha=0` (reference-free): the log-probs are averaged per
  response token, `logits = chosen_avg - rejected_avg - simpo_gamma / beta`, and the loss is the (label-smoothed)
  sigmoid of `beta * logits`.
Rewards: `beta * (policy - reference)` (sums, not averages) for dpo and ipo, as `DPOTrainer` logs them;
`beta * policy_avg` for simpo, as `CPOTrainer` does. They are detached: they are for logging and accuracy only.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mytune.errors import ConfigError
from mytune.training.loss import IGNORE_INDEX, select_labelled

LOSS_TYPES = ("dpo", "ipo", "simpo")


class PreferenceLoss(NamedTuple):
    """Per-pair results of `preference_loss`, all `[B]`: `losses` (differentiable; the recipe reduces them),
    `chosen_rewards` and `rejected_rewards` (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    positions: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labels, without ever holding the `[tokens, vocab]` logits.

    `hidden` is `[N, S, D]` from `TransformerDecoder(tokens, return_hidden=True)`, `lm_head_weight` the model's
    `lm_head.weight` `[vocab, D]`, `labels` `[N, S]` aligned with the tokens (the hidden state at position t scores
    label t+1). Returns float32 `[N]` sums of `log p(label_{t+1} | hidden_t)` over the labelled positions and the
    int64 `[N]` number of those positions (0 and 0 for a row without labels).

    As `training.loss.chunked_cross_entropy_sum`: only the labelled positions are projected (`positions` from
    `loss.label_positions` / the collate's `label_positions` selects them without a host sync; without it they are
    found here, one sync), `chunk_size` of them at a time under a non-reentrant checkpoint whose output is just the
    chunk's per-token log-probs, so the forward keeps `[tokens]` floats and the backward recomputes one chunk's
    logits at a time. Logits are cast to float32 before the softmax.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    rows, seq = labels.shape
    counts = (labels[:, 1:] != ignore_index).sum(dim=1)
    flat_hidden, targets, positions = select_labelled(hidden, labels, positions, ignore_index)
    token_logps = [
        torch.utils.checkpoint.checkpoint(
            _chunk_token_logps, hidden_chunk, lm_head_weight, target_chunk,
            use_reentrant=False, preserve_rng_state=False,
        )
        for hidden_chunk, target_chunk in zip(flat_hidden.split(chunk_size), targets.split(chunk_size))
    ]
    per_token = torch.cat(token_logps)  # split always gives at least one (possibly empty) chunk
    # each selected position belongs to row `position // (seq - 1)`; index_add keeps the sum differentiable
    row_of = torch.div(positions, max(seq - 1, 1), rounding_mode="floor")
    sums = torch.zeros(rows, dtype=torch.float32, device=hidden.device).index_add(0, row_of, per_token)
    return sums, counts


def _chunk_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_logps_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` from full `[N, S, vocab]` logits (unchunked), for when the head itself is trained through
    an adapter (`lm_head` a LoRA target) so `lm_head.weight` alone is not the projection. Float32 `[N]` sums and
    int64 `[N]` counts, as `sequence_logps`."""
    rows, seq, vocab = logits.shape
    shifted_labels = labels[:, 1:]
    token_nll = F.cross_entropy(logits[:, :-1, :].reshape(-1, vocab).float(), shifted_labels.reshape(-1),
                                ignore_index=ignore_index, reduction="none")  # 0 at ignored positions
    return -token_nll.view(rows, seq - 1).sum(dim=1), (shifted_labels != ignore_index).sum(dim=1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
) -> PreferenceLoss:
    """Per-pair preference losses and rewards from `[B]` summed response log-probs (module docstring: definitions).

    `reference_*` are the reference model's sums (unused, and may be None, for "simpo"); `*_counts` the responses'
    label-token counts from `sequence_logps`, needed by "ipo" and "simpo" (which normalise by length). TRL divides
    by the response's token count; ours counts the scored (shifted) labels, the same number whenever the response
    does not start the row (there is always a prompt or BOS before it). A count of 0 is taken as 1, as TRL's IPO.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type: unknown {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if loss_type in ("ipo", "simpo") and (chosen_counts is None or rejected_counts is None):
        raise ValueError(f"loss_type {loss_type!r} normalises by length: pass chosen_counts and rejected_counts")
    if loss_type == "simpo":
        return _simpo(policy_chosen, policy_rejected, chosen_counts, rejected_counts, beta, label_smoothing,
                      simpo_gamma)
    if reference_chosen is None or reference_rejected is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    if loss_type == "dpo":
        losses = _smoothed_sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    else:  # ipo
        chosen_avg = chosen_logratios / chosen_counts.clamp(min=1)
        rejected_avg = rejected_logratios / rejected_counts.clamp(min=1)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _simpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_counts: torch.Tensor,
           rejected_counts: torch.Tensor, beta: float, label_smoothing: float, gamma: float) -> PreferenceLoss:
    """SimPO: reference-free, on per-token average log-probs, with a target margin `gamma` (TRL's CPOTrainer)."""
    chosen_avg = policy_chosen / chosen_counts.clamp(min=1)
    rejected_avg = policy_rejected / rejected_counts.clamp(min=1)
    logits = chosen_avg - rejected_avg - gamma / beta
    losses = _smoothed_sigmoid_loss(beta * logits, label_smoothing)
    return PreferenceLoss(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def _smoothed_sigmoid_loss(scaled_margin: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)`; exactly `-logsigmoid(x)` when eps is 0."""
    if label_smoothing == 0:
        return -F.logsigmoid(scaled_margin)
    return -F.logsigmoid(scaled_margin) * (1 - label_smoothing) - F.logsigmoid(-scaled_margin) * label_smoothing


METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def preference_metric_tensor(out: PreferenceLoss, policy_chosen: torch.Tensor,
                             policy_rejected: torch.Tensor) -> torch.Tensor:
    """`preference_metrics`' values as one float32 `[6]` tensor on the batch's device, in `METRIC_NAMES` order.

    Why: a recipe can add these up over its micro-batches and all-reduce them over ranks as one tensor, and read
    them once per logged step (no host sync per micro-batch).
    """
    chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    return torch.stack([
        chosen.mean(),
        rejected.mean(),
        (chosen > rejected).float().mean(),
        (chosen - rejected).mean(),
        policy_chosen.detach().float().mean(),
        policy_rejected.detach().float().mean(),
    ])


def preference_metrics(out: PreferenceLoss, policy_chosen: torch.Tensor,
                       policy_rejected: torch.Tensor) -> dict[str, float]:
    """The batch means a preference step logs, with TRL's names and definitions: "rewards/chosen",
    "rewards/rejected", "rewards/accuracies" (share of pairs whose chosen reward is higher), "rewards/margins"
    (chosen minus rejected), "logps/chosen", "logps/rejected" (the policy's summed response log-probs, as
    `DPOTrainer` logs them; TRL's `CPOTrainer` logs per-token means for simpo, which are the rewards / beta here).

    One host sync for all six (`preference_metric_tensor` read once).
    """
    return dict(zip(METRIC_NAMES, preference_metric_tensor(out, policy_chosen, policy_rejected).tolist()))
