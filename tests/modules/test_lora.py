"""LoRA / DoRA / QLoRA layers: the math against float64 hand computations, init, freezing, merging, target names."""

import math

import pytest
import torch
from torch import nn

from mytune.errors import MytuneError
from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules.lora import (
    LoRALinear,
    apply_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    resolve_lora_targets,
    trainable_parameters,
)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def tiny_model(seed: int = 0, **overrides) -> TransformerDecoder:
    """2 layers, GQA, qkv+o bias; every weight has a multiple of 64 elements (NF4 blocks)."""
    args = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, attention_bias=True)
    torch.manual_seed(seed)
    return TransformerDecoder(ModelArgs(**{**args, **overrides})).eval()


def tokens(seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (so adapters change outputs) and magnitudes away from the weight norm."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features, generator=generator) + 0.5)


def wrapped_linear(use_dora: bool, bias: bool = True, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    layer = LoRALinear.from_linear(linear, rank=4, alpha=6.0, dropout=dropout, use_dora=use_dora)
    randomize_adapters(layer)
    return layer


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_forward_matches_float64_hand_computation(use_dora):
    layer = wrapped_linear(use_dora).eval()
    x = torch.randn(3, 5, 24)
    W, b = layer.weight.double(), layer.bias.double()
    A, B, s = layer.lora_A.weight.double(), layer.lora_B.weight.double(), 6.0 / 4
    xd = x.double()
    if use_dora:
        norm = torch.linalg.norm(W + s * B @ A, dim=1)
        m = layer.lora_magnitude_vector.double()
        expected = (m / norm) * (xd @ W.T + s * xd @ A.T @ B.T) + b
    else:
        expected = xd @ W.T + b + (xd @ A.T @ B.T) * s
    diff = (layer(x).double() - expected).abs().max().item()
    assert diff < 1e-5, diff


def test_init_is_peft_default_and_keeps_base_tensors():
    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=True)
    layer = LoRALinear.from_linear(linear, rank=8, alpha=16.0, use_dora=True)
    assert layer.weight.data_ptr() == linear.weight.data_ptr() and layer.bias.data_ptr() == linear.bias.data_ptr()
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert torch.allclose(layer.lora_magnitude_vector, torch.linalg.norm(linear.weight, dim=1))
    assert layer.scaling == 2.0
    assert [n for n, _ in layer.named_parameters()] == [
        "weight", "bias", "lora_magnitude_vector", "lora_A.weight", "lora_B.weight"]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_zero_init_b_leaves_model_output_unchanged(use_dora):
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, ALL_TARGETS, rank=4, alpha=8.0, dropout=0.1, use_dora=use_dora)
        after = model(x)
    assert sum(1 for _ in lora_layers(model)) == 2 * 7 + 1
    if use_dora:  # m / ||W|| is 1 up to rounding
        assert (after - before).abs().max() < 1e-5
    else:
        assert torch.equal(after, before)


def test_only_adapters_require_and_receive_grad():
    model = tiny_model()
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0, use_dora=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")) for n in names)
    assert len(names) == 2 * 3 * 3
    assert len(trainable_parameters(model)) == len(names)
    randomize_adapters(model)
    model.train()
    model(tokens()).square().mean().backward()
    for name, param in model.named_parameters():
        if name in names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_equals_unmerged_forward(use_dora):
    model = tiny_model()
    apply_lora(model, ALL_TARGETS, rank=4, alpha=8.0, use_dora=use_dora)
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        merged = merge_lora(model)
        assert not any(True for _ in lora_layers(merged))
        assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("_proj", "lm_head")))
        diff = (merged(x) - expected).abs().max().item()
        assert diff < 1e-5, diff
        # Not in place: the LoRA model is intact and shares every untouched tensor with the merged one.
        assert isinstance(model.lm_head, LoRALinear) and torch.equal(model(x), expected)
        assert merged.model.embed_tokens.weight is model.model.embed_tokens.weight
        merged_bias, bias = merged.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias
        assert merged_bias.data_ptr() == bias.data_ptr()
        assert set(merged.state_dict()) == set(tiny_model().state_dict())

        on_cpu = merge_lora(model, device="cpu")
        assert torch.equal(on_cpu.lm_head.weight, merged.lm_head.weight)
        assert merge_lora(model, inplace=True) is model and type(model.lm_head) is nn.Linear
        assert (model(x) - expected).abs().max() < 1e-5


