"""Named model builders with the published hyper-parameters of each checkpoint's config.json.

Each builder returns a randomly initialised `TransformerDecoder` (wrap the call in `torch.device("meta")` to build
without allocating); `model_args(name)` gives the bare `ModelArgs`. Values follow the base (not instruct) models.
"""

import dataclasses
import difflib
from collections.abc import Callable

from mytune.errors import MytuneError
from mytune.models.transformer import ModelArgs, TransformerDecoder

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3_2_ROPE = {**_LLAMA3_ROPE, "factor": 32.0}


def _llama2(**kw) -> ModelArgs:
    return ModelArgs(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, **kw)


def _llama3(**kw) -> ModelArgs:
    return ModelArgs(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                     max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, **kw)


# Qwen2.5 / Qwen3 ship with use_sliding_window=false (sliding_window None here); max_window_layers is then
# irrelevant and set to the layer count, so no layer would slide if a window were switched on.
def _qwen2_5(**kw) -> ModelArgs:
    return ModelArgs(model_type="qwen2", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     bos_token_id=151643, eos_token_id=151643, max_window_layers=kw["num_hidden_layers"], **kw)


def _qwen3(**kw) -> ModelArgs:
    return ModelArgs(model_type="qwen3", qk_norm=True, vocab_size=151936, head_dim=128, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                     max_window_layers=kw["num_hidden_layers"], **kw)


MODEL_ARGS: dict[str, Callable[[], ModelArgs]] = {
    "llama2_7b": lambda: _llama2(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32),
    "llama2_13b": lambda: _llama2(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40),
    "llama2_70b": lambda: _llama2(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8),
    "llama3_1_8b": lambda: _llama3(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, rope_scaling=dict(_LLAMA3_ROPE)),
    "llama3_1_70b": lambda: _llama3(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, rope_scaling=dict(_LLAMA3_ROPE)),
    "llama3_2_1b": lambda: _llama3(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_2_ROPE)),
    "llama3_2_3b": lambda: _llama3(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                   tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_2_ROPE)),
    # Mistral-7B-v0.1, with its 4096-token sliding window on every layer.
    "mistral_7b": lambda: ModelArgs(model_type="mistral", vocab_size=32000, hidden_size=4096,
                                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                                    max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                                    sliding_window=4096),
    "qwen2_5_0_5b": lambda: _qwen2_5(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                     max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2_5_1_5b": lambda: _qwen2_5(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                     max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen2_5_3b": lambda: _qwen2_5(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                   num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                   max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2_5_7b": lambda: _qwen2_5(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                   max_position_embeddings=131072),
    "qwen3_0_6b": lambda: _qwen3(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3_1_7b": lambda: _qwen3(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3_4b": lambda: _qwen3(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3_8b": lambda: _qwen3(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8),
}


def _tiny_args(vocab_size: int = 512) -> ModelArgs:
    return ModelArgs(model_type="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


MODEL_ARGS["llama_tiny"] = _tiny_args


def tiny_variant(args: ModelArgs, vocab_size: int = 512) -> ModelArgs:
    """A few-hundred-thousand-parameter model of the same family as `args`, for smoke tests of real configs.

    Keeps what distinguishes the family (model type, rope scaling and theta, qkv bias, q/k norm, tied embeddings,
    grouped-query ratio, sliding window) and shrinks every size (the window too, to at most 64 tokens, so that short
    test sequences exercise it; the first `max_window_layers` layers, at most one of the two, still attend fully).
    """
    group = max(1, args.num_attention_heads // args.kv_heads)
    heads = 4 if group <= 4 else group
    return dataclasses.replace(
        args, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // group), head_dim=16,
        max_position_embeddings=min(args.max_position_embeddings, 2048), bos_token_id=1, eos_token_id=2,
        sliding_window=None if args.sliding_window is None else min(args.sliding_window, 64),
        max_window_layers=min(args.max_window_layers, 1),
    )


def model_args(name: str) -> ModelArgs:
    """The `ModelArgs` of a named builder; `<name>_tiny` is `tiny_variant` of `<name>`.

    An unknown name raises MytuneError with the closest names.
    """
    if name.endswith("_tiny") and name[: -len("_tiny")] in MODEL_ARGS:
        return tiny_variant(MODEL_ARGS[name[: -len("_tiny")]]())
    if name not in MODEL_ARGS:
        close = difflib.get_close_matches(name, MODEL_ARGS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(MODEL_ARGS))}"
        raise MytuneError(f"unknown model {name!r}; {hint}")
    return MODEL_ARGS[name]()


def llama2_7b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama2_7b"))


def llama2_13b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama2_13b"))


def llama2_70b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama2_70b"))


def llama3_1_8b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama3_1_8b"))


def llama3_1_70b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama3_1_70b"))


def llama3_2_1b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama3_2_1b"))


def llama3_2_3b() -> TransformerDecoder:
    return TransformerDecoder(model_args("llama3_2_3b"))


def mistral_7b() -> TransformerDecoder:
    return TransformerDecoder(model_args("mistral_7b"))


def qwen2_5_0_5b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen2_5_0_5b"))


def qwen2_5_1_5b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen2_5_1_5b"))


def qwen2_5_3b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen2_5_3b"))


def qwen2_5_7b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen2_5_7b"))


def qwen3_0_6b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen3_0_6b"))


def qwen3_1_7b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen3_1_7b"))


def qwen3_4b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen3_4b"))


def qwen3_8b() -> TransformerDecoder:
    return TransformerDecoder(model_args("qwen3_8b"))


def llama_tiny(vocab_size: int = 512) -> TransformerDecoder:
    """A ~1M-parameter Llama (4 layers, 128 wide, GQA 4/2) for the CPU demo and tests."""
    return TransformerDecoder(_tiny_args(vocab_size))
