"""Tokenize rendered text exactly as a whole string, and mark which tokens are targets.

The tokens of a sample are the tokenization of its whole rendered text (so they equal `apply_chat_template`'s ids and
what the model sees at inference), not a concatenation of separately tokenized pieces. Special-token strings
(`<|eot_id|>`, the bos/eos strings, ...) are split out first and mapped straight to their ids, as Hugging Face
tokenizers do; this also makes SentencePiece models (which would spell `<s>` as text) behave like `transformers`.

Where a target span starts or ends inside a run of ordinary text, the boundary in tokens is found without offsets:
if `encode(prefix)` is a prefix of the run's tokens, it ends there (one extra encode: the usual case); else if
`encode(suffix)` is a suffix of them, it starts there (byte-level BPE merges "\n\n" alone, but not before a digit);
else a token straddles the boundary: stepping back a few characters finds where it starts, and it belongs to the
later part (as in `transformers`' assistant masks, where the token holding a span's first character is a target).

Tokenizer attributes used: `encode(text, add_bos=, add_eos=)`, `bos_id`, `eos_id`; optional `bos_token`/`eos_token`
(strings; default `<s>`/`</s>`, only used to render and re-split templates) and `special_tokens` (a mapping of
special-token strings to ids).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping

from mytune.data.templates import Rendered

DEFAULT_BOS_TOKEN, DEFAULT_EOS_TOKEN = "<s>", "</s>"
_MAX_BACKOFF = 16  # characters to step back from a span edge looking for the token that straddles it
_SPECIAL_LIKE = r"<\|[^|<>\s]{1,64}\|>"  # <|eot_id|>, <|im_start|>, ...: split when the tokenizer has them as one id


def special_token_strings(tokenizer: object) -> tuple[str, str]:
    """The bos and eos strings templates write.

    In order: the tokenizer's `bos_token`/`eos_token`; the string its `special_tokens` maps to the id; what
    `decode([id], skip_special_tokens=False)` gives when that encodes back to the id (HF tokenizer.json); else
    `<s>`/`</s>`. Whatever the string, the tokenizer splits it back to `bos_id`/`eos_id`. A tokenizer without bos
    (`bos_id is None`) gets an empty bos string, so templates write no bos.
    """
    bos = _token_string(tokenizer, "bos_token", "bos_id", DEFAULT_BOS_TOKEN)
    eos = _token_string(tokenizer, "eos_token", "eos_id", DEFAULT_EOS_TOKEN)
    return bos, eos


def _token_string(tokenizer: object, name: str, id_name: str, default: str) -> str:
    token_id = getattr(tokenizer, id_name, None)
    if token_id is None:
        return ""
    if isinstance(getattr(tokenizer, name, None), str) and getattr(tokenizer, name):
        return getattr(tokenizer, name)
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, Mapping):
        for text, special_id in special.items():
            if special_id == token_id:
                return text
    try:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if text and text.strip() == text and tokenizer.encode(text, add_bos=False, add_eos=False) == [token_id]:
            return text
    except Exception:  # noqa: BLE001 - a tokenizer without (this) decode: fall back to the conventional string
        pass
    return default


class TextEncoder:
    """Encodes `Rendered` samples with one tokenizer; caches which special-looking strings are single tokens."""

    def __init__(self, tokenizer: object):
        self.tokenizer = tokenizer
        bos, eos = special_token_strings(tokenizer)
        known: dict[str, int | None] = {}
        if bos:
            known[bos] = tokenizer.bos_id
        known[eos] = tokenizer.eos_id
        extra = getattr(tokenizer, "special_tokens", None)
        if isinstance(extra, Mapping):
            known.update({str(k): int(v) for k, v in extra.items()})
        self._special_ids = known
        self._suffix_tries = self._suffix_hits = 0
        names = sorted(known, key=len, reverse=True)
        self._pattern = re.compile("|".join([*(re.escape(name) for name in names), _SPECIAL_LIKE]))

    def special_id(self, text: str) -> int | None:
        """The id of `text` when the tokenizer holds it as one token, else None (then it is ordinary text)."""
        if text not in self._special_ids:
            ids = self.tokenizer.encode(text, add_bos=False, add_eos=False)
            self._special_ids[text] = ids[0] if len(ids) == 1 else None
        return self._special_ids[text]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def encode_rendered(self, rendered: Rendered) -> tuple[list[int], list[bool]]:
        """Token ids of the sample and, per token, whether it is a target (inside a span, or the added eos)."""
        text, spans = rendered.text, sorted(rendered.spans)
        starts = [start for start, _ in spans]
        edges = sorted({edge for span in spans for edge in span})

        def is_target(position: int) -> bool:
            i = bisect.bisect_right(starts, position) - 1
            return i >= 0 and spans[i][0] <= position < spans[i][1]

        ids: list[int] = []
        targets: list[bool] = []
        if rendered.add_bos and getattr(self.tokenizer, "add_bos", True) and self.tokenizer.bos_id is not None:
            ids.append(self.tokenizer.bos_id)
            targets.append(False)
        cursor = 0
        for match in self._pattern.finditer(text) if rendered.special_text else ():
            token_id = self.special_id(match.group())
            if token_id is None:
                continue
            self._encode_plain(text, cursor, match.start(), edges, is_target, ids, targets)
            ids.append(token_id)
            targets.append(is_target(match.start()))
            cursor = match.end()
        self._encode_plain(text, cursor, len(text), edges, is_target, ids, targets)
        if rendered.add_eos:
            ids.append(self.tokenizer.eos_id)
            targets.append(True)
        return ids, targets

    def _encode_plain(self, text: str, start: int, end: int, edges: list[int], is_target, ids: list[int],
                      targets: list[bool]) -> None:
        """Encode text[start:end] (no special tokens inside) whole; split its tokens at the span edges inside it."""
        if start >= end:
            return
        chunk_ids = self.encode(text[start:end])
        inner = edges[bisect.bisect_right(edges, start): bisect.bisect_left(edges, end)]
        cuts = [0]
        for edge in inner:
            cuts.append(max(cuts[-1], self._boundary(text, start, edge, end, chunk_ids)))
        cuts.append(len(chunk_ids))
        for (lo, hi), char_start in zip(zip(cuts, cuts[1:]), [start, *inner]):
            ids.extend(chunk_ids[lo:hi])
            targets.extend([is_target(char_start)] * (hi - lo))

    def _boundary(self, text: str, start: int, edge: int, end: int, chunk_ids: list[int]) -> int:
        """Index of the first token of text[start:end]'s tokens that belongs to text[edge:end].

        Whichever of the prefix / suffix checks is cheaper goes first (the shorter text), as long as suffix checks
        work for this tokenizer (they never do with SentencePiece's dummy prefix: then it stops trying them first).
        """
        suffix_works = self._suffix_tries < 8 or 4 * self._suffix_hits >= self._suffix_tries
        suffix_first = end - edge < edge - start and suffix_works
        if suffix_first:
            self._suffix_tries += 1
            boundary = self._suffix_boundary(text, edge, end, chunk_ids)
            if boundary is not None:
                self._suffix_hits += 1
                return boundary
        prefix = self.encode(text[start:edge])
        if chunk_ids[: len(prefix)] == prefix:
            return len(prefix)
        if not suffix_first:
            boundary = self._suffix_boundary(text, edge, end, chunk_ids)
            if boundary is not None:
                return boundary
        for back in range(1, min(_MAX_BACKOFF, edge - start) + 1):  # a token straddles the edge: find where it starts
            shorter = self.encode(text[start: edge - back])
            if chunk_ids[: len(shorter)] == shorter:
                return len(shorter)
        return _common_prefix_length(prefix, chunk_ids)

    def _suffix_boundary(self, text: str, edge: int, end: int, chunk_ids: list[int]) -> int | None:
        suffix = self.encode(text[edge:end])  # e.g. byte-level BPE: "\n\n" alone is one token, "\n\n4" three
        if suffix and len(suffix) <= len(chunk_ids) and chunk_ids[len(chunk_ids) - len(suffix):] == suffix:
            return len(chunk_ids) - len(suffix)
        return None


def _common_prefix_length(prefix: list[int], full: list[int]) -> int:
    n = len(prefix)
    if full[:n] == prefix:
        return n
    for i, (a, b) in enumerate(zip(prefix, full)):
        if a != b:
            return i
    return min(n, len(full))
