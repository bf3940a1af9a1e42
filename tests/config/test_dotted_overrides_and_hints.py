"""Dotted overrides into dict and list fields, other tools' key names, misplaced torchrun flags, CPU-only options."""

from dataclasses import dataclass, field

import pytest

from mytune import TuneArgumentParser
from mytune.config.hints import KEY_ALIASES, LAUNCHER_FLAGS, LAUNCHER_SWITCHES, misplaced_launcher_flags
from mytune.config.load import load_params
from mytune.errors import ConfigError


@dataclass
class MapParams:
    lr: float = 1e-3  # peak learning rate
    epochs: int = 1  # passes over the data
    batch_size: int = 2  # samples per micro-batch
    warmup_steps: int = 0  # optimizer steps of linear warmup
    column_map: dict[str, str] = field(default_factory=dict)  # our column -> the dataset's
    metric_loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # where metrics go
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj"])  # adapted modules
    rope_scaling: dict[str, float] | None = None  # optional mapping
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])  # per-source weights


def one_line_error(capsys, argv, tmp_path=None) -> str:
    with pytest.raises(SystemExit) as exit_:
        TuneArgumentParser(MapParams, recipe="demo", prog="demo").parse_params(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("demo: error: "), err
    return err.removeprefix("demo: error: ").strip()


def test_dotted_override_into_a_dict_merges_with_the_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("column_map:\n  instruction: question\n")
    params = load_params(MapParams, config=cfg, overrides=["column_map.output=answer"])
    assert params.column_map == {"instruction": "question", "output": "answer"}
    params = load_params(MapParams, config=cfg, overrides=["column_map.instruction=prompt"])
    assert params.column_map == {"instruction": "prompt"}
    # into the default (empty) dict, into a None default, and after a whole-value override
    assert load_params(MapParams, overrides=["column_map.output=a"]).column_map == {"output": "a"}
    assert load_params(MapParams, overrides=["rope_scaling.factor=8"]).rope_scaling == {"factor": 8.0}
    assert load_params(MapParams, overrides=["column_map={input: x}", "column_map.output=y"]).column_map == {
        "input": "x", "output": "y"}


def test_dotted_override_into_a_list_by_index(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("metric_loggers: [jsonl, stdout]\n")
    assert load_params(MapParams, config=cfg, overrides=["metric_loggers.1=tensorboard"]).metric_loggers == [
        "jsonl", "tensorboard"]
    params = load_params(MapParams, overrides=["lora_target_modules.1=v_proj", "weights.0=0.25"])
    assert params.lora_target_modules == ["q_proj", "v_proj"] and params.weights == [0.25, 0.5]
    assert MapParams().lora_target_modules == ["q_proj", "k_proj"]  # the default was not changed in place


def test_dotted_override_errors_are_one_line(capsys):
    message = one_line_error(capsys, ["--override", "metric_loggers.3=stdout"])
    assert message == ("`metric_loggers.3`: index 3 is out of range: metric_loggers has 1 item(s) (jsonl); "
                       "set the whole list instead, e.g. --override metric_loggers=[a,b]")
    assert "must be an index 0..0" in one_line_error(capsys, ["--override", "metric_loggers.first=stdout"])
    assert "lr is not a mapping or list" in one_line_error(capsys, ["--override", "lr.x=1"])
    message = one_line_error(capsys, ["--override", "colum_map.output=x"])
    assert message == "unknown key `colum_map.output` on the command line; did you mean `column_map`?"
    assert "expected list[float]" in one_line_error(capsys, ["--override", "weights.0=heavy"])


@pytest.mark.parametrize("typed, ours", [("learning_rate", "lr"), ("num_epochs", "epochs"),
                                         ("per_device_train_batch_size", "batch_size"),
                                         ("micro_batch_size", "batch_size")])
def test_other_tools_key_names_point_at_ours(capsys, typed, ours):
    message = one_line_error(capsys, ["--override", f"{typed}=1"])
    assert message == f"unknown key `{typed}` on the command line; mytune calls it `{ours}`"


def test_aliases_only_name_fields_the_recipe_has_and_explanations(capsys):
    # MapParams has no lora_rank: lora_r falls back to spelling (nothing close) instead of a wrong alias.
    assert "lora_rank" not in one_line_error(capsys, ["--override", "lora_r=8"])
    message = one_line_error(capsys, ["--override", "warmup_ratio=0.03"])
    assert message.startswith("unknown key `warmup_ratio` on the command line; mytune counts warmup in optimizer steps")
    assert "warmup_steps" in message


def test_every_alias_names_a_shipped_params_field():
    import dataclasses
    import importlib

    fields = set()
    for recipe in ("full_finetune_single_device", "full_finetune_distributed", "lora_finetune_single_device",
                   "lora_finetune_distributed", "generate"):
        module = importlib.import_module(f"recipes.params.{recipe}")
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                fields |= {f.name for f in dataclasses.fields(obj)}
    assert set(KEY_ALIASES.values()) <= fields
    assert not set(KEY_ALIASES) & fields  # an alias never shadows a real field


def test_launcher_flags_after_the_recipe_are_moved_in_the_hint():
    hint = misplaced_launcher_flags("full_finetune_distributed", ["--nproc_per_node", "2", "--config", "x"])
    assert hint == ("--nproc_per_node is a torchrun flag: put launcher flags before the recipe: "
                    "mytune --nproc_per_node 2 full_finetune_distributed --config x")
    hint = misplaced_launcher_flags("r", ["--config", "x", "--standalone", "--nnodes=1"])
    assert hint.endswith("mytune --standalone --nnodes=1 r --config x")
    assert misplaced_launcher_flags("r", ["--config", "x", "--override", "lr=1"]) is None


def test_launcher_flag_table_matches_torchrun():
    torchrun = pytest.importorskip("torch.distributed.run")
    names, switches = set(), set()
    for action in torchrun.get_args_parser()._actions:
        long = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        if long:
            name = long[-1][2:].replace("-", "_")
            names.add(name)
            if action.nargs == 0:
                switches.add(name)
    assert names <= LAUNCHER_FLAGS and switches <= LAUNCHER_SWITCHES


def test_torchrun_flag_in_the_recipe_args_says_where_it_goes(capsys):
    message = one_line_error(capsys, ["--nproc_per_node", "2"])
    assert "put launcher flags before the recipe" in message


@pytest.mark.parametrize("recipe_name", ["full_finetune_single_device", "full_finetune_distributed",
                                         "lora_finetune_single_device", "lora_finetune_distributed"])
def test_activation_offloading_on_the_cpu_is_one_line(recipe_name):
    import importlib

    module = importlib.import_module(f"recipes.params.{recipe_name}")
    params_class = next(v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
                        and hasattr(v, "__dataclass_fields__"))
    with pytest.raises(ConfigError, match="activation_offloading=true needs a GPU"):
        params_class(model="llama_tiny", tokenizer_path="t", dataset_path="d", device="cpu", activation_offloading=True)
    assert params_class(model="llama_tiny", tokenizer_path="t", dataset_path="d", device="auto",
                        activation_offloading=True).activation_offloading
