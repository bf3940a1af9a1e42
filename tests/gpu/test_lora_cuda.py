"""LoRA / DoRA / QLoRA / QDoRA on a CUDA device in bf16 (skipped without one): compiled decoder layers (inductor)
against eager, forward and backward; DoRA's cached norm bit for bit against the per-call computation; compiled QLoRA
does not keep dequantized weights for the backward (peak memory no higher than eager's).

benchmarks/gpu_suite.sh runs these (`pytest -m gpu tests`).
"""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules.lora import LoRALinear, apply_lora, lora_layers, trainable_parameters
from mytune.training.layer_wrappers import apply_activation_checkpointing, compile_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

KINDS = {"lora": (False, False), "dora": (True, False), "qlora": (False, True), "qdora": (True, True)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"  # lets compiled DoRA layers keep their norm
VOCAB = 256


def cuda_model(kind: str, *, hidden: int = 256, intermediate: int = 768, layers: int = 2,
               checkpointing: bool = False) -> TransformerDecoder:
    """A seeded bf16 model on the GPU with non-trivial adapters (quantized on the GPU for the q kinds)."""
    use_dora, quantize_base = KINDS[kind]
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2))
    model.to("cuda", torch.bfloat16)
    apply_lora(model, TARGETS, rank=16, alpha=32.0, use_dora=use_dora, quantize_base=quantize_base)
    generator = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator, device="cuda")
                                      * 0.02)
            if use_dora:
                layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features, generator=generator,
                                                            device="cuda") + 0.5)
    if checkpointing:
        apply_activation_checkpointing(model)
    return model.train()


def tokens(index: int, seq: int = 256) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(index)).cuda()


def forward_backward(model: nn.Module, index: int = 0) -> list[torch.Tensor]:
    out = model(tokens(index))
    out.float().logsumexp(-1).mean().backward()
    return [out.detach().float(), *[p.grad.float() for p in trainable_parameters(model)]]


def float32_reference(model: TransformerDecoder) -> TransformerDecoder:
    """`model` in float32 (NF4 weights dequantized exactly to the bf16 values they stand for, then widened)."""
    for _, layer in lora_layers(model):
        if layer.quantized:
            layer.weight = nn.Parameter(layer.dense_weight(torch.float32), requires_grad=False)
            layer.quantized = False
    return model.float()


def assert_as_close_as_eager(compiled: list[torch.Tensor], eager: list[torch.Tensor],
                             reference: list[torch.Tensor]) -> None:
    """Compiled bf16 rounds differently from eager bf16 (fused kernels keep fp32 inside), so both are measured
    against float32: per tensor, compiled's error is at most twice eager's (plus 0.1% of the tensor's scale)."""
    for c, e, r in zip(compiled, eager, reference):
        scale = r.abs().max().clamp_min(1e-12)
        compiled_error, eager_error = ((c - r).abs().max() / scale).item(), ((e - r).abs().max() / scale).item()
        assert compiled_error <= 2 * eager_error + 1e-3, (compiled_error, eager_error)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_compiled_layers_match_eager_bf16(kind, checkpointing):
    eager = cuda_model(kind, checkpointing=checkpointing)
    compiled = cuda_model(kind, checkpointing=checkpointing)
    reference = float32_reference(cuda_model(kind, checkpointing=checkpointing))
    torch._dynamo.reset()
    compile_layers(compiled, fullgraph=True)
    for index in range(2):  # DoRA: the first call computes the norm, the second reuses it
        assert_as_close_as_eager(forward_backward(compiled, index), forward_backward(eager, index),
                                 forward_backward(reference, index))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("kind", ["dora", "qdora"])
def test_cuda_compiled_cached_dora_norm_follows_optimizer_steps(kind, checkpointing):
    """With the norm stored by the graph: 3 steps of 2 micro-batches, losses as eager's (the hook refreshes it)."""
    losses = {}
    for mode in ("eager", "compiled"):
        model = cuda_model(kind, checkpointing=checkpointing)
        if mode == "compiled":
            torch._dynamo.reset()
            compile_layers(model, fullgraph=True)
        optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.5)
        values = []
        with torch._dynamo.config.patch({CACHE_FLAG: True}):
            for step in range(3):
                for micro in range(2):
                    loss = model(tokens(10 * step + micro)).float().logsumexp(-1).mean()
                    loss.backward()
                    values.append(loss.detach())
                optimizer.step()
                optimizer.zero_grad()
        losses[mode] = torch.stack(values)
    assert (losses["compiled"] - losses["eager"]).abs().max() < 2e-2 * losses["eager"].abs().max()


def previous_dora_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """DoRA as computed before the norm cache (PEFT's formula, the norm recomputed at every call)."""
    result = F.linear(x, self.weight, self.bias)
    weight = self.dense_weight(x.dtype)
    base_result = result if self.bias is None else result - self.bias
    lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype).detach()
    weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype).detach()
    mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
    lora_result = self.lora_B(self.lora_A(x))
    return result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling)


@pytest.mark.parametrize("kind", ["dora", "qdora"])
def test_cuda_dora_cached_norm_is_bitwise_the_previous_computation(kind):
    runs = []
    for previous in (False, True):
        model = cuda_model(kind)
        if previous:
            for _, layer in lora_layers(model):
                layer.forward = types.MethodType(previous_dora_forward, layer)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
        numbers = []
        for step in range(2):
            for micro in range(3):
                numbers.extend(forward_backward(model, 10 * step + micro)[:1])
            numbers.extend(p.grad.clone() for p in trainable_parameters(model))
            optimizer.step()
            optimizer.zero_grad()
        runs.append(numbers)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("kind", ["qlora", "qdora"])
def test_cuda_compiled_qlora_keeps_no_dequantized_weights(kind):
    """Peak memory of a forward+backward without activation checkpointing: compiled <= eager (+5%). Compiled, the
    NF4 dequantization is recomputed in the backward, not saved (it would add every dense weight to the peak)."""
    peaks = {}
    for mode in ("eager", "compiled"):
        model = cuda_model(kind, hidden=2048, intermediate=5632, layers=2)
        if mode == "compiled":
            torch._dynamo.reset()
            compile_layers(model, fullgraph=True)
            forward_backward(model)  # compile outside the measurement
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(model)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del model
        torch.cuda.empty_cache()
    assert peaks["compiled"] <= 1.05 * peaks["eager"], peaks
