"""Dataset rows from files, alpaca instruction formatting with loss masking, and batch collation."""

from mytune.data.collate import padded_collate
from mytune.data.instruct import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    CROSS_ENTROPY_IGNORE_INDEX,
    InstructDataset,
    InstructTokenizer,
    alpaca_prompt,
    validate_instruct_row,
)
from mytune.data.rows import load_rows

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "CROSS_ENTROPY_IGNORE_INDEX",
    "InstructDataset",
    "InstructTokenizer",
    "alpaca_prompt",
    "load_rows",
    "padded_collate",
    "validate_instruct_row",
]
