"""One decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) whose state dict matches Hugging Face's.

Per-family differences are data (`FAMILIES`), not subclasses: which biases exist, whether q/k are normalised,
how config.json states a sliding window, what the HF config class defaults are and which extra keys it carries.
"""

import copy
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from mytune.errors import MytuneError
from mytune.modules.attention import (
    Attention,
    AttentionMask,
    causal_block_mask,
    check_backend,
    choose_backend,
    document_block_mask,
    document_causal_mask,
)
from mytune.modules.kv_cache import KVCache
from mytune.modules.mlp import SwiGLUMLP
from mytune.modules.rms_norm import RMSNorm
from mytune.modules.rope import RotaryEmbedding, check_rope_scaling, rope_type


@dataclass(frozen=True)
class Family:
    """What distinguishes one HF model family from another, for this architecture."""

    architecture: str                    # the `architectures` entry of config.json
    attention_bias: bool | None = None   # forced qkv-bias value (qwen2 always, mistral never); None: from config
    o_proj_bias_follows_qkv: bool = True  # llama/qwen3: `attention_bias` also biases o_proj; qwen2: it does not
    qk_norm: bool = False                # qwen3: per-head RMSNorm on q and k
    # How config.json states a sliding window: None (the family has none), "mistral" (`sliding_window` on every
    # layer), "qwen" (`use_sliding_window` + `sliding_window`, on the layers from `max_window_layers` on).
    sliding_window_style: str | None = None
    hf_defaults: dict = field(default_factory=dict)      # HF config-class defaults for keys a config.json may omit
    hf_extra_config: dict = field(default_factory=dict)  # fixed keys written to config.json for this family


_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False}
_QWEN_WINDOW_DEFAULTS = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM",
        hf_defaults={**_COMMON_DEFAULTS, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
        hf_extra_config={"mlp_bias": False, "pretraining_tp": 1},
    ),
    "mistral": Family(
        "MistralForCausalLM",
        attention_bias=False,
        sliding_window_style="mistral",
        hf_defaults={**_COMMON_DEFAULTS, "max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2,
                     "sliding_window": 4096},
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        attention_bias=True,
        o_proj_bias_follows_qkv=False,
        sliding_window_style="qwen",
        hf_defaults={**_COMMON_DEFAULTS, **_QWEN_WINDOW_DEFAULTS, "max_position_embeddings": 32768,
                     "bos_token_id": None, "eos_token_id": None},
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        qk_norm=True,
        sliding_window_style="qwen",
        hf_defaults={**_COMMON_DEFAULTS, **_QWEN_WINDOW_DEFAULTS, "max_position_embeddings": 32768,
                     "bos_token_id": None, "eos_token_id": None, "head_dim": 128},
    ),
}


def _family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise MytuneError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


