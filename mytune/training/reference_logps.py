"""The reference model of the preference recipes: LoRA adapters turned off, and log-probs computed once and cached.

DPO and IPO compare the policy's log-probability of each response with a frozen reference model's. Two ways to get it:
- per batch: one more forward (under no_grad) of the same batch through the reference: for a LoRA recipe the policy
  itself with its adapters turned off (`adapters_disabled`: the frozen base, no second copy of the weights);
- precomputed (`precompute_reference_logps: true`): the reference never changes, so `reference_logps_for` runs it
  over the whole dataset once at setup and keeps one `[chosen, rejected]` float32 pair per dataset item; training
  then needs the policy's forward alone. `WithReferenceLogps` hands each item its pair and `collate_with_reference`
  puts them into the batch as `reference_chosen_logps` / `reference_rejected_logps` `[B]`.

The precomputed log-probs are cached in `<dataset_cache_dir>/reference_logps/<key>.pt` next to the tokenized data,
so a second run on the same data and model (a resumed run among them) reads them instead of running the reference
again. The key hashes what the values depend on: the tokenized pairs themselves (every item's tokens and labels, so
any change of data, tokenizer, template, truncation or validation split misses), the reference's weights (the
bytes of its checkpoint files, `checkpoint_identity`) and the recipe's settings that change its numbers (dtype,
quantization). A file is written to a temporary name and renamed; one that does not load or does not fit the dataset
is computed again; an unwritable cache only warns (the cache is optional, as the tokenization cache is).

Under FSDP every rank runs the same number of reference forwards (they are collectives): rank r computes a
contiguous block of the items (the last block padded with repeats of the last item), the blocks are all-gathered, and
every rank ends with the whole table. Rank 0 alone decides whether the cache has the entry and writes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mytune.data.cache import file_digest, warn
from mytune.modules.lora import lora_layers
from mytune.training.device import move_batch

CACHE_SUBDIR = "reference_logps"
CACHE_VERSION = 1
ITEM_FIELDS = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")
# Weight and config files of a Hugging Face checkpoint: what the reference's numbers depend on.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
NOT_WEIGHTS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

LogpsFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


# ---- the reference of a LoRA model -----------------------------------------------------------------------------------
@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every `LoRALinear` of `model` computes its frozen base alone (`x W^T + b`, NF4 included):
    the model is its own reference, as PEFT's `disable_adapter()` makes it. LoRA and DoRA alike (DoRA's magnitude
    is part of the adapter); the adapter's dropout is skipped with it. Nothing is copied; on exit every layer runs
    its adapter again (also after an exception). Each layer's `forward` is shadowed by its `_base_forward` on the
    instance, so FSDP's hooks (on the decoder layers) and activation checkpointing are untouched.
    """
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.forward = layer._base_forward
    try:
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


# ---- cache key -------------------------------------------------------------------------------------------------------
def dataset_fingerprint(dataset: Sequence[dict]) -> str:
    """A hash of every item's chosen/rejected tokens and labels, in order (~1 s per 100k pairs): equal hashes mean
    the same pairs at the same indices, whatever produced them."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for index in range(len(dataset)):
        item = dataset[index]
        for name in ITEM_FIELDS:
            values = np.asarray(item[name], dtype=np.int64)
            digest.update(str(len(values)).encode())
            digest.update(values.tobytes())
    return digest.hexdigest()


def checkpoint_identity(checkpoint_dir: str | Path) -> list[str]:
    """`<name>:<size>:<BLAKE2b of the bytes>` of the checkpoint's weight and config files (not the tokenizer's:
    tokenization is in the dataset's fingerprint). Reading them costs about 1 s per GB, once per precomputing run."""
    folder = Path(checkpoint_dir)
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES and f.name not in NOT_WEIGHTS)
    return [f"{f.name}:{f.stat().st_size}:{file_digest(f)}" for f in files]


