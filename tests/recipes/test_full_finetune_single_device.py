"""End to end: the tiny_demo config trains, the loss falls, and the saved checkpoint is a real HF checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mytune.checkpoint import load_hf_model
from mytune.config import TuneArgumentParser
from mytune.training.metrics import read_metrics
from recipes import full_finetune_single_device as recipe
from recipes.params.full_finetune_single_device import FullFinetuneParams

REPO = Path(__file__).resolve().parents[2]


def demo_params(tmp_path: Path, *overrides: str) -> FullFinetuneParams:
    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    argv = ["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "log_every_n_steps=1", *overrides]
    return parser.parse_params(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    params = demo_params(out, "max_steps_per_epoch=30", "epochs=1")
    ckpt_dir = recipe.recipe_main(params)
    return params, ckpt_dir


def test_loss_decreases(trained):
    params, _ = trained
    rows = read_metrics(Path(params.output_dir) / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    assert all(r["tokens_per_s"] > 0 and r["num_tokens"] > 0 for r in rows)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_checkpoint_loads_in_transformers_with_same_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ckpt_dir = trained
    assert (ckpt_dir / "config.json").is_file()
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt_dir, torch_dtype=torch.float32).eval()
    ours = load_hf_model(ckpt_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    ids = torch.tensor([tokenizer("Reverse the words: one two three").input_ids])
    with torch.no_grad():
        diff = (hf_model(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-5, diff


def test_cli_runs_the_demo_and_reports_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "mytune.cli.main", "full_finetune_single_device", "--config", "tiny_demo"]
    ok = subprocess.run(
        [*cmd, "--override", f"output_dir={tmp_path}", "max_steps_per_epoch=2", "epochs=1"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "step_2" / "model.safetensors").is_file()

    missing = subprocess.run(
        [*cmd, "--override", f"output_dir={tmp_path}", "dataset_path=/no/such/data.jsonl"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset_path" in lines[0] and "/no/such/data.jsonl" in lines[0], missing.stderr
