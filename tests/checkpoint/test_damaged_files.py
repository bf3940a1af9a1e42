"""Damaged checkpoint files give one MytuneError line naming the file and what to do, never a traceback."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mytune

from mytune.checkpoint import load_hf_model, save_hf_checkpoint
from mytune.checkpoint.peft import load_peft_adapter, save_peft_adapter
from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules.lora import apply_lora
from mytune.training.recipe_state import RECIPE_STATE_FILE, load_recipe_state, save_recipe_state
from tests.support import one_line_error

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny complete step checkpoint: HF files + recipe_state.pt, and the model and optimizer that wrote it."""
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(**TINY))
    optimizer = torch.optim.AdamW(model.parameters())
    directory = save_hf_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "step_1", dtype=torch.float32)
    save_recipe_state(directory, optimizer=optimizer, lr_scheduler=None, dataloader_state={"epoch": 0},
                      global_step=1, epoch=0)
    return directory


@pytest.fixture
def copy(saved, tmp_path):
    destination = tmp_path / "step_1"
    shutil.copytree(saved, destination)
    return destination



def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


# ---- model.safetensors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b""),
    lambda p: _truncate(p, lambda n: n // 2),
    lambda p: _truncate(p, lambda n: 20),
    lambda p: p.write_bytes(b"\x00not a safetensors file" * 40),
    lambda p: p.write_bytes(b"\xff" * 8 + b"{}"),
], ids=["empty", "truncated", "truncated_header", "garbage", "huge_header_length"])
def test_damaged_safetensors_is_one_line(copy, damage):
    damage(copy / "model.safetensors")
    message = one_line_error(load_hf_model, copy)
    assert str(copy / "model.safetensors") in message and "damaged" in message


def test_damaged_pytorch_bin_is_one_line(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    message = one_line_error(load_hf_model, copy)
    assert "pytorch_model.bin" in message and "weights_only=False" not in message


def test_pickled_code_in_pytorch_bin_is_refused_without_suggesting_weights_only_false(copy):
    (copy / "model.safetensors").unlink()
    torch.save({"x": torch.nn.Identity()}, copy / "pytorch_model.bin")
    message = one_line_error(load_hf_model, copy)
    assert "pytorch_model.bin" in message and "weights_only=False" not in message


# ---- config.json and the index ---------------------------------------------------------------------------------------
def _edit_config(directory, **values):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("values, field", [
    ({"hidden_size": "16"}, "hidden_size"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers"),
    ({"vocab_size": -3}, "vocab_size"),
    ({"num_attention_heads": True}, "num_attention_heads"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps"),
    ({"rope_theta": "1e4"}, "rope_theta"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"rope_scaling": [1]}, "rope_scaling"),
    ({"eos_token_id": "2"}, "eos_token_id"),
    ({"model_type": 3}, "model_type"),
])
def test_config_json_with_wrong_types_names_the_field(copy, values, field):
    _edit_config(copy, **values)
    message = one_line_error(load_hf_model, copy)
    assert "config.json" in message and field in message


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"llama"', "{", ""])
def test_config_json_that_is_no_mapping(copy, text):
    (copy / "config.json").write_text(text)
    assert "config.json" in one_line_error(load_hf_model, copy)


def test_config_json_not_utf8(copy):
    (copy / "config.json").write_bytes(b'{"model_type": "\xff"}')
    assert "config.json" in one_line_error(load_hf_model, copy)


@pytest.mark.parametrize("index", [
    {"weight_map": ["model.safetensors"]},
    [],
    {"weight_map": {"model.embed_tokens.weight": 3}},
    {"weight_map": {"model.embed_tokens.weight": "../step_1/model.safetensors"}},
    {},
])
def test_bad_index_is_one_line(copy, index):
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model.safetensors.index.json" in one_line_error(load_hf_model, copy)


# ---- PEFT adapter ----------------------------------------------------------------------------------------------------
def test_damaged_adapter_files_are_one_line(tmp_path):
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(**TINY))
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    adapter = save_peft_adapter(model, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    _truncate(weights, lambda n: n // 2)
    assert str(weights) in one_line_error(load_peft_adapter, TransformerDecoder(ModelArgs(**TINY)), adapter)
    (adapter / "adapter_config.json").write_text("[]")
    assert "adapter_config.json" in one_line_error(load_peft_adapter, TransformerDecoder(ModelArgs(**TINY)), adapter)


# ---- recipe_state.pt -------------------------------------------------------------------------------------------------
def _load_state(directory):
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(**TINY))
    return load_recipe_state(directory, optimizer=torch.optim.AdamW(model.parameters()), lr_scheduler=None,
                             restore_rng=False)


def test_undamaged_recipe_state_loads(copy):
    assert _load_state(copy).global_step == 1


class NotATensor:
    """A pickled class: torch.load(weights_only=True) refuses it."""


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b""),
    lambda p: _truncate(p, lambda n: n // 2),
    lambda p: _truncate(p, lambda n: n - 30),
    lambda p: p.write_bytes(b"garbage" * 50),
    lambda p: p.write_bytes(pickle.dumps({"format_version": 1})),
    lambda p: torch.save([1, 2], p),
    lambda p: torch.save({"format_version": 1}, p),
    lambda p: torch.save({"format_version": 1, "global_step": "1", "epoch": 0, "optimizer": {},
                          "optimizer_full_state_dict": False, "lr_scheduler": None, "rng": {},
                          "dataloader_state": None, "extra": {}}, p),
], ids=["empty", "half", "truncated_end", "garbage", "plain_pickle", "list", "missing_keys", "wrong_types"])
def test_damaged_recipe_state_is_one_line(copy, damage):
    damage(copy / RECIPE_STATE_FILE)
    message = one_line_error(_load_state, copy)
    assert str(copy / RECIPE_STATE_FILE) in message and "weights_only=False" not in message


