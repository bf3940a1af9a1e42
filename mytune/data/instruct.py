"""Alpaca-style instruction data from rows in memory: the walking skeleton's dataset, now a thin `SFTDataset`.

A row is `{"instruction": str, "input": str (optional), "output": str}`. The model sees
`[bos] + tokens(prompt + output) + [eos]` (the prompt and output tokenized as one string, as at inference); the
loss sees only the output and the eos (prompt labels are -100) unless `train_on_input`. Every row is validated
before any is tokenized, so a bad row 900 fails at startup and not an hour into training.
New code should call `build_sft_dataset` (any format, files, caching, packing); this keeps the old signature.
"""

from __future__ import annotations

from typing import Protocol

from mytune.data.sft import CROSS_ENTROPY_IGNORE_INDEX, SFTDataset, sft_dataset_from_rows
from mytune.data.templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, alpaca_prompt

__all__ = ["ALPACA_PROMPT_NO_INPUT", "ALPACA_PROMPT_WITH_INPUT", "CROSS_ENTROPY_IGNORE_INDEX", "InstructDataset",
           "InstructTokenizer", "alpaca_prompt"]


class InstructTokenizer(Protocol):
    """The part of `mytune.tokenizers.Tokenizer` that the data code needs (plus optional `chat_template`,
    `bos_token`/`eos_token` strings and a `special_tokens` str -> id mapping, used when present)."""

    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]: ...


class InstructDataset(SFTDataset):
    """Alpaca-format rows, tokenized and masked for supervised fine-tuning.

    Each item is `{"tokens": [...], "labels": [...]}` of equal length; labels are NOT shifted (the loss shifts).
    Prompt positions (bos included) get label -100 unless `train_on_input`. Sequences longer than `max_seq_len` are
    cut to `max_seq_len` with the last position replaced by eos, so the model always sees where an answer ends (a
    prompt longer than `max_seq_len` leaves only that eos as a target).
    """

    def __init__(self, rows: list[dict], tokenizer: InstructTokenizer, *, max_seq_len: int,
                 train_on_input: bool = False, source: str = "<rows>"):
        built = sft_dataset_from_rows(rows, tokenizer, max_seq_len=max_seq_len, source=source,
                                      dataset_format="instruct", chat_template="alpaca",
                                      train_on_input=train_on_input)
        super().__init__(built._tokens, built._targets, built._offsets, max_seq_len=max_seq_len,
                         train_on_input=train_on_input, stats=built.stats)
        self.source = source