def reference_cache_key(dataset_hash: str, model_identity: dict[str, Any]) -> str:
    """The cache entry's name: the dataset's fingerprint with the reference model's identity and settings."""
    payload = json.dumps({"version": CACHE_VERSION, "data": dataset_hash, "model": model_identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---- computing -------------------------------------------------------------------------------------------------------
def compute_reference_logps(dataset: Sequence[dict], logps_fn: LogpsFn, *, batch_size: int,
                            collate: Callable[[list[dict]], dict], device: torch.device, rank: int = 0,
                            world_size: int = 1, desc: str = "reference log-probs", group=None) -> torch.Tensor:
    """float32 `[len(dataset), 2]` (chosen, rejected) summed log-probs, row i for item i, on the CPU.

    `logps_fn(batch)` gets a collated batch already on `device` and returns the reference's `[B]` chosen and `[B]`
    rejected sums; it runs under no_grad. With `world_size > 1`, every rank computes its block and ends with the
    whole table (the same number of calls on every rank).

    `group` (tensor parallelism): the blocks are split over this process group (the data-parallel ranks) instead of
    the whole world; the ranks of one tensor-parallel group then compute the same block together, in the model's
    (dp, tp) layout, and the blocks are gathered over `group`. `rank` and `world_size` stay the global ones.
    """
    n, show_progress = len(dataset), rank == 0
    if group is not None:
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    per_rank = math.ceil(n / world_size)
    start = rank * per_rank
    indices = [min(i, n - 1) for i in range(start, start + per_rank)]  # the last block's tail repeats the last item
    out = torch.empty(per_rank, 2, dtype=torch.float32, device=device)
    with torch.no_grad():
        for first in tqdm(range(0, per_rank, batch_size), desc=desc, disable=not show_progress, dynamic_ncols=True):
            batch = collate([dataset[i] for i in indices[first:first + batch_size]])
            chosen, rejected = logps_fn(move_batch(batch, device))
            out[first:first + len(chosen), 0] = chosen.float()
            out[first:first + len(chosen), 1] = rejected.float()
    if world_size > 1:
        blocks = [torch.empty_like(out) for _ in range(world_size)]
        dist.all_gather(blocks, out, group=group)
        out = torch.cat(blocks)
    return out[:n].cpu()


def reference_logps_for(dataset: Sequence[dict], logps_fn: LogpsFn, *, cache_dir: str | Path | None,
                        model_identity: dict[str, Any] | None, batch_size: int,
                        collate: Callable[[list[dict]], dict], device: torch.device, rank: int = 0,
                        world_size: int = 1, name: str = "dataset", group=None) -> torch.Tensor:
    """The reference's `[len(dataset), 2]` log-probs: read from the cache (`cache_dir`, None = no cache) when it holds
    this dataset and model, else computed (`compute_reference_logps`) and written there by rank 0.

    `model_identity` (e.g. `{"checkpoint": checkpoint_identity(dir), "dtype": ...}`) is read on rank 0 only: the
    other ranks may pass None (they neither hash the data nor touch the cache). `group`: the data-parallel process
    group under tensor parallelism (see `compute_reference_logps`); `rank` and `world_size` stay the global ones."""
    table = None
    if cache_dir is not None:
        if rank == 0:
            key = reference_cache_key(dataset_fingerprint(dataset), model_identity)
            path = Path(cache_dir) / CACHE_SUBDIR / f"{key}.pt"
            table = load_table(path, len(dataset))
        if world_size > 1:
            table = _broadcast_table(table, len(dataset), device)
        if table is not None:
            if rank == 0:
                print(f"{name}: reference log-probs of {len(dataset)} pairs read from {path}", flush=True)
            return table
    table = compute_reference_logps(dataset, logps_fn, batch_size=batch_size, collate=collate, device=device,
                                    rank=rank, world_size=world_size, desc=f"{name}: reference log-probs",
                                    group=group)
    if cache_dir is not None and rank == 0:
        if save_table(path, table) is not None:
            print(f"{name}: reference log-probs of {len(dataset)} pairs cached in {path}", flush=True)
    return table


def _broadcast_table(table: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """Rank 0's cache lookup on every rank: whether it found the entry, and then its values."""
    found = torch.tensor([float(table is not None)], device=device)
    dist.broadcast(found, src=0)
    if not found.item():
        return None
    values = table.to(device) if table is not None else torch.empty(n, 2, dtype=torch.float32, device=device)
    dist.broadcast(values, src=0)
    return values.cpu()


def load_table(path: Path, n: int) -> torch.Tensor | None:
    """A cached `[n, 2]` finite float32 table, or None (absent; a damaged or mismatched file warns)."""
    if not path.is_file():
        return None
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: computed again, never trained on
        warn(f"reference log-prob cache {path} is unreadable ({type(err).__name__}): computing it again")
        return None
    if (not isinstance(table, torch.Tensor) or table.dtype != torch.float32 or tuple(table.shape) != (n, 2)
            or not torch.isfinite(table).all()):
        warn(f"reference log-prob cache {path} does not hold {n} finite pairs: computing it again")
        return None
    return table


def save_table(path: Path, table: torch.Tensor) -> Path | None:
    """Write atomically (a temporary file, then a rename); an unwritable cache warns and returns None."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(table.contiguous(), f)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warn(f"reference log-prob cache not written to {path.parent} ({err.strerror or err}); the run goes on "
             f"without it")
        return None
    return path


# ---- feeding them by index -------------------------------------------------------------------------------------------
class WithReferenceLogps(torch.utils.data.Dataset):
    """`dataset`'s items, each with its precomputed `reference_logps` (a float32 `[2]`: chosen, rejected).

    Same length and indices as `dataset`, so the resumable sampler and its saved state are unchanged; other
    attributes (`summary`, `stats`, `num_samples`) are `dataset`'s.
    """

    def __init__(self, dataset: Sequence[dict], logps: torch.Tensor):
        if len(logps) != len(dataset):
            raise ValueError(f"{len(logps)} reference log-prob pairs for {len(dataset)} items")
        self.dataset, self.logps = dataset, logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "reference_logps": self.logps[index]}

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "logps"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_with_reference(items: list[dict], *, collate: Callable[[list[dict]], dict]) -> dict[str, torch.Tensor]:
    """`collate` of the items without their `reference_logps`, plus `reference_chosen_logps` and
    `reference_rejected_logps` `[B]` when the items carry them.
    """
    plain = [{k: v for k, v in item.items() if k != "reference_logps"} for item in items]
    batch = collate(plain)
    if items and "reference_logps" in items[0]:
        pairs = torch.stack([item["reference_logps"] for item in items])
        batch["reference_chosen_logps"], batch["reference_rejected_logps"] = pairs[:, 0], pairs[:, 1]
    return batch
