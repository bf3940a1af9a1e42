"""On-disk cache of tokenized datasets, keyed by (data, tokenizer, settings).

A cache entry is a folder `<cache_dir>/<key>/` with `tokens.npy` (int32, all samples back to back),
`targets.npy` (bool, same length: the token is a target), `offsets.npy` (int64, sample i is
`offsets[i]:offsets[i+1]`) and `meta.json` (counts). Arrays are memory-mapped on load, so a cached dataset of
billions of tokens opens instantly and is shared between DataLoader workers. Entries are written to a temporary
folder and renamed into place, so a crash or a concurrent writer never leaves a half-written entry.

The key hashes the data's identity (each local file's resolved path and a BLAKE2b hash of its bytes, so a file
edited in place with its modification time restored misses; a hub dataset's name, split and fingerprint), the
tokenizer's identity (class, special ids, the bytes of its files, its chat template and the ids of a probe text)
and every setting that changes the tokens. `train_on_input` and packing are applied on load, so they share an entry.

An entry is checked before use (array types and shapes, offsets, token ids inside the vocabulary, well-formed
meta.json); a bad one is rebuilt, never trained on. The cache is optional: a cache dir that cannot be written
(a file, read-only, a full disk) gives a warning and the run goes on without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 2  # 2: local data keyed on its content, not its modification time
HASH_CHUNK_BYTES = 1 << 20
# meta.json of an entry: the counts SFTDataset.stats reports, and their types.
META_FIELDS = {"rows": int, "bad_rows_skipped": int, "skipped_examples": list, "truncated": int,
               "dropped_too_long": int, "samples": int, "tokens": int, "dataset_format": str, "chat_template": str}
_PROBE_TEXT = "Hello world! Ünïcode ✓ 123\n\t<s></s><|im_start|><|eot_id|> [INST]"


def default_cache_dir() -> Path:
    """`$MYTUNE_DATA_CACHE`, else `~/.cache/mytune/datasets`."""
    return Path(os.environ.get("MYTUNE_DATA_CACHE", Path.home() / ".cache" / "mytune" / "datasets")).expanduser()


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes, read in 1 MiB chunks (about 1 GB/s: a 100 MB dataset costs ~0.1 s per run)."""
    digest = hashlib.blake2b(digest_size=20)
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def content_fingerprint(files: list[Path]) -> list[str]:
    """`<resolved path>:<size>:<hash of the bytes>` of each data file: what a cache key may trust."""
    return [f"{file.resolve()}:{file.stat().st_size}:{file_digest(file)}" for file in files]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    digest.update(json.dumps(tokenizer.encode(_PROBE_TEXT, add_eos=True)).encode())  # with its own BOS rule
    return digest.hexdigest()


def cache_key(data_fingerprint: list[str], tokenizer_hash: str, settings: dict) -> str:
    payload = json.dumps({"version": CACHE_VERSION, "data": data_fingerprint, "tokenizer": tokenizer_hash,
                          "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_entry(cache_dir: Path, key: str, *, vocab_size: int | None = None,
               quiet: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict] | None:
    """(tokens, targets, offsets, meta) of a complete, well-formed entry, memory-mapped; else None.

    An absent entry is None silently; a damaged one (unreadable, wrong types or shapes, token ids outside
    `[0, vocab_size)`, bad meta.json) is None with a warning (unless `quiet`), so the caller rebuilds it.
    """
    folder = Path(cache_dir) / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        entry = _read_entry(folder)
        problem = entry_problem(*entry, vocab_size=vocab_size)
    except (OSError, ValueError) as err:  # unreadable, truncated or not a .npy / JSON file
        entry, problem = None, " ".join(str(err).split()) or type(err).__name__
    if problem is not None:
        if not quiet:
            warn(f"tokenization cache entry {folder} is damaged ({problem}): tokenizing again")
        return None
    return entry


def _read_entry(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")  # allow_pickle stays False: no code runs on load
    targets = np.load(folder / "targets.npy", mmap_mode="r")
    offsets = np.load(folder / "offsets.npy")
    return tokens, targets, offsets, meta


def entry_problem(tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray, meta: object, *,
                  vocab_size: int | None = None) -> str | None:
    """What is wrong with an entry's arrays and meta.json, or None when they are fit to train on.

    Reads every token id once (a min and a max: ~0.1 s per 100M tokens), so a flipped bit or a cache built with
    another vocabulary never reaches the embedding as an out-of-range index.
    """
    if not isinstance(meta, dict):
        return f"meta.json holds a {type(meta).__name__}, not a mapping"
    for name, kind in META_FIELDS.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            return f"meta.json: {name} is missing or not {kind.__name__}"
    arrays = {"tokens": (tokens, np.int32), "targets": (targets, np.bool_), "offsets": (offsets, np.int64)}
    for name, (array, dtype) in arrays.items():
        if array.dtype != dtype or array.ndim != 1:
            return f"{name}.npy is {array.dtype} of {array.ndim} dimensions, not 1-D {np.dtype(dtype)}"
    if len(tokens) != len(targets):
        return f"{len(tokens)} tokens but {len(targets)} target flags"
    if len(offsets) < 2 or len(offsets) != meta["samples"] + 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        return "offsets.npy does not match the samples and tokens"
    if np.any(offsets[1:] <= offsets[:-1]):
        return "offsets.npy is not increasing"
    if meta["tokens"] != len(tokens):
        return f"meta.json counts {meta['tokens']} tokens, tokens.npy holds {len(tokens)}"
    if len(tokens):
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            return (f"token ids from {low} to {high}, outside the tokenizer's vocabulary [0, {vocab_size})"
                    if vocab_size is not None else f"negative token id {low}")
    return None


def save_entry(cache_dir: Path, key: str, tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray,
               meta: dict, *, vocab_size: int | None = None) -> Path | None:
    """Write an entry atomically; if another process wrote the same key first, keep theirs.

    The cache is optional: when it cannot be written (the cache dir is a file or read-only, the disk is full) this
    warns, naming the path and what to do, and returns None; the caller goes on with the tokens it has.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
        np.save(tmp / "tokens.npy", np.ascontiguousarray(tokens, dtype=np.int32))
        np.save(tmp / "targets.npy", np.ascontiguousarray(targets, dtype=np.bool_))
        np.save(tmp / "offsets.npy", np.ascontiguousarray(offsets, dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        if final.exists() and load_entry(cache_dir, key, vocab_size=vocab_size, quiet=True) is None:
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry (e.g. files deleted by hand)
        try:
            os.replace(tmp, final)
        except OSError:  # the key exists already (a concurrent writer): identical content, keep it
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        from mytune.checkpoint.atomic import describe_write_error  # local: only on this error path

        warn(f"tokenization cache not written to {cache_dir}: {describe_write_error(err, final)} (the "
             f"dataset_cache_dir setting; off: no cache); the run goes on without it")
        return None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
