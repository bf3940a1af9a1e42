"""End to end: the LoRA tiny_demo trains (loss falls, base frozen) and writes a merged HF checkpoint plus a PEFT
adapter that transformers / peft / mytune load to the same logits; DoRA + QLoRA runs; bad targets fail in one line."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mytune.checkpoint import load_hf_model, load_peft_adapter
from mytune.config import TuneArgumentParser
from mytune.errors import MytuneError
from mytune.training.metrics import read_metrics
from recipes import lora_finetune_single_device as recipe
from recipes.params.lora_finetune_single_device import LoRAFinetuneParams

STEPS = 20


def demo_params(tmp_path: Path, *overrides: str) -> LoRAFinetuneParams:
    parser = TuneArgumentParser(LoRAFinetuneParams, recipe="lora_finetune_single_device")
    argv = ["--config", "tiny_demo", "--override", f"output_dir={tmp_path}", "log_every_n_steps=1",
            f"dataset_cache_dir={tmp_path / 'cache'}", *overrides]
    return parser.parse_params(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_demo")
    params = demo_params(out, f"max_steps_per_epoch={STEPS}", "epochs=1")
    return params, recipe.recipe_main(params)


def test_loss_decreases(trained):
    params, _ = trained
    rows = read_metrics(Path(params.output_dir) / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS and all(r["tokens_per_s"] > 0 for r in rows)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"tiny_demo LoRA losses: first {first:.3f}, last {last:.3f}")
    assert last < 0.85 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_outputs_are_merged_checkpoint_and_peft_adapter_with_the_same_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params, step_dir = trained
    base_dir = Path(params.output_dir) / "base_model"
    adapter_dir = step_dir / "adapter"
    assert step_dir == Path(params.output_dir) / f"step_{STEPS}"
    assert (step_dir / "model.safetensors").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve()) and config["r"] == 8
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                        "lm_head"]

    # The base stayed frozen: untargeted tensors are bit-identical to the saved random start, targeted ones moved.
    base, merged = load_file(base_dir / "model.safetensors"), load_file(step_dir / "model.safetensors")
    assert set(base) == set(merged)
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    assert torch.equal(base["model.layers.3.post_attention_layernorm.weight"],
                       merged["model.layers.3.post_attention_layernorm.weight"])
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])

    ids = torch.tensor([AutoTokenizer.from_pretrained(step_dir)("Reverse the words: one two three").input_ids])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32).eval()(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                               adapter_dir).eval()
        peft_logits = peft_model(ids).logits
        ours = load_peft_adapter(load_hf_model(base_dir), adapter_dir).eval()(ids)
    print(f"merged vs peft adapter: {(merged_logits - peft_logits).abs().max():.2e}, "
          f"mytune adapter vs peft adapter: {(ours - peft_logits).abs().max():.2e}")
    assert (merged_logits - peft_logits).abs().max() < 1e-4
    assert (ours - peft_logits).abs().max() < 1e-5


def test_dora_qlora_runs_and_saves_both(tmp_path):
    params = demo_params(tmp_path, "max_steps_per_epoch=2", "epochs=1", "use_dora=true", "quantize_base=true",
                         "dtype=bf16", "batch_size=2", "max_seq_len=64", "lora_target_modules=[linear_qkv,linear_fc2]")
    step_dir = recipe.recipe_main(params)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(step_dir / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector" in adapter
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert len(adapter) == 3 * 4 * 4  # (A, B, magnitude) x 4 layers x (q, k, v, down)
    merged = load_hf_model(step_dir, dtype=torch.bfloat16)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_unknown_target_is_a_one_line_config_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_params(tmp_path, "lora_target_modules=[q_proj,mlp_proj]")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown module name 'mlp_proj'" in err[0] and "known: q_proj" in err[0], err


RESUME_RUN = ["max_seq_len=128", "max_steps_per_epoch=6", "epochs=2", "save_every_n_steps=4", "dtype=fp32",
              "lr_scheduler=cosine", "warmup_steps=2", "keep_last_n_checkpoints=null"]


def test_resume_from_step_4_gives_bitwise_the_same_losses(tmp_path, capsys):
    """12 steps saving every 4; a second run resumed from step_4 (adapters from its adapter/, optimizer, LR schedule,
    data position, RNG) logs bitwise the uninterrupted run's losses for steps 5..12 (CPU, fp32)."""
    reference_out = tmp_path / "reference"
    recipe.recipe_main(demo_params(reference_out, *RESUME_RUN))
    expected = {r["step"]: r["loss"] for r in read_metrics(reference_out / "metrics.jsonl")}
    assert sorted(expected) == list(range(1, 13))
    assert sorted(p.name for p in reference_out.glob("step_*")) == ["step_12", "step_4", "step_8"]
    assert (reference_out / "step_4" / "recipe_state.pt").is_file()
    assert (reference_out / "step_4" / "adapter" / "adapter_model.safetensors").is_file()

    resumed_out = tmp_path / "resumed"
    step_dir = recipe.recipe_main(demo_params(resumed_out, *RESUME_RUN, "keep_last_n_checkpoints=1",
                                              f"resume_from_checkpoint={reference_out / 'step_4'}"))
    assert "at step 4" in capsys.readouterr().out
    resumed = {r["step"]: r["loss"] for r in read_metrics(resumed_out / "metrics.jsonl")}
    assert resumed == {step: loss for step, loss in expected.items() if step > 4}  # bitwise: == on floats
    assert step_dir == resumed_out / "step_12" and [p.name for p in resumed_out.glob("step_*")] == ["step_12"]
    # The final adapters are the same tensors as the uninterrupted run's.
    a = load_file(reference_out / "step_12" / "adapter" / "adapter_model.safetensors")
    b = load_file(step_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_naming_the_last_good_checkpoint(tmp_path):
    params = demo_params(tmp_path, "max_seq_len=64", "max_steps_per_epoch=4", "epochs=1", "dtype=fp32", "lr=1e30",
                         "warmup_steps=0", "lr_scheduler=constant", "save_every_n_steps=1", "max_grad_norm=null")
    with pytest.raises(MytuneError) as err:
        recipe.recipe_main(params)
    message = str(err.value)
    assert "training diverged" in message and "lower lr (now 1e+30)" in message, message
    last_good = Path(message.split("the last good checkpoint is ")[1].split()[0])
    assert (last_good / "recipe_state.pt").is_file() and (last_good / "adapter").is_dir()
    assert last_good == sorted(tmp_path.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]


def test_resume_from_a_path_that_is_no_checkpoint_is_an_error(tmp_path):
    with pytest.raises(MytuneError, match="is not a resumable checkpoint"):
        recipe.recipe_main(demo_params(tmp_path / "out", f"resume_from_checkpoint={tmp_path}"))


def test_chunked_loss_is_used_only_without_an_adapter_on_lm_head(tmp_path):
    params = demo_params(tmp_path, "max_seq_len=64", "max_steps_per_epoch=1", "epochs=1", "dtype=fp32",
                         "lora_target_modules=[q_proj,v_proj]", "chunked_loss=true", "activation_checkpointing=true",
                         "metric_loggers=[jsonl,stdout]")
    r = recipe.LoRAFinetuneRecipeSingleDevice(params)
    r.setup()
    assert r.chunked_loss
    r.train()
    r.cleanup()
    assert "peak_memory_gib" in read_metrics(tmp_path / "metrics.jsonl")[0]
    params = demo_params(tmp_path / "head", "max_seq_len=64", "max_steps_per_epoch=1", "epochs=1", "chunked_loss=true")
    r = recipe.LoRAFinetuneRecipeSingleDevice(params)
    r.setup()
    assert not r.chunked_loss  # tiny_demo targets lm_head: the loss goes through its adapter, unchunked


# ---- compile, optimizers, profiler ---------------------------------------------------------------------------------
SHORT_RUN = ["max_seq_len=128", "max_steps_per_epoch=3", "epochs=1", "val_fraction=0", "eval_every_n_steps=0",
             "dtype=fp32"]


def losses_of(out: Path, *overrides: str) -> list[float]:
    recipe.recipe_main(demo_params(out, *overrides))
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory):
    return losses_of(tmp_path_factory.mktemp("eager"), *SHORT_RUN)


