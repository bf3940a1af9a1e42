"""On-disk cache of tokenized datasets, keyed by (data, tokenizer, settings).

A cache entry is a folder `<cache_dir>/<key>/` with `tokens.npy` (int32, all samples back to back),
`targets.npy` (bool, same length: the token is a target), `offsets.npy` (int64, sample i is
`offsets[i]:offsets[i+1]`) and `meta.json` (counts). Arrays are memory-mapped on load, so a cached dataset of
billions of tokens opens instantly and is shared between DataLoader workers. Entries are written to a temporary
folder and renamed into place, so a crash or a concurrent writer never leaves a half-written entry.

The key hashes the data's identity (each file's resolved path, size and modification time; a hub dataset's name,
split and fingerprint), the tokenizer's identity (class, special ids, the bytes of its files, its chat template and
the ids of a probe text) and every setting that changes the tokens. `train_on_input` and packing are applied on
load, so they share an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 1
_PROBE_TEXT = "Hello world! Ünïcode ✓ 123\n\t<s></s><|im_start|><|eot_id|> [INST]"


def default_cache_dir() -> Path:
    """`$MYTUNE_DATA_CACHE`, else `~/.cache/mytune/datasets`."""
    return Path(os.environ.get("MYTUNE_DATA_CACHE", Path.home() / ".cache" / "mytune" / "datasets")).expanduser()


def tokenizer_fingerprint(tokenizer: object) -> str:
    """A hash that changes when the tokenizer would produce different ids."""
    digest = hashlib.sha256()
    cls = type(tokenizer)
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    for name in ("bos_id", "eos_id", "pad_id", "vocab_size", "bos_token", "eos_token", "chat_template"):
        parts.append(f"{name}={getattr(tokenizer, name, None)!r}")
    special = getattr(tokenizer, "special_tokens", None)
    if special:
        parts.append(json.dumps(dict(special), sort_keys=True))
    digest.update("\0".join(parts).encode())
    for file in getattr(tokenizer, "files", None) or ():
        try:
            digest.update(Path(file).read_bytes())
        except OSError:
            digest.update(str(file).encode())
    digest.update(json.dumps(tokenizer.encode(_PROBE_TEXT, add_bos=True, add_eos=True)).encode())
    return digest.hexdigest()


def cache_key(data_fingerprint: list[str], tokenizer_hash: str, settings: dict) -> str:
    payload = json.dumps({"version": CACHE_VERSION, "data": data_fingerprint, "tokenizer": tokenizer_hash,
                          "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_entry(cache_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict] | None:
    """(tokens, targets, offsets, meta) of a complete entry, memory-mapped; None when absent or unreadable."""
    folder = Path(cache_dir) / key
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        targets = np.load(folder / "targets.npy", mmap_mode="r")
        offsets = np.load(folder / "offsets.npy")
    except (OSError, ValueError):
        return None
    if len(tokens) != len(targets) or len(offsets) == 0 or offsets[-1] != len(tokens):
        return None
    return tokens, targets, offsets, meta


def save_entry(cache_dir: Path, key: str, tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray,
               meta: dict) -> Path:
    """Write an entry atomically; if another process wrote the same key first, keep theirs."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
    try:
        np.save(tmp / "tokens.npy", np.ascontiguousarray(tokens, dtype=np.int32))
        np.save(tmp / "targets.npy", np.ascontiguousarray(targets, dtype=np.bool_))
        np.save(tmp / "offsets.npy", np.ascontiguousarray(offsets, dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        if final.exists() and load_entry(cache_dir, key) is None:
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry (e.g. files deleted by hand)
        try:
            os.replace(tmp, final)
        except OSError:  # the key exists already (a concurrent writer): identical content, keep it
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
