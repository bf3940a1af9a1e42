"""The one tokenizer interface recipes use, and helpers shared by its implementations."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from mytune.errors import MytuneError

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # where transformers >= 4.50 saves the template instead of the config


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `encode` adds bos as the tokenizer's own rule says (`add_bos`: what transformers'
    `tokenizer(text)` does, from tokenizer.json's post-processor or `add_bos_token` in tokenizer_config.json) unless
    told otherwise (`add_bos=`), and eos only when asked (`add_eos`).

    `bos_token`/`eos_token` are the strings of `bos_id`/`eos_id` (what chat templates write; None without bos) and
    `chat_template` the Jinja template from tokenizer_config.json (or chat_template.jinja) beside the files, or None:
    the data pipeline renders prompts with them (`mytune.data.templates`).
    """

    bos_id: int | None
    eos_id: int
    pad_id: int            # a valid id used for padding inputs (labels there are masked anyway); eos if none
    vocab_size: int
    files: list[Path]      # the files to copy into a saved checkpoint so the output dir is self-contained
    bos_token: str | None
    eos_token: str
    chat_template: str | None
    add_bos: bool          # the tokenizer's rule: does raw text get bos prepended (False when bos_id is None)

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]: ...

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


def read_add_bos_token(directory: Path) -> bool | None:
    """`add_bos_token` of tokenizer_config.json in `directory` (transformers' switch for SentencePiece tokenizers), or
    None when the file or the key is absent."""
    path = directory / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MytuneError(f"{path}: invalid JSON ({err})") from None
    value = config.get("add_bos_token") if isinstance(config, dict) else None
    if value is not None and not isinstance(value, bool):
        raise MytuneError(f"{path}: add_bos_token must be true or false, got {value!r}")
    return value


def read_chat_template(directory: Path) -> str | None:
    """The chat template of the tokenizer files in `directory`, as `transformers` finds it, or None.

    `chat_template` in tokenizer_config.json: a Jinja string, or a list of `{"name", "template"}` of which the one
    named "default" is used (transformers' default); else a chat_template.jinja file beside it.
    """
    path = directory / TOKENIZER_CONFIG_NAME
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise MytuneError(f"{path}: invalid JSON ({err})") from None
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise MytuneError(f"{path}: chat_template lists templates {sorted(map(str, named))} but none named "
                                  "'default'; set chat_template=<Jinja string> in the recipe config")
            template = named["default"]
        if template is not None and not isinstance(template, str):
            raise MytuneError(f"{path}: chat_template must be a Jinja string, got {type(template).__name__}")
        if template:
            return template
    jinja = directory / CHAT_TEMPLATE_NAME
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    return None


def sibling_config_files(model_file: Path) -> list[Path]:
    """tokenizer_config.json / special_tokens_map.json / chat_template.jinja next to `model_file`, when they exist
    (they carry the special tokens and chat template, so a saved checkpoint should keep them)."""
    directory = model_file.parent
    names = (TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME, CHAT_TEMPLATE_NAME)
    return [directory / name for name in names if (directory / name).is_file()]
