"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Only safetensors are read, so loading a checkpoint never runs pickled code; `pytorch_model.bin` files are read
with `torch.load(weights_only=True)` as a fallback for old checkpoints.
"""

import copy
import json
import math
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mytune.checkpoint.atomic import atomic_directory
from mytune.errors import MytuneError
from mytune.models.transformer import ModelArgs, TransformerDecoder

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
TIED_KEY = "lm_head.weight"  # dropped from saved checkpoints when tie_word_embeddings

# HF key prefix -> mytune key prefix, per model_type. Empty: the names are identical (mytune uses HF's names);
# a family whose HF names differ adds its renames here rather than code.
KEY_RENAMES: dict[str, dict[str, str]] = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}}


# Buffers some older checkpoints saved although they are recomputed from config.json (e.g. rotary `inv_freq`).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_mytune_key(model_type: str, key: str) -> str:
    return _rename(key, KEY_RENAMES.get(model_type, {}))


def mytune_to_hf_key(model_type: str, key: str) -> str:
    return _rename(key, {ours: hf for hf, ours in KEY_RENAMES.get(model_type, {}).items()})


def _rename(key: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON `true` is no integer here


def _positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


def _token_id(value: object) -> bool:
    return _is_int(value) and value >= 0


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _or_null(check):
    return lambda value: value is None or check(value)


# config.json fields the model is built from: (check of the JSON value, what it must be). Absent fields take the
# family's defaults; a present one of the wrong type would otherwise fail deep inside model construction.
CONFIG_FIELD_CHECKS = {
    "vocab_size": (_positive_int, "a positive integer"),
    "hidden_size": (_positive_int, "a positive integer"),
    "intermediate_size": (_positive_int, "a positive integer"),
    "num_hidden_layers": (_positive_int, "a positive integer"),
    "num_attention_heads": (_positive_int, "a positive integer"),
    "max_position_embeddings": (_positive_int, "a positive integer"),
    "num_key_value_heads": (_or_null(_positive_int), "a positive integer or null"),
    "head_dim": (_or_null(_positive_int), "a positive integer or null"),
    "sliding_window": (_or_null(_positive_int), "a positive integer or null"),
    "max_window_layers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "bos_token_id": (_or_null(_token_id), "a token id (an integer >= 0) or null"),
    "eos_token_id": (_or_null(lambda v: all(map(_token_id, v)) if isinstance(v, list) else _token_id(v)),
                     "a token id, a list of token ids or null"),
    "rms_norm_eps": (_positive_number, "a positive number"),
    "rope_theta": (_or_null(_positive_number), "a positive number or null"),
    "rope_scaling": (_or_null(lambda v: isinstance(v, dict)), "a mapping or null"),
    "rope_parameters": (_or_null(lambda v: isinstance(v, dict)), "a mapping or null"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "attention_bias": (lambda v: isinstance(v, bool), "true or false"),
    "use_sliding_window": (lambda v: isinstance(v, bool), "true or false"),
}
_REDOWNLOAD = "the file is damaged or not a Hugging Face config.json: fix it or copy/download it again"


def read_json_file(path: Path, what: str = "JSON file") -> object:
    """The parsed JSON of `path`; unreadable, non-UTF-8 or invalid JSON raise one MytuneError line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MytuneError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise MytuneError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          f"the {what} is damaged: copy or download it again") from None
    except json.JSONDecodeError as err:
        raise MytuneError(f"{path}: invalid JSON ({err}); the {what} is damaged: copy or download it again") from None


def read_hf_config(checkpoint_dir: str | Path) -> dict:
    """The checkpoint's config.json as a dict, its model fields checked for type (one MytuneError line if not)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise MytuneError(f"checkpoint directory {checkpoint_dir} does not exist")
    path = checkpoint_dir / CONFIG_NAME
    if not path.is_file():
        raise MytuneError(f"{path} not found: checkpoint_dir must hold a Hugging Face config.json")
    config = read_json_file(path, "config.json")
    if not isinstance(config, dict):
        raise MytuneError(f"{path}: must be a JSON object of settings, got a {type(config).__name__}; {_REDOWNLOAD}")
    check_hf_config(config, path)
    return config


def check_hf_config(config: dict, path: Path | str) -> None:
    """model_type is a string and each model field present in config.json has a usable value (CONFIG_FIELD_CHECKS)."""
    if not isinstance(config.get("model_type"), str):
        raise MytuneError(f"{path}: model_type must be a string such as \"llama\", got {config.get('model_type')!r}; "
                          f"{_REDOWNLOAD}")
    for key, (check, expected) in CONFIG_FIELD_CHECKS.items():
        if key in config and not check(config[key]):
            raise MytuneError(f"{path}: {key} must be {expected}, got {config[key]!r}; {_REDOWNLOAD}")


def read_hf_model_args(checkpoint_dir: str | Path) -> ModelArgs:
    """The `ModelArgs` of the checkpoint's config.json, carrying config.json and generation_config.json (when there
    is one) as read, so that `save_hf_checkpoint` keeps every key of both."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_hf_config(checkpoint_dir)
    generation_config = None
    path = checkpoint_dir / GENERATION_CONFIG_NAME
    if path.is_file():
        generation_config = read_json_file(path, "generation_config.json")
        if not isinstance(generation_config, dict):
            raise MytuneError(f"{path}: must be a JSON object of settings, got a "
                              f"{type(generation_config).__name__}; the file is damaged: copy or download it again")
    return ModelArgs.from_hf_config(config, generation_config)


