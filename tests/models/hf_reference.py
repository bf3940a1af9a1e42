"""Tiny randomly initialised transformers models, one per supported family, as numerical references.

Every parameter (norm weights and biases included) is randomised, so a mapping mistake cannot hide behind a
weight that happens to be 1 or 0.
"""

import torch

# name -> (transformers config class name, config kwargs). Together they cover GQA, tied embeddings, llama3 rope
# scaling, qkv bias, q/k norm and a head_dim that is not hidden_size // num_attention_heads.
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama3_gqa_scaled_rope": ("LlamaConfig", dict(
        COMMON, head_dim=24, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama_tied_mha_bias": ("LlamaConfig", dict(COMMON, num_key_value_heads=4, tie_word_embeddings=True,
                                                attention_bias=True)),
    "mistral": ("MistralConfig", dict(COMMON, rope_theta=1e6, sliding_window=None)),
    "qwen2_bias_tied": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3_qk_norm_head_dim": ("Qwen3Config", dict(COMMON, head_dim=40, rope_theta=1e6)),
}
# Sliding-window attention with a window (16) shorter than the test sequences: mistral slides on every layer; qwen2
# and qwen3 from layer `max_window_layers` on (layer 0 full, layer 1 sliding, as transformers' config derives).
WINDOW = 16
SLIDING_CONFIGS: dict[str, tuple[str, dict]] = {
    "mistral_sliding": ("MistralConfig", dict(COMMON, rope_theta=1e6, sliding_window=WINDOW)),
    "qwen2_sliding": ("Qwen2Config", dict(COMMON, rope_theta=1e6, use_sliding_window=True, sliding_window=WINDOW,
                                          max_window_layers=1)),
    "qwen3_sliding": ("Qwen3Config", dict(COMMON, head_dim=40, rope_theta=1e6, use_sliding_window=True,
                                          sliding_window=WINDOW, max_window_layers=1)),
}


def make_hf_model(family: str, attn_implementation: str = "eager", seed: int = 0):
    """A transformers causal LM for `family`, float32, eval mode, every parameter random."""
    import transformers

    config_class, kwargs = {**FAMILY_CONFIGS, **SLIDING_CONFIGS}[family]
    config = getattr(transformers, config_class)(**kwargs, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomize_(model)
    return model


def ours_from_hf(hf_model):
    """A TransformerDecoder with the transformers model's config and weights (state dict copied directly)."""
    from mytune.models import ModelArgs, TransformerDecoder

    model = TransformerDecoder(ModelArgs.from_hf_config(hf_model.config.to_dict()))
    model.load_state_dict(hf_model.state_dict())
    if model.args.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    """Random weights everywhere: matrices ~ N(0, 0.1), 1-D tensors (norms, biases) ~ U(0.5, 1.5) and N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def random_tokens(vocab_size: int = 320, batch: int = 2, seq: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
