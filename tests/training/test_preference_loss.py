"""Preference losses and per-sequence log-probs: equal to TRL 1.16's own code on the same model, batch and reference
(fp32, within 1e-5), and the chunked log-probs equal to the unchunked ones (values and gradients).

TRL is called, not re-implemented: `DPOTrainer._compute_loss` (loss types "sigmoid" and "ipo", reference model
forward, rewards and logged metrics) and `CPOTrainer.get_batch_loss_metrics` / `cpo_loss` (SimPO, and the
label-smoothed sigmoid) run on a bare trainer object that holds only the attributes those methods read, so no
dataset, tokenizer or `TrainingArguments` is needed; the models are transformers twins of the tiny mytune models,
patched with TRL's `add_fused_lm_head` exactly as `DPOTrainer.__init__` patches them.
"""

import importlib.util
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mytune.errors import ConfigError
from mytune.training.loss import IGNORE_INDEX, label_positions
from mytune.training.preference import (
    METRIC_NAMES,
    PreferenceLoss,
    preference_loss,
    preference_metric_tensor,
    preference_metrics,
    sequence_logps,
    sequence_logps_from_logits,
)
from tests.models.hf_reference import make_hf_model, ours_from_hf
from tests.support import one_line_error
from tests.training.test_chunked_loss import HOST_SYNC_OPS, LargestTensor, _RecordOps

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),  # TRL's call into transformers
]
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL (dev extra) is not installed")

TOLERANCE = 1e-5
UNTIED, TIED = "llama3_gqa_scaled_rope", "llama_tied_mha_bias"
VOCAB = 320  # hf_reference's tiny configs
# Three pairs sharing a prompt each: (prompt, chosen response, rejected response) lengths; rows right-padded to 14.
# 41 labelled tokens in all (a prime, so no chunk size below divides it).
PAIR_LENGTHS = [(3, 6, 8), (5, 9, 3), (2, 4, 11)]
SEQ = 14
PAD = 0


