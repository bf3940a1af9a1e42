"""Preference datasets (DPO and its relatives): a prompt with a chosen and a rejected response, tokenized as SFT does.

    dataset = build_preference_dataset("pairs.jsonl", tokenizer, max_seq_len=1024, cache_dir=...)
    train, val = split_validation(dataset, 0.05, seed=0)            # the same function as for SFT data
    loader = ResumableDataLoader(train, batch_size=..., sampler=ResumableSampler(train, ...),
                                 collate_fn=partial(preference_collate, pad_id=tokenizer.pad_id))

Row formats, detected from the first row's columns (`column_map` maps our names prompt/chosen/rejected to the
dataset's, e.g. {"prompt": "question"}):
- standard (TRL): `prompt`, `chosen`, `rejected` strings. Each side is rendered as the SFT instruct row
  {"instruction": prompt, "output": response} (alpaca, or the chat template as one user and one assistant turn), so
  the response tokens are exactly those SFT trains on for that output.
- conversational (TRL): `prompt` a list of messages, `chosen`/`rejected` lists of (assistant) messages: each side is
  the chat row prompt + response. Messages are `{"role", "content"}` or ShareGPT `{"from", "value"}`.
- implicit (HH-RLHF style): `chosen`/`rejected` whole conversations starting with the same messages: the shared
  messages are the prompt, the rest of each (its final assistant turn(s)) the response.
Only response tokens are labelled: assistant turns inside the prompt are context, not targets (SFT's
train_on_input=False, restricted to the response).

Pipeline: the SFT one, reused. Rows are read (rows.py) and every row validated before tokenizing (a bad row fails
naming file:line, or is skipped and counted with `skip_bad_rows`); each side is rendered (templates.py) and
tokenized whole (encoding.py) by sft.py's worker pool; then each pair is fitted to `max_seq_len` and cached
(cache.py: the same entry layout, with the chosen and rejected samples of pair i at sample 2i and 2i + 1, under a
key whose settings say kind=preference, so an SFT entry is never read as a preference one).

Truncation keeps the response. When a side is longer than `max_seq_len`, the prompt is cut from its left, by the same
number of tokens on both sides (so both responses still follow the same prompt), keeping the BOS token and at least
the prompt's last token; only if a response alone still does not fit is its end cut, keeping a final eos (as SFT's
truncation does). "drop" leaves such a pair out instead. Both are counted in `stats`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mytune.data.cache import cache_key, load_entry, save_entry, tokenizer_fingerprint, warn
from mytune.data.collate import padded_collate
from mytune.data.encoding import special_token_strings
from mytune.data.formats import Example, RowError, check_column_map, column_label, string_column, to_example
from mytune.data.rows import RowTable, read_rows
from mytune.data.sft import (
    CROSS_ENTROPY_IGNORE_INDEX,
    DataSettings,
    TokenizeJob,
    check_settings,
    run_tokenize_job,
    source_identity,
    tokenizer_workers,
)
from mytune.data.templates import PromptRenderer, Rendered, resolve_template
from mytune.errors import MytuneError

PREFERENCE_FORMATS = ("standard", "conversational", "implicit")
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
CACHE_KIND = "preference"


# ---- the dataset -----------------------------------------------------------------------------------------------------
class PreferenceDataset(Dataset):
    """Tokenized preference pairs in flat arrays (the SFTDataset layout): pair i's chosen side is sample 2i, its
    rejected side sample 2i + 1, sample j at `offsets[j]:offsets[j+1]` of `tokens` (int32) and `targets` (bool).

    `indices` selects and orders the pairs this dataset uses (`split_validation` makes subsets sharing the arrays),
    so `indices[i]` names item i's pair in the whole dataset (e.g. to look up precomputed reference log-probs).
    `cache_key` is the tokenization cache key the pairs were stored under (None without a cache).
    """

    def __init__(self, tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray, *, max_seq_len: int,
                 indices: Sequence[int] | None = None, stats: dict | None = None, cache_key: str | None = None):
        self._tokens = tokens
        self._targets = targets
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.max_seq_len = max_seq_len
        total = (len(self._offsets) - 1) // 2
        self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        self.stats = dict(stats or {})
        self.cache_key = cache_key

    @property
    def num_samples(self) -> int:
        """Pairs in this dataset (what `split_validation` splits)."""
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        pair = int(self.indices[index])
        chosen_tokens, chosen_labels = self._side(2 * pair)
        rejected_tokens, rejected_labels = self._side(2 * pair + 1)
        return {"chosen_tokens": chosen_tokens, "chosen_labels": chosen_labels,
                "rejected_tokens": rejected_tokens, "rejected_labels": rejected_labels}

    def _side(self, sample: int) -> tuple[list[int], list[int]]:
        start, end = self._offsets[sample], self._offsets[sample + 1]
        tokens = np.asarray(self._tokens[start:end], dtype=np.int64)
        labels = np.where(self._targets[start:end], tokens, CROSS_ENTROPY_IGNORE_INDEX)
        return tokens.tolist(), labels.tolist()

    def token_counts(self) -> list[int]:
        """Tokens of each pair, chosen plus rejected (after truncation): for statistics and batching."""
        lengths = self._offsets[1:] - self._offsets[:-1]
        return (lengths[2 * self.indices] + lengths[2 * self.indices + 1]).tolist()

    def subset(self, indices: Sequence[int]) -> "PreferenceDataset":
        """The pairs at `indices` (positions in this dataset's order)."""
        return PreferenceDataset(self._tokens, self._targets, self._offsets, max_seq_len=self.max_seq_len,
                                 indices=self.indices[np.asarray(indices, dtype=np.int64)], stats=self.stats,
                                 cache_key=self.cache_key)

    def summary(self) -> str:
        s = self.stats
        return (f"{len(self)} preference pairs, {sum(self.token_counts())} tokens ({s.get('truncated_prompt', 0)} "
                f"prompts and {s.get('truncated_response', 0)} responses truncated, "
                f"{s.get('dropped_too_long', 0)} pairs dropped as longer than max_seq_len={self.max_seq_len}, "
                f"{s.get('bad_rows_skipped', 0)} bad rows skipped; tokenization cache: {s.get('cache', 'off')})")


def preference_collate(items: list[dict], *, pad_id: int, ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX,
                       pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """A batch for one concatenated forward: `padded_collate` over [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}].

    Rows [:B] are the chosen sides and [B:] the rejected ones (pair i at rows i and B + i), all padded to the longest
    of the 2B sequences (rounded up to `pad_to_multiple_of`: sequence parallel): "tokens", "labels" [2B, S],
    "seq_lens" [2B], "label_positions".
    """
    sides = [{"tokens": item["chosen_tokens"], "labels": item["chosen_labels"]} for item in items]
    sides += [{"tokens": item["rejected_tokens"], "labels": item["rejected_labels"]} for item in items]
    return padded_collate(sides, pad_id=pad_id, ignore_index=ignore_index, pad_to_multiple_of=pad_to_multiple_of)


# ---- building --------------------------------------------------------------------------------------------------------
def build_preference_dataset(path: str | Path, tokenizer: object, *, max_seq_len: int,
                             column_map: Mapping[str, str] | None = None, chat_template: str | None = None,
                             skip_bad_rows: bool = False, truncation: str = "truncate",
                             cache_dir: str | Path | None = None, split: str = "train",
                             num_proc: int | None = None) -> PreferenceDataset:
    """Tokenized preference pairs from a file, a folder, or a hub dataset name (see the module docstring).

    - `column_map`: {our column: dataset column} for prompt, chosen, rejected.
    - `chat_template`: as for SFT: None (the tokenizer's own if it has one, else alpaca for standard rows and chatml
      for conversations), a built-in name (alpaca, llama2, llama3, chatml), "tokenizer", or a Jinja string.
    - `truncation`: "truncate" (keep the response: cut the prompt's left first) or "drop" pairs that do not fit.
    - `skip_bad_rows`: skip and count unusable rows instead of raising at the first one.
    - `cache_dir`: where tokenized pairs are cached (None: no cache); `split`: the split of a hub dataset.
    - `num_proc`: tokenizer processes (None: automatic, as for SFT).
    """
    settings = _preference_settings(max_seq_len, column_map, chat_template, skip_bad_rows, truncation, num_proc)
    hub, data_id = source_identity(path, split, fingerprint=cache_dir is not None)
    key = None
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if cache_dir is not None and data_id is not None:  # else a missing path: read_rows says so
        cache_dir = Path(cache_dir).expanduser()
        key = cache_key(data_id, tokenizer_fingerprint(tokenizer),
                        {**settings.cache_fields(), "kind": CACHE_KIND, "split": split})
        cached = load_entry(cache_dir, key, vocab_size=vocab_size)
        if cached is not None:
            if _meta_problem(cached[3]) is None:
                return _dataset(*cached, settings, cache="hit", key=key)
            warn(f"tokenization cache entry {cache_dir / key} does not hold preference pairs: tokenizing again")
            shutil.rmtree(cache_dir / key, ignore_errors=True)  # else save_entry keeps it (another writer's)
    table = read_rows(path, skip_bad_rows=skip_bad_rows, split=split, hub=hub)
    tokens, targets, offsets, meta = _tokenize_pairs(table, tokenizer, settings, source=str(path))
    cache = "off"
    if cache_dir is not None:
        written = save_entry(cache_dir, key, tokens, targets, offsets, meta, vocab_size=vocab_size)
        cache = "written" if written is not None else "not written"
    return _dataset(tokens, targets, offsets, meta, settings, cache=cache, key=key if cache == "written" else None)


def preference_dataset_from_rows(rows: list, tokenizer: object, *, max_seq_len: int, source: str = "<rows>",
                                 column_map: Mapping[str, str] | None = None, chat_template: str | None = None,
                                 skip_bad_rows: bool = False, truncation: str = "truncate",
                                 num_proc: int | None = 1) -> PreferenceDataset:
    """`build_preference_dataset` for rows already in memory (errors name them "<source> row N (0-based)"); no cache."""
    settings = _preference_settings(max_seq_len, column_map, chat_template, skip_bad_rows, truncation, num_proc,
                                    source=source)
    if not rows:
        raise MytuneError(f"{source}: no rows; the dataset needs at least one row")
    arrays = _tokenize_pairs(RowTable.from_rows(rows, source), tokenizer, settings, source=source)
    return _dataset(*arrays, settings, cache="off", key=None)


def _preference_settings(max_seq_len, column_map, chat_template, skip_bad_rows, truncation, num_proc,
                         source: str = "") -> DataSettings:
    """SFT's setting checks, with the preference column map (prompt/chosen/rejected) checked here."""
    settings = check_settings(max_seq_len, None, None, chat_template, skip_bad_rows, truncation, num_proc,
                               source=source)
    settings.column_map = check_column_map(column_map, PREFERENCE_COLUMNS, reader="preference data")
    return settings


def _dataset(tokens, targets, offsets, meta, settings: DataSettings, *, cache: str, key: str | None) -> PreferenceDataset:
    return PreferenceDataset(tokens, targets, offsets, max_seq_len=settings.max_seq_len,
                             stats={**meta, "cache": cache}, cache_key=key)


def _meta_problem(meta: dict) -> str | None:
    """What makes a (well-formed) cache entry unfit to be read as pairs; None when it is fit."""
    pairs = meta.get("pairs")
    if meta.get("kind") != CACHE_KIND or not isinstance(pairs, int) or 2 * pairs != meta["samples"]:
        return "not a preference entry"
    return None


# ---- rows -> pairs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    """One side of a pair as SFT would render it: `example` is prompt + response; the first `prompt_turns`
    assistant turns belong to the prompt (context, not trained)."""

    example: Example
    prompt_turns: int = 0


class ResponseRenderer:
    """Renders a `Side` with an SFT `PromptRenderer`, keeping only the response's target spans. Picklable."""

    def __init__(self, renderer: PromptRenderer):
        self.renderer = renderer

    def __call__(self, side: Side) -> Rendered:
        rendered = self.renderer(side.example)
        if side.prompt_turns:
            rendered.spans = sorted(rendered.spans)[side.prompt_turns:]
        return rendered


def detect_preference_format(row: object, column_map: Mapping[str, str], where: str) -> str:
    """standard (prompt is a string), conversational (prompt is a list) or implicit (no prompt column)."""
    prompt, chosen, rejected = (column_map.get(column, column) for column in PREFERENCE_COLUMNS)
    if isinstance(row, Mapping) and chosen in row and rejected in row:
        if prompt not in row:
            if isinstance(row[chosen], str):
                raise MytuneError(
                    f"{where}: {chosen!r} and {rejected!r} are strings but there is no {prompt!r} column; give the "
                    f"prompt its own column (TRL's extract_prompt splits it off), or {chosen!r}/{rejected!r} as "
                    "message lists sharing their first messages")
            return "implicit"
        return "conversational" if isinstance(row[prompt], list) else "standard"
    present = (", ".join(map(str, row)) or "none") if isinstance(row, Mapping) else f"a {type(row).__name__}"
    raise MytuneError(
        f"{where}: cannot tell the preference format from the columns ({present}); expected {prompt!r}, {chosen!r} "
        f"and {rejected!r} (prompt and responses as strings or message lists), or {chosen!r} and {rejected!r} "
        "conversations sharing their first messages; map other names with column_map={prompt: ..., chosen: ..., "
        "rejected: ...}"
    )


def to_pair(row: object, preference_format: str, column_map: Mapping[str, str]) -> tuple[Side, Side]:
    """Validate a row and split it into its (chosen, rejected) sides; a `RowError` names the column and the problem."""
    if not isinstance(row, Mapping):
        raise RowError(f"expected an object with columns {', '.join(PREFERENCE_COLUMNS)}, got {type(row).__name__}")
    if preference_format == "standard":
        prompt = string_column(row, "prompt", column_map, required=True)
        chosen, rejected = (string_column(row, side, column_map, required=True) for side in ("chosen", "rejected"))
        return (Side(Example("instruct", instruction=prompt, output=chosen)),
                Side(Example("instruct", instruction=prompt, output=rejected)))
    if preference_format == "conversational":
        prompt = _messages(row, "prompt", column_map, prompt=True)
        responses = [_messages(row, side, column_map) for side in ("chosen", "rejected")]
    else:
        prompt, responses = _split_shared_prefix(row, column_map)
    turns = sum(role == "assistant" for role, _ in prompt)
    chosen, rejected = (Side(Example("chat", messages=prompt + response), turns) for response in responses)
    return chosen, rejected


def _messages(row: Mapping, column: str, column_map: Mapping[str, str], *,
              prompt: bool = False) -> tuple[tuple[str, str], ...]:
    """The (role, content) messages of a list column, checked by SFT's chat-row validation (formats.py).

    A response must end in an assistant message. A prompt need not hold one: it is checked with a placeholder
    assistant turn after it (SFT requires one per conversation), which is dropped again.
    """
    theirs = column_map.get(column, column)
    if theirs not in row:
        present = ", ".join(map(str, row)) or "none"
        raise RowError(f"missing column {column_label(column, column_map)} (columns present: {present})")
    turns = row[theirs]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {column_label(column, column_map)} must be a non-empty list of messages, got "
                       f"{type(turns).__name__}: {turns!r:.60}")
    sharegpt = isinstance(turns[0], Mapping) and "from" in turns[0] and "role" not in turns[0]
    role_key, content_key, chat_column = ("from", "value", "conversations") if sharegpt else \
        ("role", "content", "messages")
    checked = turns + [{role_key: "assistant", content_key: ""}] if prompt else turns
    messages = to_example({theirs: checked}, "chat", {chat_column: theirs}).messages
    if prompt:
        return messages[:-1]
    if messages[-1][0] != "assistant":
        raise RowError(f"column {column_label(column, column_map)} must end in an assistant message (the response), "
                       f"got a {messages[-1][0]} message last")
    return messages


def _split_shared_prefix(row: Mapping, column_map: Mapping[str, str]):
    """HH-RLHF style: the messages both conversations start with are the prompt, the rest of each its response."""
    chosen, rejected = (_messages(row, side, column_map) for side in ("chosen", "rejected"))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    names = " and ".join(column_label(side, column_map) for side in ("chosen", "rejected"))
    if shared == 0:
        raise RowError(f"{names} share no first message, so there is no prompt; give the conversations the same "
                       "prompt messages (or the prompt in its own 'prompt' column)")
    if shared == len(chosen) or shared == len(rejected):
        raise RowError(f"{names} do not differ after their shared messages (one conversation is the other or "
                       "starts it), so there is no pair of responses")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        user = next((i for i in range(shared, len(messages)) if messages[i][0] in ("user", "system")), None)
        if user is not None:
            raise RowError(f"{names} differ before their final assistant turn(s): message {user} of "
                           f"{column_label(side, column_map)} is a {messages[user][0]} message after the shared prompt")
    return chosen[:shared], [chosen[shared:], rejected[shared:]]


# ---- tokenizing and fitting ------------------------------------------------------------------------------------------
def _tokenize_pairs(table: RowTable, tokenizer: object, settings: DataSettings,
                    source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Validate every row, tokenize both sides (sft.py's workers), fit each pair; returns (tokens, targets, offsets,
    stats) with pair i at samples 2i (chosen) and 2i + 1 (rejected)."""
    if not table.rows:
        raise MytuneError(f"{source}: no usable rows ({table.skipped} bad rows skipped: "
                          f"{'; '.join(table.skip_messages)})")
    column_map = settings.column_map
    rows_read = len(table.rows) + table.skipped
    preference_format = detect_preference_format(table.rows[0], column_map, table.where(0))
    sides: list[Side | None] = []
    for index, row in enumerate(table.rows):
        try:
            sides.extend(to_pair(row, preference_format, column_map))
        except RowError as err:
            table.skip(f"{table.where(index)}: {err}", settings.skip_bad_rows)
            sides.extend((None, None))

    template = resolve_template(settings.chat_template, tokenizer,
                                "instruct" if preference_format == "standard" else "chat")
    bos_token, eos_token = special_token_strings(tokenizer)
    renderer = ResponseRenderer(PromptRenderer(template, bos_token=bos_token, eos_token=eos_token))
    # Full sequences first (no cut: SFT's truncation is per sample), fitted per pair below.
    job = TokenizeJob(sides, renderer, tokenizer, sys.maxsize, "truncate", settings.skip_bad_rows)
    results = run_tokenize_job(job, tokenizer_workers(settings.num_proc, len(sides)))
    reported: set[int] = set()
    for result in results:
        for index, message in result.errors:
            if index // 2 not in reported:
                reported.add(index // 2)
                table.skip(f"{table.where(index // 2)}: {message}", settings.skip_bad_rows)

    lengths = np.concatenate([r.lengths for r in results])
    all_tokens = np.concatenate([r.tokens for r in results])
    all_targets = np.concatenate([r.targets for r in results])
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))])
    counts = {"truncated": 0, "truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0}
    kept_tokens, kept_targets, kept_lengths = [], [], []
    for pair in range(len(table.rows)):
        if pair in reported or lengths[2 * pair] <= 0 or lengths[2 * pair + 1] <= 0:
            continue  # a bad row: reported above or at validation
        pair_sides = [(all_tokens[starts[j]:starts[j + 1]], all_targets[starts[j]:starts[j + 1]])
                      for j in (2 * pair, 2 * pair + 1)]
        if not all(targets.any() for _, targets in pair_sides):
            table.skip(f"{table.where(pair)}: a response renders to no tokens to train on with chat_template "
                       f"{template if len(template) < 40 else '<jinja>'}", settings.skip_bad_rows)
            continue
        fitted, prompt_cut, response_cut = fit_pair(pair_sides, settings.max_seq_len, truncation=settings.truncation,
                                                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        counts["truncated"] += prompt_cut or response_cut
        counts["truncated_prompt"] += prompt_cut
        counts["truncated_response"] += response_cut
        for ids, targets in fitted:
            kept_tokens.append(ids)
            kept_targets.append(targets)
            kept_lengths.append(len(ids))
    pairs = len(kept_lengths) // 2
    meta = {
        "kind": CACHE_KIND,
        "rows": rows_read,
        "bad_rows_skipped": table.skipped,
        "skipped_examples": table.skip_messages,
        **counts,
        "pairs": pairs,
        "samples": 2 * pairs,
        "tokens": int(sum(kept_lengths)),
        "dataset_format": preference_format,
        "chat_template": template if len(template) < 40 else "<jinja>",
    }
    if not pairs:
        raise MytuneError(f"{source}: no usable preference pairs ({meta['bad_rows_skipped']} bad rows skipped, "
                          f"{meta['dropped_too_long']} dropped as longer than max_seq_len={settings.max_seq_len})")
    tokens = np.concatenate(kept_tokens).astype(np.int32)
    targets = np.concatenate(kept_targets).astype(np.bool_)
    offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)
    return tokens, targets, offsets, meta


def fit_pair(sides: list[tuple[np.ndarray, np.ndarray]], max_seq_len: int, *, truncation: str, bos_id: int | None,
             eos_id: int) -> tuple[list[tuple[np.ndarray, np.ndarray]] | None, bool, bool]:
    """Fit both sides (token ids, target flags) of a pair into `max_seq_len`, keeping the responses.

    The prompt (the tokens before the first target) is cut from its left by the same number of tokens on both
    sides, keeping a leading BOS and the prompt's last token (so every response token is predicted from the prompt);
    a side still too long then loses its response's end, keeping a final eos target. Returns (sides, prompt cut,
    response cut), or (None, False, False) when `truncation` is "drop" and a side is too long.
    """
    over = max(len(ids) for ids, _ in sides) - max_seq_len
    if over <= 0:
        return sides, False, False
    if truncation == "drop":
        return None, False, False
    heads, removable = [], []
    for ids, targets in sides:
        prompt_length = int(np.argmax(targets))
        head = int(bos_id is not None and prompt_length > 0 and ids[0] == bos_id)
        heads.append(head)
        removable.append(max(0, prompt_length - head - 1))
    cut = min(over, *removable)
    fitted, response_cut = [], False
    for (ids, targets), head in zip(sides, heads):
        if cut:
            ids = np.concatenate([ids[:head], ids[head + cut:]])
            targets = np.concatenate([targets[:head], targets[head + cut:]])
        if len(ids) > max_seq_len:
            ids = np.concatenate([ids[: max_seq_len - 1], [eos_id]]).astype(ids.dtype)
            targets = np.concatenate([targets[: max_seq_len - 1], [True]])
            response_cut = True
        fitted.append((ids, targets))
    return fitted, cut > 0, response_cut
