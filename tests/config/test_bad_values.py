"""nan/inf in float fields, output_dir that cannot be written and non-UTF-8 configs: one ConfigError line each."""

import dataclasses
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mytune.config.configs import recipes_dir
from mytune.config.load import load_params
from mytune.errors import ConfigError
from recipes.params.full_finetune_distributed import FullFinetuneDistributedParams
from recipes.params.full_finetune_single_device import FullFinetuneParams
from recipes.params.generate import GenerateParams
from recipes.params.lora_finetune_distributed import LoRAFinetuneDistributedParams
from recipes.params.lora_finetune_single_device import LoRAFinetuneParams

REPO = Path(__file__).resolve().parents[2]
RECIPES = {
    "full_finetune_single_device": FullFinetuneParams,
    "full_finetune_distributed": FullFinetuneDistributedParams,
    "lora_finetune_single_device": LoRAFinetuneParams,
    "lora_finetune_distributed": LoRAFinetuneDistributedParams,
    "generate": GenerateParams,
}


def tiny_demo(recipe: str) -> Path:
    return recipes_dir() / "configs" / recipe / "tiny_demo.yaml"


def float_fields(params_cls: type) -> list[str]:
    """Fields typed float or float | None."""
    hints = typing.get_type_hints(params_cls)
    return [f.name for f in dataclasses.fields(params_cls)
            if hints[f.name] is float or float in typing.get_args(hints[f.name])]


def test_every_params_class_has_float_fields():
    assert all(float_fields(cls) for cls in RECIPES.values())


@pytest.mark.parametrize("recipe, field", [(r, f) for r, cls in RECIPES.items() for f in float_fields(cls)])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_non_finite_float_fields_are_refused(recipe, field, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped output_dir is relative: checked here, never created
    with pytest.raises(ConfigError) as info:
        load_params(RECIPES[recipe], config=tiny_demo(recipe), overrides=[f"{field}={value}"])
    message = str(info.value)
    assert field in message and "finite" in message and "\n" not in message


def test_non_finite_values_from_yaml_and_python_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(tiny_demo("full_finetune_single_device").read_text().replace("weight_decay: 0.0", "weight_decay: .nan"))
    with pytest.raises(ConfigError, match="weight_decay must be a finite number"):
        load_params(FullFinetuneParams, config=config)
    with pytest.raises(ConfigError, match="max_grad_norm must be a finite number"):
        FullFinetuneParams(model="llama_tiny", tokenizer_path="t", dataset_path="d", max_grad_norm=math.inf)
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        GenerateParams(checkpoint_dir="c", prompt="hi", temperature=math.nan)


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "mytune"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mytune.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_validate_reports_nan_instead_of_ok(tmp_path):
    run = console("validate", "full_finetune_single_device", "--config", "tiny_demo", "--override", "lr=nan",
                  cwd=tmp_path)
    assert run.returncode == 2 and "OK" not in run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "lr must be a finite number" in lines[0], run.stderr


# ---- output_dir ------------------------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for output_dir, expected in ((a_file, "is a file"), (a_file / "run", f"is under the file {a_file}")):
        with pytest.raises(ConfigError) as info:
            load_params(FullFinetuneParams, config=tiny_demo("full_finetune_single_device"),
                        overrides=[f"output_dir={output_dir}"])
        assert expected in str(info.value) and "set output_dir" in str(info.value)
    assert a_file.read_text() == "x"


def test_read_only_output_dir(tmp_path, monkeypatch):
    """chmod does not stop root (CI runs as root): os.access answers as for a read-only mount."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    for output_dir in (read_only, read_only / "new" / "run"):
        with pytest.raises(ConfigError) as info:
            load_params(LoRAFinetuneParams, config=tiny_demo("lora_finetune_single_device"),
                        overrides=[f"output_dir={output_dir}"])
        assert f"make {read_only} writable" in str(info.value)
    assert not (read_only / "new").exists()  # validation creates nothing


def test_validate_and_a_recipe_start_report_an_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for command in (("validate", "full_finetune_single_device"), ("full_finetune_single_device",)):
        run = console(*command, "--config", "tiny_demo", "--override", f"output_dir={tmp_path / 'file' / 'out'}",
                      "max_steps_per_epoch=1", cwd=tmp_path)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and "is under the file" in lines[0], run.stderr


# ---- the config file itself ------------------------------------------------------------------------------------------
def test_non_utf8_config_is_one_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("prompt: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_params(GenerateParams, config=config)
    assert str(config) in str(info.value) and "UTF-8" in str(info.value)
    run = console("generate", "--config", str(config), cwd=tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "UTF-8" in lines[0], run.stderr


def test_config_that_is_a_directory_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_params(GenerateParams, config=tmp_path)
