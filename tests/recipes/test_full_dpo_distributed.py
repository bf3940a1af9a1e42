"""full_dpo_distributed end to end: 2 CPU processes (gloo) equal one process on the same global batch (loss,
rewards, log-probs, validation), a few steps equal a plain loop around TRL's own `DPOTrainer` loss on the
transformers twin, the frozen reference is the start (first loss ln 2), precomputed reference log-probs equal the
per-batch reference, and a run stopped by SIGTERM and resumed continues bitwise."""

import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from mytune.config import TuneArgumentParser
from mytune.errors import ConfigError
from mytune.training.distributed import destroy_distributed
from mytune.training.metrics import read_metrics
from mytune.training.preference import METRIC_NAMES
from recipes import full_dpo_distributed as dpo_recipe
from recipes.params.full_dpo_distributed import FullDPODistributedParams

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mytune" / "assets" / "demo"
STEPS = 4
# Same pairs (unshuffled), seed and hyper-parameters; the 2-process run has half the per-process batch. 41
# validation pairs (odd: rank 1's last one is a wrap-around repeat that must not count), evaluated after steps 2 and 4.
COMMON = ["shuffle=false", "dtype=fp32", "epochs=1", f"max_steps_per_epoch={STEPS}", "log_every_n_steps=1",
          "gradient_accumulation_steps=2", "warmup_steps=1", "val_fraction=0.05", "eval_every_n_steps=2",
          "max_seq_len=128", "lr=1e-3"]
COMPARED = ("loss", *METRIC_NAMES)
# Compared within 1e-5; the summed log-probs (tens of nats) within 1e-5 relative to their size.
# rewards/accuracies is compared after the first step: there the policy is the reference, every reward is 0 up to
# rounding, and whether chosen > rejected is a coin toss of the last bit.
ABSOLUTE = ("loss",)
# Rewards are beta times differences of summed log-probs (|logps| ~ 100 here, where one float32 rounding step is ~1e-5):
# they are compared relative to beta * |logps|, the summed log-probs relative to themselves.
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
LOGPS = ("logps/chosen", "logps/rejected")
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL (dev extra) is not installed")
# The shipped tiny_demo starts from the SFT demo's checkpoint; these tests start from the seeded random tiny Llama
# (a later checkpoint_dir=... override wins).
RANDOM_START = ("checkpoint_dir=", "model=llama_tiny")


def two_ranks(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MYTUNE_DATA_CACHE": str(out.parent / f"{out.name}-cache")}
    return subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "full_dpo_distributed",
         "--config", "tiny_demo", "--override", f"output_dir={out}", *RANDOM_START, *overrides],
        capture_output=True, text=True, env=env, cwd=out.parent, timeout=300,
    )


def parse(out: Path, *overrides: str) -> FullDPODistributedParams:
    parser = TuneArgumentParser(FullDPODistributedParams, recipe="full_dpo_distributed")
    return parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={out}",
                                f"dataset_cache_dir={out.parent / 'cache'}", *RANDOM_START, *overrides])


def world_of_one(out: Path, *overrides: str) -> list[dict]:
    """The recipe in this process (a world of one, no torchrun); its metrics.jsonl rows."""
    try:
        dpo_recipe.recipe_main(parse(out, *overrides))
    finally:
        destroy_distributed()
    return read_metrics(out / "metrics.jsonl")


def max_diff(a: list[dict], b: list[dict], names) -> float:
    return max(abs(x[name] - y[name]) for x, y in zip(a, b) for name in names)


def max_rel_diff(a: list[dict], b: list[dict], names) -> float:
    return max(abs(x[name] - y[name]) / max(abs(y[name]), 1.0) for x, y in zip(a, b) for name in names)


