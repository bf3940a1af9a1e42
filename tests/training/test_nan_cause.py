"""check_finite names the likely cause of a non-finite loss: weights damaged in the checkpoint are not an lr problem."""

import pytest
import torch

from mytune.checkpoint import load_hf_model, save_hf_checkpoint
from mytune.errors import MytuneError
from mytune.models import ModelArgs, TransformerDecoder
from mytune.training.loss import cross_entropy_sum
from mytune.training.safety import check_finite

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32)


def tiny_model(bad: float | None = None) -> TransformerDecoder:
    torch.manual_seed(0)
    model = TransformerDecoder(ModelArgs(**TINY))
    if bad is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = bad
    return model


def loss_of(model) -> torch.Tensor:
    tokens = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        return cross_entropy_sum(model(tokens), tokens)


def error(loss, step, **kwargs) -> str:
    with pytest.raises(MytuneError) as info:
        check_finite(loss, step, **kwargs)
    print(info.value)
    return str(info.value)


def test_inf_weights_in_the_checkpoint_say_damaged_not_lower_lr(tmp_path):
    save_hf_checkpoint(tiny_model(bad=float("inf")), tmp_path / "model", dtype=torch.float32)
    model = load_hf_model(tmp_path / "model")
    loss = loss_of(model)
    assert not torch.isfinite(loss)
    message = error(loss, 1, lr=3e-3, model=model)
    assert "inf in model.layers.0.mlp.down_proj.weight" in message
    assert "checkpoint the run started from is damaged" in message and "lower lr" not in message


def test_a_resumed_checkpoint_holding_nan_is_named(tmp_path):
    model = tiny_model(bad=float("nan"))
    message = error(float("nan"), 5, last_checkpoint=tmp_path / "step_4", lr=1e-4, model=model)
    assert "nan in model.layers.0.mlp.down_proj.weight" in message
    assert f"the checkpoint {tmp_path / 'step_4'} they came from: it is damaged" in message


def test_weights_that_turned_non_finite_during_training_are_divergence(tmp_path):
    model = tiny_model(bad=float("nan"))
    message = error(float("nan"), 9, last_checkpoint=tmp_path / "step_4", lr=1e-4, model=model)
    assert "training diverged in an earlier update (the weights hold nan in model.layers.0.mlp.down_proj.weight)" \
        in message and "lower lr (now 0.0001)" in message
    assert f"the last good checkpoint is {tmp_path / 'step_4'}" in message


def test_finite_weights_keep_the_divergence_message():
    message = error(float("inf"), 3, lr=2e-4, model=tiny_model())
    assert message == ("loss is inf at step 3: training diverged; lower lr (now 0.0002) or set max_grad_norm; "
                       "no checkpoint was saved before it")
