"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Only safetensors are read, so loading a checkpoint never runs pickled code; `pytorch_model.bin` files are read
with `torch.load(weights_only=True)` as a fallback for old checkpoints.
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
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


def read_hf_config(checkpoint_dir: str | Path) -> dict:
    """The checkpoint's config.json as a dict."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise MytuneError(f"checkpoint directory {checkpoint_dir} does not exist")
    path = checkpoint_dir / CONFIG_NAME
    if not path.is_file():
        raise MytuneError(f"{path} not found: checkpoint_dir must hold a Hugging Face config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MytuneError(f"{path}: invalid JSON ({err})") from None


def load_hf_model(checkpoint_dir: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> TransformerDecoder:
    """Build the model described by config.json and fill it with the checkpoint's weights, cast to `dtype`.

    The model is built on the meta device (no memory, no random init) and tensors are read straight onto `device`,
    so peak memory is one copy of the weights. Missing or unexpected keys and shape mismatches raise MytuneError.
    """
    checkpoint_dir = Path(checkpoint_dir)
    args = ModelArgs.from_hf_config(read_hf_config(checkpoint_dir))
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
    """(file, key, tensor) for every tensor of the checkpoint, read onto `device`."""
    for path in _weight_files(checkpoint_dir):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt", device=_safetensors_device(device)) as f:
                for key in f.keys():
                    yield path, key, f.get_tensor(key)
        else:
            for key, tensor in torch.load(path, map_location=device, weights_only=True, mmap=True).items():
                yield path, key, tensor


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
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise MytuneError(f"{index_path}: not a valid index ({err!r})") from None
            files = [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise MytuneError(f"{index_path} names {file.name}, which does not exist")
            return files
        if (checkpoint_dir / single_name).is_file():
            return [checkpoint_dir / single_name]
    raise MytuneError(f"{checkpoint_dir} has no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")


def save_hf_checkpoint(model: TransformerDecoder, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                       tokenizer_files: Sequence[Path] = (), max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

    config.json + generation_config.json, safetensors in `dtype` (sharded into files of at most `max_shard_bytes`
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
        (tmp / CONFIG_NAME).write_text(json.dumps(args.to_hf_config(torch_dtype=dtype_name), indent=2) + "\n")
        generation_config = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation_config, indent=2) + "\n")
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