def test_recipe_state_with_pickled_objects_is_refused_without_suggesting_weights_only_false(copy):
    torch.save({"format_version": 1, "extra": NotATensor()}, copy / RECIPE_STATE_FILE)
    message = one_line_error(_load_state, copy)
    assert str(copy / RECIPE_STATE_FILE) in message and "weights_only=False" not in message
    assert "code" in message


# ---- the commands: training start and generate -----------------------------------------------------------------------
DEMO_TOKENIZER = Path(mytune.__file__).parent / "assets" / "demo" / "tokenizer.model"


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "mytune"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mytune.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def truncated_demo_checkpoint(tmp_path_factory):
    """A checkpoint of the demo tokenizer's size, with its model.safetensors cut in half."""
    from mytune.tokenizers import load_tokenizer

    torch.manual_seed(0)
    vocab_size = load_tokenizer(DEMO_TOKENIZER).vocab_size
    model = TransformerDecoder(ModelArgs(**{**TINY, "vocab_size": vocab_size}))
    directory = save_hf_checkpoint(model, tmp_path_factory.mktemp("demo") / "model", dtype=torch.float32,
                                   tokenizer_files=[DEMO_TOKENIZER])
    _truncate(directory / "model.safetensors", lambda n: n // 2)
    return directory


def assert_one_line_exit_2(run: subprocess.CompletedProcess, *expected: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert all(text in lines[0] for text in expected), lines[0]


def test_generate_from_a_truncated_checkpoint(truncated_demo_checkpoint, tmp_path):
    run = console("generate", "--config", "tiny_demo", "--override", f"checkpoint_dir={truncated_demo_checkpoint}",
                  cwd=tmp_path)
    assert_one_line_exit_2(run, str(truncated_demo_checkpoint / "model.safetensors"), "damaged")


def test_generate_with_a_generation_config_that_is_a_list(truncated_demo_checkpoint, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(truncated_demo_checkpoint, directory)
    (directory / "model.safetensors").unlink()
    save_hf_checkpoint(load_hf_model_like(directory), tmp_path / "good", dtype=torch.float32)
    shutil.copy(tmp_path / "good" / "model.safetensors", directory)
    (directory / "generation_config.json").write_text("[2]")
    run = console("generate", "--config", "tiny_demo", "--override", f"checkpoint_dir={directory}",
                  "max_new_tokens=2", cwd=tmp_path)
    assert_one_line_exit_2(run, "generation_config.json")


def load_hf_model_like(directory: Path) -> TransformerDecoder:
    """A fresh model of the shape `directory/config.json` describes."""
    from mytune.checkpoint.hf import read_hf_config

    torch.manual_seed(0)
    return TransformerDecoder(ModelArgs.from_hf_config(read_hf_config(directory)))


def test_training_start_from_a_truncated_checkpoint(truncated_demo_checkpoint, tmp_path):
    run = console("full_finetune_single_device", "--config", "tiny_demo", "--override",
                  f"checkpoint_dir={truncated_demo_checkpoint}", "model=", f"output_dir={tmp_path / 'out'}",
                  "max_steps_per_epoch=1", "val_fraction=0", "eval_every_n_steps=0", "dataset_cache_dir=off",
                  cwd=tmp_path)
    assert_one_line_exit_2(run, str(truncated_demo_checkpoint / "model.safetensors"), "damaged")
    assert not (tmp_path / "out" / "step_1").exists()
