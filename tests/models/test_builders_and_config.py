"""Named builders carry the published sizes; ModelArgs <-> HF config.json round trips and matches transformers."""

import dataclasses

import pytest
import torch

from mytune.errors import MytuneError
from mytune.models import MODEL_ARGS, ModelArgs, TransformerDecoder, llama_tiny, model_args

# Parameter counts published for the released checkpoints (tied embeddings counted once).
PUBLISHED_PARAMETER_COUNTS = {
    "llama2_7b": 6_738_415_616,
    "llama3_1_8b": 8_030_261_248,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "mistral_7b": 7_241_732_096,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_0_6b": 596_049_920,
}


def meta_model(args: ModelArgs) -> TransformerDecoder:
    with torch.device("meta"):
        return TransformerDecoder(args)


@pytest.mark.parametrize("name", PUBLISHED_PARAMETER_COUNTS)
def test_builders_have_published_parameter_counts(name):
    assert sum(p.numel() for p in meta_model(model_args(name)).parameters()) == PUBLISHED_PARAMETER_COUNTS[name]


def test_every_builder_matches_the_transformers_model_of_its_config():
    """to_hf_config() -> transformers builds a model with exactly our state-dict keys and shapes, and the same tying."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in MODEL_ARGS:
        args = model_args(name)
        config = AutoConfig.for_model(**args.to_hf_config())
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config)
        ours = meta_model(args)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
        hf_tied = hf.lm_head.weight is hf.model.embed_tokens.weight
        assert hf_tied == args.tie_word_embeddings == (ours.lm_head.weight is ours.model.embed_tokens.weight), name


def test_llama3_builders_use_llama3_rope_scaling():
    assert model_args("llama3_1_8b").rope_scaling["factor"] == 8.0
    assert model_args("llama3_2_1b").rope_scaling["factor"] == 32.0
    for name in ("llama3_1_8b", "llama3_2_3b"):
        args = model_args(name)
        assert (args.rope_theta, args.vocab_size, args.rope_scaling["rope_type"]) == (500000.0, 128256, "llama3")
    assert model_args("llama3_2_1b").tie_word_embeddings and not model_args("llama3_1_8b").tie_word_embeddings


def test_llama_tiny_is_small():
    model = llama_tiny(vocab_size=300)
    assert model.args.vocab_size == 300
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 2_000_000


def test_unknown_builder_name_suggests_close_names():
    with pytest.raises(MytuneError, match="unknown model 'llama3_8b'; did you mean llama3_1_8b"):
        model_args("llama3_8b")


@pytest.mark.parametrize("name", ["llama3_2_1b", "qwen2_5_0_5b", "qwen3_0_6b", "mistral_7b", "llama2_7b"])
def test_hf_config_round_trip(name):
    args = model_args(name)
    resolved = dataclasses.replace(args, head_dim=args.attn_head_dim, num_key_value_heads=args.kv_heads)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == resolved


def test_transformers_reads_our_config_as_written():
    from transformers import AutoConfig

    args = model_args("llama3_2_1b")
    config = AutoConfig.for_model(**args.to_hf_config(torch_dtype="bfloat16"))
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 32.0
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.head_dim == 64 and config.num_key_value_heads == 8 and config.tie_word_embeddings
    # and back: transformers' own serialisation (5.x writes rope_parameters) reads as the same ModelArgs
    assert ModelArgs.from_hf_config(config.to_dict()) == args  # llama3_2_1b spells out head_dim and kv heads


def test_reads_legacy_and_current_rope_layouts():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96,
            "num_hidden_layers": 1, "vocab_size": 100, "max_position_embeddings": 512}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    legacy = ModelArgs.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    current = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                                    **scaling}})
    assert legacy == current
    assert legacy.rope_theta == 5e5 and legacy.rope_scaling == {"rope_type": "llama3", **scaling}
    plain = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4


def test_missing_config_keys_take_transformers_defaults():
    qwen3 = ModelArgs.from_hf_config({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
                                      "intermediate_size": 96, "num_hidden_layers": 1, "vocab_size": 100})
    assert qwen3.head_dim == 128 and qwen3.rms_norm_eps == 1e-6 and qwen3.qk_norm  # Qwen3Config defaults
    qwen2 = ModelArgs.from_hf_config({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                                      "intermediate_size": 96, "num_hidden_layers": 1, "vocab_size": 100})
    assert qwen2.attention_bias and qwen2.attn_head_dim == 16


def test_unsupported_configs_are_one_line_user_errors():
    base = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 1}
    with pytest.raises(MytuneError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        ModelArgs.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(MytuneError, match="hidden_act='gelu'"):
        ModelArgs.from_hf_config({**base, "model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(MytuneError, match="mlp_bias"):
        ModelArgs.from_hf_config({**base, "model_type": "llama", "mlp_bias": True})
    with pytest.raises(MytuneError, match="rope_scaling type 'yarn'"):
        ModelArgs.from_hf_config({**base, "model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_sliding_window_config_as_transformers_reads_it():
    base = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 4,
            "vocab_size": 100}
    mistral = ModelArgs.from_hf_config({**base, "model_type": "mistral"})
    assert mistral.sliding_window == 4096  # MistralConfig's default
    assert ModelArgs.from_hf_config({**base, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    off = ModelArgs.from_hf_config({**base, "model_type": "qwen2", "sliding_window": 32, "max_window_layers": 2})
    assert off.sliding_window is None and off.max_window_layers == 2  # use_sliding_window defaults to false
    on = {**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2}
    args = ModelArgs.from_hf_config(on)
    assert [args.layer_sliding_window(i) for i in range(4)] == [None, None, 32, 32]
    # transformers 5.x writes layer_types; read back, the model is the same
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(**args.to_hf_config())
    assert hf_config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert hf_config.sliding_window == 32
    back = ModelArgs.from_hf_config(hf_config.to_dict())
    assert (back.sliding_window, back.max_window_layers) == (args.sliding_window, args.max_window_layers)


def test_unsupported_sliding_window_configs_are_user_errors():
    base = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2,
            "vocab_size": 100, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}
    with pytest.raises(MytuneError, match="layer_types"):
        ModelArgs.from_hf_config({**base, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(MytuneError, match="sliding_window=8 is not possible for model_type 'llama'"):
        ModelArgs(model_type="llama", sliding_window=8)
    with pytest.raises(MytuneError, match="max_window_layers"):
        ModelArgs(model_type="mistral", sliding_window=8, max_window_layers=1)
