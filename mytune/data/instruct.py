"""Alpaca-style instruction data: prompt templates, row validation, tokenization and loss masking.

A row is `{"instruction": str, "input": str (optional), "output": str}`. The model sees
`[bos] + prompt + output + [eos]`; the loss sees only the output and the eos (prompt labels are -100) unless
`train_on_input`. Every row is validated and tokenized once, up front, so a bad row 900 fails at startup and not
an hour into training.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from typing import Protocol

from torch.utils.data import Dataset

from mytune.errors import MytuneError

CROSS_ENTROPY_IGNORE_INDEX = -100

# The Stanford alpaca templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class InstructTokenizer(Protocol):
    """The part of `mytune.tokenizers.Tokenizer` that instruction data needs."""

    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca prompt for one row: the with-input template when `input_text` is non-empty, else the no-input one."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def validate_instruct_row(row: object, index: int, source: str) -> None:
    """Raise a one-line `MytuneError` naming `source` and the 0-based row `index` if `row` is not a valid alpaca row."""
    where = f"{source} row {index} (0-based)"
    if not isinstance(row, Mapping):
        raise MytuneError(f"{where}: expected an object with instruction/input/output, got {type(row).__name__}")
    for column in ("instruction", "output"):
        if column not in row:
            present = ", ".join(map(str, row)) or "none"
            raise MytuneError(
                f"{where}: missing column {column!r} (columns present: {present}); "
                "each row needs string columns 'instruction' and 'output' ('input' is optional)"
            )
    for column in ("instruction", "input", "output"):
        value = row.get(column)
        if column == "input" and value is None:
            continue
        if not isinstance(value, str):
            raise MytuneError(f"{where}: column {column!r} must be a string, got {type(value).__name__}: {value!r:.60}")


class InstructDataset(Dataset):
    """Alpaca-format rows, tokenized and masked for supervised fine-tuning.

    Each item is `{"tokens": [...], "labels": [...]}` of equal length; labels are NOT shifted (the loss shifts).
    `tokens = [bos] + encode(prompt) + encode(output) + [eos]` (no bos when the tokenizer has none). Prompt
    positions (bos included) get label -100 unless `train_on_input`. Sequences longer than `max_seq_len` are cut to
    `max_seq_len` with the last position replaced by eos, so the model always sees where an answer ends (a prompt
    longer than `max_seq_len` leaves only that eos as a target).
    """

    def __init__(self, rows: list[dict], tokenizer: InstructTokenizer, *, max_seq_len: int,
                 train_on_input: bool = False, source: str = "<rows>"):
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise MytuneError(f"{source}: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if not rows:
            raise MytuneError(f"{source}: no rows; the dataset needs at least one instruction/output row")
        for index, row in enumerate(rows):  # all rows first: a bad row fails before any (slow) tokenization
            validate_instruct_row(row, index, source)
        self.max_seq_len = max_seq_len
        self.train_on_input = train_on_input
        self.source = source
        self._tokens: list[array] = []      # int32 arrays: a python list of ints would take ~9x the memory
        self._prompt_lens: list[int] = []   # positions masked when not train_on_input (bos + prompt)
        for row in rows:
            tokens, prompt_len = self._tokenize(row, tokenizer)
            self._tokens.append(array("i", tokens))
            self._prompt_lens.append(prompt_len)

    def _tokenize(self, row: Mapping, tokenizer: InstructTokenizer) -> tuple[list[int], int]:
        prompt = alpaca_prompt(row["instruction"], row.get("input") or "")
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        prompt_ids = bos + tokenizer.encode(prompt, add_bos=False, add_eos=False)
        output_ids = tokenizer.encode(row["output"], add_bos=False, add_eos=False) + [tokenizer.eos_id]
        tokens = prompt_ids + output_ids
        if len(tokens) > self.max_seq_len:
            tokens = tokens[: self.max_seq_len - 1] + [tokenizer.eos_id]
        return tokens, min(len(prompt_ids), len(tokens) - 1)  # the final eos is always a target

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        tokens = self._tokens[index].tolist()
        labels = list(tokens)
        if not self.train_on_input:
            labels[: self._prompt_lens[index]] = [CROSS_ENTROPY_IGNORE_INDEX] * self._prompt_lens[index]
        return {"tokens": tokens, "labels": labels}

    def token_counts(self) -> list[int]:
        """Number of tokens of each item (after truncation): for statistics and length-aware batching."""
        return [len(tokens) for tokens in self._tokens]

