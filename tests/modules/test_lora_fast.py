"""LoRA/DoRA fast paths give the numbers of the plain formulas: the in-place LoRA epilogue, DoRA's weight norm
computed once per optimizer step, and compiled decoder layers (LoRA, DoRA, QLoRA, QDoRA) against eager.

References: the plain LoRA formula `F.linear(x, W, b) + B(A(dropout(x))) * s`, and DoRA exactly as it was computed
before the cache (PEFT's `DoraLinearLayer.forward`, the norm recomputed at every call): bit for bit on CPU float32.
"""

import copy
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules.lora import LoRALinear, apply_lora, invalidate_dora_norms, lora_layers, trainable_parameters
from mytune.training.layer_wrappers import apply_activation_checkpointing, compile_layers

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]
VOCAB = 128


def tiny_model(*, use_dora: bool, quantize_base: bool = False, dropout: float = 0.0, targets=TARGETS,
               layers: int = 2) -> TransformerDecoder:
    """A seeded 2-layer model (every weight a multiple of 64 elements, for NF4) with non-trivial adapters."""
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         attention_bias=True))
    apply_lora(model, targets, rank=4, alpha=6.0, dropout=dropout, use_dora=use_dora, quantize_base=quantize_base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
            if use_dora:
                layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features, generator=generator) + 0.5)
    return model.train()


def batch(index: int, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(100 + index))


def previous_dora_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """DoRA as computed before the norm cache: PEFT's formula, the norm recomputed at every call."""
    result = F.linear(x, self.weight, self.bias)
    weight = self.dense_weight(x.dtype)
    if isinstance(self.lora_dropout, nn.Identity) or not self.training:
        base_result = result if self.bias is None else result - self.bias
    else:
        x = self.lora_dropout(x)
        base_result = F.linear(x, weight)
    lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype).detach()
    weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype).detach()
    mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
    lora_result = self.lora_B(self.lora_A(x))
    return result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling)


def use_previous_dora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.forward = types.MethodType(previous_dora_forward, layer)
    return model