def test_compile_is_applied_after_activation_checkpointing(tmp_path, monkeypatch):
    """The wiring alone (nothing compiled): compile_layers gets the model whose layers are already checkpointed."""
    from mytune.training.layer_wrappers import _INNER_FORWARD

    seen = []
    monkeypatch.setattr(recipe, "compile_layers", lambda model: seen.append(
        [hasattr(layer, _INNER_FORWARD) for layer in model.model.layers]))
    r = recipe.LoRAFinetuneRecipeSingleDevice(demo_params(tmp_path, *SHORT_RUN, "compile=true",
                                                          "activation_checkpointing=true"))
    r.setup()
    assert seen == [[True] * 4]
    r = recipe.LoRAFinetuneRecipeSingleDevice(demo_params(tmp_path / "off", *SHORT_RUN))
    r.setup()
    assert len(seen) == 1  # compile=false (the default) does not compile


def test_compile_true_trains_to_the_eager_losses(eager_losses, tmp_path, monkeypatch):
    """compile=true through the real `compile_layers` with torch.compile's "eager" backend: dynamo traces each LoRA
    layer (frozen base + adapters) and runs the captured graphs; the 3 steps (3 sequence lengths: a static graph,
    then a dynamic-shape recompile) log the eager losses. AOT autograd ("aot_eager", +10 s here) is covered on a plain
    model in tests/training/test_layer_wrappers.py; inductor (10-30 s on a CPU) in the MYTUNE_TEST_INDUCTOR test below."""
    from mytune.training.layer_wrappers import compile_layers

    compiled = []

    def dynamo_only_compile(model):
        compiled.append(compile_layers(model, backend="eager"))

    monkeypatch.setattr(recipe, "compile_layers", dynamo_only_compile)
    try:
        losses = losses_of(tmp_path, *SHORT_RUN, "compile=true")
        layers = compiled[0].model.layers
        assert all(layer._compiled_call_impl is not None for layer in layers)  # nn.Module.compile, in place
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 1 and len(losses) == 3
    assert max(abs(a - b) for a, b in zip(losses, eager_losses)) < 1e-5, (losses, eager_losses)
    # In place: the adapter's keys have no `_orig_mod.`, so the checkpoint is the same as an eager run's.
    adapter = load_file(tmp_path / "step_3" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MYTUNE_TEST_INDUCTOR"),
                    reason="inductor compiles for 10-30 s on a CPU; set MYTUNE_TEST_INDUCTOR=1 to run")