def config_to_save(args: ModelArgs, torch_dtype: str) -> dict:
    """config.json for a model with `args`, saved in `torch_dtype`.

    A random start writes what `args` gives. A model read from a checkpoint starts from that checkpoint's config.json
    (`args.hf_config`: `pad_token_id`, `unk_token_id`, `_name_or_path`, custom keys all kept) and rewrites only what
    mytune owns: the dtype, and the architecture fields whose value `args` changed since the read.
    """
    ours = args.to_hf_config(torch_dtype=torch_dtype)
    if args.hf_config is None:
        return ours
    as_read = ModelArgs.from_hf_config(args.hf_config).to_hf_config(torch_dtype=torch_dtype)
    config = copy.deepcopy(args.hf_config)
    config.update({key: value for key, value in ours.items() if value != as_read[key]})
    config["torch_dtype"] = torch_dtype
    if "dtype" in config:  # transformers 5 writes `dtype`
        config["dtype"] = torch_dtype
    return config


def generation_config_to_save(args: ModelArgs) -> dict:
    """generation_config.json: the source checkpoint's (`args.hf_generation_config`, every key kept) with bos/eos
    rewritten only where `args` changed them since the read; else bos/eos from `args`."""
    ours = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
    if args.hf_generation_config is None:
        return ours
    as_read = ModelArgs.from_hf_config(args.hf_config) if args.hf_config is not None else None
    config = copy.deepcopy(args.hf_generation_config)
    config.update({key: value for key, value in ours.items() if as_read is None or getattr(as_read, key) != value})
    return config


