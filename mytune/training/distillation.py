"""Knowledge distillation: the KL(teacher || student) token loss, chunked like the CE loss, and the teacher's checks.

The distillation recipes train a student on `(1 - kd_ratio) * CE + kd_ratio * KL(teacher || student)` over the
response tokens (labelled positions, shifted as in `training/loss.py`), both sums divided by the label tokens of the
whole optimizer step. For a 128k-150k vocabulary the `[tokens, vocab]` logits of two models would be the largest
tensors of the step, so the KL (and the CE next to it, sharing the student's logits) runs `chunk_size` labelled
tokens at a time under a non-reentrant checkpoint, as `chunked_cross_entropy_sum` does: the forward keeps one
scalar per chunk, the backward recomputes one chunk's logits of both models.

A teacher whose embedding is larger than the student's (padding rows: Qwen2.5 7B has 152064 rows, 1.5B 151936) is
compared over the student's vocabulary: the teacher's head is cut to the student's first `vocab` rows before its
softmax, so the padding rows (never real tokens) take no probability mass. The recipes first check that both models
read the text the same way (`check_same_tokenizer`): the same ids for every token.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mytune.errors import MytuneError
from mytune.training.loss import IGNORE_INDEX, select_labelled

# Text the tokenizer check encodes with both tokenizers: words, digits, punctuation, whitespace runs, non-Latin.
PROBE_TEXT = ("Knowledge distillation: the student (1.5B) learns from the teacher's 7B logits!\n\n"
              "  def f(x):\treturn x ** 2  # 12345 + 678 = 13023; café, naïve, 東京, Ünïcödé, emoji 🙂 ...")


def kd_loss_sum(student_hidden: torch.Tensor, student_head_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_head_weight: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the labelled (shifted) positions of KL(teacher || student), a float32 scalar.

    `student_hidden` / `teacher_hidden` are `[batch, seq, hidden]` (each model's own hidden size) from
    `model(tokens, return_hidden=True)`; the head weights are `[vocab, hidden]`; `labels` are aligned with the tokens
    (position t predicts label t+1, `IGNORE_INDEX` not counted); `positions` from `label_positions` (the collate's)
    avoids a host sync. The teacher side gets no gradient. See `distillation_loss_sums` for the chunking.
    """
    return distillation_loss_sums(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels,
                                  chunk_size=chunk_size, positions=positions)[1]


def distillation_loss_sums(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                           teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, labels: torch.Tensor, *,
                           chunk_size: int = 1024, positions: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KL(teacher || student) sum) over the labelled positions: float32 scalars sharing the student's logits.

    Only the labelled positions reach the heads (selected by `positions`, or found here with one host sync). Each
    chunk of `chunk_size` of them runs under a non-reentrant `torch.utils.checkpoint`: the student's and teacher's
    chunk logits (cast to float32 before the softmax) exist one chunk at a time, in the forward and again in the
    backward, so no `[tokens, vocab]` float32 tensor of either model is kept. The teacher's hidden states are detached.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    vocab = student_head_weight.size(0)
    if teacher_head_weight.size(0) < vocab:
        raise MytuneError(f"the teacher's head has {teacher_head_weight.size(0)} rows, fewer than the student's "
                          f"{vocab}: distil into a student whose vocabulary is no larger than the teacher's")
    teacher_head_weight = teacher_head_weight.detach()[:vocab]  # padding rows past the student's vocab: left out
    student, targets, positions = select_labelled(student_hidden, labels, positions)
    teacher = select_labelled(teacher_hidden.detach(), labels, positions)[0]
    ce_total = torch.zeros((), dtype=torch.float32, device=student.device)
    kd_total = torch.zeros((), dtype=torch.float32, device=student.device)
    for s_chunk, t_chunk, target_chunk in zip(student.split(chunk_size), teacher.split(chunk_size),
                                              targets.split(chunk_size)):
        ce, kd = torch.utils.checkpoint.checkpoint(
            _chunk_loss_sums, s_chunk, student_head_weight, t_chunk, teacher_head_weight, target_chunk,
            use_reentrant=False, preserve_rng_state=False,
        )
        ce_total, kd_total = ce_total + ce, kd_total + kd
    return ce_total, kd_total