def train_steps(model: nn.Module, *, steps: int = 2, micro_batches: int = 3, seed: int = 5,
                optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW) -> dict:
    """Gradient accumulation: per step `micro_batches` forward/backward passes, then an optimizer step (AdamW by
    default). Returns every number."""
    optimizer = optimizer(trainable_parameters(model), lr=1e-2)
    torch.manual_seed(seed)  # dropout
    losses, grads = [], []
    for step in range(steps):
        for micro in range(micro_batches):
            loss = model(batch(step * micro_batches + micro)).float().square().mean()
            loss.backward()
            losses.append(loss.detach())
        grads.append([p.grad.clone() for p in trainable_parameters(model)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        eval_out = model(batch(99))
    model.train()
    return {"losses": torch.stack(losses), "grads": grads, "eval": eval_out,
            "params": [p.detach().clone() for p in trainable_parameters(model)]}


def max_difference(a: dict, b: dict) -> float:
    pairs = [(a["losses"], b["losses"]), (a["eval"], b["eval"]), *zip(a["params"], b["params"]),
             *[pair for ga, gb in zip(a["grads"], b["grads"]) for pair in zip(ga, gb)]]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def count_norm_computations(monkeypatch) -> list[int]:
    calls = [0]
    original = LoRALinear._weight_norm

    def counting(self, weight, lora_weight):
        calls[0] += 1
        return original(self, weight, lora_weight)

    monkeypatch.setattr(LoRALinear, "_weight_norm", counting)
    return calls


# --- LoRA epilogue ------------------------------------------------------------------------------------------------

def lora_layer(*, bias: bool, quantize_base: bool = False, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 128, bias=bias), rank=4, alpha=6.0, dropout=dropout,
                                   quantize_base=quantize_base)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_lora_epilogue_matches_plain_formula(quantize_base, bias, dropout):
    layer = lora_layer(bias=bias, quantize_base=quantize_base, dropout=dropout).train()
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    out = layer(x)
    out.square().sum().backward()
    got = [out.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    layer.zero_grad()
    torch.manual_seed(7)
    expected = F.linear(x_ref, layer.weight, layer.bias) + layer.lora_B(layer.lora_A(layer.lora_dropout(x_ref))) \
        * layer.scaling
    expected.square().sum().backward()
    wanted = [expected.detach(), x_ref.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    for a, b in zip(got, wanted):
        relative = ((a - b).abs().max() / b.abs().max()).item()
        assert relative < 1e-6, relative


class NewStorages(TorchDispatchMode):
    """Counts the tensors ops allocate (new storage, not views or in-place results) with `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if type(t) is torch.Tensor}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is torch.Tensor and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_lora_epilogue_allocates_only_the_base_output(bias):
    layer = lora_layer(bias=bias)
    x = torch.randn(3, 5, 64)
    with torch.no_grad(), NewStorages(3 * 5 * 128) as new:
        layer(x)
    assert new.count == 1  # the base matmul's output; B(A x) * s is accumulated into it
    with torch.no_grad(), NewStorages(3 * 5 * 128) as plain:
        F.linear(x, layer.weight, layer.bias) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    assert plain.count == 4  # what the plain formula allocates: base, B(.), * s, +


# --- DoRA: the weight norm once per optimizer step ----------------------------------------------------------------

@pytest.mark.parametrize("quantize_base", [False, True], ids=["dora", "qdora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_dora_cached_norm_is_bitwise_the_previous_computation(quantize_base, dropout):
    new = train_steps(tiny_model(use_dora=True, quantize_base=quantize_base, dropout=dropout))
    previous = train_steps(use_previous_dora(tiny_model(use_dora=True, quantize_base=quantize_base,
                                                        dropout=dropout)))
    assert max_difference(new, previous) == 0.0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_dora_norm_is_computed_once_per_optimizer_step(monkeypatch, checkpointing):
    model = tiny_model(use_dora=True)
    if checkpointing:
        apply_activation_checkpointing(model)
    n_layers = sum(1 for _ in lora_layers(model))
    calls = count_norm_computations(monkeypatch)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    for step in range(2):
        for micro in range(3):
            model(batch(micro)).square().mean().backward()
        assert calls[0] == (step + 1) * n_layers  # once per layer for all micro-batches and the recompute
        optimizer.step()  # the global post-step hook drops every cached norm
        optimizer.zero_grad()
        assert all(layer._dora_norm is None for _, layer in lora_layers(model))
    model.eval()
    with torch.no_grad():
        out = model(batch(0))
        model(batch(1))
    assert calls[0] == 3 * n_layers
    with torch.no_grad():
        assert torch.equal(out, use_previous_dora(copy.deepcopy(model))(batch(0)))


def test_dora_norm_follows_every_weight_change(monkeypatch):
    model = tiny_model(use_dora=True).eval()
    reference = use_previous_dora(copy.deepcopy(model))
    calls = count_norm_computations(monkeypatch)
    x = batch(0)

    def check(expect_recompute: bool) -> None:
        before = calls[0]
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))
        assert calls[0] - before == (n_layers if expect_recompute else 0)

    n_layers = sum(1 for _ in lora_layers(model))
    check(True)
    check(False)
    state = {k: v + 0.01 if "lora_" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    reference.load_state_dict(state)
    check(True)
    with torch.no_grad():  # a hand edit in place: eager forwards see the version counter move
        for m in (model, reference):
            m.model.layers[0].self_attn.q_proj.lora_A.weight.mul_(1.5)
    before = calls[0]
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert calls[0] - before == 1
    assert invalidate_dora_norms(model) == n_layers
    check(True)
    model.double(), reference.double()  # a cast drops the cache: the norm comes back in the new dtype
    check(True)
    assert model.lm_head._dora_norm.dtype == torch.float64


def test_dora_norm_from_inference_mode_is_not_reused_for_training():
    model = tiny_model(use_dora=True)
    with torch.inference_mode():
        model(batch(0))
    assert model.lm_head._dora_norm.is_inference()
    out = model(batch(0))  # autograd cannot save an inference tensor: the norm is recomputed
    out.square().mean().backward()
    assert not model.lm_head._dora_norm.is_inference()
    with torch.no_grad():
        assert torch.equal(out, use_previous_dora(copy.deepcopy(model))(batch(0)))


def test_dora_copy_follows_optimizer_steps():
    model = tiny_model(use_dora=True)
    model(batch(0)).square().mean().backward()
    clone = copy.deepcopy(model)  # carries the cached norms; the optimizer hook must reach the copy too
    optimizer = torch.optim.SGD(trainable_parameters(clone), lr=0.5)
    clone(batch(0)).square().mean().backward()
    assert all(layer._dora_norm is not None for _, layer in lora_layers(clone))
    optimizer.step()
    assert all(layer._dora_norm is None for _, layer in lora_layers(clone))
    reference = use_previous_dora(copy.deepcopy(clone))
    with torch.no_grad():
        assert torch.equal(clone(batch(1)), reference(batch(1)))


# --- torch.compile: LoRA, DoRA, QLoRA, QDoRA decoder layers --------------------------------------------------------

KINDS = {"lora": (False, False), "dora": (True, False), "qlora": (False, True), "qdora": (True, True)}
LAYER_TARGETS = ["q_proj", "v_proj", "down_proj"]


def layer_inputs(model: TransformerDecoder, seq: int = 12) -> tuple[torch.Tensor, ...]:
    h = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(seq))
    cos, sin = model.model.rotary_emb(torch.arange(seq).unsqueeze(0).expand(2, -1), h.dtype)
    return h, cos, sin


# Dynamo lets a compiled DoRA layer store its norm on the module (the cache) only with this flag on, since the store
# is a side effect inside activation checkpointing; off (torch's default), compiled layers compute the norm per call.
CACHE_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


@pytest.mark.parametrize("cache_in_graph", [False, True], ids=["norm_per_call", "norm_cached"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_decoder_layer_compiles_fullgraph(kind, cache_in_graph):
    use_dora, quantize_base = KINDS[kind]
    model = tiny_model(use_dora=use_dora, quantize_base=quantize_base, targets=LAYER_TARGETS, layers=1)
    torch._dynamo.reset()
    layer = model.model.layers[0]
    with torch._dynamo.config.patch({CACHE_FLAG: cache_in_graph}):
        first = torch._dynamo.explain(layer)(*layer_inputs(model))
        second = torch._dynamo.explain(layer)(*layer_inputs(model))  # cached: the norm now is an input
    assert (first.graph_count, first.graph_break_count) == (1, 0), first.break_reasons
    assert (second.graph_count, second.graph_break_count) == (1, 0), second.break_reasons
    if use_dora:
        assert (model.model.layers[0].self_attn.q_proj._dora_norm is not None) == cache_in_graph


def compiled_matches_eager(kind: str, backend: str, tolerance: float, *, checkpointing: bool = False,
                           cache_in_graph: bool = False, optimizer=torch.optim.AdamW) -> None:
    """A compiled (fullgraph) 1-layer model trains like the eager one over 2 optimizer steps of 2 micro-batches."""
    use_dora, quantize_base = KINDS[kind]
    eager = tiny_model(use_dora=use_dora, quantize_base=quantize_base, targets=LAYER_TARGETS, layers=1)
    compiled = tiny_model(use_dora=use_dora, quantize_base=quantize_base, targets=LAYER_TARGETS, layers=1)
    if checkpointing:
        apply_activation_checkpointing(eager)
        apply_activation_checkpointing(compiled)
    torch._dynamo.reset()
    compile_layers(compiled, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch({CACHE_FLAG: cache_in_graph}):
        difference = max_difference(train_steps(compiled, micro_batches=2, optimizer=optimizer),
                                    train_steps(eager, micro_batches=2, optimizer=optimizer))
    assert difference <= tolerance, difference


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_layers_match_eager_over_optimizer_steps(kind):
    """aot_eager traces what inductor compiles (the same graphs), in seconds."""
    compiled_matches_eager(kind, "aot_eager", tolerance=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("kind", ["dora", "qdora"])
def test_compiled_cached_norm_matches_eager_over_optimizer_steps(kind, checkpointing):
    """The norm stored by the graph is refreshed after each optimizer step (the hook), with or without the layer
    checkpointed (QLoRA configs checkpoint; the NF4 dequantization is a checkpointed region inside it too)."""
    compiled_matches_eager(kind, "aot_eager", tolerance=1e-6, checkpointing=checkpointing, cache_in_graph=True)


@pytest.mark.parametrize("kind", ["qlora", "qdora"])
def test_compiled_checkpointed_quantized_layers_match_eager(kind):
    compiled_matches_eager(kind, "aot_eager", tolerance=1e-6, checkpointing=True)


@pytest.mark.skipif(os.environ.get("MYTUNE_TEST_INDUCTOR") != "1",
                    reason="inductor compiles for 10-60 s on a CPU; set MYTUNE_TEST_INDUCTOR=1 to run")
@pytest.mark.parametrize("kind", list(KINDS))
def test_inductor_layers_match_eager_over_optimizer_steps(kind):
    """SGD: AdamW's normalisation would turn inductor's last-bit differences in near-zero gradients into ~1e-5
    parameter differences, hiding what is compared (gradients agree to ~1e-9 here)."""
    compiled_matches_eager(kind, "inductor", tolerance=1e-5, cache_in_graph=KINDS[kind][0], optimizer=torch.optim.SGD)
