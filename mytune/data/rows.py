"""Read dataset rows (plain dicts) from local JSON / JSON-lines files.

Rows are kept as plain dicts so any format (instruct, chat, text) can validate its own columns. Every error a user
can cause names the file and, where it has one, the line, so a broken row in a 50k-line file is found at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from mytune.errors import MytuneError

ROW_FILE_SUFFIXES = (".json", ".jsonl")


def load_rows(path: str | Path) -> list[dict]:
    """Load rows from a `.json` file (a list of objects), a `.jsonl` file (one object per line) or a folder of them.

    A folder is read file by file in name order (only `*.json` / `*.jsonl`, not recursively). A `.json` file that
    holds JSON lines (as `datasets.Dataset.to_json` writes them) is read as JSON lines. Blank lines are skipped.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in ROW_FILE_SUFFIXES)
        if not files:
            raise MytuneError(f"{path}: folder has no .json or .jsonl files; point the dataset path at a data file")
        return [row for file in files for row in _load_file(file)]
    if not path.exists():
        raise MytuneError(f"{path}: dataset file not found; check the dataset path")
    return _load_file(path)


def _load_file(path: Path) -> list[dict]:
    if path.suffix not in ROW_FILE_SUFFIXES:
        raise MytuneError(
            f"{path}: unsupported dataset file type {path.suffix!r}; use .json (a list of objects) or .jsonl"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as err:
        raise MytuneError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise MytuneError(f"{path}: file is empty; expected dataset rows")
    rows = _parse_json_lines(text, path) if path.suffix == ".jsonl" else _parse_json_file(text, path)
    if not rows:
        raise MytuneError(f"{path}: file has no rows; expected at least one object")
    return rows


def _parse_json_lines(text: str, path: Path) -> list[dict]:
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MytuneError(f"{path} line {line_number}: invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise MytuneError(f"{path} line {line_number}: row is {_json_type(row)}, expected a JSON object per line")
        rows.append(row)
    return rows


def _parse_json_file(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):  # JSON lines saved as .json
            return _parse_json_lines(text, path)
        raise MytuneError(f"{path} line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(data, list):
        raise MytuneError(
            f"{path}: expected a JSON list of objects at the top level, got {_json_type(data)} "
            "(for one object per line use a .jsonl file)"
        )
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise MytuneError(
                f"{path} line {_line_of_list_item(text, index)}: row {index} (0-based) is {_json_type(row)}, "
                "expected a JSON object"
            )
    return data


def _line_of_list_item(text: str, index: int) -> int:
    """1-based line where item `index` of the (valid) top-level JSON list in `text` starts; only used for errors."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    for _ in range(index + 1):
        while text[position] in " \t\r\n,":
            position += 1
        start = position
        _, position = decoder.raw_decode(text, position)
    return text.count("\n", 0, start) + 1


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
