"""LoRA/DoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

A directory written here loads with `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
adapter_dir)` and gives the same logits as the mytune model it came from. Keys are PEFT's: the model key with the
`base_model.model.` prefix (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, DoRA's
`...q_proj.lora_magnitude_vector`). `load_peft_adapter` reads such a directory back (ours or one PEFT wrote).
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mytune.checkpoint.atomic import atomic_directory
from mytune.checkpoint.hf import damaged_weights_error, hf_to_mytune_key, mytune_to_hf_key, read_json_file
from mytune.errors import MytuneError
from mytune.models.transformer import TransformerDecoder
from mytune.config.names import LORA_TARGETS, resolve_lora_targets
from mytune.modules.lora import apply_lora, lora_layers, lora_state_dict

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def lora_settings(model: TransformerDecoder) -> dict[str, Any]:
    """The adapter's hyper-parameters read off the model's LoRA layers: target_modules, r, lora_alpha, lora_dropout,
    use_dora (the layers all share them, as `apply_lora` makes them)."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers (call apply_lora first)")
    settings = {(layer.rank, layer.alpha, layer.dropout, layer.use_dora) for _, layer in layers}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (rank, alpha, dropout, use_dora): {sorted(settings)}")
    rank, alpha, dropout, use_dora = settings.pop()
    wrapped = {name.rpartition(".")[2] for name, _ in layers}
    return {"target_modules": [name for name in LORA_TARGETS if name in wrapped], "r": rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
            "use_dora": use_dora}


def save_peft_adapter(model: TransformerDecoder, out_dir: str | Path, base_model_name_or_path: str = "",
                      targets: list[str] | None = None, rank: int | None = None, alpha: float | None = None,
                      dropout: float | None = None, use_dora: bool | None = None, *,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the model's adapter as a PEFT LoRA adapter directory (atomically); returns `out_dir`.

    The hyper-parameters are read off the LoRA layers; the ones passed are checked against them (a mismatch is a
    bug: the config would describe a different adapter than the weights). Tensors are written in `dtype`
    (default: as trained).
    """
    settings = lora_settings(model)
    given = {"target_modules": resolve_lora_targets(targets) if targets is not None else None, "r": rank,
             "lora_alpha": alpha, "lora_dropout": dropout, "use_dora": use_dora}
    for key, value in given.items():
        if value is not None and value != settings[key]:
            raise ValueError(f"save_peft_adapter: {key}={value!r} but the model's LoRA layers have {settings[key]!r}")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path) or None,
        **settings,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    model_type = model.args.model_type
    tensors = {PEFT_KEY_PREFIX + mytune_to_hf_key(model_type, key): t.detach().to("cpu", dtype or t.dtype).contiguous()
               for key, t in lora_state_dict(model).items()}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter, checked for options mytune does not implement."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise MytuneError(f"{path} not found: an adapter directory holds adapter_config.json and "
                          f"{ADAPTER_WEIGHTS_NAME}")
    config = read_json_file(path, ADAPTER_CONFIG_NAME)
    if not isinstance(config, dict):
        raise MytuneError(f"{path}: must be a JSON object of settings, got a {type(config).__name__}; the file is "
                          "damaged: copy it again")
    if config.get("peft_type") != "LORA":
        raise MytuneError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if not isinstance(config.get("target_modules"), list):
        raise MytuneError(f"{path}: target_modules must be a list of module names, got "
                          f"{config.get('target_modules')!r}")
    unsupported = {"use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                   "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    for key, default in unsupported.items():
        if config.get(key) is not None and config[key] != default:
            raise MytuneError(f"{path}: {key}={config[key]!r} is not supported (only {default!r})")
    for key, expected in (("r", "a positive integer"), ("lora_alpha", "a positive number")):
        value = config.get(key)
        kinds = int if key == "r" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not (math.isfinite(value) and value > 0):
            raise MytuneError(f"{path}: {key} must be {expected}, got {value!r}; the file is damaged: copy it again")
    return config


def load_peft_adapter(model: TransformerDecoder, adapter_dir: str | Path) -> TransformerDecoder:
    """Load a PEFT LoRA adapter into `model` (in place) and return it.

    A model without LoRA layers gets them first (`apply_lora` with the adapter's settings); one that has them must
    match the adapter's rank, alpha and use_dora. Missing, unexpected or mis-shaped tensors raise MytuneError.
    PEFT's copies of base weights (`...base_layer.weight`, written for targeted heads) are ignored.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise MytuneError(f"{path} not found")
    rank, alpha, use_dora = config["r"], config["lora_alpha"], bool(config.get("use_dora", False))
    if not any(True for _ in lora_layers(model)):
        apply_lora(model, config["target_modules"], rank=rank, alpha=alpha,
                   dropout=config.get("lora_dropout", 0.0), use_dora=use_dora)
    else:
        for name, layer in lora_layers(model):
            if (layer.rank, layer.scaling, layer.use_dora) != (rank, alpha / rank, use_dora):
                raise MytuneError(f"{adapter_dir}: adapter has r={rank}, lora_alpha={alpha}, use_dora={use_dora} but "
                                  f"{name} has r={layer.rank}, lora_alpha={layer.alpha}, use_dora={layer.use_dora}")

    expected = {key: model.get_parameter(key) for key in lora_state_dict(model)}
    try:
        loaded = _copy_adapter_tensors(path, model, expected)
    except (SafetensorError, OSError) as err:
        raise damaged_weights_error(path, err) from None
    missing = [key for key in expected if key not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        peft_key = PEFT_KEY_PREFIX + mytune_to_hf_key(model.args.model_type, missing[0])
        raise MytuneError(f"{path}: missing key {peft_key!r}{more}")
    return model


def _copy_adapter_tensors(path: Path, model: TransformerDecoder, expected: dict[str, torch.Tensor]) -> set[str]:
    """Copy the adapter file's tensors into the model's LoRA parameters (`expected`); returns the keys loaded."""
    loaded = set()
    with safe_open(path, framework="pt") as f, torch.no_grad():
        for peft_key in f.keys():
            if not peft_key.startswith(PEFT_KEY_PREFIX):
                raise MytuneError(f"{path.name}: key {peft_key!r} does not start with {PEFT_KEY_PREFIX!r}")
            if ".base_layer." in peft_key:
                continue
            key = hf_to_mytune_key(model.args.model_type, peft_key[len(PEFT_KEY_PREFIX):])
            if key not in expected:
                raise MytuneError(f"{path.name}: unexpected key {peft_key!r} (adapter_config.json and weights "
                                  f"disagree, or the adapter belongs to another model)")
            tensor = f.get_tensor(peft_key)
            if tensor.shape != expected[key].shape:
                raise MytuneError(f"{path.name}: {peft_key!r} has shape {tuple(tensor.shape)} but the model expects "
                                  f"{tuple(expected[key].shape)}")
            expected[key].copy_(tensor)
            loaded.add(key)
    return loaded