@dataclass
class ModelArgs:
    """Hyper-parameters of a `TransformerDecoder`; field names follow HF config.json so the mapping is 1:1."""

    model_type: str = "llama"        # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None      # None -> = num_attention_heads
    head_dim: int | None = None                 # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None            # llama3 style {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False                # qkv bias (qwen2)
    qk_norm: bool = False                       # per-head RMSNorm on q and k (qwen3)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Sliding-window attention (mistral, qwen2, qwen3): a query sees the last `sliding_window` positions, itself
    # included; None = full causal attention. Layers below `max_window_layers` attend fully anyway (qwen's rule;
    # 0 = every layer slides, mistral's). As transformers reads config.json: a qwen `use_sliding_window=false`
    # means sliding_window None here.
    sliding_window: int | None = None
    max_window_layers: int = 0
    # The source checkpoint's config.json / generation_config.json as read (None for a random start): a save keeps
    # every key of them and rewrites only what these args own (`checkpoint.hf.config_to_save`). Not model
    # hyper-parameters: left out of equality and repr.
    hf_config: dict | None = field(default=None, compare=False, repr=False)
    hf_generation_config: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        family = _family(self.model_type)
        if family.attention_bias is not None and self.attention_bias != family.attention_bias:
            raise MytuneError(f"model_type {self.model_type!r} needs attention_bias={family.attention_bias}")
        if self.qk_norm != family.qk_norm:
            raise MytuneError(f"model_type {self.model_type!r} needs qk_norm={family.qk_norm}")
        check_rope_scaling(self.rope_scaling)
        if self.num_attention_heads % self.kv_heads:
            raise MytuneError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.kv_heads})")
        if self.sliding_window is not None and (family.sliding_window_style is None or self.sliding_window < 1):
            raise MytuneError(f"sliding_window={self.sliding_window} is not possible for model_type "
                              f"{self.model_type!r}" + ("" if family.sliding_window_style else " (it has none)"))
        if self.max_window_layers and family.sliding_window_style != "qwen":
            raise MytuneError(f"max_window_layers is a qwen2/qwen3 option, not one of model_type {self.model_type!r}")

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx` (None: full causal attention)."""
        return self.sliding_window if layer_idx >= self.max_window_layers else None

    @property
    def kv_heads(self) -> int:
        """`num_key_value_heads` with its default resolved."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """`head_dim` with its default resolved."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and FAMILIES[self.model_type].o_proj_bias_follows_qkv

    @classmethod
    def from_hf_config(cls, config: dict, generation_config: dict | None = None) -> "ModelArgs":
        """Read an HF config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`); the
        dicts (and generation_config.json's, when given) are kept as `hf_config` / `hf_generation_config`."""
        model_type = config.get("model_type")
        family = _family(model_type)
        _check_supported_hf_options(config)
        cfg = {**family.hf_defaults, **config}
        rope_theta, rope_scaling = _hf_rope(cfg)
        if family.attention_bias is not None:
            cfg["attention_bias"] = family.attention_bias
        sliding_window, max_window_layers = _hf_sliding_window(cfg, family)
        names = {f.name for f in fields(cls)} - {"model_type", "rope_theta", "rope_scaling", "qk_norm",
                                                 "sliding_window", "max_window_layers", "hf_config",
                                                 "hf_generation_config"}
        return cls(model_type=model_type, rope_theta=rope_theta, rope_scaling=rope_scaling, qk_norm=family.qk_norm,
                   sliding_window=sliding_window, max_window_layers=max_window_layers,
                   hf_config=copy.deepcopy(config), hf_generation_config=copy.deepcopy(generation_config),
                   **{name: cfg[name] for name in names if name in cfg})

    def to_hf_config(self, torch_dtype: str = "float32") -> dict:
        """A config.json dict that transformers 4.45+ and 5.x `AutoModelForCausalLM` load as this exact model."""
        family = FAMILIES[self.model_type]
        rope_parameters = {"rope_type": rope_type(self.rope_scaling), **(self.rope_scaling or {}),
                           "rope_theta": self.rope_theta}
        config = {
            "architectures": [family.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.attn_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,                       # transformers 4.x
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,                  # transformers 5.x
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": torch_dtype,
            **family.hf_extra_config,
        }
        if family.attention_bias is None:
            config["attention_bias"] = self.attention_bias
        if family.sliding_window_style == "mistral":
            config["sliding_window"] = self.sliding_window
        elif family.sliding_window_style == "qwen":
            config.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                          max_window_layers=self.max_window_layers)
        return config


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config layout; `rope_scaling` is None for plain RoPE."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    kind = params.get("rope_type", "default")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return theta, params


def _hf_sliding_window(cfg: dict, family: Family) -> tuple[int | None, int]:
    """(sliding_window, max_window_layers) with transformers' semantics: mistral slides on every layer when
    `sliding_window` is set; qwen2/qwen3 only with `use_sliding_window`, on the layers named "sliding_attention" by
    `layer_types`, which defaults to the layers from `max_window_layers` on."""
    if family.sliding_window_style is None:
        return None, 0
    window = cfg.get("sliding_window")
    if family.sliding_window_style == "mistral":
        return window, 0
    if window is None or not cfg.get("use_sliding_window"):
        return None, cfg["max_window_layers"]
    num_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        return window, cfg["max_window_layers"]
    num_full = layer_types.count("full_attention")
    expected = ["full_attention"] * num_full + ["sliding_attention"] * (num_layers - num_full)
    if list(layer_types) != expected:
        raise MytuneError(f"config.json layer_types {layer_types} is not supported; only full-attention layers "
                          f"followed by sliding-attention layers")
    return window, num_full


def _check_supported_hf_options(config: dict) -> None:
    """Refuse HF options this architecture does not implement, rather than load a silently different model."""
    if config.get("hidden_act", "silu") != "silu":
        raise MytuneError(f"config.json hidden_act={config['hidden_act']!r} is not supported; only 'silu'")
    if config.get("mlp_bias"):
        raise MytuneError("config.json mlp_bias=true is not supported")
    rope_params = config.get("rope_parameters") or {}
    if config.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise MytuneError("config.json partial_rotary_factor != 1 is not supported")


class DecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, args: ModelArgs, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(
            hidden_size=args.hidden_size, num_heads=args.num_attention_heads, num_kv_heads=args.kv_heads,
            head_dim=args.attn_head_dim, qkv_bias=args.attention_bias, o_bias=args.o_proj_bias,
            qk_norm=args.qk_norm, norm_eps=args.rms_norm_eps, sliding_window=args.layer_sliding_window(layer_idx),
        )
        self.mlp = SwiGLUMLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, layer_idx: int = 0,
                attn_mask: AttentionMask | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer_idx, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """Everything under HF's `model.` prefix: embeddings, layers, final norm (and the RoPE tables)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, idx) for idx in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.attn_head_dim, args.rope_theta, args.rope_scaling)


class TransformerDecoder(nn.Module):
    """Decoder-only language model; `state_dict()` keys equal HF `LlamaForCausalLM`'s (`model.layers.0...`).

    With `tie_word_embeddings`, `lm_head.weight` is the very same Parameter as `model.embed_tokens.weight`.

    `attention_backend` ("auto" | "sdpa" | "flex"; an attribute, so a recipe or benchmark may set it after building)
    picks how masked attention runs (`modules.attention.choose_backend`): "auto" uses compiled flex attention with a
    block mask for packed rows or a sliding window on CUDA and SDPA otherwise; "sdpa" forces the dense-mask SDPA
    path (the reference; the fast path off); "flex" forces flex wherever no KV cache is used (on the CPU: forward
    only, flex has no CPU backward in torch 2.13). Unpacked rows without a window always take SDPA `is_causal`
    under "auto"; KV-cache decoding always takes SDPA.
    """

    def __init__(self, args: ModelArgs, attention_backend: str = "auto") -> None:
        super().__init__()
        check_backend(attention_backend)
        self.args = args
        self.attention_backend = attention_backend
        self.model = DecoderBody(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Make `lm_head.weight` the embedding matrix itself (call again after replacing either parameter)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """HF's initialisation: linear and embedding weights ~ N(0, std), biases 0, norms 1; RoPE tables rebuilt."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if not (module is self.lm_head and self.args.tie_word_embeddings):
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def forward(self, tokens: torch.LongTensor, position_ids: torch.LongTensor | None = None,
                kv_cache: KVCache | None = None, document_ids: torch.LongTensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """`tokens` `[batch, seq]` -> logits `[batch, seq, vocab]` in the model's dtype.

        `position_ids` default to `0..seq-1` (after the cached positions when a `kv_cache` is given, which is then
        filled with this call's keys/values). `document_ids` `[batch, seq]` mark the samples of packed rows: attention
        then stays inside each sample (pass `position_ids` restarting per sample too).

        With `return_hidden`, the final-normed hidden states `[batch, seq, hidden]` come back instead of logits (the
        `lm_head` is not applied), for `training.loss.chunked_cross_entropy_sum`, which applies `lm_head.weight` a
        chunk of tokens at a time so the full `[batch, seq, vocab]` logits never exist.
        """
        batch, seq = tokens.shape
        num_past = kv_cache.seq_len if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(num_past, num_past + seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
        masks = self.attention_masks(seq, tokens.device, document_ids, kv_cache is not None)
        h = self.model.embed_tokens(tokens)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)
        for layer_idx, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, kv_cache, layer_idx, masks[layer.self_attn.sliding_window])
        if kv_cache is not None:
            kv_cache.advance(seq)
        h = self.model.norm(h)
        return h if return_hidden else self.lm_head(h)

    def attention_masks(self, seq: int, device: torch.device, document_ids: torch.Tensor | None = None,
                        with_cache: bool = False) -> dict[int | None, AttentionMask | None]:
        """One mask per distinct layer window (None: full attention), built once per forward and shared by the
        layers of that window: a `BlockMask` (flex), a dense bool mask (packed rows on SDPA) or None (SDPA
        `is_causal`, or the window / KV-cache masking the attention layer does itself)."""
        windows = {layer.self_attn.sliding_window for layer in self.model.layers}
        if with_cache:
            if document_ids is not None:
                raise ValueError("document_ids (packed sequences) cannot be combined with a kv_cache")
            return dict.fromkeys(windows)
        cuts = {window: window if window is not None and window < seq else None for window in windows}  # >= seq: no cut
        built = {cut: self._attention_mask(seq, device, document_ids, cut) for cut in set(cuts.values())}
        return {window: built[cut] for window, cut in cuts.items()}

    def _attention_mask(self, seq: int, device: torch.device, document_ids: torch.Tensor | None,
                        window: int | None) -> AttentionMask | None:
        backend = choose_backend(self.attention_backend, device, packed=document_ids is not None,
                                 sliding_window=window)
        if backend == "flex":
            return document_block_mask(document_ids, window) if document_ids is not None else \
                causal_block_mask(seq, window, device)
        return document_causal_mask(document_ids, window) if document_ids is not None else None
