"""float8 training (torchao): which layers convert, that names stay HF's, that the numbers stay close, and the
one-line refusals where float8 cannot run. The float8 casts are emulated on the CPU (`emulate=True`); the real
tensor-core path is tests/gpu/test_training_cuda.py."""

import copy

import pytest
import torch

from mytune.errors import ConfigError
from mytune.models.transformer import ModelArgs, TransformerDecoder
from mytune.training.float8 import check_float8_supported, convert_to_float8
from mytune.training.loss import chunked_cross_entropy_sum


def tiny_model() -> TransformerDecoder:
    torch.manual_seed(0)
    return TransformerDecoder(ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_converts_the_decoder_blocks_linears_only_and_keeps_the_state_dict():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert convert_to_float8(model, emulate=True) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Float8Linear"
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)


def test_layers_whose_dimensions_are_not_multiples_of_16_stay_in_high_precision():
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(vocab_size=64, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    convert_to_float8(model, emulate=True)
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate_proj) is torch.nn.Linear and type(mlp.down_proj) is torch.nn.Linear  # 72 % 16 != 0
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Float8Linear"  # 48 x 48


def test_emulated_float8_training_follows_the_high_precision_run():
    """Five AdamW steps on the same batch: float8 (emulated) losses stay within 1% of fp32's while both
    fall, i.e. the converted model trains the same weights the same way, at float8's precision."""
    reference = tiny_model()
    converted = copy.deepcopy(reference)
    convert_to_float8(converted, emulate=True)
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("fp32", reference), ("float8", converted)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(5):
            loss = chunked_cross_entropy_sum(model(tokens, return_hidden=True), model.lm_head.weight, tokens) / 126
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    print("fp32 losses", losses["fp32"], "float8 (emulated)", losses["float8"])
    assert losses["float8"][-1] < losses["float8"][0] - 0.1
    for ours, ref in zip(losses["float8"], losses["fp32"]):
        assert abs(ours - ref) < 0.01 * ref


def test_float8_is_refused_in_one_line_off_a_capable_gpu():
    with pytest.raises(ConfigError, match=r"float8=true needs .*compute capability 8.9\+.*set float8=false"):
        check_float8_supported(torch.device("cpu"))


def test_float8_with_device_cpu_is_a_params_error():
    from recipes.params.full_finetune_distributed import FullFinetuneDistributedParams
    from recipes.params.full_finetune_single_device import FullFinetuneParams

    for params in (FullFinetuneParams, FullFinetuneDistributedParams):
        with pytest.raises(ConfigError, match="float8=true needs an NVIDIA GPU.*device=cpu"):
            params(model="llama_tiny", tokenizer_path="t", dataset_path="d", device="cpu", float8=True)