def preference_batch(pair_lengths=PAIR_LENGTHS, seq: int = SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
    """TRL's DPO inputs for `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]` rows (the layout of
    `mytune.data.preference_collate`), plus `labels` = input_ids with everything but the response masked, as
    `DPOTrainer._compute_loss` builds them."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(pair_lengths)
    input_ids = torch.full((2 * rows, seq), PAD)
    attention_mask = torch.zeros(2 * rows, seq, dtype=torch.long)
    completion_mask = torch.zeros(2 * rows, seq, dtype=torch.long)
    for i, (prompt_len, *response_lens) in enumerate(pair_lengths):
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=gen)
        for row, response_len in zip((i, rows + i), response_lens):
            end = prompt_len + response_len
            input_ids[row, :prompt_len] = prompt
            input_ids[row, prompt_len:end] = torch.randint(1, VOCAB, (response_len,), generator=gen)
            attention_mask[row, :end] = 1
            completion_mask[row, prompt_len:end] = 1
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "labels": labels}


def pair_rows(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The one-pair batch of pair `i` (its chosen and rejected rows)."""
    rows = batch["input_ids"].size(0) // 2
    return {k: v[[i, rows + i]] for k, v in batch.items()}


def twins(family: str = UNTIED):
    """(HF policy, HF reference, our policy, our reference): the reference is the policy slightly perturbed, so the
    log-ratios are neither zero nor saturating."""
    hf_policy, hf_reference = make_hf_model(family), make_hf_model(family)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf_reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return hf_policy, hf_reference, ours_from_hf(hf_policy), ours_from_hf(hf_reference)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Same parameters, gradients equal within TOLERANCE relative to each tensor's largest entry; returns the
    largest such relative difference."""
    assert got.keys() == expected.keys()
    worst = 0.0
    for name, g in expected.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        diff = float((got[name] - g).abs().max()) / scale
        assert diff < TOLERANCE, (name, diff)
        worst = max(worst, diff)
    return worst


def ours(policy, reference, batch, *, chunk_size: int = 5, **loss_kwargs):
    """Our preference step on the `[2B, S]` batch: chunked log-probs of policy (with grad) and reference (no grad)."""
    labels = batch["labels"]
    positions = label_positions(labels)
    hidden = policy(batch["input_ids"], return_hidden=True)
    logps, counts = sequence_logps(hidden, policy.lm_head.weight, labels, chunk_size=chunk_size, positions=positions)
    with torch.no_grad():
        ref_hidden = reference(batch["input_ids"], return_hidden=True)
        ref_logps, _ = sequence_logps(ref_hidden, reference.lm_head.weight, labels, chunk_size=chunk_size,
                                      positions=positions)
    policy_chosen, policy_rejected = logps.chunk(2)
    reference_chosen, reference_rejected = ref_logps.chunk(2)
    chosen_counts, rejected_counts = counts.chunk(2)
    if loss_kwargs["loss_type"] == "simpo":
        reference_chosen = reference_rejected = None
    out = preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                          chosen_counts=chosen_counts, rejected_counts=rejected_counts, **loss_kwargs)
    return out, policy_chosen, policy_rejected, counts


# ---- TRL, called through bare trainer objects ----

class _Accelerator:
    """What TRL's loss methods use of `accelerate.Accelerator` on one process."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


def patch_fused_heads(hf_policy, hf_reference) -> None:
    """`DPOTrainer.__init__`'s patching (trl/trainer/dpo_trainer.py, the `add_fused_lm_head` calls)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(hf_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf_reference)


def trl_dpo(hf_policy, hf_reference, batch, *, loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL 1.16 `DPOTrainer._compute_loss` on `batch` (reference model forward, reverse-KL, no WPO weighting):
    its loss and the metrics it logs."""
    from trl import DPOTrainer

    trainer = object.__new__(DPOTrainer)  # no __init__: only the attributes _compute_loss reads
    trainer.__dict__.update(
        model=hf_policy, ref_model=hf_reference, accelerator=_Accelerator(),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=False, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss = DPOTrainer._compute_loss(trainer, hf_policy, inputs, return_outputs=False)
    mode = "train" if hf_policy.training else "eval"
    return loss, {name: values[-1] for name, values in trainer._metrics[mode].items()}


def cpo_trainer(*, loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float = 0.5):
    """A bare TRL `CPOTrainer` (trl/experimental/cpo) with `cpo_alpha=0` (no NLL term: pure SimPO) and `alpha=0`."""
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(
        accelerator=_Accelerator(), is_encoder_decoder=False, pad_token_id=PAD, aux_loss_enabled=False,
        cpo_alpha=0.0, alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
    )
    return trainer


def cpo_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `[2B, S]` batch as CPOTrainer's chosen_* / rejected_* columns."""
    rows = batch["input_ids"].size(0) // 2
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "labels": "labels"}
    out = {}
    for side, part in (("chosen", slice(0, rows)), ("rejected", slice(rows, None))):
        for ours_name, theirs in names.items():
            out[f"{side}_{theirs}"] = batch[ours_name][part]
    return out


def trl_fused_logps(hf_model, batch) -> torch.Tensor:
    """TRL's per-sequence log-probs as `DPOTrainer._compute_loss` sums them: `log_probs` of the fused LM head,
    summed over the sequence."""
    out = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                   use_cache=False, fused_lm_head=True)
    return out.log_probs[:, -(batch["labels"].size(1) - 1):].sum(dim=1)


def max_abs(a, b) -> float:
    a, b = (torch.as_tensor(x).detach().to(torch.float64) for x in (a, b))
    return float((a - b).abs().max())


# ---- sequence_logps ----

@needs_trl
@pytest.mark.parametrize("family", [UNTIED, TIED])
def test_sequence_logps_equal_trl_per_sequence_logps(family):
    """Ours (chunked, on the mytune model) == TRL's fused-head sums (DPOTrainer) and `CPOTrainer.get_batch_logps`
    (full logits + selective_log_softmax), on the transformers twin."""
    from trl.experimental.cpo import CPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    hf_policy, _, policy, _ = twins(family)
    batch = preference_batch()
    with torch.no_grad():
        logits = hf_policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cpo_sums = CPOTrainer.get_batch_logps(logits, batch["labels"])
        cpo_means = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
        add_fused_lm_head(hf_policy)
        fused_sums = trl_fused_logps(hf_policy, batch)
        got, counts = sequence_logps(policy(batch["input_ids"], return_hidden=True), policy.lm_head.weight,
                                     batch["labels"], chunk_size=4)
    assert got.dtype == torch.float32 and counts.dtype == torch.int64
    assert counts.tolist() == [p[1] for p in PAIR_LENGTHS] + [p[2] for p in PAIR_LENGTHS]
    errors = max_abs(got, fused_sums), max_abs(got, cpo_sums), max_abs(got / counts, cpo_means)
    print(f"{family}: max abs diff vs TRL fused head {errors[0]:.2e}, vs get_batch_logps {errors[1]:.2e}, "
          f"means {errors[2]:.2e} (logps {got.tolist()})")
    assert max(errors) < TOLERANCE
    assert got.abs().min() > 1.0  # real sums, not near-zero ones