def load_hf_model(checkpoint_dir: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> TransformerDecoder:
    """Build the model described by config.json and fill it with the checkpoint's weights, cast to `dtype`.

    The model is built on the meta device (no memory, no random init) and tensors are read straight onto `device`,
    so peak memory is one copy of the weights. Missing or unexpected keys and shape mismatches raise MytuneError.
    """
    checkpoint_dir = Path(checkpoint_dir)
    args = read_hf_model_args(checkpoint_dir)
    device = torch.device(device)
    with torch.device("meta"):
        model = TransformerDecoder(args)
    expected = {key: t.shape for key, t in model.state_dict().items()}
    tied = args.tie_word_embeddings

    state_dict = {}
    for source, hf_key, tensor in _iter_checkpoint_tensors(checkpoint_dir, device):
        key = hf_to_mytune_key(args.model_type, hf_key)
        if hf_key.endswith(IGNORED_KEY_SUFFIXES):
            continue
        if tied and key == TIED_KEY:
            continue  # some tied checkpoints store the head anyway; the embedding is the one used
        if key not in expected:
            raise MytuneError(f"{source.name}: unexpected key {hf_key!r} for a {args.model_type} model "
                              f"(config.json and weights disagree)")
        if tensor.shape != expected[key]:
            raise MytuneError(f"{source.name}: {hf_key!r} has shape {tuple(tensor.shape)} but config.json "
                              f"implies {tuple(expected[key])}")
        state_dict[key] = tensor.to(dtype)

    missing = [key for key in expected if key not in state_dict and not (tied and key == TIED_KEY)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MytuneError(f"{checkpoint_dir}: missing key {missing[0]!r} of shape {tuple(expected[missing[0]])}{more}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.model.rotary_emb.reset_parameters(device)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left on the meta device after loading: {leftover}"
    return model


def _iter_checkpoint_tensors(checkpoint_dir: Path, device: torch.device) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, key, tensor) for every tensor of the checkpoint, read onto `device`; a damaged file is one line."""
    for path in _weight_files(checkpoint_dir):
        if path.suffix == ".safetensors":
            yield from _safetensors_tensors(path, device)
        else:
            for key, tensor in _load_bin(path, device).items():
                yield path, key, tensor


def damaged_weights_error(path: Path, detail: object) -> MytuneError:
    """The one line for a weight file that cannot be read: what it is and what to do."""
    detail = " ".join(str(detail).split())
    return MytuneError(f"{path}: cannot read the weights ({detail}); the file is damaged or incomplete (an "
                       f"interrupted copy, download or save?): copy or download it again, or use another checkpoint")


def _safetensors_tensors(path: Path, device: torch.device) -> Iterator[tuple[Path, str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt", device=_safetensors_device(device)) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                yield path, key, tensor
    except (SafetensorError, OSError) as err:
        raise damaged_weights_error(path, err) from None


def _load_bin(path: Path, device: torch.device) -> dict:
    """A pytorch_model.bin shard, read with weights_only=True: pickled code is refused, never run."""
    try:
        # mmap needs the zip format of torch >= 1.6; older (legacy) files are read whole
        state_dict = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:  # (torch's own text suggests weights_only=False: never repeated here)
        if not zipfile.is_zipfile(path):
            raise damaged_weights_error(path, "not a torch checkpoint file") from None
        raise MytuneError(f"{path}: holds pickled objects other than tensors; mytune reads only plain tensors, so "
                          "it will not run code from a checkpoint: convert the checkpoint to safetensors where you "
                          "trust it, or use another checkpoint") from None
    except torch.OutOfMemoryError:  # a RuntimeError, but the file is fine: no "download it again" advice
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise damaged_weights_error(path, err) from None
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise damaged_weights_error(path, "not a mapping of names to tensors")
    return state_dict


def _safetensors_device(device: torch.device) -> str:
    """safetensors wants an explicit index for accelerators ("cuda:0"), so resolve a bare "cuda"."""
    if device.type != "cpu" and device.index is None:
        return f"{device.type}:{torch.get_device_module(device.type).current_device()}"
    return str(device)


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files named by the index (sharded) or the single-file checkpoint, safetensors preferred."""
    for index_name, single_name in ((SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME), (BIN_INDEX_NAME, BIN_NAME)):
        index_path = checkpoint_dir / index_name
        if index_path.is_file():
            files = [checkpoint_dir / name for name in _index_file_names(index_path)]
            for file in files:
                if not file.is_file():
                    raise MytuneError(f"{index_path} names {file.name}, which does not exist")
            return files
        if (checkpoint_dir / single_name).is_file():
            return [checkpoint_dir / single_name]
    raise MytuneError(f"{checkpoint_dir} has no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")


def _index_file_names(index_path: Path) -> list[str]:
    """The weight file names an index's `weight_map` ({key: file name in the same directory}) points at."""
    index = read_json_file(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MytuneError(f"{index_path}: not a valid index (it needs a \"weight_map\" object of tensor name -> "
                          f"file name); the file is damaged: copy or download it again")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise MytuneError(f"{index_path}: weight_map[{key!r}] must be a file name in the same directory, got "
                              f"{name!r}; the file is damaged: copy or download it again")
    return sorted(set(weight_map.values()))


def save_hf_checkpoint(model: TransformerDecoder, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                       tokenizer_files: Sequence[Path] = (), max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

    config.json + generation_config.json (a model read from a checkpoint keeps every key of that checkpoint's:
    `config_to_save`), safetensors in `dtype` (sharded into files of at most `max_shard_bytes`
    with model.safetensors.index.json when larger), and copies of `tokenizer_files` (a SentencePiece
    tokenizer.model also gets the tokenizer_config.json transformers needs). The directory appears atomically.
    """
    out_dir = Path(out_dir)
    args = model.args
    missing_files = [str(p) for p in tokenizer_files if not Path(p).is_file()]
    if missing_files:
        raise MytuneError(f"tokenizer file {missing_files[0]} does not exist")
    tensors = {
        mytune_to_hf_key(args.model_type, key): t
        for key, t in model.state_dict().items()
        if not (args.tie_word_embeddings and key == TIED_KEY)
    }
    dtype_name = str(dtype).removeprefix("torch.")
    with atomic_directory(out_dir) as tmp:
        _write_safetensors(tensors, tmp, dtype, max_shard_bytes)
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_save(args, dtype_name), indent=2) + "\n")
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation_config_to_save(args), indent=2) + "\n")
        if tokenizer_files:
            from mytune.tokenizers import copy_tokenizer_files  # local: keeps checkpoint importable on its own

            copy_tokenizer_files([Path(p) for p in tokenizer_files], tmp)
    return out_dir


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype,
                       max_shard_bytes: int) -> None:
    """One model.safetensors, or shards `model-0000i-of-0000n.safetensors` plus the index, filled in key order."""
    nbytes = {key: t.numel() * dtype.itemsize for key, t in tensors.items()}
    shards: list[list[str]] = [[]]
    shard_size = 0
    for key in tensors:
        if shards[-1] and shard_size + nbytes[key] > max_shard_bytes:
            shards.append([])
            shard_size = 0
        shards[-1].append(key)
        shard_size += nbytes[key]

    names = ([SAFETENSORS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        # Converted one shard at a time so host memory holds at most one shard of the cast copy.
        shard = {key: tensors[key].detach().to("cpu", dtype).contiguous() for key in keys}
        save_file(shard, directory / name, metadata={"format": "pt"})
        del shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (directory / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
