"""knowledge_distillation_single_device end to end on the tiny demo: the loss falls and is the kd_ratio mix of the
logged ce_loss and kd_loss, the student is saved as HF files that transformers loads, a resumed run repeats the
uninterrupted run's losses bitwise (full and LoRA student; also after SIGTERM, which saves and exits 0), kd_ratio=0
trains as the SFT recipe, a teacher equal to the student has zero KL, an NF4 teacher runs, and a teacher with another
tokenizer is refused in one line naming both paths."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mytune.checkpoint import load_hf_model, save_hf_checkpoint
from mytune.config import TuneArgumentParser
from mytune.errors import MytuneError
from mytune.models import llama_tiny
from mytune.training.metrics import read_metrics
from recipes import full_finetune_single_device as sft_recipe
from recipes import knowledge_distillation_single_device as recipe
from recipes.params.full_finetune_single_device import FullFinetuneParams
from recipes.params.knowledge_distillation_single_device import KnowledgeDistillationParams

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mytune" / "assets" / "demo"
FAST = ["max_seq_len=128", "log_every_n_steps=1", "dtype=fp32", "epochs=1", "val_fraction=0.0", "eval_every_n_steps=0"]


def params(out: Path, *overrides: str) -> KnowledgeDistillationParams:
    parser = TuneArgumentParser(KnowledgeDistillationParams, recipe="knowledge_distillation_single_device")
    return parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={out}",
                                f"dataset_cache_dir={out.parent / 'cache'}", *FAST, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "out"
    p = params(out, "max_steps_per_epoch=30", "val_fraction=0.05", "eval_every_n_steps=15")
    return p, recipe.recipe_main(p)


def test_loss_falls_and_is_the_kd_ratio_mix_of_ce_and_kl(trained):
    p, ckpt_dir = trained
    rows = read_metrics(Path(p.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert r["loss"] == pytest.approx((1 - p.kd_ratio) * r["ce_loss"] + p.kd_ratio * r["kd_loss"], rel=1e-12)
        assert r["kd_loss"] >= 0 and r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["grad_norm"] > 0
    first, last = (sum(r["loss"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert last < 0.8 * first, (first, last)
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [15, 30]
    assert all(r["val_loss"] == pytest.approx((1 - p.kd_ratio) * r["val_ce_loss"] + p.kd_ratio * r["val_kd_loss"])
               for r in evaluated)
    assert evaluated[1]["val_ce_loss"] < evaluated[0]["val_ce_loss"]


def test_the_student_is_saved_as_hf_files_that_transformers_loads(trained):
    from transformers import AutoModelForCausalLM

    _, ckpt_dir = trained
    assert ckpt_dir.name == "step_30" and (ckpt_dir / "recipe_state.pt").is_file()
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt_dir, torch_dtype=torch.float32).eval()
    ours = load_hf_model(ckpt_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert (hf_model(ids).logits - ours(ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("student", ["full", "lora"])
def test_a_resumed_run_repeats_the_losses_bitwise(student, tmp_path):
    lora = ["lora_target_modules=[q_proj,v_proj]", "lr=1e-3"] if student == "lora" else []
    run = ["max_steps_per_epoch=4", "save_every_n_steps=2", *lora]
    reference = recipe.recipe_main(params(tmp_path / "reference", *run)).parent
    if student == "lora":
        assert (reference / "step_4" / "adapter" / "adapter_model.safetensors").is_file()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "step_2", resumed / "step_2")
    recipe.recipe_main(params(resumed, *run, "resume_from_checkpoint=latest"))
    expected = read_metrics(reference / "metrics.jsonl")
    got = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [3, 4]
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in expected[2:]], key  # bitwise


def test_kd_ratio_zero_trains_as_the_sft_recipe(tmp_path):
    """The teacher is built under its own RNG state and the CE is the SFT loss: with kd_ratio=0 the student follows
    full_finetune_single_device's losses (the CE comes from a log-softmax here, F.cross_entropy there)."""
    run = ["max_steps_per_epoch=4"]
    recipe.recipe_main(params(tmp_path / "kd", *run, "kd_ratio=0"))
    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    sft_recipe.recipe_main(parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={tmp_path / 'sft'}",
                                                f"dataset_cache_dir={tmp_path / 'cache'}", *FAST, *run]))
    kd, sft = read_metrics(tmp_path / "kd" / "metrics.jsonl"), read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert [r["num_tokens"] for r in kd] == [r["num_tokens"] for r in sft]
    diff = max(abs(a["ce_loss"] - b["loss"]) for a, b in zip(kd, sft))
    print(f"kd_ratio=0 vs full_finetune_single_device: max loss diff {diff:.1e}")
    assert diff < 1e-5 and all(a["loss"] == a["ce_loss"] for a in kd), diff