@pytest.mark.parametrize("family", [UNTIED, TIED])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("with_positions", [True, False])
def test_chunked_equal_unchunked_values_and_gradients(family, chunk_size, with_positions):
    _, _, policy, _ = twins(family)
    batch = preference_batch()
    labels = batch["labels"]
    weights = torch.linspace(-1.0, 2.0, labels.size(0))  # a different gradient per row

    expected, expected_counts = sequence_logps_from_logits(policy(batch["input_ids"]), labels)
    (expected * weights).sum().backward()
    expected_grads = grads(policy)

    positions = label_positions(labels) if with_positions else None
    got, counts = sequence_logps(policy(batch["input_ids"], return_hidden=True), policy.lm_head.weight, labels,
                                 chunk_size=chunk_size, positions=positions)
    (got * weights).sum().backward()
    worst = assert_grads_close(grads(policy), expected_grads)
    assert torch.equal(counts, expected_counts)
    print(f"chunk {chunk_size}: max abs logp diff {max_abs(got, expected):.2e}, max rel grad diff {worst:.2e}")
    assert max_abs(got, expected) < TOLERANCE


def test_rows_without_labels_give_zero_and_keep_the_graph():
    """A row whose labels are all masked (e.g. a response truncated away) sums to 0 with count 0; an all-masked
    batch still backpropagates (zero gradients) instead of failing."""
    _, _, policy, _ = twins()
    batch = preference_batch()
    labels = batch["labels"].clone()
    labels[1] = IGNORE_INDEX
    hidden = policy(batch["input_ids"], return_hidden=True)
    got, counts = sequence_logps(hidden, policy.lm_head.weight, labels, chunk_size=3)
    expected, _ = sequence_logps_from_logits(policy.lm_head(hidden), labels)
    assert got[1].item() == 0.0 and counts[1].item() == 0
    assert max_abs(got, expected) < TOLERANCE

    empty, empty_counts = sequence_logps(hidden, policy.lm_head.weight, torch.full_like(labels, IGNORE_INDEX))
    empty.sum().backward()
    assert not empty.any() and not empty_counts.any()
    assert all(g is None or not g.any() for g in (p.grad for p in policy.parameters()))


def test_bf16_hidden_is_reduced_in_float32():
    _, _, policy, _ = twins()
    policy = policy.to(torch.bfloat16)
    batch = preference_batch()
    with torch.no_grad():
        hidden = policy(batch["input_ids"], return_hidden=True)
        got, _ = sequence_logps(hidden, policy.lm_head.weight, batch["labels"], chunk_size=6)
        expected, _ = sequence_logps_from_logits(policy.lm_head(hidden), batch["labels"])
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_no_tensor_of_full_logits_size_is_allocated_or_saved():
    """Vocab 4096, 4 x 64 labelled tokens, chunks of 32: full logits are 1M floats; sequence_logps never makes a
    tensor over 32 x 4096 (forward, backward, recomputation) and keeps only its inputs and per-token values."""
    torch.manual_seed(0)
    vocab, dim, chunk = 4096, 16, 32
    hidden = torch.randn(4, 65, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (4, 65))
    n_tokens = 4 * 64

    def run(fn):
        saved = []
        with LargestTensor() as mode:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                logps, _ = fn()
            logps.sum().backward()
        return mode.largest, max(saved)

    full_largest, full_saved = run(lambda: sequence_logps_from_logits(hidden @ weight.T, labels))
    chunk_largest, chunk_saved = run(lambda: sequence_logps(hidden, weight, labels, chunk_size=chunk))
    assert full_largest >= n_tokens * vocab and full_saved >= n_tokens * vocab  # the measurement sees the logits
    assert chunk_largest <= chunk * vocab
    assert chunk_saved <= max(vocab * dim, n_tokens * dim)


def test_positions_select_without_a_host_sync():
    _, _, policy, _ = twins()
    batch = preference_batch()
    hidden = policy(batch["input_ids"], return_hidden=True)
    positions = label_positions(batch["labels"])
    with _RecordOps() as recorded:
        logps, _ = sequence_logps(hidden, policy.lm_head.weight, batch["labels"], chunk_size=4, positions=positions)
        logps.sum().backward()
    assert not recorded.ops & HOST_SYNC_OPS, recorded.ops & HOST_SYNC_OPS


