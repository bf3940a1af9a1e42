"""The decoder transformer, its hyper-parameters, and named builders."""

from mytune.models.builders import (
    MODEL_ARGS,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama3_1_8b,
    llama3_1_70b,
    llama3_2_1b,
    llama3_2_3b,
    llama_tiny,
    mistral_7b,
    model_args,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen3_0_6b,
    qwen3_1_7b,
    qwen3_4b,
    qwen3_8b,
)
from mytune.models.transformer import FAMILIES, ModelArgs, TransformerDecoder

__all__ = [
    "FAMILIES", "MODEL_ARGS", "ModelArgs", "TransformerDecoder", "llama2_7b", "llama2_13b", "llama2_70b",
    "llama3_1_8b", "llama3_1_70b", "llama3_2_1b", "llama3_2_3b", "llama_tiny", "mistral_7b", "model_args",
    "qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b", "qwen2_5_7b", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b",
]
