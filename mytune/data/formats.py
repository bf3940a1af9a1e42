"""Dataset formats: detect instruct / chat / text from the columns, validate a row, and normalise it.

- instruct: alpaca columns `instruction` (str), `input` (str, optional, may be null or empty), `output` (str).
- chat: `messages`, a list of `{"role", "content"}` (roles system/user/assistant/tool), or ShareGPT `conversations`,
  a list of `{"from", "value"}` (human/gpt/system/...); normalised to `messages`. At least one assistant turn.
- text: `text` (str), trained on entirely (continued pre-training / completion).

`column_map` maps our column names to the dataset's, e.g. `{"instruction": "prompt", "output": "response"}`.
A bad row raises `RowError` naming the column and the problem; callers prefix where the row is
("data.jsonl line 7: missing column 'output' ...").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mytune.errors import ConfigError, MytuneError

DATASET_FORMATS = ("instruct", "chat", "text")
FORMAT_COLUMNS = {"instruct": ("instruction", "input", "output"), "chat": ("messages", "conversations"),
                  "text": ("text",)}
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool"}


class RowError(MytuneError):
    """A dataset row that cannot be used; the message names the row. Skipped and counted with `skip_bad_rows`."""


@dataclass(frozen=True)
class Example:
    """One validated row. `kind` is the dataset format; exactly one payload field is set for it."""

    kind: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs
    text: str = ""

    def as_messages(self) -> list[dict[str, str]]:
        """Chat messages for this example; an instruct row becomes one user turn (instruction, blank line, input)."""
        if self.kind == "instruct":
            user = self.instruction + (f"\n\n{self.input}" if self.input else "")
            return [{"role": "user", "content": user}, {"role": "assistant", "content": self.output}]
        return [{"role": role, "content": content} for role, content in self.messages]


def check_column_map(column_map: Mapping[str, str] | None, columns: Sequence[str] | None = None,
                     reader: str = "mytune") -> dict[str, str]:
    """Validate `column_map` ({our column: dataset column}); unknown keys raise `ConfigError` naming the valid ones:
    `columns` (default: the SFT formats' columns), the columns `reader` reads."""
    if not column_map:
        return {}
    known = list(columns) if columns is not None else sorted(
        {column for format_columns in FORMAT_COLUMNS.values() for column in format_columns})
    if not isinstance(column_map, Mapping):
        raise ConfigError(f"column_map must be a mapping of {'/'.join(known)} to dataset column names, "
                          f"got {type(column_map).__name__}")
    for ours, theirs in column_map.items():
        if ours not in known:
            raise ConfigError(f"column_map key {ours!r} is not a column {reader} reads; use one of {', '.join(known)}")
        if not isinstance(theirs, str) or not theirs:
            raise ConfigError(f"column_map[{ours!r}] must be a dataset column name, got {theirs!r}")
    return dict(column_map)


def detect_format(row: object, column_map: Mapping[str, str], where: str) -> str:
    """The format a row's columns say: `instruction` -> instruct, `messages`/`conversations` -> chat, `text` -> text."""
    if isinstance(row, Mapping):
        for fmt, columns in (("instruct", ("instruction",)), ("chat", ("messages", "conversations")),
                             ("text", ("text",))):
            if any(column_map.get(column, column) in row for column in columns):
                return fmt
        present = ", ".join(map(str, row)) or "none"
    else:
        present = f"a {type(row).__name__}, not an object"
    raise MytuneError(
        f"{where}: cannot tell the dataset format from the columns ({present}); expected 'instruction' (instruct), "
        "'messages' or 'conversations' (chat) or 'text' (text): set dataset_format=... and column_map={...}"
    )


def check_dataset_format(dataset_format: str | None) -> str | None:
    if dataset_format is not None and dataset_format not in DATASET_FORMATS:
        raise ConfigError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)} (or null to detect it), "
                          f"got {dataset_format!r}")
    return dataset_format


