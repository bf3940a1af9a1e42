"""PEFT adapters: ours load in `peft` with identical logits (eval and train mode), PEFT's load in ours, merged saves
load in transformers, and bad adapters are reported in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mytune.checkpoint import load_hf_model, load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from mytune.checkpoint.peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from mytune.errors import MytuneError
from mytune.modules.lora import apply_lora, lora_layers, lora_state_dict, merge_lora
from tests.models.hf_reference import make_hf_model, random_tokens

TOLERANCE = 1e-5
ALL_LINEAR = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# (reference family, targets): GQA + llama3 rope with the output head; qkv biases with a tied (so untargeted) head.
CASES = {
    "llama3": ("llama3_gqa_scaled_rope", [*ALL_LINEAR, "output"]),
    "qwen2_bias": ("qwen2_bias_tied", ALL_LINEAR),
}


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    """Family -> a transformers checkpoint saved by save_pretrained (every weight random)."""
    root = tmp_path_factory.mktemp("base")
    paths = {}
    for name, (family, _) in CASES.items():
        make_hf_model(family).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def peft_model(base_path, adapter_dir, *, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(base_path), adapter_dir, is_trainable=trainable)


@torch.no_grad()
def lora_model(base_path, targets, *, use_dora: bool, dropout: float = 0.0, seed: int = 1):
    """load_hf_model + apply_lora with non-trivial adapters (random B, magnitudes off the weight norm)."""
    model = load_hf_model(base_path)
    torch.manual_seed(seed)
    apply_lora(model, targets, rank=4, alpha=8.0, dropout=dropout, use_dora=use_dora)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.normal_(0, 0.1)
        if use_dora:
            layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features) + 0.5)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", CASES)
def test_peft_loads_our_adapter_with_identical_logits(case, use_dora, base_checkpoints, tmp_path):
    base = base_checkpoints[case]
    ours = lora_model(base, CASES[case][1], use_dora=use_dora, dropout=0.1)
    adapter = save_peft_adapter(ours, tmp_path / "adapter", str(base))
    reference = peft_model(base, adapter).eval()
    tokens = random_tokens()
    with torch.no_grad():
        expected, actual = reference(tokens).logits, ours(tokens)
        untuned = hf_model(base)(tokens).logits
    diff = (actual - expected).abs().max().item()
    print(f"{case} use_dora={use_dora}: max abs logit diff vs peft {diff:.2e} "
          f"(the adapter moves logits by {(expected - untuned).abs().max():.2f})")
    assert diff < TOLERANCE
    assert (expected - untuned).abs().max() > 0.1  # the adapter is not a no-op
    n_wrapped = sum(1 for _ in reference.named_modules() if _[0].endswith(".lora_A"))
    assert n_wrapped == sum(1 for _ in lora_layers(ours))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_step_matches_peft_with_dropout(use_dora, base_checkpoints, tmp_path):
    """Train mode, dropout 0.3, the same RNG state: same logits and the same adapter gradients as PEFT."""
    base = base_checkpoints["llama3"]
    ours = lora_model(base, CASES["llama3"][1], use_dora=use_dora, dropout=0.3)
    reference = peft_model(base, save_peft_adapter(ours, tmp_path / "a"), trainable=True)
    ours.train()
    reference.train()
    tokens = random_tokens()
    torch.manual_seed(7)
    actual = ours(tokens)
    torch.manual_seed(7)
    expected = reference(tokens).logits
    assert (actual - expected).abs().max() < TOLERANCE
    actual.square().mean().backward()
    expected.square().mean().backward()
    peft_grads = {name.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): p.grad
                  for name, p in reference.named_parameters() if p.requires_grad}
    ours_grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(ours_grads) and len(ours_grads) == (3 if use_dora else 2) * (2 * 7 + 1)
    worst = max((ours_grads[n] - peft_grads[n]).abs().max().item() / (peft_grads[n].abs().max().item() + 1e-12)
                for n in ours_grads)
    print(f"use_dora={use_dora} train mode: logits diff {(actual - expected).abs().max():.2e}, "
          f"worst relative adapter-grad diff {worst:.2e}")
    assert worst < 1e-4, worst


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_checkpoint_loads_in_transformers_with_same_logits(use_dora, base_checkpoints, tmp_path):
    ours = lora_model(base_checkpoints["qwen2_bias"], CASES["qwen2_bias"][1], use_dora=use_dora)
    out = save_hf_checkpoint(merge_lora(ours, device="cpu"), tmp_path / "merged", dtype=torch.float32)
    tokens = random_tokens()
    with torch.no_grad():
        diff = (hf_model(out)(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < TOLERANCE, diff
    assert not any(".lora_" in key for key in load_file(out / "model.safetensors"))
    assert isinstance(ours.model.layers[0].mlp.up_proj, type(ours.model.layers[0].self_attn.q_proj))  # untouched


def test_adapter_files_have_peft_names_and_config(base_checkpoints, tmp_path):
    base = base_checkpoints["llama3"]
    ours = lora_model(base, ["q_proj", "linear_fc2", "output"], use_dora=True, dropout=0.05)
    out = save_peft_adapter(ours, tmp_path / "adapter", str(base), targets=["output", "q_proj", "down_proj"],
                            rank=4, alpha=8.0, dropout=0.05, use_dora=True)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left behind
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "target_modules", "r", "lora_alpha", "lora_dropout",
                                   "use_dora", "bias", "fan_in_fan_out", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "down_proj", "lm_head"], "r": 4,
        "lora_alpha": 8, "lora_dropout": 0.05, "use_dora": True, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base)}
    tensors = load_file(out / ADAPTER_WEIGHTS_NAME)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in tensors
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (320, 4)
    assert len(tensors) == 3 * (2 + 2 + 1)
    with pytest.raises(ValueError, match="r=8 but the model's LoRA layers have 4"):
        save_peft_adapter(ours, tmp_path / "bad", rank=8)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_load_peft_adapter_round_trip(use_dora, base_checkpoints, tmp_path):
    base = base_checkpoints["llama3"]
    ours = lora_model(base, CASES["llama3"][1], use_dora=use_dora, dropout=0.1)
    adapter = save_peft_adapter(ours, tmp_path / "adapter", str(base))
    fresh = load_peft_adapter(load_hf_model(base), adapter).eval()  # gets its LoRA layers from adapter_config.json
    tokens = random_tokens()
    with torch.no_grad():
        assert torch.equal(fresh(tokens), ours(tokens))
    assert {k: v.shape for k, v in lora_state_dict(fresh).items()} == {k: v.shape for k, v in lora_state_dict(ours).items()}
    assert next(layer for _, layer in lora_layers(fresh)).dropout == 0.1
    # Into a model that already has matching LoRA layers (resuming): loaded in place.
    again = lora_model(base, CASES["llama3"][1], use_dora=use_dora, seed=5)
    with torch.no_grad():
        assert torch.equal(load_peft_adapter(again, adapter)(tokens), ours(tokens))


def test_load_adapter_written_by_peft(base_checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = base_checkpoints["llama3"]
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                        use_dora=True, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    reference = get_peft_model(hf_model(base), config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.mul_(0).add_(torch.randn_like(param) * 0.1 + ("magnitude" in name))
    reference.save_pretrained(tmp_path / "peft_adapter")
    ours = load_peft_adapter(load_hf_model(base), tmp_path / "peft_adapter").eval()
    tokens = random_tokens()
    with torch.no_grad():
        diff = (ours(tokens) - reference.eval()(tokens).logits).abs().max().item()
    assert diff < TOLERANCE, diff


def test_bad_adapters_are_one_line_errors(base_checkpoints, tmp_path):
    base = base_checkpoints["llama3"]
    ours = lora_model(base, ["q_proj"], use_dora=False)
    adapter = save_peft_adapter(ours, tmp_path / "adapter")

    with pytest.raises(MytuneError, match="adapter has r=4, lora_alpha=8, use_dora=False but "
                                          "model.layers.0.self_attn.q_proj has r=2, lora_alpha=8.0"):
        load_peft_adapter(apply_lora(load_hf_model(base), ["q_proj"], rank=2, alpha=8.0), adapter)

    tensors = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, adapter / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(MytuneError, match="missing key 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'"):
        load_peft_adapter(load_hf_model(base), adapter)

    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] = torch.zeros(96, 3)
    save_file(tensors, adapter / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(MytuneError, match=r"has shape \(96, 3\) but the model expects \(96, 4\)"):
        load_peft_adapter(load_hf_model(base), adapter)

    config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    (adapter / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(MytuneError, match="use_rslora=True is not supported"):
        load_peft_adapter(load_hf_model(base), adapter)
    (adapter / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(MytuneError, match="peft_type is 'IA3'; only LORA"):
        load_peft_adapter(load_hf_model(base), adapter)
    with pytest.raises(MytuneError, match="adapter_config.json not found"):
        load_peft_adapter(load_hf_model(base), tmp_path)
