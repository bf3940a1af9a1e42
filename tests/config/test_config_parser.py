"""TuneArgumentParser: precedence, conversion, interpolation, config names, one-line errors and --help."""

import enum
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

import mytune
from mytune import TuneArgumentParser
from mytune.config import find_missing_paths
from mytune.config.configs import config_names, recipes_dir
from mytune.config.load import load_params
from mytune.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class DemoParams:
    """Params with a field of every supported type."""

    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("data_path", "model_dir")

    output_dir: str = "out"  # where results go
    log_dir: str = "logs"  # where logs go
    data_path: str = ""  # training data file
    model_dir: str = ""  # Hugging Face model directory
    lr: float = 1e-3  # peak learning rate
    epochs: int = 1  # passes over the data
    shuffle: bool = True  # reshuffle every epoch
    max_steps: int | None = None  # stop after this many steps (null: never)
    tags: list[str] = field(default_factory=list)  # free-form labels
    layers: list[int] = field(default_factory=lambda: [0, 1])  # layer indices
    schedule: Literal["constant", "cosine"] = "cosine"  # lr decay
    mode: Mode = Mode.FAST  # speed mode
    undocumented: int = 7

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")


def make_parser(**kwargs) -> TuneArgumentParser:
    return TuneArgumentParser(DemoParams, recipe="demo_recipe", prog="demo", **kwargs)


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def expect_exit(capsys, argv, parser=None) -> str:
    """Parse `argv`, expect exit code 2 and exactly one stderr line `demo: error: ...`; return the message."""
    parser = parser or make_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_params(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("demo: error: "), err
    return err.removeprefix("demo: error: ").strip()


def test_defaults_without_config_or_overrides():
    params = make_parser().parse_params([])
    assert params == DemoParams()


def test_precedence_override_beats_yaml_beats_defaults(tmp_path):
    cfg = write_yaml(tmp_path, "lr: 0.5\nepochs: 3\n")
    params = make_parser().parse_params(["--config", str(cfg), "--override", "epochs=4"])
    assert params.epochs == 4  # override
    assert params.lr == 0.5  # yaml
    assert params.shuffle is True and params.output_dir == "out"  # defaults


def test_override_forms_and_repeats(tmp_path):
    cfg = write_yaml(tmp_path, "epochs: 2\n")
    params = make_parser().parse_params(
        [f"--config={cfg}", "--override", "lr=0.1", "epochs=5", "--override=shuffle=false", "--override", "epochs=6"]
    )
    assert (params.lr, params.epochs, params.shuffle) == (0.1, 6, False)


def test_every_type_from_the_command_line():
    params = make_parser().parse_params(
        ["--override", "lr=2e-5", "epochs=3", "shuffle=NO", "max_steps=10", "tags=[a,b]", "layers=3,4",
         "schedule=constant", "mode=slow", "output_dir=/tmp/a=b"]
    )
    assert params.lr == 2e-5 and isinstance(params.lr, float)
    assert params.epochs == 3 and params.shuffle is False and params.max_steps == 10
    assert params.tags == ["a", "b"] and params.layers == [3, 4]
    assert params.schedule == "constant" and params.mode is Mode.SLOW
    assert params.output_dir == "/tmp/a=b"  # split on the first `=`, the rest stays raw


def test_every_type_from_yaml(tmp_path):
    cfg = write_yaml(
        tmp_path,
        "lr: 2e-5\nepochs: 2\nshuffle: false\nmax_steps: ~\ntags: [x, y]\nlayers:\n  - 5\n  - 6\n"
        "schedule: constant\nmode: FAST\n",
    )
    params = make_parser().parse_params(["--config", str(cfg)])
    assert params.lr == 2e-5 and params.epochs == 2 and params.shuffle is False and params.max_steps is None
    assert params.tags == ["x", "y"] and params.layers == [5, 6]
    assert params.schedule == "constant" and params.mode is Mode.FAST


@pytest.mark.parametrize("null", ["null", "none", "~", "None"])
def test_override_null_for_optional(tmp_path, null):
    cfg = write_yaml(tmp_path, "max_steps: 3\n")
    assert make_parser().parse_params(["--config", str(cfg), "--override", f"max_steps={null}"]).max_steps is None


def test_interpolation_sees_overrides_and_defaults(tmp_path):
    cfg = write_yaml(tmp_path, "output_dir: /base\nlog_dir: ${output_dir}/logs\ndata_path: ${model_dir}/data.json\n")
    params = make_parser().parse_params(["--config", str(cfg), "--override", "output_dir=/elsewhere"])
    assert params.log_dir == "/elsewhere/logs"
    assert params.data_path == "/data.json"  # model_dir is not in the YAML: its default "" is used


def test_override_may_interpolate(tmp_path):
    params = make_parser().parse_params(["--override", "output_dir=/o", "log_dir=${output_dir}/l"])
    assert params.log_dir == "/o/l"


def test_asset_resolver_from_any_cwd_and_copied_config(tmp_path, monkeypatch):
    write_yaml(tmp_path, "data_path: ${asset:demo/tokenizer.model}\n", name="copied.yaml")
    monkeypatch.chdir(tmp_path)
    params = make_parser().parse_params(["--config", "copied.yaml"])
    expected = Path(mytune.__file__).resolve().parent / "assets" / "demo" / "tokenizer.model"
    assert Path(params.data_path) == expected and Path(params.data_path).is_absolute()


def test_unknown_key_in_yaml_names_file_and_suggests(tmp_path, capsys):
    cfg = write_yaml(tmp_path, "lr: 0.1\nepoch: 3\n")
    message = expect_exit(capsys, ["--config", str(cfg)])
    assert message == f"unknown key `epoch` in {cfg}; did you mean `epochs`?"


def test_unknown_key_on_command_line_suggests(capsys):
    message = expect_exit(capsys, ["--override", "lrr=0.1"])
    assert message == "unknown key `lrr` on the command line; did you mean `lr`?"


def test_unknown_key_without_close_match(capsys):
    assert "see --help" in expect_exit(capsys, ["--override", "zzzzzz=1"])


def test_wrong_type_names_field_value_and_type(tmp_path, capsys):
    assert expect_exit(capsys, ["--override", "epochs=2.5"]) == "epochs: invalid value '2.5' (command line), expected int"
    cfg = write_yaml(tmp_path, "lr: fast\n")
    assert expect_exit(capsys, ["--config", str(cfg)]) == f"lr: invalid value 'fast' ({cfg}), expected float"
    assert "expected one of 'constant', 'cosine'" in expect_exit(capsys, ["--override", "schedule=linear"])
    assert "expected one of FAST, SLOW" in expect_exit(capsys, ["--override", "mode=medium"])


def test_post_init_config_error_is_one_line(capsys):
    assert expect_exit(capsys, ["--override", "epochs=0"]) == "epochs must be >= 1, got 0"


def test_malformed_override_and_argparse_errors_are_one_line(capsys):
    assert "is not key=value" in expect_exit(capsys, ["--override", "lr"])
    assert "unrecognized arguments: lr=1" in expect_exit(capsys, ["lr=1"])
    assert "expected at least one argument" in expect_exit(capsys, ["--override"])


def test_bad_yaml_and_non_mapping_yaml(tmp_path, capsys):
    bad = write_yaml(tmp_path, "lr: [1, 2\n", name="bad.yaml")
    assert expect_exit(capsys, ["--config", str(bad)]).startswith(f"{bad}: invalid YAML")
    listed = write_yaml(tmp_path, "- 1\n- 2\n", name="list.yaml")
    assert "must be a mapping" in expect_exit(capsys, ["--config", str(listed)])


def test_unresolvable_interpolation(tmp_path, capsys):
    cfg = write_yaml(tmp_path, "log_dir: ${nope}/x\n")
    message = expect_exit(capsys, ["--config", str(cfg)])
    assert message.startswith(f"log_dir: cannot resolve '${{nope}}/x' ({cfg})")


def test_missing_config_lists_available_names(capsys):
    parser = TuneArgumentParser(DemoParams, recipe="full_finetune_single_device", prog="demo")
    message = expect_exit(capsys, ["--config", "no_such_config"], parser=parser)
    assert message.startswith("config `no_such_config` not found: not a config of full_finetune_single_device (available:")
    for name in config_names("full_finetune_single_device"):
        assert name in message


def test_config_name_resolves_in_recipes_configs_dir():
    names = config_names("full_finetune_single_device")
    if not names:
        pytest.skip("no configs shipped for full_finetune_single_device yet")
    parser = TuneArgumentParser(DemoParams, recipe=REPO / "recipes" / "full_finetune_single_device.py")
    expected = recipes_dir() / "configs" / "full_finetune_single_device" / f"{names[0]}.yaml"
    assert parser.resolve_config(names[0]) == expected
    assert expected.is_file()


def test_config_path_relative_to_cwd(tmp_path, monkeypatch):
    write_yaml(tmp_path, "epochs: 9\n", name="mine.yaml")
    monkeypatch.chdir(tmp_path)
    assert make_parser().parse_params(["--config", "mine.yaml"]).epochs == 9


def test_help_lists_every_field_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_:
        TuneArgumentParser(DemoParams, recipe="full_finetune_single_device", prog="demo").parse_params(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "  lr (float) = 0.001\n      peak learning rate\n" in out
    assert "  max_steps (int | None) = null\n      stop after this many steps (null: never)\n" in out
    assert "  schedule (one of 'constant', 'cosine') = 'cosine'\n      lr decay\n" in out
    assert "  mode (one of FAST, SLOW) = FAST\n      speed mode\n" in out
    assert "  layers (list[int]) = [0, 1]\n" in out
    assert "  undocumented (int) = 7\n" in out
    assert "INPUT_PATHS" not in out
    for name in config_names("full_finetune_single_device"):
        assert name in out.split("configs for full_finetune_single_device (--config NAME):")[1]


def test_help_without_shipped_configs(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_params(["-h"])
    assert "configs: none shipped for demo_recipe" in capsys.readouterr().out


def test_load_params_directly(tmp_path):
    cfg = write_yaml(tmp_path, "epochs: 2\n")
    assert load_params(DemoParams, config=cfg, overrides=["lr=1"]) == DemoParams(epochs=2, lr=1.0)
    with pytest.raises(ConfigError, match=r"config file .* does not exist"):
        load_params(DemoParams, config=tmp_path / "missing.yaml")


def test_required_field_without_default():
    @dataclass
    class Required:
        name: str  # must be given

    assert load_params(Required, overrides=["name=x"]).name == "x"
    with pytest.raises(ConfigError, match="name has no default: set it in the config or with --override name=..."):
        load_params(Required)


def test_find_missing_paths(tmp_path):
    existing = tmp_path / "data.json"
    existing.write_text("[]")
    assert find_missing_paths(DemoParams()) == []  # empty means unset
    assert find_missing_paths(DemoParams(data_path=str(existing), model_dir=str(tmp_path))) == []
    missing = find_missing_paths(DemoParams(data_path="/x/y", model_dir="/no/model"))
    assert missing == [
        "data_path: /x/y does not exist (set data_path=... to training data file)",
        "model_dir: /no/model does not exist (set model_dir=... to Hugging Face model directory)",
    ]


def test_a_missing_step_dir_says_an_earlier_run_writes_it(tmp_path):
    """The DPO demo starts from the SFT demo's outputs/tiny_demo/step_864: missing, the line says to run that first."""
    step = tmp_path / "outputs" / "tiny_demo" / "step_864"
    missing = find_missing_paths(DemoParams(model_dir=str(step)))
    assert missing == [f"model_dir: {step} does not exist (set model_dir=... to Hugging Face model directory); it is "
                       f"a checkpoint a fine-tuning run writes into its output_dir {step.parent}: run that recipe "
                       "first (the config's header says which), from this directory"]


def test_one_line_error_and_exit_code_in_a_real_process(tmp_path):
    script = tmp_path / "fake_recipe.py"
    script.write_text(
        "from dataclasses import dataclass\n"
        "from mytune import TuneArgumentParser\n"
        "@dataclass\n"
        "class P:\n"
        "    lr: float = 0.1  # learning rate\n"
        "print(TuneArgumentParser(P, recipe=__file__).parse_params())\n"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, str(script), "--override", "lr=2e-5"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "P(lr=2e-05)" and ok.stderr == ""
    bad = subprocess.run([sys.executable, str(script), "--override", "lrr=1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr == "fake_recipe.py: error: unknown key `lrr` on the command line; did you mean `lr`?\n"


def test_import_mytune_is_light():
    code = "import sys, mytune; assert mytune.TuneArgumentParser and mytune.__version__; " \
           "heavy = {'torch', 'transformers', 'omegaconf'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(REPO)})


def test_hub_dataset_names_are_not_missing_paths(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from mytune.config import find_missing_paths

    @dataclass
    class HubParams:
        INPUT_PATHS: ClassVar[tuple[str, ...]] = ("dataset_path", "checkpoint_dir")
        HUB_DATASET_FIELDS: ClassVar[tuple[str, ...]] = ("dataset_path",)
        dataset_path: str = ""
        checkpoint_dir: str = ""

    assert find_missing_paths(HubParams(dataset_path="tatsu-lab/alpaca")) == []
    missing = find_missing_paths(HubParams(dataset_path=str(tmp_path / "data.jsonl"), checkpoint_dir="org/model"))
    assert [m.split(":")[0] for m in missing] == ["dataset_path", "checkpoint_dir"]
    assert find_missing_paths(HubParams(dataset_path="./local/data.jsonl")) != []


@pytest.mark.parametrize("recipe_name", ["full_finetune_single_device", "full_finetune_distributed",
                                         "lora_finetune_single_device", "lora_finetune_distributed"])
def test_flex_attention_on_the_cpu_is_one_line_naming_the_field(recipe_name):
    import importlib

    params_class = importlib.import_module(f"recipes.{recipe_name}").recipe_main.__annotations__["params"]
    with pytest.raises(ConfigError, match="attention_backend=flex needs a CUDA GPU"):
        params_class(model="llama_tiny", tokenizer_path="t", dataset_path="d", device="cpu",
                     attention_backend="flex")
    assert params_class(model="llama_tiny", tokenizer_path="t", dataset_path="d", device="cpu",
                        attention_backend="sdpa").attention_backend == "sdpa"
