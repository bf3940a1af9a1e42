"""Supervised fine-tuning datasets: one entry point from a path to tokenized (optionally packed) samples.

    dataset = build_sft_dataset("data.jsonl", tokenizer, max_seq_len=2048, packed=True, cache_dir=...)
    train, val = split_validation(dataset, 0.05, seed=0)

Pipeline: read rows (rows.py) -> detect/validate the format (formats.py; all rows are checked before any
tokenization, so row 900's typo fails in a second) -> render with a prompt format (templates.py) -> tokenize the
whole text and mark targets (encoding.py), in parallel worker processes for large inputs -> truncate or drop samples
longer than `max_seq_len` -> cache on disk (cache.py) -> optionally pack (packing.py).

Items: `{"tokens": [...], "labels": [...]}` (labels NOT shifted, -100 where not trained), and for packed datasets also
`"position_ids"` and `"document_ids"` (see packing.py for the contract). `padded_collate` batches either kind.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from mytune.data.cache import cache_key, content_fingerprint, load_entry, save_entry, tokenizer_fingerprint
from mytune.data.encoding import TextEncoder, special_token_strings
from mytune.data.formats import (
    Example,
    RowError,
    check_column_map,
    check_dataset_format,
    detect_format,
    to_example,
)
from mytune.data.packing import greedy_pack
from mytune.data.rows import (
    RowTable,
    local_data_files,
    looks_like_hub_name,
    open_hub_dataset,
    read_rows,
)
from mytune.data.templates import PromptRenderer, resolve_template
from mytune.data.transform import RowTransform, load_row_transform
from mytune.errors import ConfigError, MytuneError, one_line

CROSS_ENTROPY_IGNORE_INDEX = -100
TRUNCATION_MODES = ("truncate", "drop")
PARALLEL_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves


class SFTDataset(Dataset):
    """Tokenized samples in flat arrays; items are samples, or packs of samples when `packed`.

    `tokens` (int32) and `targets` (bool) hold all samples back to back, sample i at `offsets[i]:offsets[i+1]`.
    `indices` selects and orders the samples this dataset uses (`split_validation` makes subsets that share the
    arrays). Labels are built on access: -100 where `targets` is False unless `train_on_input`.
    `stats` counts rows read, bad rows skipped, samples truncated and dropped, tokens; `summary()` says it in a line.
    """

    def __init__(self, tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray, *, max_seq_len: int,
                 train_on_input: bool = False, packed: bool = False, indices: Sequence[int] | None = None,
                 stats: dict | None = None):
        self._tokens = tokens
        self._targets = targets
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.max_seq_len = max_seq_len
        self.train_on_input = train_on_input
        self.packed = packed
        total = len(self._offsets) - 1
        self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        self._lengths = (self._offsets[1:] - self._offsets[:-1])[self.indices]
        self.packs = greedy_pack(self._lengths.tolist(), max_seq_len) if packed else None
        self.stats = dict(stats or {})

    # ---- samples ----------------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def sample(self, index: int) -> dict[str, list[int]]:
        """Sample `index` (in this dataset's order) alone, unpacked: {"tokens", "labels"}."""
        tokens, labels = self._sample_arrays(index)
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}

    def _sample_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.indices[index]
        start, end = self._offsets[sample], self._offsets[sample + 1]
        tokens = np.asarray(self._tokens[start:end], dtype=np.int64)
        if self.train_on_input:
            return tokens, tokens.copy()
        return tokens, np.where(self._targets[start:end], tokens, CROSS_ENTROPY_IGNORE_INDEX)

    def sample_lengths(self) -> list[int]:
        return self._lengths.tolist()

    # ---- items ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.packs) - 1 if self.packed else len(self.indices)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if not self.packed:
            return self.sample(index)
        parts = [self._sample_arrays(i) for i in range(self.packs[index], self.packs[index + 1])]
        tokens, labels, positions, documents = [], [], [], []
        for document, (sample_tokens, sample_labels) in enumerate(parts):
            sample_labels = sample_labels.copy()
            sample_labels[0] = CROSS_ENTROPY_IGNORE_INDEX  # never predicted from the previous sample's last token
            tokens.append(sample_tokens)
            labels.append(sample_labels)
            positions.append(np.arange(len(sample_tokens)))
            documents.append(np.full(len(sample_tokens), document))
        return {"tokens": np.concatenate(tokens).tolist(), "labels": np.concatenate(labels).tolist(),
                "position_ids": np.concatenate(positions).tolist(),
                "document_ids": np.concatenate(documents).tolist()}

    def token_counts(self) -> list[int]:
        """Tokens of each item (after truncation; packs: the sum of their samples): for statistics and batching."""
        if not self.packed:
            return self._lengths.tolist()
        cumulative = np.concatenate([[0], np.cumsum(self._lengths)])
        return (cumulative[self.packs[1:]] - cumulative[self.packs[:-1]]).tolist()

    # ---- derived datasets -------------------------------------------------------------------------------------------
    def subset(self, indices: Sequence[int]) -> "SFTDataset":
        """The samples at `indices` (positions in this dataset's sample order), packed again if this one is packed."""
        return SFTDataset(self._tokens, self._targets, self._offsets, max_seq_len=self.max_seq_len,
                          train_on_input=self.train_on_input, packed=self.packed,
                          indices=self.indices[np.asarray(indices, dtype=np.int64)], stats=self.stats)

    def summary(self) -> str:
        s = self.stats
        packs = f" in {len(self)} packed rows" if self.packed else ""
        return (f"{self.num_samples} samples{packs}, {int(self._lengths.sum())} tokens "
                f"({s.get('truncated', 0)} truncated, {s.get('dropped_too_long', 0)} dropped as longer than "
                f"max_seq_len={self.max_seq_len}, {s.get('bad_rows_skipped', 0)} bad rows skipped; "
                f"tokenization cache: {s.get('cache', 'off')})")