# ---- preference_loss against TRL ----

@needs_trl
@pytest.mark.parametrize("loss_type, trl_loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trl_dpo_trainer(loss_type, trl_loss_type):
    """Loss, logged metrics and policy gradients of the batch, and each pair's loss, rewards and log-probs, equal
    `DPOTrainer._compute_loss` with a reference model (TRL computes everything from the transformers twins)."""
    beta = 0.1 if loss_type == "dpo" else 0.5
    hf_policy, hf_reference, policy, reference = twins()
    patch_fused_heads(hf_policy, hf_reference)
    batch = preference_batch()

    trl_loss, trl_metrics = trl_dpo(hf_policy, hf_reference, batch, loss_type=trl_loss_type, beta=beta)
    trl_loss.backward()
    out, chosen, rejected, _ = ours(policy, reference, batch, loss_type=loss_type, beta=beta)
    loss = out.losses.mean()
    loss.backward()
    metrics = preference_metrics(out, chosen, rejected)

    assert isinstance(out, PreferenceLoss) and out.losses.shape == out.chosen_rewards.shape == (3,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    loss_error = abs(loss.item() - trl_loss.item())
    metric_errors = {name: abs(value - trl_metrics[name]) for name, value in metrics.items()}
    grad_error = assert_grads_close(grads(policy), grads(hf_policy))
    print(f"{loss_type}: loss {loss.item():.6f} (TRL {trl_loss.item():.6f}, diff {loss_error:.2e}); metric diffs "
          f"{ {k: f'{v:.1e}' for k, v in metric_errors.items()} }; max rel grad diff {grad_error:.2e}")
    assert loss_error < TOLERANCE and max(metric_errors.values()) < TOLERANCE
    assert 0.0 < metrics["rewards/accuracies"] < 1.0  # a batch where the pairs disagree: the accuracy is exercised

    for i in range(3):  # per pair: a one-pair batch through TRL gives its loss, rewards and log-probs
        with torch.no_grad():
            pair_loss, pair_metrics = trl_dpo(hf_policy, hf_reference, pair_rows(batch, i), loss_type=trl_loss_type,
                                              beta=beta)
        expected = (pair_loss.item(), pair_metrics["rewards/chosen"], pair_metrics["rewards/rejected"],
                    pair_metrics["logps/chosen"], pair_metrics["logps/rejected"])
        got = (out.losses[i].item(), out.chosen_rewards[i].item(), out.rejected_rewards[i].item(),
               chosen[i].item(), rejected[i].item())
        assert max_abs(got, expected) < TOLERANCE, (i, got, expected)


@needs_trl
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_label_smoothed_dpo_equals_trl_label_smoothed_sigmoid(label_smoothing):
    """TRL 1.16's DPOTrainer "sigmoid" has no label smoothing (only its "robust" / "exo_pair" / "aot" use it). The
    conservative-DPO form lives in `CPOTrainer.cpo_loss` (loss_type "sigmoid", trl/experimental/cpo/cpo_trainer.py:
    `-logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps` with `logits = chosen - rejected`).
    Fed the DPO log-ratios (policy minus reference, from TRL's fused head), it is exactly label-smoothed DPO, and
    its rewards `beta * logratio` are DPOTrainer's. Per-pair losses, rewards and the policy gradient are compared."""
    beta = 0.2
    hf_policy, hf_reference, policy, reference = twins()
    patch_fused_heads(hf_policy, hf_reference)
    batch = preference_batch()

    with torch.no_grad():
        reference_logps = trl_fused_logps(hf_reference, batch)
    logratios = trl_fused_logps(hf_policy, batch) - reference_logps
    trainer = cpo_trainer(loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing)
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(*logratios.chunk(2))
    trl_losses.mean().backward()

    out, _, _, _ = ours(policy, reference, batch, loss_type="dpo", beta=beta, label_smoothing=label_smoothing)
    out.losses.mean().backward()

    errors = (max_abs(out.losses.detach(), trl_losses.detach()), max_abs(out.chosen_rewards, trl_chosen),
              max_abs(out.rejected_rewards, trl_rejected))
    grad_error = assert_grads_close(grads(policy), grads(hf_policy))
    print(f"dpo eps={label_smoothing}: max abs diffs loss/rewards {errors}, max rel grad diff {grad_error:.2e}")
    assert max(errors) < TOLERANCE

    if label_smoothing == 0.0:  # and it is DPOTrainer's "sigmoid" loss
        with torch.no_grad():
            dpo_loss, _ = trl_dpo(hf_policy, hf_reference, batch, loss_type="sigmoid", beta=beta)
        assert abs(dpo_loss.item() - out.losses.mean().item()) < TOLERANCE


@needs_trl
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(label_smoothing):
    """SimPO (reference-free, length-normalised) == `CPOTrainer.get_batch_loss_metrics` with loss_type "simpo",
    cpo_alpha 0: loss, rewards metrics and policy gradients of the batch; per pair, `cpo_loss` on TRL's averaged
    log-probs (`get_batch_logps(average_log_prob=True)`) gives each loss and reward."""
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.8
    hf_policy, _, policy, reference = twins()
    batch = preference_batch()
    trainer = cpo_trainer(loss_type="simpo", beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma)

    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(hf_policy, cpo_batch(batch))
    trl_loss.backward()
    with torch.no_grad():
        logits = hf_policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl_means = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
        trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(*trl_means.chunk(2))

    out, chosen, rejected, counts = ours(policy, reference, batch, loss_type="simpo", beta=beta,
                                         label_smoothing=label_smoothing, simpo_gamma=gamma)
    loss = out.losses.mean()
    loss.backward()
    metrics = preference_metrics(out, chosen, rejected)

    grad_error = assert_grads_close(grads(policy), grads(hf_policy))
    rewards = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    errors = {
        "loss": abs(loss.item() - trl_loss.item()),
        **{name: abs(metrics[name] - trl_metrics[name]) for name in rewards},
        # CPOTrainer logs the per-token mean log-probs for simpo; ours logs the sums (as DPOTrainer): compare means
        "logps/chosen (mean)": max_abs(chosen.detach() / counts[:3], trl_means[:3]),
        "per-pair losses": max_abs(out.losses.detach(), trl_losses),
        "per-pair chosen rewards": max_abs(out.chosen_rewards, trl_chosen),
        "per-pair rejected rewards": max_abs(out.rejected_rewards, trl_rejected),
    }
    print(f"simpo eps={label_smoothing}: {errors}; max rel grad diff {grad_error:.2e}")
    assert max(errors.values()) < TOLERANCE


def test_simpo_needs_no_reference_and_ipo_simpo_need_counts():
    logps = torch.tensor([-3.0, -5.0])
    counts = torch.tensor([2, 4])
    out = preference_loss(logps, logps - 1, None, None, loss_type="simpo", beta=2.0, chosen_counts=counts,
                          rejected_counts=counts)
    assert out.losses.shape == (2,)
    with pytest.raises(ValueError, match="counts"):
        preference_loss(logps, logps, logps, logps, loss_type="ipo", beta=0.1)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(logps, logps, None, None, loss_type="dpo", beta=0.1)


def test_unknown_loss_type_is_a_one_line_config_error():
    logps = torch.tensor([-3.0])
    message = one_line_error(preference_loss, logps, logps, logps, logps, loss_type="orpo", beta=0.1)
    assert "loss_type" in message and "dpo" in message
    with pytest.raises(ConfigError):
        preference_loss(logps, logps, logps, logps, loss_type="sigmoid", beta=0.1)


def test_metric_tensor_of_equal_micro_batches_averages_to_the_batch_metrics():
    """What a recipe does with gradient accumulation: mean of the micro-batches' metric tensors == the metrics of
    the whole batch (micro-batches of equal pair counts)."""
    gen = torch.Generator().manual_seed(0)
    policy, reference = -torch.rand(4, 8, generator=gen) * 40, -torch.rand(4, 8, generator=gen) * 40
    counts = torch.randint(1, 20, (2, 8), generator=gen)

    def metrics_of(part):
        out = preference_loss(policy[0, part], policy[1, part], reference[0, part], reference[1, part],
                              loss_type="ipo", beta=0.1, chosen_counts=counts[0, part],
                              rejected_counts=counts[1, part])
        return preference_metric_tensor(out, policy[0, part], policy[1, part])

    whole = dict(zip(METRIC_NAMES, metrics_of(slice(None)).tolist()))
    averaged = (metrics_of(slice(0, 4)) + metrics_of(slice(4, 8))) / 2
    assert 0.0 < whole["rewards/accuracies"] < 1.0
    assert max_abs(averaged, list(whole.values())) < 1e-5
