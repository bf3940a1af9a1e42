"""Activation checkpointing, activation offloading and per-layer compile change memory/speed, never the numbers."""

import copy
import os

import pytest
import torch

from mytune.models.transformer import ModelArgs, TransformerDecoder
from mytune.training.layer_wrappers import (
    ActivationOffloader,
    activation_offloading,
    apply_activation_checkpointing,
    compile_layers,
)
from mytune.training.loss import cross_entropy_sum


def tiny_model(layers: int = 3) -> TransformerDecoder:
    torch.manual_seed(0)
    return TransformerDecoder(ModelArgs(vocab_size=101, hidden_size=32, intermediate_size=96,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))


def loss_and_grads(model, tokens, context=None):
    model.zero_grad(set_to_none=True)
    with context if context is not None else torch.enable_grad():
        loss = cross_entropy_sum(model(tokens), tokens)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(expected, got):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-6, atol=1e-7, msg=name)


class CountSaved:
    """Counts the tensors autograd saves for the backward (outside checkpointed regions)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def _pack(self, t):
        self.count += 1
        return t


def test_activation_checkpointing_keeps_keys_and_gradients_and_saves_less():
    torch.manual_seed(1)
    tokens = torch.randint(0, 101, (2, 16))
    model = tiny_model()
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    with CountSaved() as plain_saved:
        expected = loss_and_grads(model, tokens)

    assert apply_activation_checkpointing(model) == 3
    assert apply_activation_checkpointing(model) == 0  # idempotent
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    with CountSaved() as ckpt_saved:
        got = loss_and_grads(model, tokens)
    assert_same(expected, got)
    assert ckpt_saved.count < plain_saved.count / 3  # layer internals are recomputed, not kept

    # A deep copy's checkpointed layers run the copy's weights, not the original's.
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.model.layers.parameters():
            p.mul_(0.5)
    assert not torch.allclose(clone(tokens), model(tokens))
    assert loss_and_grads(clone, tokens)[1]["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0


def test_every_other_layer():
    model = tiny_model(layers=4)
    assert apply_activation_checkpointing(model, every_n_layers=2) == 2
    assert [hasattr(layer, "_mytune_inner_forward") for layer in model.model.layers] == [True, False, True, False]


def test_activation_offloading_gives_equal_gradients_and_skips_parameters():
    torch.manual_seed(1)
    tokens = torch.randint(0, 101, (2, 16))
    model = tiny_model()
    expected = loss_and_grads(model, tokens)

    with activation_offloading(False) as disabled:
        assert disabled is None
    # On this CPU-only machine nothing is off the CPU: exercise the copy path on CPU tensors.
    context = activation_offloading(True, offload_cpu_tensors=True, min_bytes=0)
    model.zero_grad(set_to_none=True)
    with context as offloader:
        loss = cross_entropy_sum(model(tokens), tokens)
    loss.backward()
    got = (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()})
    assert_same(expected, got)
    assert offloader.offloaded_tensors > 10

    # What stays put: parameters and their views, CPU tensors by default, small tensors.
    hooks = ActivationOffloader(offload_cpu_tensors=True, min_bytes=64)
    weight = model.lm_head.weight
    assert not hooks.should_offload(weight) and not hooks.should_offload(weight.t())
    assert not hooks.should_offload(torch.ones(4))  # 16 bytes
    assert hooks.should_offload(torch.ones(64))
    assert not ActivationOffloader().should_offload(torch.ones(1024))  # already on the CPU
    activation = torch.randn(8, 8)
    packed = hooks.pack(activation)
    assert isinstance(packed, tuple) and packed[1].data_ptr() != activation.data_ptr()
    torch.testing.assert_close(hooks.unpack(packed), activation, rtol=0, atol=0)


def test_checkpointing_and_offloading_together():
    torch.manual_seed(1)
    tokens = torch.randint(0, 101, (2, 16))
    model = tiny_model()
    expected = loss_and_grads(model, tokens)
    apply_activation_checkpointing(model)
    got = loss_and_grads(model, tokens, activation_offloading(True, offload_cpu_tensors=True, min_bytes=0))
    assert_same(expected, got)


def compiled_matches_eager(backend: str, checkpointing: bool):
    torch.manual_seed(1)
    tokens = torch.randint(0, 101, (2, 8))
    model = tiny_model(layers=1)
    expected = loss_and_grads(model, tokens)
    keys = list(model.state_dict())
    if checkpointing:
        apply_activation_checkpointing(model)
    assert compile_layers(model, backend=backend) is model
    got = loss_and_grads(model, tokens)
    assert list(model.state_dict()) == keys  # no `_orig_mod.`
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_compile_layers_with_checkpointing_matches_eager():
    """Dynamo traces each layer (with the checkpoint inside) and AOT autograd builds its backward; `aot_eager` runs
    those graphs without inductor's code generation, which costs 10-30 s on a CPU (see the test below)."""
    compiled_matches_eager("aot_eager", checkpointing=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MYTUNE_TEST_INDUCTOR"),
                    reason="inductor compiles for 10-30 s on a CPU; set MYTUNE_TEST_INDUCTOR=1 to run")
def test_compile_layers_inductor_matches_eager():
    compiled_matches_eager("inductor", checkpointing=False)


def test_activation_offloading_off_a_gpu_says_so_once_and_is_off(capsys):
    from mytune.training.layer_wrappers import use_activation_offloading

    assert use_activation_offloading(True, torch.device("cpu")) is False
    assert "activation_offloading=true has no effect on cpu" in capsys.readouterr().err
    assert use_activation_offloading(False, torch.device("cpu")) is False
    assert capsys.readouterr().err == ""