def _chunk_loss_sums(student: torch.Tensor, student_weight: torch.Tensor, teacher: torch.Tensor,
                     teacher_weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student_logprobs = F.log_softmax(F.linear(student, student_weight).float(), dim=-1)
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(F.linear(teacher, teacher_weight).float(), dim=-1)
    ce = F.nll_loss(student_logprobs, targets, reduction="sum")
    kd = F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum")
    return ce, kd


def distillation_loss_sums_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KL sum) from full `[batch, seq, vocab]` logits (float32): the path when lm_head is a LoRA target
    (the projection must go through the adapter) or `chunked_loss` is off. The teacher's logits are cut to the
    student's vocabulary as in `distillation_loss_sums`."""
    vocab = student_logits.size(-1)
    keep = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(student_logits[:, :-1][keep].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.detach()[:, :-1, :vocab][keep].float(), dim=-1)
    ce = F.nll_loss(student, labels[:, 1:][keep], reduction="sum")
    return ce, F.kl_div(student, teacher, log_target=True, reduction="sum")


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, *, student_path: str, teacher_path: str,
                         probes: Sequence[str] = (PROBE_TEXT,)) -> None:
    """Refuse (one line naming both paths) a teacher whose tokenizer reads text differently from the student's.

    Distillation compares the two models' distributions id by id, so the ids must mean the same tokens: the same
    vocabulary size, the same bos/eos ids, the same string for every id and the same ids for the probe texts. (The
    models' embeddings may still differ in size: padding rows past the tokenizer's vocabulary are left out.)
    """
    def refuse(what: str) -> None:
        raise MytuneError(f"the teacher's tokenizer ({teacher_path}) differs from the student's ({student_path}): "
                          f"{what}; distillation needs one tokenizer: pick a teacher of the student's model family")

    if teacher_tokenizer.vocab_size != student_tokenizer.vocab_size:
        refuse(f"{teacher_tokenizer.vocab_size} tokens vs {student_tokenizer.vocab_size}")
    for name in ("bos_id", "eos_id"):
        if getattr(teacher_tokenizer, name) != getattr(student_tokenizer, name):
            refuse(f"{name} {getattr(teacher_tokenizer, name)} vs {getattr(student_tokenizer, name)}")
    for token_id in range(student_tokenizer.vocab_size):
        teacher_text = teacher_tokenizer.decode([token_id], skip_special_tokens=False)
        student_text = student_tokenizer.decode([token_id], skip_special_tokens=False)
        if teacher_text != student_text:
            refuse(f"token {token_id} is {teacher_text!r} vs {student_text!r}")
    for text in probes:
        if teacher_tokenizer.encode(text) != student_tokenizer.encode(text):
            refuse(f"they encode {text[:40]!r}... to different ids")


class NF4Linear(torch.nn.Module):
    """A frozen linear layer whose `weight` is a torchao `NF4Tensor` (the teacher with `teacher_quantize`): the same
    state-dict keys as `nn.Linear`, the product dequantized block by block as QLoRA's frozen base does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mytune.modules.lora import nf4_linear

        return nf4_linear(x, self.weight, self.bias)


def quantize_teacher(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """Store the weights of every linear layer inside the decoder layers in NF4 (`mytune.modules.lora.to_nf4`, as
    QLoRA quantizes its frozen base), in place; embeddings, norms and `lm_head` (read whole by the KD loss) stay.

    `device` moves each weight there before it is quantized (a teacher read into host memory reaches the accelerator
    one layer in full precision at a time). On the meta device nothing is allocated (the FSDP recipe's sharded build).
    """
    from mytune.modules.lora import to_nf4

    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if type(linear) is not torch.nn.Linear:
                continue
            weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
            bias = linear.bias.detach().to(weight.device) if linear.bias is not None else None
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child,
                    NF4Linear(to_nf4(weight), bias))
    return model