def assert_same_metrics(got: list[dict], expected: list[dict], what: str, prefix: str = "") -> None:
    """Loss within 1e-5; rewards within 1e-5 of beta * |logps| (the default beta 0.1); summed log-probs within 1e-5
    relative; prints the figures."""
    absolute, rewards, logps = ([prefix + n for n in names] for names in (ABSOLUTE, REWARDS, LOGPS))
    diff, rel = max_diff(got, expected, absolute), max_rel_diff(got, expected, logps)
    reward_scale = max(1.0, 0.1 * max(abs(row[name]) for row in expected for name in logps))
    reward_rel = max_diff(got, expected, rewards) / reward_scale
    print(f"{what}: max abs diff of the loss {diff:.2e}, of the rewards {reward_rel:.2e} of beta * |logps|, "
          f"max rel diff of logps {rel:.2e}")
    assert diff < 1e-5 and reward_rel < 1e-5 and rel < 1e-5, (got, expected)
    accuracy = prefix + "rewards/accuracies"
    first = 0 if prefix else 1  # validation runs after a step
    # A flipped pair moves it by 1 / pairs; the rest is the float sums of per-rank means.
    assert max_diff(got[first:], expected[first:], [accuracy]) < 1e-6, (got, expected)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_dpo") / "out"
    result = two_ranks(out, "batch_size=2", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_same_global_batch(two_rank_run, tmp_path):
    out, result = two_rank_run
    single = world_of_one(tmp_path / "single", "batch_size=4", *COMMON)
    sharded = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in sharded] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    assert [r["num_tokens"] for r in sharded] == [r["num_tokens"] for r in single]  # the same pairs per step
    assert_same_metrics(sharded, single, "full DPO, 2 processes vs 1")
    norm_diff = max_diff(sharded, single, ["grad_norm"])
    print(f"grad norm: max diff {norm_diff:.2e}")
    assert norm_diff < 1e-4
    assert abs(sharded[0]["loss"] - math.log(2)) < 1e-6  # the policy starts as the reference
    assert all(abs(r["loss"] - math.log(2)) > 1e-4 for r in sharded[1:])  # and then moves away from it
    # Validation: each rank evaluates its shard, the sums are all-reduced; the repeat on rank 1 is left out.
    evaluated = [(a, b) for a, b in zip(sharded, single) if "val_loss" in a]
    assert [a["step"] for a, _ in evaluated] == [2, 4] and all("val_loss" in b for _, b in evaluated)
    assert all(a["val_pairs"] == b["val_pairs"] == 41 for a, b in evaluated)
    assert_same_metrics([a for a, _ in evaluated], [b for _, b in evaluated], "validation", prefix="val_")
    assert result.stdout.count("saved checkpoint to") == 1  # rank 0 alone logs and writes
    assert result.stdout.count("full_dpo_distributed done:") == 1  # rank 0 alone prints the closing summary
    assert result.stdout.count("a frozen sharded reference") == 1


def test_the_reference_is_the_frozen_bf16_start_and_the_policy_fp32_masters(tmp_path):
    """dtype=bf16 as a world of one: the reference's sharded weights are bf16, frozen and in eval mode, the policy's
    float32; at the first step both compute the same bf16 numbers, so the loss is exactly DPO's ln 2."""
    params = parse(tmp_path / "out", "dtype=bf16", "max_steps_per_epoch=2", "epochs=1", "log_every_n_steps=1",
                   "max_seq_len=128", "val_fraction=0", "eval_every_n_steps=0")
    recipe = dpo_recipe.FullDPORecipeDistributed(params)
    try:
        recipe.setup()
        assert {p.dtype for p in recipe.model.parameters()} == {torch.float32}
        assert {p.dtype for p in recipe.reference.parameters()} == {torch.bfloat16}
        assert all(isinstance(p, DTensor) and not p.requires_grad for p in recipe.reference.parameters())
        assert not recipe.reference.training and recipe.model.training
        recipe.train()
        # Resharded after each no_grad forward: no gathered reference weights stay behind between steps.
        assert all(isinstance(p, DTensor) for p in recipe.reference.parameters())
        recipe.cleanup()
    finally:
        destroy_distributed()
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0.0
    assert rows[1]["loss"] != rows[0]["loss"]


def tiny_hf_checkpoint(path: Path) -> Path:
    """A random transformers Llama (every weight randomised) with the demo tokenizer's vocabulary, saved as HF files."""
    import transformers

    from tests.models.hf_reference import randomize_

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    randomize_(model)
    with torch.no_grad():  # smaller weights: log-ratios that move without saturating the sigmoid
        for param in model.parameters():
            param.mul_(0.3)
    model.save_pretrained(path)
    return path


