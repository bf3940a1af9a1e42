"""The one tokenizer interface recipes use, and helpers shared by its implementations."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from mytune.errors import MytuneError

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `encode` adds bos/eos only when asked (`add_bos`, `add_eos`), never on its own."""

    bos_id: int | None
    eos_id: int
    pad_id: int            # a valid id used for padding inputs (labels there are masked anyway); eos if none
    vocab_size: int
    files: list[Path]      # the files to copy into a saved checkpoint so the output dir is self-contained

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


def with_special(ids: list[int], bos_id: int | None, eos_id: int, *, add_bos: bool, add_eos: bool) -> list[int]:
    """`ids` with bos prepended / eos appended as requested (bos only if the tokenizer has one)."""
    if add_bos and bos_id is not None:
        ids = [bos_id, *ids]
    if add_eos:
        ids = [*ids, eos_id]
    return ids


def read_special_tokens(directory: Path) -> dict[str, str | None]:
    """Special-token strings (`bos_token`, `eos_token`, `pad_token`, `unk_token`) from tokenizer_config.json and
    special_tokens_map.json in `directory` (tokenizer_config.json wins); `{}` when neither exists."""
    tokens: dict[str, str | None] = {}
    for name in (SPECIAL_TOKENS_MAP_NAME, TOKENIZER_CONFIG_NAME):
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise MytuneError(f"{path}: invalid JSON ({err})") from None
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in config:
                value = config[key]
                tokens[key] = value.get("content") if isinstance(value, dict) else value
    return tokens


def sibling_config_files(model_file: Path) -> list[Path]:
    """tokenizer_config.json / special_tokens_map.json next to `model_file`, when they exist (they carry the
    special tokens and chat template, so a saved checkpoint should keep them)."""
    return [p for p in (model_file.parent / TOKENIZER_CONFIG_NAME, model_file.parent / SPECIAL_TOKENS_MAP_NAME)
            if p.is_file()]