def split_validation(dataset: Dataset, val_fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split samples (before packing: packs are rebuilt on each side) into (train, validation) at random.

    Any dataset with `num_samples` and `subset(indices)` splits: an `SFTDataset`, a `PreferenceDataset` (its
    samples are pairs), or a mix (each source split on its own).

    `round(val_fraction * num_samples)` samples, at least one, go to validation; both keep the original order.
    The same seed and data give the same split on every rank and every resume.
    """
    if hasattr(dataset, "split_validation"):  # a dataset mix (mix.py): each source split on its own
        return dataset.split_validation(val_fraction, seed=seed)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")
    n = dataset.num_samples
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise MytuneError(f"val_fraction={val_fraction} of {n} samples leaves no training samples; "
                          "lower val_fraction or add data")
    order = np.random.default_rng(seed).permutation(n)
    val_indices = np.sort(order[:n_val])
    train_indices = np.sort(order[n_val:])
    return dataset.subset(train_indices), dataset.subset(val_indices)


# ---- building --------------------------------------------------------------------------------------------------------
@dataclass
class DataSettings:
    max_seq_len: int
    dataset_format: str | None
    column_map: dict
    chat_template: str | None
    skip_bad_rows: bool
    truncation: str
    num_proc: int | None
    row_transform: RowTransform | None = None

    def cache_fields(self) -> dict:
        fields = {"max_seq_len": self.max_seq_len, "dataset_format": self.dataset_format,
                  "column_map": self.column_map, "chat_template": self.chat_template,
                  "skip_bad_rows": self.skip_bad_rows, "truncation": self.truncation}
        if self.row_transform is not None:  # absent otherwise: entries written before transforms existed still hit
            fields["row_transform"] = self.row_transform.fingerprint
        return fields


def build_sft_dataset(path: str | Path, tokenizer: object, *, max_seq_len: int, dataset_format: str | None = None,
                      train_on_input: bool = False, column_map: Mapping[str, str] | None = None,
                      chat_template: str | None = None, packed: bool = False, skip_bad_rows: bool = False,
                      truncation: str = "truncate", cache_dir: str | Path | None = None,
                      num_proc: int | None = None, split: str = "train",
                      row_transform: str | Callable | None = None) -> SFTDataset:
    """Tokenized SFT samples from a file, a folder, or a hub dataset name.

    - `dataset_format`: instruct | chat | text, or None to detect it from the first row's columns.
    - `column_map`: {our column: dataset column}, e.g. {"instruction": "prompt", "output": "response"}.
    - `chat_template`: None (the tokenizer's `chat_template` if it has one, else alpaca for instruct / chatml for chat),
      a built-in name (alpaca, llama2, llama3, chatml), "tokenizer", or a Jinja template string.
    - `train_on_input`: train on prompt tokens too (default: only outputs / every assistant turn).
    - `truncation`: samples longer than `max_seq_len` are cut keeping a final eos ("truncate") or left out ("drop");
      either way counted in `stats`.
    - `skip_bad_rows`: skip and count unusable rows instead of raising at the first one.
    - `packed`: items are greedy packs of samples up to `max_seq_len` tokens with position and document ids.
    - `cache_dir`: where tokenized data is cached (None: no cache); a second build with the same data, tokenizer and
      settings loads it instead of tokenizing.
    - `num_proc`: tokenizer processes (None: all cores, capped at 8, for >= 20k rows; else 1).
    - `split`: the split of a hub dataset.
    - `row_transform`: `module:function` (or a callable) applied to each raw row before format detection; it returns
      an instruct, chat or text row (see transform.py). Its source code is part of the cache key.
    """
    settings = check_settings(max_seq_len, dataset_format, column_map, chat_template, skip_bad_rows, truncation,
                               num_proc, row_transform=row_transform)
    hub, data_id = source_identity(path, split, fingerprint=cache_dir is not None)
    key = None
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if cache_dir is not None and data_id is not None:  # else a missing path: read_rows says so
        cache_dir = Path(cache_dir).expanduser()
        key = cache_key(data_id, tokenizer_fingerprint(tokenizer), {**settings.cache_fields(), "split": split})
        if (cached := load_entry(cache_dir, key, vocab_size=vocab_size)) is not None:
            return _from_arrays(*cached, settings, train_on_input, packed, cache="hit")
    table = read_rows(path, skip_bad_rows=skip_bad_rows, split=split, hub=hub)
    tokens, targets, offsets, meta = _tokenize_table(table, tokenizer, settings, source=str(path))
    cache = "off"
    if cache_dir is not None:
        written = save_entry(cache_dir, key, tokens, targets, offsets, meta, vocab_size=vocab_size)
        cache = "written" if written is not None else "not written"
    return _from_arrays(tokens, targets, offsets, meta, settings, train_on_input, packed, cache=cache)


def source_identity(path: str | Path, split: str, *, fingerprint: bool) -> tuple[object | None, list[str] | None]:
    """The opened hub dataset (else None) and the data's identity for a cache key, known before any row is read:
    local files by their bytes (path, size and mtime survive an in-place edit: cp -p, rsync, tar; hashed only when
    `fingerprint`), a hub dataset by its name and revision. None when the path is neither (read_rows then says so)."""
    files = local_data_files(path)
    if files is not None:
        return None, content_fingerprint(files) if fingerprint else None
    if looks_like_hub_name(str(path)):
        hub = open_hub_dataset(str(path), split)
        return hub, [hub[1]]
    return None, None


def sft_dataset_from_rows(rows: list, tokenizer: object, *, max_seq_len: int, source: str = "<rows>",
                          dataset_format: str | None = None, train_on_input: bool = False,
                          column_map: Mapping[str, str] | None = None, chat_template: str | None = None,
                          packed: bool = False, skip_bad_rows: bool = False, truncation: str = "truncate",
                          num_proc: int | None = 1, row_transform: str | Callable | None = None) -> SFTDataset:
    """`build_sft_dataset` for rows already in memory (errors name them "<source> row N (0-based)"); no cache."""
    settings = check_settings(max_seq_len, dataset_format, column_map, chat_template, skip_bad_rows, truncation,
                               num_proc, source=source, row_transform=row_transform)
    if not rows:
        raise MytuneError(f"{source}: no rows; the dataset needs at least one row")
    arrays = _tokenize_table(RowTable.from_rows(rows, source), tokenizer, settings, source=source)
    return _from_arrays(*arrays, settings, train_on_input, packed, cache="off")


def check_settings(max_seq_len, dataset_format, column_map, chat_template, skip_bad_rows, truncation, num_proc,
                    source: str = "", row_transform: str | Callable | None = None) -> DataSettings:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ConfigError(f"num_proc must be an integer >= 1 or null (automatic), got {num_proc!r}")
    return DataSettings(max_seq_len, check_dataset_format(dataset_format), check_column_map(column_map),
                     chat_template, bool(skip_bad_rows), truncation, num_proc, load_row_transform(row_transform))


def _from_arrays(tokens, targets, offsets, meta, settings: DataSettings, train_on_input: bool, packed: bool,
                 cache: str) -> SFTDataset:
    stats = {**meta, "cache": cache}
    return SFTDataset(tokens, targets, offsets, max_seq_len=settings.max_seq_len, train_on_input=train_on_input,
                      packed=packed, stats=stats)


def _tokenize_table(table: RowTable, tokenizer: object, settings: DataSettings,
                    source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Validate every row, then tokenize; returns (tokens, targets, offsets, stats)."""
    if not table.rows:
        raise MytuneError(f"{source}: no usable rows ({table.skipped} bad rows skipped: "
                          f"{'; '.join(table.skip_messages)})")
    column_map = settings.column_map
    rows_read = len(table.rows) + table.skipped  # bad rows found below are counted by table.skip too
    rows = _transform_rows(table, settings) if settings.row_transform is not None else table.rows
    first = next((index for index, row in enumerate(rows) if row is not None), None)
    if first is None:
        raise MytuneError(f"{source}: no usable rows ({table.skipped} bad rows skipped: "
                          f"{'; '.join(table.skip_messages)})")
    returned = f"row_transform {settings.row_transform.name} returned a row that " if settings.row_transform else ""
    try:
        dataset_format = settings.dataset_format or detect_format(rows[first], column_map, table.where(first))
    except MytuneError as err:
        if not returned:
            raise
        raise MytuneError(f"{table.where(first)}: {returned}is in no known format: "
                          f"{str(err).split(': ', 1)[-1]}") from None
    examples: list[Example | None] = []
    for index, row in enumerate(rows):
        if row is None:  # the row transform failed on it (skipped and counted)
            examples.append(None)
            continue
        try:
            examples.append(to_example(row, dataset_format, column_map))
        except RowError as err:
            table.skip(f"{table.where(index)}: {returned and returned + f'is not {dataset_format}: '}{err}",
                       settings.skip_bad_rows)
            examples.append(None)

    template = resolve_template(settings.chat_template, tokenizer, dataset_format)
    bos_token, eos_token = special_token_strings(tokenizer)
    job = TokenizeJob(examples, PromptRenderer(template, bos_token=bos_token, eos_token=eos_token), tokenizer,
               settings.max_seq_len, settings.truncation, settings.skip_bad_rows)
    results = run_tokenize_job(job, tokenizer_workers(settings.num_proc, len(examples)))

    lengths = np.concatenate([r.lengths for r in results])
    for result in results:
        for index, message in result.errors:
            table.skip(f"{table.where(index)}: {message}", settings.skip_bad_rows)
    kept = lengths[lengths > 0]
    tokens = np.concatenate([r.tokens for r in results])  # results: one per range, and there is at least one row
    targets = np.concatenate([r.targets for r in results])
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    meta = {
        "rows": rows_read,
        "bad_rows_skipped": table.skipped,
        "skipped_examples": table.skip_messages,
        "truncated": sum(r.truncated for r in results),
        "dropped_too_long": int((lengths == _DROPPED).sum()),
        "samples": int(len(kept)),
        "tokens": int(kept.sum()),
        "dataset_format": dataset_format,
        "chat_template": template if len(template) < 40 else "<jinja>",
    }
    if not len(kept):
        raise MytuneError(f"{source}: no usable samples ({meta['bad_rows_skipped']} bad rows skipped, "
                          f"{meta['dropped_too_long']} dropped as longer than max_seq_len={settings.max_seq_len})")
    return tokens, targets, offsets, meta


def _transform_rows(table: RowTable, settings: DataSettings) -> list[dict | None]:
    """Each raw row through the row transform; a row it raises on or turns into a non-dict is a bad row (None)."""
    transform = settings.row_transform
    rows: list[dict | None] = []
    for index, row in enumerate(table.rows):
        try:
            result = transform.function(row)
        except Exception as err:
            table.skip(f"{table.where(index)}: row_transform {transform.name} raised {type(err).__name__}"
                       + (f": {one_line(err)}" if str(err).strip() else ""), settings.skip_bad_rows)
            rows.append(None)
            continue
        if not isinstance(result, Mapping):
            table.skip(f"{table.where(index)}: row_transform {transform.name} returned {type(result).__name__}, "
                       "expected a dict row in a built-in format (instruction/input/output, messages or "
                       "conversations, or text)", settings.skip_bad_rows)
            rows.append(None)
            continue
        rows.append(dict(result))
    return rows


# ---- tokenization workers --------------------------------------------------------------------------------------------
_ERROR, _DROPPED = -1, -2


@dataclass
class TokenizeJob:
    examples: list
    renderer: PromptRenderer
    tokenizer: object
    max_seq_len: int
    truncation: str
    keep_going: bool  # on a bad row: continue (skip_bad_rows) or stop at once


@dataclass
class _Result:
    lengths: np.ndarray  # per row: tokens kept, _ERROR or _DROPPED (skipped rows from validation count as _ERROR)
    tokens: np.ndarray
    targets: np.ndarray
    truncated: int = 0
    errors: list = field(default_factory=list)


_WORKER_JOB: TokenizeJob | None = None
_WORKER_ENCODER: TextEncoder | None = None


def _set_worker_job(job: TokenizeJob | None, in_worker: bool = False) -> None:
    global _WORKER_JOB, _WORKER_ENCODER
    if in_worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_JOB, _WORKER_ENCODER = job, (TextEncoder(job.tokenizer) if job is not None else None)


def _tokenize_range(bounds: tuple[int, int]) -> _Result:
    job, encoder = _WORKER_JOB, _WORKER_ENCODER
    eos = job.tokenizer.eos_id
    lengths = np.full(bounds[1] - bounds[0], _ERROR, dtype=np.int64)
    all_ids: list[int] = []
    all_targets: list[bool] = []
    result = _Result(lengths, None, None)
    for offset, index in enumerate(range(*bounds)):
        example = job.examples[index]
        if example is None:
            continue
        try:
            ids, targets = encoder.encode_rendered(job.renderer(example))
        except RowError as err:
            result.errors.append((index, str(err)))
            if not job.keep_going:
                break
            continue
        if len(ids) > job.max_seq_len:
            if job.truncation == "drop":
                lengths[offset] = _DROPPED
                continue
            ids = ids[: job.max_seq_len - 1] + [eos]  # keep the end-of-sequence token: the model sees answers end
            targets = targets[: job.max_seq_len - 1] + [True]
            result.truncated += 1
        lengths[offset] = len(ids)
        all_ids.extend(ids)
        all_targets.extend(targets)
    result.tokens = np.asarray(all_ids, dtype=np.int32)
    result.targets = np.asarray(all_targets, dtype=np.bool_)
    return result


def tokenizer_workers(num_proc: int | None, num_rows: int) -> int:
    if num_proc is not None:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8) if num_rows >= PARALLEL_MIN_ROWS else 1


def run_tokenize_job(job: TokenizeJob, num_workers: int) -> list[_Result]:
    n = len(job.examples)
    if num_workers <= 1 or n < 2:
        _set_worker_job(job)
        try:
            return [_tokenize_range((0, n))]
        finally:
            _set_worker_job(None)
    chunk = max(256, -(-n // (num_workers * 4)))
    ranges = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    # fork shares the examples and tokenizer with the workers without pickling them; elsewhere they are pickled once
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    results = []
    with context.Pool(num_workers, initializer=_set_worker_job, initargs=(job, True)) as pool:
        for result in pool.imap(_tokenize_range, ranges):
            results.append(result)
            if result.errors and not job.keep_going:
                pool.terminate()
                break
    return results