@needs_trl
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_steps_equal_a_plain_loop_around_trls_dpo_loss(tmp_path, loss_type):
    """3 optimizer steps of 2 micro-batches of 2 pairs: the recipe (FSDP, world of one, our chunked log-probs and
    loss) and a plain loop that trains the transformers twin with TRL 1.16's `DPOTrainer._compute_loss` (its
    reference-model forward, fused-head log-probs, loss and logged rewards), torch AdamW, the same clipping."""
    import transformers

    from mytune.data.preference import build_preference_dataset, preference_collate
    from mytune.tokenizers import load_tokenizer
    from tests.training.test_preference_loss import patch_fused_heads, trl_dpo

    checkpoint = tiny_hf_checkpoint(tmp_path / "ckpt")
    beta, lr, steps, accumulation, pairs = 0.1, 1e-3, 3, 2, 2
    got = world_of_one(tmp_path / "out", f"checkpoint_dir={checkpoint}", f"tokenizer_path={DEMO / 'tokenizer.model'}",
                       f"loss_type={loss_type}", f"beta={beta}", f"lr={lr}", "lr_scheduler=constant",
                       "warmup_steps=0", "max_grad_norm=1.0", "weight_decay=0", "dtype=fp32", "shuffle=false",
                       f"batch_size={pairs}", f"gradient_accumulation_steps={accumulation}", "epochs=1",
                       f"max_steps_per_epoch={steps}", "log_every_n_steps=1", "val_fraction=0", "eval_every_n_steps=0",
                       "max_seq_len=128", "loss_chunk_size=37")

    tokenizer = load_tokenizer(str(DEMO / "tokenizer.model"))
    dataset = build_preference_dataset(str(DEMO / "preference_demo.jsonl"), tokenizer, max_seq_len=128)
    policy = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    reference.requires_grad_(False)
    patch_fused_heads(policy, reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    expected = []
    for step in range(steps):
        sums = dict.fromkeys(COMPARED, 0.0)
        for micro in range(accumulation):
            first = (step * accumulation + micro) * pairs
            batch = preference_collate([dataset[i] for i in range(first, first + pairs)], pad_id=tokenizer.pad_id)
            inputs = {"input_ids": batch["tokens"],
                      "attention_mask": (torch.arange(batch["tokens"].size(1)) < batch["seq_lens"][:, None]).long(),
                      "completion_mask": (batch["labels"] != -100).long()}
            loss, metrics = trl_dpo(policy, reference, inputs, loss_type={"dpo": "sigmoid"}.get(loss_type, loss_type),
                                    beta=beta)
            (loss / accumulation).backward()
            sums["loss"] += loss.item() / accumulation
            for name in METRIC_NAMES:
                sums[name] += metrics[name] / accumulation
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected.append(sums)

    assert len(got) == steps
    assert_same_metrics(got, expected, f"full DPO ({loss_type}) vs a TRL DPOTrainer loop, {steps} steps")
    assert len({round(r["loss"], 4) for r in got}) == steps  # the policy moves: later steps test the updates too


def start_two_ranks(out: Path, *overrides: str) -> subprocess.Popen:
    """`two_ranks` without waiting: the launcher's Popen (text stdout and stderr piped)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MYTUNE_DATA_CACHE": str(out.parent / f"{out.name}-cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", "full_dpo_distributed",
         "--config", "tiny_demo", "--override", f"output_dir={out}", *RANDOM_START, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent,
    )


@pytest.mark.slow
def test_sigterm_then_resume_latest_continues_bitwise(tmp_path):
    """bf16, random start, two 2-process runs side by side: one uninterrupted (the reference losses), one sent
    SIGTERM on rank 1 once its step_2 is complete. Both ranks stop after the same step and save it together (exit 0);
    the run resumed with `resume_from_checkpoint=latest` rebuilds the frozen reference from the seed and logs the
    uninterrupted run's losses, rewards and grad norms bitwise."""
    from tests.recipes.test_full_finetune_distributed import rank_pid

    steps = 30
    run = ["batch_size=2", "dtype=bf16", "epochs=1", f"max_steps_per_epoch={steps}", "log_every_n_steps=1",
           "warmup_steps=2", "val_fraction=0", "eval_every_n_steps=0", "max_seq_len=96", "save_every_n_steps=2",
           "keep_last_n_checkpoints=2", "lr=1e-3"]
    full, out = tmp_path / "full", tmp_path / "out"
    jobs = [start_two_ranks(full, *run), start_two_ranks(out, *run)]
    reference, interrupted = jobs
    try:
        deadline = time.monotonic() + 300
        while not (out / "step_2" / "recipe_state.pt").is_file():
            assert interrupted.poll() is None, interrupted.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never saved step_2"
            time.sleep(0.01)
        os.kill(rank_pid(interrupted, rank=1), signal.SIGTERM)
        stdout, stderr = interrupted.communicate(timeout=300)
        reference_stderr = reference.communicate(timeout=300)[1]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.communicate()
    assert reference.returncode == 0, reference_stderr[-3000:]
    assert interrupted.returncode == 0, stderr[-3000:]
    stopped_at = int(stdout.split("preemption signal at step ")[1].split(":")[0])  # printed by rank 0
    assert 2 <= stopped_at < steps, stdout[-3000:]
    assert (out / f"step_{stopped_at}" / "recipe_state.pt").is_file()
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == stopped_at

    resumed = two_ranks(out, *run, "resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resumed from {out / f'step_{stopped_at}'} at step {stopped_at}") == 1
    expected, got = read_metrics(full / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, steps + 1))
    names = [*COMPARED, "grad_norm"]
    print(f"full DPO bf16 SIGTERM at step {stopped_at} + resume: max diff {max_diff(got, expected, names):.3g}")
    assert [[r[name] for name in names] for r in got] == [[r[name] for name in names] for r in expected]


