"""The shared loss: parity with a float64 reference, and accumulation that is independent of the micro-batch split."""

import math

import torch

from mytune.training.loss import IGNORE_INDEX, count_label_tokens, cross_entropy_sum


def reference_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Next-token negative log-likelihood summed in float64 with explicit loops."""
    total = 0.0
    logp = torch.log_softmax(logits.double(), dim=-1)
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                total -= float(logp[b, t, target])
    return total


def test_cross_entropy_sum_matches_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    got = float(cross_entropy_sum(logits, labels))
    assert math.isclose(got, reference_loss_sum(logits, labels), rel_tol=1e-6)
    assert count_label_tokens(labels) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_bf16_logits_are_reduced_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    got = cross_entropy_sum(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), reference_loss_sum(logits.bfloat16().float(), labels), rel_tol=1e-5)


def test_gradient_is_independent_of_micro_batch_split():
    """Normalising by the step's label tokens makes 1x4 and 2x2 micro-batches give the same gradient."""
    torch.manual_seed(0)
    weight = torch.randn(6, 9, requires_grad=True)
    inputs = torch.randn(4, 5, 6)
    labels = torch.randint(0, 9, (4, 5))
    labels[1, :3] = IGNORE_INDEX  # uneven token counts per sample
    labels[3, 1:] = IGNORE_INDEX

    def grad_for(splits: int) -> torch.Tensor:
        weight.grad = None
        chunks = list(zip(inputs.chunk(splits), labels.chunk(splits)))
        total = sum(count_label_tokens(lab) for _, lab in chunks)
        for x, lab in chunks:
            (cross_entropy_sum(x @ weight, lab) / total).backward()
        return weight.grad.clone()

    torch.testing.assert_close(grad_for(1), grad_for(2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_for(1), grad_for(4), rtol=1e-6, atol=1e-7)
