"""The KD loss: chunked CE + KL(teacher || student) equal a float64 computation without chunks (value and gradient),
a larger teacher vocabulary is compared over the student's, a teacher with another tokenizer is refused, and the
distillation params fields are checked in one line."""

import re
from pathlib import Path

import pytest
import torch

from mytune.errors import MytuneError
from mytune.models.transformer import ModelArgs, TransformerDecoder
from mytune.tokenizers import load_tokenizer
from mytune.training.distillation import (
    check_same_tokenizer,
    distillation_loss_sums,
    distillation_loss_sums_from_logits,
    kd_loss_sum,
)
from mytune.training.loss import IGNORE_INDEX, label_positions

STUDENT_VOCAB = 97
REPO = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = REPO / "mytune" / "assets" / "demo" / "tokenizer.model"


def tiny_model(seed: int, hidden: int, vocab: int, tie: bool = False) -> TransformerDecoder:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return TransformerDecoder(args)


def batch(batch_size: int = 3, seq: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = torch.randint(0, STUDENT_VOCAB, (batch_size, seq))
    labels = tokens.clone()
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    return tokens, labels


def float64_reference(student: TransformerDecoder, teacher: TransformerDecoder, tokens: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE and KL sums from the full float64 logits (the teacher cut to the student's vocab), no chunks."""
    student_logits = student.lm_head(student(tokens, return_hidden=True)).double()
    with torch.no_grad():
        teacher_logits = teacher(tokens).double()[..., :STUDENT_VOCAB]
    keep = labels[:, 1:] != IGNORE_INDEX
    s = torch.log_softmax(student_logits[:, :-1][keep], dim=-1)
    t = torch.log_softmax(teacher_logits[:, :-1][keep], dim=-1)
    ce = -s.gather(1, labels[:, 1:][keep].unsqueeze(1)).sum()
    kd = (t.exp() * (t - s)).sum()
    return ce, kd


def student_grads(model: TransformerDecoder) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 7, 1000])
@pytest.mark.parametrize("teacher_vocab", [STUDENT_VOCAB, STUDENT_VOCAB + 31])  # + padding rows
def test_chunked_losses_and_gradients_equal_the_float64_reference(tie, chunk_size, teacher_vocab):
    student = tiny_model(0, hidden=32, vocab=STUDENT_VOCAB, tie=tie)
    teacher = tiny_model(1, hidden=48, vocab=teacher_vocab)  # another width: only the logits meet
    tokens, labels = batch()
    ce_ref, kd_ref = float64_reference(student, teacher, tokens, labels)
    (0.3 * ce_ref + 0.7 * kd_ref).backward()
    ref_grads = student_grads(student)

    with torch.no_grad():
        teacher_hidden = teacher(tokens, return_hidden=True)
    ce, kd = distillation_loss_sums(student(tokens, return_hidden=True), student.lm_head.weight, teacher_hidden,
                                    teacher.lm_head.weight, labels, chunk_size=chunk_size,
                                    positions=label_positions(labels))
    (0.3 * ce + 0.7 * kd).backward()
    got_grads = student_grads(student)

    assert ce.dtype == kd.dtype == torch.float32 and kd.item() > 0
    grad_err = max(float((got_grads[n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items())
    print(f"chunk {chunk_size}, tie {tie}, teacher vocab {teacher_vocab}: "
          f"|ce - ref| {abs(ce.item() - ce_ref.item()):.2e}, |kd - ref| {abs(kd.item() - kd_ref.item()):.2e}, "
          f"max grad error / max |grad| {grad_err:.2e}")
    torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(kd.double(), kd_ref.detach(), rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name].double(), g.double(), rtol=1e-5, atol=1e-6 * float(g.abs().max()),
                                   msg=name)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher gets no gradient


def test_kd_loss_sum_without_positions_and_the_unchunked_path_agree():
    student = tiny_model(0, hidden=32, vocab=STUDENT_VOCAB)
    teacher = tiny_model(1, hidden=32, vocab=STUDENT_VOCAB + 3)
    tokens, labels = batch()
    _, kd_ref = float64_reference(student, teacher, tokens, labels)
    with torch.no_grad():
        kd = kd_loss_sum(student(tokens, return_hidden=True), student.lm_head.weight,
                         teacher(tokens, return_hidden=True), teacher.lm_head.weight, labels, chunk_size=5)
        ce_full, kd_full = distillation_loss_sums_from_logits(student(tokens), teacher(tokens), labels)
        ce_ref, _ = float64_reference(student, teacher, tokens, labels)
    torch.testing.assert_close(kd.double(), kd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd_full.double(), kd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_full.double(), ce_ref, rtol=1e-6, atol=1e-5)


def test_the_same_model_as_teacher_gives_zero_kl():
    model = tiny_model(0, hidden=32, vocab=STUDENT_VOCAB)
    tokens, labels = batch()
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        kd = kd_loss_sum(hidden, model.lm_head.weight, hidden, model.lm_head.weight, labels, chunk_size=4)
    assert abs(kd.item()) < 1e-5


def test_a_smaller_teacher_vocabulary_is_refused():
    student = tiny_model(0, hidden=32, vocab=STUDENT_VOCAB)
    teacher = tiny_model(1, hidden=32, vocab=STUDENT_VOCAB - 1)
    tokens, labels = batch()
    with pytest.raises(MytuneError, match="fewer than the student's"):
        kd_loss_sum(student(tokens, return_hidden=True), student.lm_head.weight,
                    teacher(tokens, return_hidden=True), teacher.lm_head.weight, labels)


class ShiftedTokenizer:
    """The demo tokenizer with two ids swapped: the same size and specials, different meaning."""

    def __init__(self, inner):
        self.inner = inner
        self.vocab_size, self.bos_id, self.eos_id = inner.vocab_size, inner.bos_id, inner.eos_id

    def decode(self, ids, *, skip_special_tokens=True):
        swap = {100: 101, 101: 100}
        return self.inner.decode([swap.get(i, i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode(self, text, **kwargs):
        return self.inner.encode(text, **kwargs)


def test_tokenizer_check_accepts_the_same_and_refuses_another_in_one_line():
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    check_same_tokenizer(tokenizer, load_tokenizer(DEMO_TOKENIZER), student_path="s", teacher_path="t")
    with pytest.raises(MytuneError, match=r"teacher's tokenizer \(/teacher\) differs from the student's \(/student\)"
                                          r": token 100") as err:
        check_same_tokenizer(tokenizer, ShiftedTokenizer(tokenizer), student_path="/student", teacher_path="/teacher")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["teacher_model="], "teacher_checkpoint_dir is empty"),
    (["kd_ratio=1.5"], r"kd_ratio must be in \[0, 1\]"),
    (["quantize_base=true"], "lora_target_modules is empty"),
    (["lora_target_modules=[q_proj]", "lora_rank=0"], "lora_rank must be >= 1"),
    (["teacher_dtype=fp16"], "teacher_dtype"),
])
@pytest.mark.parametrize("recipe", ["knowledge_distillation_single_device", "knowledge_distillation_distributed"])
def test_distillation_fields_are_checked_in_one_line(recipe, overrides, message, tmp_path, capsys):
    from mytune.cli.recipes import load_params_class
    from mytune.config import TuneArgumentParser

    params_cls = load_params_class(REPO / "recipes" / f"{recipe}.py")
    with pytest.raises((MytuneError, SystemExit)) as err:
        TuneArgumentParser(params_cls, recipe=recipe).parse_params(
            ["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", *overrides])
    text = str(err.value) if isinstance(err.value, MytuneError) else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1 and re.search(message, text), text
