"""The config test suite: every shipped YAML parses into its recipe's params, validates, and runs its recipe.

Configs are found recursively under recipes/configs/<recipe>/, so a new file is tested without editing this one.
Each run swaps the real checkpoint for a tiny random checkpoint of the same model family (named by the config's
file name: `llama3_1_8b*.yaml` -> `llama3_1_8b_tiny`), saved in Hugging Face format, and trains 2 steps on CPU.
"""

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mytune.checkpoint import save_hf_checkpoint
from mytune.cli.recipes import load_params_class
from mytune.config import TuneArgumentParser
from mytune.models import TransformerDecoder
from mytune.models.builders import MODEL_ARGS, model_args
from mytune.tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
CONFIGS_ROOT = REPO / "recipes" / "configs"
CONFIGS = sorted(CONFIGS_ROOT.rglob("*.yaml"))
DEMO = REPO / "mytune" / "assets" / "demo"


def recipe_of(config: Path, root: Path = CONFIGS_ROOT) -> str:
    """The recipe a config belongs to: the first folder under recipes/configs/, however deep the file is nested
    (`lora_finetune_single_device/experiments/llama3_2_1b_long.yaml` -> `lora_finetune_single_device`)."""
    return config.relative_to(root).parts[0]


def config_id(config: Path, root: Path = CONFIGS_ROOT) -> str:
    """`<recipe>/<name>` with the subfolders of a nested config: the name `--config` takes after the recipe."""
    return config.relative_to(root).with_suffix("").as_posix()


def family_model(config: Path) -> str:
    """The tiny builder for a config: the longest builder name its file name starts with, as `<name>_tiny`."""
    if config.stem == "tiny_demo" or config.stem.startswith("tiny_demo_"):
        return "llama_tiny"
    names = [n for n in MODEL_ARGS if config.stem == n or config.stem.startswith(n + "_")]
    assert names, f"{config.name}: a config's file name must start with a model builder name (one of {sorted(MODEL_ARGS)})"
    return max(names, key=len) + "_tiny"


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Model name -> a saved tiny HF checkpoint of that family with the demo tokenizer, built once per name."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    tokenizer = load_tokenizer(DEMO / "tokenizer.model")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            args = model_args(name)
            args.vocab_size = tokenizer.vocab_size
            made[name] = save_hf_checkpoint(
                TransformerDecoder(args), root / name, dtype=torch.float32, tokenizer_files=tokenizer.files
            )
        return made[name]

    return get


def test_configs_were_found():
    recipes = {recipe_of(c) for c in CONFIGS}
    assert {"full_finetune_single_device", "full_finetune_distributed"} <= recipes
    assert recipes <= {p.stem for p in (REPO / "recipes").glob("*.py")}  # every folder names a recipe


def test_nested_configs_map_to_their_recipe_and_are_found_by_name(tmp_path, monkeypatch):
    """A config in a subfolder belongs to the recipe of the top folder and is found as `experiments/<name>`."""
    from mytune.config import configs

    root = tmp_path / "recipes"
    nested = root / "configs" / "full_finetune_single_device" / "experiments" / "tiny_demo_long.yaml"
    nested.parent.mkdir(parents=True)
    shipped = CONFIGS_ROOT / "full_finetune_single_device" / "tiny_demo.yaml"
    nested.write_text(shipped.read_text().replace("epochs: 6", "epochs: 3"))
    assert recipe_of(nested, root / "configs") == "full_finetune_single_device"
    assert config_id(nested, root / "configs") == "full_finetune_single_device/experiments/tiny_demo_long"
    monkeypatch.setattr(configs, "recipes_dir", lambda: root)
    params_cls = load_params_class(REPO / "recipes" / "full_finetune_single_device.py")
    parser = TuneArgumentParser(params_cls, recipe="full_finetune_single_device")
    assert parser.resolve_config("experiments/tiny_demo_long") == nested
    assert parser.parse_params(["--config", "experiments/tiny_demo_long"]).epochs == 3


@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_config_parses_validates_and_runs(config, tiny_checkpoints, tmp_path, capsys):
    recipe = recipe_of(config)
    params_cls = load_params_class(REPO / "recipes" / f"{recipe}.py")
    fields = {f.name for f in dataclasses.fields(params_cls)}

    # 1. As shipped: every key is known and every value valid (missing weights are fine here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TuneArgumentParser(params_cls, recipe=recipe).parse_params(["--config", str(config)])

    # 2. Swapped onto a tiny same-family checkpoint, the recipe runs 2 steps on CPU.
    ckpt = tiny_checkpoints(family_model(config))
    # Preference recipes read pairs (the shipped preference demo); a distillation teacher is the same tiny model.
    data = DEMO / ("preference_demo.jsonl" if "_dpo_" in recipe else "alpaca_demo.jsonl")
    swaps = {
        "checkpoint_dir": ckpt, "tokenizer_path": ckpt, "model": "", "dataset_path": data,
        "teacher_checkpoint_dir": ckpt, "teacher_model": "",
        "output_dir": tmp_path / "out", "device": "cpu", "epochs": 1, "max_steps_per_epoch": 2, "max_seq_len": 128,
        "batch_size": 2, "gradient_accumulation_steps": 1, "dataset_cache_dir": tmp_path / "cache", "max_new_tokens": 4,
        # The QLoRA configs compile on GPUs; inductor on this CPU would take minutes per config. The compiled paths
        # have their own tests (tests/modules/test_lora_fast.py, tests/gpu).
        "compile": False,
    }
    overrides = [f"{k}={v}" for k, v in swaps.items() if k in fields]
    if "quantize_base: true" in config.read_text() and recipe.endswith("_distributed"):
        # Sharded NF4 needs 2+ processes: this config runs under torchrun (2 CPU processes, gloo).
        result = subprocess.run(
            [sys.executable, "-m", "mytune.cli.main", "--nproc_per_node", "2", recipe, "--config", str(config),
             "--override", *overrides],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        module = importlib.import_module(f"recipes.{recipe}")
        module.main(["--config", str(config), "--override", *overrides])

    metrics = tmp_path / "out" / "metrics.jsonl"
    if "max_steps_per_epoch" in fields:  # a training recipe: two finite losses and a saved checkpoint
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) >= 1 and all(math.isfinite(x) for x in losses), rows
        assert any((tmp_path / "out").glob("step_2*")), sorted(p.name for p in (tmp_path / "out").iterdir())


def test_a_typo_in_a_config_fails_the_parse(tmp_path, capsys):
    shipped = REPO / "recipes" / "configs" / "full_finetune_single_device" / "tiny_demo.yaml"
    typo = tmp_path / "typo.yaml"
    typo.write_text(shipped.read_text().replace("batch_size:", "bacth_size:"))
    params_cls = load_params_class(REPO / "recipes" / "full_finetune_single_device.py")
    with pytest.raises(SystemExit) as exit_info:
        TuneArgumentParser(params_cls, recipe="full_finetune_single_device").parse_params(["--config", str(typo)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bacth_size" in err and "batch_size" in err and str(typo) in err