def test_a_resumed_run_from_a_checkpoint_keeps_its_reference(tmp_path):
    """checkpoint_dir start, a world of one: resumed from step_2 (copied alone into a fresh output_dir), the policy
    comes from the step and the reference again from checkpoint_dir, so the run logs the uninterrupted one's numbers."""
    checkpoint = tiny_hf_checkpoint(tmp_path / "ckpt")
    run = [f"checkpoint_dir={checkpoint}", f"tokenizer_path={DEMO / 'tokenizer.model'}", "dtype=fp32", "batch_size=2",
           "max_steps_per_epoch=4", "epochs=1", "log_every_n_steps=1", "max_seq_len=96", "val_fraction=0",
           "eval_every_n_steps=0", "save_every_n_steps=2", "keep_last_n_checkpoints=null"]
    expected = world_of_one(tmp_path / "full", *run)
    (tmp_path / "out").mkdir()
    shutil.copytree(tmp_path / "full" / "step_2", tmp_path / "out" / "step_2")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", tmp_path / "out" / "metrics.jsonl")
    got = world_of_one(tmp_path / "out", *run, "resume_from_checkpoint=latest")
    names = [*COMPARED, "grad_norm"]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [[r[name] for name in names] for r in got] == [[r[name] for name in names] for r in expected]


def test_precomputed_reference_logps_equal_the_per_batch_reference_and_are_cached(tmp_path, capsys):
    """On 40 shuffled pairs (so the cached values are looked up by index, not met in the order they were computed)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((DEMO / "preference_demo.jsonl").read_text().splitlines(keepends=True)[:40]))
    run = [f"dataset_path={data}", "dtype=fp32", "batch_size=2", "max_steps_per_epoch=4", "epochs=1",
           "log_every_n_steps=1", "max_seq_len=96", "val_fraction=0.1", "shuffle=true"]
    per_batch = world_of_one(tmp_path / "a", *run)
    precomputed = world_of_one(tmp_path / "b", *run, "precompute_reference_logps=true")
    assert "a frozen sharded reference" in capsys.readouterr().out
    again = world_of_one(tmp_path / "c", *run, "precompute_reference_logps=true")
    printed = capsys.readouterr().out
    assert "dataset_path: reference log-probs of 36 pairs read from" in printed
    assert "validation: reference log-probs of 4 pairs read from" in printed
    assert_same_metrics(per_batch, precomputed, "precomputed vs per-batch reference")
    assert_same_metrics(per_batch[-1:], precomputed[-1:], "validation", prefix="val_")
    assert [[r[n] for n in COMPARED] for r in precomputed] == [[r[n] for n in COMPARED] for r in again]


def test_simpo_builds_no_reference_and_trains(tmp_path):
    params = parse(tmp_path / "out", "loss_type=simpo", "beta=2.0", "dtype=fp32", "max_steps_per_epoch=3",
                   "epochs=1", "log_every_n_steps=1", "max_seq_len=96", "val_fraction=0", "eval_every_n_steps=0")
    recipe = dpo_recipe.FullDPORecipeDistributed(params)
    try:
        recipe.setup()
        assert recipe.reference is None
        recipe.train()
        recipe.cleanup()
    finally:
        destroy_distributed()
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # simpo's rewards are beta times the policy's own per-token mean log-probs: negative, and above beta times the
    # summed log-probs (responses of one token or more).
    assert all(2.0 * r["logps/chosen"] <= r["rewards/chosen"] < 0 for r in rows)


def test_params_refuse_what_the_recipe_cannot_do():
    base = {"model": "llama_tiny", "tokenizer_path": "t", "dataset_path": "d"}
    with pytest.raises(ConfigError, match="precompute_reference_logps"):
        FullDPODistributedParams(**base, loss_type="simpo", precompute_reference_logps=True)
    with pytest.raises(ConfigError, match="loss_type"):
        FullDPODistributedParams(**base, loss_type="kto")
    with pytest.raises(ConfigError, match="cpu_offload=true needs a GPU run"):
        FullDPODistributedParams(**base, device="cpu", cpu_offload=True)
