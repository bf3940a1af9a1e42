"""End to end: lora_dpo_single_device trains the same losses as a plain loop over transformers + PEFT + TRL's own
`DPOTrainer` loss code (reference = PEFT's adapters off) on the same batches; precomputed reference log-probs train
like per-batch ones and are read back from the cache by a resumed run; a resume is bitwise; ipo and simpo run and log
every metric; a nan loss and bad fields stop with one line."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mytune.checkpoint import save_peft_adapter
from mytune.config import TuneArgumentParser
from mytune.errors import MytuneError
from mytune.training.metrics import read_metrics
from recipes import lora_dpo_single_device as recipe
from recipes.params.lora_dpo_single_device import LoRADPOParams

DEMO_DATA = Path(recipe.__file__).resolve().parents[1] / "mytune" / "assets" / "demo" / "preference_demo.jsonl"
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL (dev extra) is not installed")
TOLERANCE = 1e-5
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib")
# A seconds-long run: short rows, fp32, every step logged, no validation, nothing pruned. lm_head takes no adapter:
# TRL's fused head (like our chunked log-probs) projects with lm_head.weight itself.
SHORT = ["max_seq_len=96", "batch_size=2", "gradient_accumulation_steps=2", "epochs=1", "dtype=fp32",
         "log_every_n_steps=1", "val_fraction=0", "eval_every_n_steps=0", "save_every_n_steps=0",
         "keep_last_n_checkpoints=null", "lr_scheduler=constant", "warmup_steps=0",
         "lora_target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


def demo_params(tmp_path: Path, *overrides: str) -> LoRADPOParams:
    parser = TuneArgumentParser(LoRADPOParams, recipe="lora_dpo_single_device")
    # A seeded random start: the shipped tiny_demo starts from the SFT demo's checkpoint.
    return parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={tmp_path}",
                                f"dataset_cache_dir={tmp_path.parent / 'cache'}", "checkpoint_dir=", "model=llama_tiny",
                                *overrides])


def losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(out / "metrics.jsonl")}


def trl_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our collated `[2B, S]` batch as TRL's DPO inputs: the same rows, its attention and completion masks."""
    positions = torch.arange(batch["tokens"].size(1))
    return {"input_ids": batch["tokens"], "attention_mask": (positions < batch["seq_lens"][:, None]).long(),
            "completion_mask": (batch["labels"] != -100).long()}