def to_example(row: object, dataset_format: str, column_map: Mapping[str, str]) -> Example:
    """Validate `row` for `dataset_format` and normalise it; a `RowError` names the column and the problem.

    The message does not say where the row is (that costs time for every good row): callers prefix it.
    """
    if not isinstance(row, Mapping):
        raise RowError(f"expected an object with {_column_list(dataset_format, column_map)}, "
                       f"got {type(row).__name__}")
    if dataset_format == "instruct":
        return _instruct(row, column_map)
    if dataset_format == "chat":
        return _chat(row, column_map)
    return Example("text", text=string_column(row, "text", column_map, required=True))


def _column_list(dataset_format: str, column_map: Mapping[str, str]) -> str:
    return "/".join(column_map.get(column, column) for column in FORMAT_COLUMNS[dataset_format])


def column_label(column: str, column_map: Mapping[str, str]) -> str:
    theirs = column_map.get(column, column)
    return repr(theirs) if theirs == column else f"{theirs!r} (mapped from {column!r})"


def string_column(row: Mapping, column: str, column_map: Mapping[str, str], *, required: bool) -> str:
    theirs = column_map.get(column, column)
    if theirs not in row:
        if not required:
            return ""
        present = ", ".join(map(str, row)) or "none"
        raise RowError(f"missing column {column_label(column, column_map)} (columns present: {present})")
    value = row[theirs]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {column_label(column, column_map)} must be a string, "
                       f"got {type(value).__name__}: {value!r:.60}")
    return value


def _instruct(row: Mapping, column_map: Mapping[str, str]) -> Example:
    for column in ("instruction", "output"):
        if column_map.get(column, column) not in row:
            present = ", ".join(map(str, row)) or "none"
            raise RowError(
                f"missing column {column_label(column, column_map)} (columns present: {present}); "
                f"each row needs string columns {_column_list('instruct', column_map).replace('/', ', ')} "
                "(the input is optional)"
            )
    return Example(
        "instruct",
        instruction=string_column(row, "instruction", column_map, required=True),
        input=string_column(row, "input", column_map, required=False),
        output=string_column(row, "output", column_map, required=True),
    )


def _chat(row: Mapping, column_map: Mapping[str, str]) -> Example:
    messages_column = column_map.get("messages", "messages")
    sharegpt_column = column_map.get("conversations", "conversations")
    if messages_column in row:
        column, role_key, content_key, roles = messages_column, "role", "content", {r: r for r in CHAT_ROLES}
    elif sharegpt_column in row:
        column, role_key, content_key, roles = sharegpt_column, "from", "value", SHAREGPT_ROLES
    else:
        present = ", ".join(map(str, row)) or "none"
        raise RowError(f"missing column {messages_column!r} (or ShareGPT {sharegpt_column!r}) "
                       f"(columns present: {present})")
    turns = row[column]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {column!r} must be a non-empty list of messages, "
                       f"got {type(turns).__name__}: {turns!r:.60}")
    messages = []
    for index, turn in enumerate(turns):
        at = f"{column}[{index}]"
        if not isinstance(turn, Mapping):
            raise RowError(f"{at} must be an object with {role_key!r} and {content_key!r}, got {type(turn).__name__}")
        for key in (role_key, content_key):
            if key not in turn:
                raise RowError(f"{at}: missing key {key!r} (keys present: {', '.join(map(str, turn)) or 'none'})")
            if not isinstance(turn[key], str):
                raise RowError(f"{at}: {key!r} must be a string, got {type(turn[key]).__name__}: {turn[key]!r:.60}")
        role = roles.get(turn[role_key])
        if role is None:
            raise RowError(f"{at}: unknown {role_key} {turn[role_key]!r}; expected one of {', '.join(roles)}")
        messages.append((role, turn[content_key]))
    if not any(role == "assistant" for role, _ in messages):
        raise RowError("the conversation has no assistant message, so nothing to train on")
    return Example("chat", messages=tuple(messages))