def test_target_names_and_aliases():
    assert resolve_lora_targets(["linear_qkv"]) == ["q_proj", "k_proj", "v_proj"]
    assert resolve_lora_targets(["output", "linear_fc2", "linear_fc1", "linear_proj", "q_proj"]) == [
        "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    assert resolve_lora_targets(["v_proj", "linear_qkv", "v_proj"]) == ["q_proj", "k_proj", "v_proj"]
    with pytest.raises(MytuneError, match="unknown module name 'q_prj'; did you mean q_proj"):
        resolve_lora_targets(["q_prj"])
    with pytest.raises(MytuneError, match="lora_target_modules is empty"):
        resolve_lora_targets([])

    by_alias = apply_lora(tiny_model(), ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output"], 4, 8.0)
    by_name = apply_lora(tiny_model(), ALL_TARGETS, 4, 8.0)
    assert [n for n, _ in lora_layers(by_alias)] == [n for n, _ in lora_layers(by_name)]
    assert [n for n, _ in lora_layers(apply_lora(tiny_model(), ["linear_fc2"], 4, 8.0))] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_tied_head_and_double_application_are_refused():
    with pytest.raises(MytuneError, match="lm_head shares its weight with model.embed_tokens.weight"):
        apply_lora(tiny_model(tie_word_embeddings=True), ["q_proj", "output"], 4, 8.0)
    model = apply_lora(tiny_model(), ["q_proj"], 4, 8.0)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, ["v_proj"], 4, 8.0)


def test_lora_state_dict_holds_only_the_adapters():
    model = apply_lora(tiny_model(), ["q_proj", "output"], 4, 8.0, use_dora=True)
    state = lora_state_dict(model)
    assert sorted(state) == sorted(
        [f"model.layers.{i}.self_attn.q_proj.{p}" for i in range(2)
         for p in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")]
        + ["lm_head.lora_A.weight", "lm_head.lora_B.weight", "lm_head.lora_magnitude_vector"])
    assert state["lm_head.lora_A.weight"].shape == (4, 64) and state["lm_head.lora_B.weight"].shape == (128, 4)
    # The model's own state dict keeps the HF keys of the base weights at their usual paths.
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" in model.state_dict()


def test_dropout_applies_to_the_adapter_input_only_in_training():
    layer = wrapped_linear(use_dora=False, dropout=0.5)
    x = torch.randn(4, 24)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert torch.allclose(out, base + layer.lora_B(layer.lora_A(dropped)) * layer.scaling, atol=1e-6)
    layer.eval()
    assert torch.allclose(layer(x), base + layer.lora_B(layer.lora_A(x)) * layer.scaling, atol=1e-6)


def dequantized_reference(model: nn.Module) -> nn.Module:
    """The same model with every NF4 base weight replaced by its dequantized dense tensor."""
    reference = merge_lora(model)  # a structural copy sharing tensors; its LoRA layers are rebuilt below
    for name, layer in lora_layers(model):
        dense = LoRALinear(layer.in_features, layer.out_features, rank=layer.rank, alpha=layer.alpha,
                           use_dora=layer.use_dora, bias=layer.bias is not None)
        dense.load_state_dict({**lora_state_dict(layer), "weight": layer.dense_weight(),
                               **({"bias": layer.bias} if layer.bias is not None else {})})
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, dense.eval())
    return reference


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_matches_dequantized_reference_and_trains_only_adapters(use_dora):
    original = tiny_model()
    dense_weights = {n: p.detach().clone() for n, p in original.named_parameters()}
    model = apply_lora(original, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output"], rank=4,
                       alpha=8.0, use_dora=use_dora, quantize_base=True)
    randomize_adapters(model)
    from torchao.quantization import NF4Tensor  # imported by apply_lora already (quietly)

    layers = dict(lora_layers(model))
    assert all(isinstance(layer.weight, NF4Tensor) and layer.quantized for layer in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    # NF4 is a 4-bit code: the dequantized weight is close to, not equal to, the original.
    error = (q.dense_weight() - dense_weights["model.layers.0.self_attn.q_proj.weight"]).abs()
    assert 0 < error.mean() < 0.1 * dense_weights["model.layers.0.self_attn.q_proj.weight"].abs().mean()

    x = tokens()
    reference = dequantized_reference(model)
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    assert diff < 1e-5, diff

    model.train()
    model(x).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in grads)

    with torch.no_grad():  # merging dequantizes: the merged plain model reproduces the QLoRA model
        model.eval()
        assert (merge_lora(model)(x) - model(x)).abs().max() < 1e-5


def test_qlora_bf16_forward_is_close_to_dequantized_reference():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8.0, quantize_base=True)
    randomize_adapters(model)
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.bfloat16
    reference = dequantized_reference(model).to(torch.bfloat16)
    with torch.no_grad():
        out, expected = model(tokens()), reference(tokens())
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected.float()).abs().max() < 0.02  # bf16 rounding of the same operations