def test_sigterm_saves_exits_zero_and_resumes_to_the_same_losses(tmp_path):
    run = ["max_steps_per_epoch=12", "epochs=2", "save_every_n_steps=3"]  # a resume lands mid-run, crosses an epoch
    reference = recipe.recipe_main(params(tmp_path / "reference", *run)).parent
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mytune.cli.main", "knowledge_distillation_single_device", "--config", "tiny_demo",
           "--override", f"output_dir={out}", f"dataset_cache_dir={tmp_path / 'cache'}", *FAST, *run]
    # The same thread count as the in-process reference run: a float sum's order may depend on it.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.monotonic() + 120
    while not (out / "step_3" / "recipe_state.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0  # saved at the next step boundary, exit 0
    proc.stderr.close()
    saved = max(int(p.name[5:]) for p in out.glob("step_*"))
    assert 3 <= saved < 24 and (out / f"step_{saved}" / "recipe_state.pt").is_file()
    recipe.recipe_main(params(out, *run, "resume_from_checkpoint=latest"))
    expected = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")} == expected  # bitwise, every step


def tiny_checkpoint(path: Path, tokenizer_files: list[Path], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_hf_checkpoint(llama_tiny(), path, dtype=torch.float32, tokenizer_files=tokenizer_files)


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_an_nf4_teacher_runs(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", [DEMO / "tokenizer.model"])
    same = ["model=", f"checkpoint_dir={ckpt}", f"tokenizer_path={ckpt}", f"teacher_checkpoint_dir={ckpt}",
            "max_steps_per_epoch=2", "lr=1e-6"]
    recipe.recipe_main(params(tmp_path / "same", *same))
    first = read_metrics(tmp_path / "same" / "metrics.jsonl")[0]
    assert abs(first["kd_loss"]) < 1e-6 and first["ce_loss"] > 1  # the student starts as the teacher

    recipe.recipe_main(params(tmp_path / "nf4", *same, "teacher_quantize=true", "teacher_dtype=bf16"))
    nf4 = read_metrics(tmp_path / "nf4" / "metrics.jsonl")[0]
    assert 0 < nf4["kd_loss"] < 0.05  # the bf16 NF4 teacher is close to, not equal to, the fp32 student


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"  # enough distinct text for a 512-piece vocabulary
    corpus.write_text((DEMO / "alpaca_demo.jsonl").read_text() + (REPO / "README.md").read_text())
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=512,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                                   minloglevel=2)
    teacher = tiny_checkpoint(tmp_path / "teacher", [tmp_path / "tokenizer.model"])
    cmd = [sys.executable, "-m", "mytune.cli.main", "knowledge_distillation_single_device", "--config", "tiny_demo",
           "--override", f"output_dir={tmp_path / 'out'}", f"dataset_cache_dir={tmp_path / 'cache'}",
           f"teacher_checkpoint_dir={teacher}", "max_steps_per_epoch=1", *FAST]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and f"teacher's tokenizer ({teacher})" in error[0], result.stderr
    assert "demo/tokenizer.model" in error[0]
    with pytest.raises(MytuneError, match="differs from the student's"):
        recipe.recipe_main(params(tmp_path / "out2", f"teacher_checkpoint_dir={teacher}", "max_steps_per_epoch=1"))