def test_compile_true_with_inductor_trains_to_the_eager_losses(eager_losses, tmp_path):
    try:
        losses = losses_of(tmp_path, *SHORT_RUN, "compile=true")
    finally:
        torch._dynamo.reset()
    assert len(losses) == 3
    assert max(abs(a - b) for a, b in zip(losses, eager_losses)) < 1e-4, (losses, eager_losses)


def test_profile_writes_a_trace_of_the_training_steps(tmp_path):
    """profile_steps=1: step 1 skipped, step 2 warm-up, step 3 recorded and written as rank0_step3.json."""
    losses = losses_of(tmp_path, *SHORT_RUN, "profile=true", "profile_steps=1")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert traces == ["rank0_step3.json"]
    names = {e.get("name", "") for e in json.loads((tmp_path / "profile" / traces[0]).read_text())["traceEvents"]}
    assert "ProfilerStep#2" in names and "ProfilerStep#1" not in names  # only the third step is recorded
    # The whole optimizer step is inside: forward, backward and the optimizer update.
    assert "aten::mm" in names and any(n.startswith("autograd::engine::evaluate_function") for n in names)
    assert any(n.startswith("Optimizer.step#AdamW.step") for n in names), sorted(names)[:50]


LOW_BIT_RUN = ["max_seq_len=128", "max_steps_per_epoch=6", "epochs=1", "val_fraction=0", "eval_every_n_steps=0",
               "dtype=fp32", "warmup_steps=1", "lr_scheduler=cosine", "keep_last_n_checkpoints=null"]