@needs_trl
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # TRL's call into transformers
@pytest.mark.parametrize("loss_type, trl_loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_losses_equal_a_plain_loop_with_trl_dpo_loss_on_a_peft_model(loss_type, trl_loss_type, tmp_path):
    """3 optimizer steps of 2 micro-batches of 2 pairs. The plain loop: the recipe's saved random start loaded by
    transformers, the recipe's initial adapters loaded by PEFT, TRL 1.16's `DPOTrainer._compute_loss` with no
    ref_model (so TRL's own `use_adapter` turns the adapters off for the reference), loss / accumulation steps,
    clipping and SGD; batches from the recipe's loader. Losses and logged rewards equal within 1e-5 (fp32).
    SGD, not AdamW: Adam's first steps divide gradients by their own size, so a 1e-9 difference in a near-zero
    gradient entry can flip a whole lr-sized update; SGD keeps the comparison linear."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tests.training.test_preference_loss import trl_dpo

    steps, accumulation, lr, beta = 3, 2, 2.0, 0.1
    run = [*SHORT, f"max_steps_per_epoch={steps}", f"loss_type={loss_type}", "optimizer=sgd", f"lr={lr}",
           f"beta={beta}"]
    recipe.recipe_main(demo_params(tmp_path / "recipe", *run))
    ours = read_metrics(tmp_path / "recipe" / "metrics.jsonl")

    # The same seeded start, adapters and batches, from a recipe object set up with the same params.
    twin = recipe.LoRADPORecipeSingleDevice(demo_params(tmp_path / "twin", *run))
    twin.setup()
    twin.run_lock.release()
    p = twin.params
    save_peft_adapter(twin.model, tmp_path / "init", base_model_name_or_path=str(twin.base_model_path),
                      targets=p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout)
    twin.dataloader.set_epoch(0)
    batches = iter(twin.dataloader)

    hf = AutoModelForCausalLM.from_pretrained(twin.base_model_path, dtype=torch.float32)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer.__init__
    policy = PeftModel.from_pretrained(hf, tmp_path / "init", is_trainable=True).train()
    trainable = [t for t in policy.parameters() if t.requires_grad]
    optim = torch.optim.SGD(trainable, lr=lr, momentum=0.9)
    theirs = []
    for _ in range(steps):
        step_loss, step_metrics = 0.0, []
        for _ in range(accumulation):
            loss, metrics = trl_dpo(policy, None, trl_inputs(next(batches)), loss_type=trl_loss_type, beta=beta)
            (loss / accumulation).backward()
            step_loss += loss.item() / accumulation
            step_metrics.append(metrics)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        optim.zero_grad()
        theirs.append({"loss": step_loss, **{k: sum(m[k] for m in step_metrics) / accumulation
                                             for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}})

    # Relative to the value where it is over 1 (rewards are beta * summed log-ratios).
    errors = {k: max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(ours, theirs)) for k in theirs[0]}
    print(f"{loss_type}: ours {[round(r['loss'], 6) for r in ours]}, TRL {[round(r['loss'], 6) for r in theirs]}, "
          f"max differences {', '.join(f'{k} {v:.1e}' for k, v in errors.items())}")
    assert len(ours) == steps and max(errors.values()) < TOLERANCE
    assert len({round(r["loss"], 4) for r in ours}) == steps  # the steps differ: training moved the adapters


def test_precomputed_reference_trains_like_per_batch_and_a_resumed_run_reads_the_cache(tmp_path, capsys):
    """The same 4 steps with the reference run per batch and precomputed: losses and metrics within 1e-5 (batched
    differently, so not bitwise). The precomputed run caches the log-probs; a run resumed from its step_2 reads
    them back (no reference forward) and logs its losses bitwise."""
    data = tmp_path / "pairs.jsonl"  # the demo's first 80 pairs: 72 to train on, 8 held out
    data.write_text("\n".join(DEMO_DATA.read_text().splitlines()[:80]) + "\n")
    run = [*SHORT, f"dataset_path={data}", "max_steps_per_epoch=4", "val_fraction=0.1", "save_every_n_steps=2",
           "eval_every_n_steps=2"]
    recipe.recipe_main(demo_params(tmp_path / "per_batch", *run))
    recipe.recipe_main(demo_params(tmp_path / "precomputed", *run, "precompute_reference_logps=true"))
    out = capsys.readouterr().out
    assert "dataset_path: reference log-probs of 72 pairs cached in" in out
    assert "validation: reference log-probs of 8 pairs cached in" in out
    per_batch = read_metrics(tmp_path / "per_batch" / "metrics.jsonl")
    precomputed = read_metrics(tmp_path / "precomputed" / "metrics.jsonl")
    # Not the accuracies: they count exact ties, and at step 1 (policy == reference) per-batch rewards are exactly 0
    # while precomputed ones (other padding) are +-1e-7.
    keys = [k for k in per_batch[-1] if k.startswith(("loss", "rewards/", "logps/", "val_loss", "val_rewards"))
            and not k.endswith("accuracies")]
    # Relative to the value where it is over 1 (the summed log-probs are about -40).
    errors = {k: max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(per_batch, precomputed) if k in a)
              for k in keys}
    with capsys.disabled():
        print("precomputed vs per-batch reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert len(precomputed) == 4 and max(errors.values()) < TOLERANCE

    resumed = tmp_path / "resumed"
    calls = []
    original = recipe.LoRADPORecipeSingleDevice.reference_logps
    try:
        recipe.LoRADPORecipeSingleDevice.reference_logps = lambda self, batch: calls.append(1) or original(self, batch)
        recipe.recipe_main(demo_params(resumed, *run, "precompute_reference_logps=true",
                                       f"resume_from_checkpoint={tmp_path / 'precomputed' / 'step_2'}"))
    finally:
        recipe.LoRADPORecipeSingleDevice.reference_logps = original
    out = capsys.readouterr().out
    assert "dataset_path: reference log-probs of 72 pairs read from" in out and not calls
    assert losses(resumed) == {s: v for s, v in losses(tmp_path / "precomputed").items() if s > 2}


RESUME_RUN = [*SHORT, "max_steps_per_epoch=3", "epochs=2", "save_every_n_steps=2", "lr_scheduler=cosine",
              "warmup_steps=1", "lora_dropout=0.1"]


def test_resume_from_step_2_gives_bitwise_the_same_losses_and_adapters(tmp_path, capsys):
    """6 steps over 2 epochs saving every 2, with adapter dropout (the RNG must resume too); a run resumed from
    step_2 logs bitwise the uninterrupted run's losses and rewards for steps 3..6 and ends with the same adapters."""
    reference = tmp_path / "reference"
    recipe.recipe_main(demo_params(reference, *RESUME_RUN))
    expected = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in expected] == list(range(1, 7))
    assert (reference / "step_2" / "adapter" / "adapter_model.safetensors").is_file()

    resumed = tmp_path / "resumed"
    step_dir = recipe.recipe_main(demo_params(resumed, *RESUME_RUN,
                                              f"resume_from_checkpoint={reference / 'step_2'}"))
    assert "at step 2" in capsys.readouterr().out
    got = read_metrics(resumed / "metrics.jsonl")
    fields = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm")
    assert [{k: r[k] for k in fields} for r in got] == [{k: r[k] for k in fields} for r in expected[2:]]  # bitwise
    a = load_file(reference / "step_6" / "adapter" / "adapter_model.safetensors")
    b = load_file(step_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_ipo_and_simpo_train_and_log_every_metric(loss_type, tmp_path, monkeypatch):
    """Both log the train and validation metrics; simpo never runs a reference forward (reference-free)."""
    if loss_type == "simpo":
        monkeypatch.setattr(recipe.LoRADPORecipeSingleDevice, "reference_logps",
                            lambda self, batch: pytest.fail("simpo ran a reference forward"))
    step_dir = recipe.recipe_main(demo_params(tmp_path / "out", *SHORT, "max_steps_per_epoch=2",
                                              f"loss_type={loss_type}", "val_fraction=0.02", "max_eval_batches=2"))
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 2 and all(k in rows[-1] and math.isfinite(rows[-1][k]) for k in METRICS), rows[-1]
    assert all(math.isfinite(rows[-1][f"val_{k}"]) for k in ("loss", "rewards/accuracies", "rewards/margins"))
    assert rows[-1]["val_pairs"] == 4  # 2 batches of 2 pairs
    assert (step_dir / "adapter" / "adapter_config.json").is_file() and (step_dir / "model.safetensors").is_file()


def test_nan_loss_stops_naming_the_last_good_checkpoint(tmp_path):
    params = demo_params(tmp_path / "out", *SHORT, "max_steps_per_epoch=4", "lr=1e30", "save_every_n_steps=1",
                         "max_grad_norm=null")
    with pytest.raises(MytuneError) as err:
        recipe.recipe_main(params)
    message = str(err.value)
    assert "training diverged" in message and "lower lr (now 1e+30)" in message, message
    last_good = Path(message.split("the last good checkpoint is ")[1].split()[0])
    assert (last_good / "recipe_state.pt").is_file() and (last_good / "adapter").is_dir()


@pytest.mark.parametrize("overrides, expected", [
    (["loss_type=kto"], "loss_type"),
    (["label_smoothing=0.1", "loss_type=ipo"], "label_smoothing applies to loss_type=dpo and simpo"),
    (["beta=0"], "beta must be > 0"),
    (["precompute_reference_logps=true", "loss_type=simpo"], "simpo uses no reference model"),
    (["column_map={instruction: q}"], "column_map: unknown column 'instruction'"),
    (["packed=true"], "packed"),
])
def test_bad_fields_are_one_line_config_errors(overrides, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_params(tmp_path / "out", *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_sigterm_saves_exits_zero_and_resume_latest_gives_the_same_losses(tmp_path):
    """From the command line: SIGTERM once step_2 is complete; the run saves the step it is in and exits 0;
    `resume_from_checkpoint=latest` then logs bitwise the losses of an uninterrupted run."""
    run = [*SHORT, "max_steps_per_epoch=16", "save_every_n_steps=2"]  # steps to spare after step_2 on a busy machine

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mytune.cli.main", "lora_dpo_single_device", "--config", "tiny_demo",
                "--override", f"output_dir={out}", f"dataset_cache_dir={tmp_path / 'cache'}", "checkpoint_dir=",
                "model=llama_tiny", *run, *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    assert subprocess.run(command(reference), capture_output=True, env=env).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not (out / "step_2" / "recipe_state.pt").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never saved step_2"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    proc.stderr.close()
    stopped = max(int(p.name[5:]) for p in out.glob("step_*"))
    assert 2 <= stopped < 16 and max(losses(out)) == stopped
    result = subprocess.run(command(out, "resume_from_checkpoint=latest"), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(out) == losses(reference)  # bitwise, every step
    assert json.loads((out / "step_16" / "adapter" / "adapter_config.json").read_text())["r"] == 8


WORDS = ("rain", "horse", "quiet", "garden", "music", "wind", "fast", "table", "night", "blue", "paper", "fish", "dog",
         "yellow", "road", "bird", "green", "snow", "star", "field", "chair", "tree", "ship", "light")


def form_pairs(n: int) -> list[dict]:
    """Pairs whose wrong answer differs in form, not in knowledge: the words capitalized or in capitals (chosen) vs
    left in lower case (rejected), three random words each."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (3,), generator=gen).tolist()]
        text = " ".join(words)
        if i % 2:
            rows.append({"prompt": f"Capitalize the first letter of each word.\n\n{text}",
                         "chosen": " ".join(w.capitalize() for w in words), "rejected": text})
        else:
            rows.append({"prompt": f"Convert the text to capital letters.\n\n{text}", "chosen": text.upper(),
                         "rejected": text})
    return rows


def test_dpo_learns_a_preference_that_holds_on_held_out_pairs(tmp_path):
    """128 pairs whose right answer differs from the wrong one in form (capitals): a random tiny model knows nothing,
    yet 36 DPO steps teach it the preference, and the held-out pairs are then preferred far above chance (0.5).
    (The shipped tiny_demo starts from the SFT demo's checkpoint instead; the closing note gives its figure.)"""
    data = tmp_path / "form_pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in form_pairs(128)))
    recipe.recipe_main(demo_params(tmp_path / "out", f"dataset_path={data}", "val_fraction=0.25", "eval_every_n_steps=0", "save_every_n_steps=0", "epochs=3",
                                   "max_seq_len=96"))
    last = read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]
    print(f"form pairs: held-out reward accuracy {last['val_rewards/accuracies']:.3f} over {last['val_pairs']} pairs "
          f"after {last['step']} steps")
    assert last["val_pairs"] == 32 and last["val_rewards/accuracies"] >= 0.8
