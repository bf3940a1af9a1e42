"""End to end: the tiny_demo config trains, the loss falls, and the saved checkpoint is a real HF checkpoint; the data
pipeline's options (packing, chat data, the tokenizer's template, validation, bad rows) work through the recipe."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mytune.checkpoint import load_hf_model
from mytune.config import TuneArgumentParser
from mytune.config.paths import looks_like_hub_dataset
from mytune.errors import ConfigError, MytuneError
from mytune.training.metrics import read_metrics
from recipes import full_finetune_single_device as recipe
from recipes.params.full_finetune_single_device import FullFinetuneParams

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mytune" / "assets" / "demo"


def demo_params(tmp_path: Path, *overrides: str) -> FullFinetuneParams:
    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    argv = ["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "log_every_n_steps=1",
            f"dataset_cache_dir={tmp_path / 'cache'}", *overrides]
    return parser.parse_params(argv)


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MYTUNE_DATA_CACHE": str(tmp_path / "cache")}  # not the user's ~/.cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    params = demo_params(out, "max_steps_per_epoch=30", "epochs=1")
    ckpt_dir = recipe.recipe_main(params)
    return params, ckpt_dir


def test_loss_decreases(trained):
    params, ckpt_dir = trained
    rows = read_metrics(Path(params.output_dir) / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and [r["step"] for r in rows if "val_loss" in r] == [30]  # the last step is evaluated
    assert all(r["tokens_per_s"] > 0 and r["num_tokens"] > 0 for r in rows)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"
    state = torch.load(ckpt_dir / "recipe_state.pt", weights_only=True)  # where the data loader stopped
    assert state["global_step"] == 30 and state["dataloader_state"]["consumed"] == 30 * 8
    assert state["dataloader_state"]["num_samples"] == 1216 - 61  # round(0.05 * 1216) demo samples are validation
    assert all(r["peak_memory_gib"] > 0 for r in rows)


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
        capture_output=True, text=True, cwd=tmp_path, env=cli_env(tmp_path),
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "step_2" / "model.safetensors").is_file()

    missing = subprocess.run(
        [*cmd, "--override", f"output_dir={tmp_path}", "dataset_path=/no/such/data.jsonl"],
        capture_output=True, text=True, cwd=tmp_path, env=cli_env(tmp_path),
    )
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset_path" in lines[0] and "/no/such/data.jsonl" in lines[0], missing.stderr


# ---- the data pipeline through the recipe --------------------------------------------------------------------------
def test_packed_demo_trains_with_position_and_document_ids(tmp_path):
    params = demo_params(tmp_path, "packed=true", "max_steps_per_epoch=25", "epochs=1", "batch_size=2",
                         "eval_every_n_steps=0")
    run = recipe.FullFinetuneRecipeSingleDevice(params)
    run.setup()
    dataset = run.dataloader.dataset
    assert dataset.packed and len(dataset) < dataset.num_samples / 2  # a 256-token row holds several demo samples
    calls = []
    forward = run.model.forward

    def spy(tokens, **kwargs):
        calls.append(kwargs)
        return forward(tokens, **kwargs)

    run.model.forward = spy
    run.train()
    assert all(c["document_ids"] is not None and c["position_ids"] is not None for c in calls)
    assert len(calls) == 25 + len(run.val_dataloader)  # training steps, then the validation at the last step
    run.cleanup()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and math.isfinite(rows[-1]["val_loss"])
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def chat_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = i % 17, (3 * i) % 11
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a + b}"},
                    {"role": "user", "content": "And doubled?"},
                    {"role": "assistant", "content": f"{2 * (a + b)}"}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer with a number."})
        rows.append({"messages": messages})
    return rows


@pytest.mark.parametrize("own_template", [False, True], ids=["chatml", "tokenizer-template"])
def test_chat_data_trains_with_chatml_or_the_tokenizers_template(tmp_path, capsys, own_template):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(96)))
    overrides = [f"dataset_path={data}", "max_steps_per_epoch=6", "epochs=1", "eval_every_n_steps=3"]
    if own_template:  # the demo tokenizer with a tokenizer_config.json holding a chat template
        tokenizer_dir = tmp_path / "tokenizer"
        tokenizer_dir.mkdir()
        shutil.copy(DEMO / "tokenizer.model", tokenizer_dir / "tokenizer.model")
        (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        overrides.append(f"tokenizer_path={tokenizer_dir}")
    params = demo_params(tmp_path / "out", *overrides)
    ckpt_dir = recipe.recipe_main(params)

    out = capsys.readouterr().out
    assert re.search(r"dataset_path: 96 samples, \d+ tokens \(0 truncated", out), out
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(math.isfinite(r["val_loss"]) for r in rows if r["step"] in (3, 6))
    if own_template:
        config = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
        assert config["chat_template"] == CHAT_TEMPLATE  # the checkpoint keeps the template it was trained with


def test_validation_is_logged_at_its_steps_and_matches_a_by_hand_evaluation(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join((DEMO / "alpaca_demo.jsonl").read_text().splitlines(keepends=True)[:13]))
    params = demo_params(tmp_path, "max_steps_per_epoch=7", "epochs=1", "eval_every_n_steps=3", "log_every_n_steps=5",
                         "val_fraction=0", f"dataset_val={val}")
    run = recipe.FullFinetuneRecipeSingleDevice(params)
    run.setup()
    run.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], "val_loss" in r) for r in rows] == [(3, True), (5, False), (6, True), (7, True)]
    for r in rows[::2]:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))

    # The last value by hand: the summed token loss of the 13 samples over their label tokens.
    from mytune.training.loss import count_label_tokens, cross_entropy_sum

    run.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(13):
            sample = run.val_dataloader.dataset[i]
            ids, labels = torch.tensor([sample["tokens"]]), torch.tensor([sample["labels"]])
            total += cross_entropy_sum(run.model(ids), labels).item()
            tokens += count_label_tokens(labels)
    assert rows[-1]["val_tokens"] == tokens
    assert rows[-1]["val_loss"] == pytest.approx(total / tokens, rel=1e-5)

    run.params.max_eval_batches = 1  # a cheaper validation: the first batch only
    assert run.evaluate()["val_tokens"] < tokens
    run.cleanup()


def write_rows_with_bad_ones(path: Path) -> None:
    lines = (DEMO / "alpaca_demo.jsonl").read_text().splitlines()[:40]
    lines.insert(2, json.dumps({"instruction": "No output column here."}))  # line 3
    lines.insert(5, '{"instruction": "broken JSON", ')  # line 6
    lines.append(json.dumps({"instruction": "A very long answer.", "output": " word" * 400}))  # line 43
    path.write_text("\n".join(lines) + "\n")


def test_bad_row_is_one_line_naming_file_and_line_and_skip_bad_rows_counts(tmp_path):
    data = tmp_path / "data.jsonl"
    write_rows_with_bad_ones(data)
    cmd = [sys.executable, "-m", "mytune.cli.main", "full_finetune_single_device", "--config", "tiny_demo",
           "--override", f"output_dir={tmp_path / 'out'}", f"dataset_path={data}", "max_steps_per_epoch=2", "epochs=1"]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=cli_env(tmp_path))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    # Files are parsed before rows are validated: the broken JSON on line 6 is reported before line 3's missing column.
    assert f"{data} line 6: invalid JSON" in lines[0] and "skip_bad_rows=true" in lines[0]
    assert not (tmp_path / "out").exists()  # failed before any training

    skip = subprocess.run([*cmd, "skip_bad_rows=true", "truncation=drop"], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env(tmp_path))
    assert skip.returncode == 0, skip.stderr[-2000:]
    assert ("dataset_path: 40 samples" in skip.stdout and "1 dropped as longer than max_seq_len=256" in skip.stdout
            and "2 bad rows skipped" in skip.stdout), skip.stdout
    assert f"skipped {data} line 3: missing column 'output'" in skip.stdout
    assert f"skipped {data} line 6: invalid JSON" in skip.stdout


def test_truncation_keeps_long_samples_cut_to_max_seq_len(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_rows_with_bad_ones(data)
    params = demo_params(tmp_path, f"dataset_path={data}", "skip_bad_rows=true", "max_steps_per_epoch=1", "epochs=1")
    run = recipe.FullFinetuneRecipeSingleDevice(params)
    run.tokenizer = recipe.load_tokenizer(params.tokenizer_path)
    run.setup_data()  # the data alone: no model needed
    assert "41 samples" in capsys.readouterr().out  # the long one is kept, cut
    lengths = run.dataloader.dataset.sample_lengths() + run.val_dataloader.dataset.sample_lengths()
    assert max(lengths) == 256 and run.dataloader.dataset.stats["truncated"] == 1


def test_hub_dataset_names_are_not_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # if `datasets` is installed: fail at once, no network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert looks_like_hub_dataset("tatsu-lab/alpaca") and looks_like_hub_dataset("teknium/OpenHermes-2.5")
    assert not looks_like_hub_dataset("data/train.jsonl") and not looks_like_hub_dataset("/abs/alpaca")
    params = demo_params(tmp_path, "dataset_path=someone/some_dataset")
    with pytest.raises(MytuneError, match="someone/some_dataset") as error:
        recipe.recipe_main(params)  # goes to the hub loader (here: `datasets` is missing or the hub is offline)
    assert "does not exist" not in str(error.value)


@pytest.mark.parametrize("overrides, field", [
    ({"dataset_format": "csv"}, "dataset_format"),
    ({"column_map": {"prompt": "instruction"}}, "column_map"),
    ({"column_map": {"instruction": ""}}, "column_map"),
    ({"chat_template": "vicuna"}, "chat_template"),
    ({"chat_template": "alpaca", "dataset_format": "chat"}, "chat_template=alpaca"),
    ({"truncation": "cut"}, "truncation"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": 0.1, "dataset_val": "v.jsonl"}, "dataset_val and val_fraction"),
    ({"eval_every_n_steps": -1}, "eval_every_n_steps"),
    ({"eval_every_n_steps": 10}, "eval_every_n_steps=10 but there is no validation data"),
    ({"max_eval_batches": 0, "val_fraction": 0.1}, "max_eval_batches"),
])
def test_data_params_are_validated(overrides, field):
    base = {"model": "llama_tiny", "tokenizer_path": "t", "dataset_path": "d"}
    with pytest.raises(ConfigError, match=re.escape(field)):
        FullFinetuneParams(**base, **overrides)
    FullFinetuneParams(**base, column_map={"instruction": "prompt"}, chat_template="{{ messages }}",
                       val_fraction=0.1, eval_every_n_steps=10, max_eval_batches=2)  # all fine


def test_column_map_from_the_command_line(tmp_path):
    params = demo_params(tmp_path, "column_map={instruction: prompt, output: response}", "dataset_format=instruct")
    assert params.column_map == {"instruction": "prompt", "output": "response"}


# ---- memory / speed / logging options ------------------------------------------------------------------------------
def losses_of(tmp_path: Path, *overrides: str) -> list[float]:
    params = demo_params(tmp_path, "max_steps_per_epoch=3", "epochs=1", "val_fraction=0", "eval_every_n_steps=0",
                         "max_seq_len=128", *overrides)
    recipe.recipe_main(params)
    return [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]


@pytest.fixture(scope="module")
def unchunked_losses(tmp_path_factory):
    return losses_of(tmp_path_factory.mktemp("unchunked"), "chunked_loss=false")


def test_chunked_loss_and_activation_checkpointing_give_the_same_losses(unchunked_losses, tmp_path):
    chunked = losses_of(tmp_path / "chunked", "chunked_loss=true", "loss_chunk_size=100")
    # (activation_offloading is a GPU option, refused with device=cpu; its copy path has its own test)
    checkpointed = losses_of(tmp_path / "ac", "chunked_loss=false", "activation_checkpointing=true")
    assert len(unchunked_losses) == 3
    assert max(abs(a - b) for a, b in zip(chunked, unchunked_losses)) < 1e-5, (chunked, unchunked_losses)
    assert max(abs(a - b) for a, b in zip(checkpointed, unchunked_losses)) < 1e-5, (checkpointed, unchunked_losses)




def test_compile_true_trains_to_the_eager_losses(unchunked_losses, tmp_path, monkeypatch):
    """compile=true through the real `compile_layers` with torch.compile's "eager" backend (dynamo traces each layer
    and runs the captured graphs: the wiring, without inductor's 10-30 s of code generation on a CPU; inductor itself
    is in tests/training/test_layer_wrappers.py behind MYTUNE_TEST_INDUCTOR=1): the same losses as the eager run."""
    from mytune.training.layer_wrappers import compile_layers

    compiled = []
    monkeypatch.setattr(recipe, "compile_layers",
                        lambda model: compiled.append(compile_layers(model, backend="eager")))
    try:
        losses = losses_of(tmp_path, "chunked_loss=false", "compile=true")
        assert all(layer._compiled_call_impl is not None for layer in compiled[0].model.layers)
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 1
    assert max(abs(a - b) for a, b in zip(losses, unchunked_losses)) < 1e-5, (losses, unchunked_losses)
    assert "model.layers.0.self_attn.q_proj.weight" in load_hf_model(tmp_path / "step_3").state_dict()


OPTIMIZER_RUN = ["max_seq_len=128", "max_steps_per_epoch=6", "epochs=1", "val_fraction=0", "eval_every_n_steps=0",
                 "warmup_steps=1", "lr_scheduler=cosine", "keep_last_n_checkpoints=null"]


def assert_trains(losses: list[float], steps: int) -> None:
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) / 2 < 0.97 * losses[0], f"loss did not fall: {losses}"


def test_sgd_trains_and_tensorboard_writes_an_event_file(tmp_path):
    recipe.recipe_main(demo_params(tmp_path, *OPTIMIZER_RUN, "optimizer=sgd", "lr=0.2", "warmup_steps=0",
                                   "metric_loggers=[jsonl, tensorboard]"))
    assert_trains([r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")], 6)
    state = torch.load(tmp_path / "step_6" / "recipe_state.pt", weights_only=True)["optimizer"]
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())  # SGD's momentum, not AdamW's
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("optimizer, state_class", [("adamw8bit", "OptimState8bit"), ("adamw4bit", "OptimState4bit")])
def test_low_bit_adamw_trains_and_resumes_bitwise(optimizer, state_class, tmp_path, monkeypatch):
    """torchao's AdamW8bit / AdamW4bit on the CPU: 6 steps saving every 3, then a run resumed from step_3 logs
    bitwise the same losses for steps 4-6: the block-quantized moments go through recipe_state.pt exactly. Every
    linear weight of llama_tiny has >= 4096 elements, so its state is quantized (norms keep float32 state).
    torch.compile of torchao's per-parameter update is stubbed out (inductor takes ~40 s for these shapes on a CPU;
    the update's math is the same eagerly; the compiled update is tested in tests/training/test_optim.py)."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    run = [*OPTIMIZER_RUN, f"optimizer={optimizer}", "save_every_n_steps=3"]
    reference = tmp_path / "reference"
    recipe.recipe_main(demo_params(reference, *run))
    expected = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert_trains([expected[step] for step in sorted(expected)], 6)
    state = torch.load(reference / "step_3" / "recipe_state.pt", weights_only=True)["optimizer"]["state"]
    quantized = sum(type(s["exp_avg"]).__name__ == state_class and type(s["exp_avg_sq"]).__name__ == state_class
                    for s in state.values())
    assert quantized == 4 * 7 + 2, quantized  # 7 projections in each of 4 layers, the embedding, the untied head

    resumed = tmp_path / "resumed"
    recipe.recipe_main(demo_params(resumed, *run, f"resume_from_checkpoint={reference / 'step_3'}"))
    got = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert got == {step: loss for step, loss in expected.items() if step > 3}  # bitwise


@pytest.mark.parametrize("overrides, field", [
    ({"optimizer": "adam"}, "optimizer='adam'"),
    ({"metric_loggers": ["jsonl", "tensorbord"]}, "did you mean 'tensorboard'"),
    ({"loss_chunk_size": 0}, "loss_chunk_size"),
    ({"save_every_n_steps": -1}, "save_every_n_steps"),
    ({"keep_last_n_checkpoints": 0}, "keep_last_n_checkpoints"),
    ({"profile_steps": 0}, "profile_steps"),
])
def test_training_options_are_validated(overrides, field):
    base = {"model": "llama_tiny", "tokenizer_path": "t", "dataset_path": "d"}
    with pytest.raises(ConfigError, match=re.escape(field)):
        FullFinetuneParams(**base, **overrides)