def assert_trains(losses: list[float], steps: int) -> None:
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) / 2 < 0.97 * losses[0], f"loss did not fall: {losses}"


def test_sgd_trains(tmp_path):
    # SGD needs a far larger lr than AdamW's 1e-2 to move the zero-initialised lora_B in 6 steps.
    assert_trains(losses_of(tmp_path, *LOW_BIT_RUN, "optimizer=sgd", "lr=0.5", "warmup_steps=0"), 6)
    state = torch.load(tmp_path / "step_6" / "recipe_state.pt", weights_only=True)["optimizer"]
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())


@pytest.mark.parametrize("optimizer, state_class", [("adamw8bit", "OptimState8bit"), ("adamw4bit", "OptimState4bit")])
def test_low_bit_adamw_trains_and_resumes_bitwise(optimizer, state_class, tmp_path, monkeypatch):
    """torchao's AdamW8bit / AdamW4bit on the CPU: 6 steps saving every 3, then a run resumed from step_3 logs
    bitwise the same losses for steps 4-6 and ends with the same adapters: the block-quantized moments go through
    recipe_state.pt exactly. lora_rank=32 so that most adapter matrices have >= 4096 elements (torchao keeps smaller
    tensors' state in float32). torch.compile of torchao's per-parameter update is stubbed out here (inductor takes
    ~40 s for these shapes on a CPU; the update's math is the same eagerly); the compiled update is in the
    MYTUNE_TEST_INDUCTOR test below."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    run = [*LOW_BIT_RUN, f"optimizer={optimizer}", "lora_rank=32", "save_every_n_steps=3"]
    reference = tmp_path / "reference"
    recipe.recipe_main(demo_params(reference, *run))
    expected = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert_trains([expected[step] for step in sorted(expected)], 6)
    state = torch.load(reference / "step_3" / "recipe_state.pt", weights_only=True)["optimizer"]["state"]
    quantized = sum(type(s["exp_avg"]).__name__ == state_class and type(s["exp_avg_sq"]).__name__ == state_class
                    for s in state.values())
    assert quantized >= len(state) // 2, (quantized, len(state))

    resumed = tmp_path / "resumed"
    step_dir = recipe.recipe_main(demo_params(resumed, *run, f"resume_from_checkpoint={reference / 'step_3'}"))
    got = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert got == {step: loss for step, loss in expected.items() if step > 3}  # bitwise
    a = load_file(reference / "step_6" / "adapter" / "adapter_model.safetensors")
    b = load_file(step_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MYTUNE_TEST_INDUCTOR"),
                    reason="inductor compiles for 10-30 s on a CPU; set MYTUNE_TEST_INDUCTOR=1 to run")
def test_low_bit_adamw_compiled_update_trains_like_the_eager_one(tmp_path, monkeypatch):
    """torchao's real (inductor-compiled) 8-bit update against the same update run eagerly."""
    run = [*SHORT_RUN, "optimizer=adamw8bit", "lora_rank=32"]
    try:
        compiled = losses_of(tmp_path / "compiled", *run)
    finally:
        torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    eager = losses_of(tmp_path / "eager", *run)
    assert max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-4, (compiled, eager)
