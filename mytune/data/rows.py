"""Read dataset rows (plain dicts) from local files, folders of them, or Hugging Face hub datasets.

Rows are kept as plain dicts so any format (instruct, chat, text) can validate its own columns. Every row remembers
where it came from (file and line, or row number), so an error in row 48,213 of a 50k-line file names that line.

Local files: `.jsonl` (one object per line), `.json` (a list of objects, or JSON lines), `.txt` (one `{"text": line}`
row per non-empty line, as `datasets`' text loader does), `.csv` (a header line, then one row per record; every value
is a string), `.parquet` (needs `pyarrow`). A folder is read file by file in name order (not recursively) and must
hold one kind of file. Anything else that does not exist locally and looks like `owner/name` is loaded from the hub
with `datasets.load_dataset(name, split=split)` (the optional `datasets` package).
"""

from __future__ import annotations

import csv
import io
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from mytune.errors import MytuneError

FILE_KINDS = {".json": "json", ".jsonl": "json", ".txt": "txt", ".csv": "csv", ".parquet": "parquet"}
ROW_FILE_SUFFIXES = tuple(FILE_KINDS)
MAX_SKIP_MESSAGES = 5  # skipped rows beyond this are only counted


@dataclass
class RowTable:
    """Rows plus where each one came from.

    `where(i)` names row i for error messages: "data.jsonl line 7" for text files (1-based line of the row's start),
    "data.parquet row 12 (0-based)" / "tatsu-lab/alpaca [train] row 12 (0-based)" for tabular sources. `skipped`
    counts rows dropped by `skip_bad_rows` while parsing (invalid JSON, a row that is not an object);
    `skip_messages` holds the first few.
    """

    rows: list[dict] = field(default_factory=list)
    sources: list[tuple[str, str]] = field(default_factory=list)  # (display name, "line" | "row")
    source_index: array = field(default_factory=lambda: array("i"))
    position: array = field(default_factory=lambda: array("q"))
    skipped: int = 0
    skip_messages: list[str] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: list, source: str = "<rows>") -> "RowTable":
        """Rows already in memory; they are named "<source> row N (0-based)" in errors."""
        table = cls()
        index = table._add_source(source, "row")
        table.rows = list(rows)
        table.source_index = array("i", [index]) * len(rows)
        table.position = array("q", range(len(rows)))
        return table

    def where(self, index: int) -> str:
        name, unit = self.sources[self.source_index[index]]
        return f"{name} {unit} {self.position[index]}" + (" (0-based)" if unit == "row" else "")

    def __len__(self) -> int:
        return len(self.rows)

    def _add_source(self, name: str, unit: str) -> int:
        self.sources.append((name, unit))
        return len(self.sources) - 1

    def _append(self, row: dict, source: int, position: int) -> None:
        self.rows.append(row)
        self.source_index.append(source)
        self.position.append(position)

    def skip(self, message: str, skip_bad_rows: bool) -> None:
        """A bad row: one MytuneError line, or (with `skip_bad_rows`) counted, its first messages kept."""
        if not skip_bad_rows:
            raise MytuneError(message + " (set skip_bad_rows=true to skip bad rows and count them)")
        self.skipped += 1
        if len(self.skip_messages) < MAX_SKIP_MESSAGES:
            self.skip_messages.append(message)


def load_rows(path: str | Path) -> list[dict]:
    """All rows of a local file or folder (see the module docstring for the formats); errors name file and line."""
    return read_rows(path, allow_hub=False).rows


def read_rows(path: str | Path, *, skip_bad_rows: bool = False, split: str = "train",
              allow_hub: bool = True, hub: tuple[Any, str] | None = None) -> RowTable:
    """Rows of a local file, a folder of files, or (when `path` does not exist locally) a hub dataset `split`.

    With `skip_bad_rows`, lines that are not valid JSON objects are skipped and counted instead of raising.
    An empty file, a missing file and a JSON file that is not a list still raise: nothing sensible can be skipped.
    `hub` is what `open_hub_dataset(path, split)` returned, when the caller already opened it.
    """
    table = RowTable()
    local = Path(path).expanduser()
    if local.is_dir():
        for file in data_files(local):
            _read_file(file, table, skip_bad_rows)
    elif local.exists():
        _read_file(local, table, skip_bad_rows)
    elif allow_hub and looks_like_hub_name(str(path)):
        dataset, _ = hub or open_hub_dataset(str(path), split)
        _extend_tabular(dataset, f"{path} [{split}]", table)
    else:
        raise MytuneError(f"{path}: dataset file not found; check the dataset path")
    return table


def local_data_files(path: str | Path) -> list[Path] | None:
    """The data files a local file or folder path reads, in order, without reading them; None if not local."""
    local = Path(path).expanduser()
    if local.is_dir():
        return data_files(local)
    if local.is_file():
        return [local]
    return None


def data_files(folder: Path) -> list[Path]:
    """The data files of a dataset folder, in the order they are read (one kind of file per folder)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FILE_KINDS)
    if not files:
        raise MytuneError(
            f"{folder}: folder has no data files ({', '.join(ROW_FILE_SUFFIXES)}); "
            "point the dataset path at a data file"
        )
    kinds = sorted({FILE_KINDS[p.suffix] for p in files})
    if len(kinds) > 1:
        raise MytuneError(
            f"{folder}: folder mixes {' and '.join(kinds)} files; keep one kind of data file per folder "
            "(or point the dataset path at one file)"
        )
    return files


def looks_like_hub_name(name: str) -> bool:
    """`owner/name` or `name`, without a data-file suffix or a path-like start."""
    if Path(name).suffix in FILE_KINDS or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    return 1 <= len(name.split("/")) <= 2 and all(part.strip() for part in name.split("/"))


def _read_file(path: Path, table: RowTable, skip_bad_rows: bool) -> None:
    kind = FILE_KINDS.get(path.suffix)
    if kind is None:
        raise MytuneError(
            f"{path}: unsupported dataset file type {path.suffix!r}; use one of {', '.join(ROW_FILE_SUFFIXES)}"
        )
    before = len(table.rows) + table.skipped
    if kind == "parquet":
        _read_parquet(path, table)
    else:
        text = _read_text(path)
        if not text.strip():
            raise MytuneError(f"{path}: file is empty; expected dataset rows")
        if kind == "json":
            _read_json(text, path, table, skip_bad_rows)
        elif kind == "txt":
            _read_txt(text, path, table)
        else:
            _read_csv(text, path, table, skip_bad_rows)
    if len(table.rows) + table.skipped == before:
        raise MytuneError(f"{path}: file has no rows; expected at least one row")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as err:
        raise MytuneError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines; not splitlines(): JSON strings may hold U+2028."""
    for line_number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield line_number, line


def _read_json(text: str, path: Path, table: RowTable, skip_bad_rows: bool) -> None:
    if path.suffix == ".jsonl":
        _read_json_lines(text, path, table, skip_bad_rows)
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        _read_json_list(text, path, table, skip_bad_rows)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if stripped.startswith("{"):  # JSON lines saved as .json (as datasets.Dataset.to_json writes them)
            _read_json_lines(text, path, table, skip_bad_rows)
            return
        raise MytuneError(f"{path} line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, dict) and len(stripped.strip().split("\n")) == 1:  # one JSON line
        _read_json_lines(text, path, table, skip_bad_rows)
        return
    raise MytuneError(
            f"{path}: expected a JSON list of objects at the top level, got {_json_type(data)} "
        "(for one object per line use a .jsonl file)"
    )


def _read_json_lines(text: str, path: Path, table: RowTable, skip_bad_rows: bool) -> None:
    source = table._add_source(str(path), "line")
    for line_number, line in _lines(text):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            table.skip(f"{path} line {line_number}: invalid JSON: {err.msg} (column {err.colno})", skip_bad_rows)
            continue
        if not isinstance(row, dict):
            table.skip(f"{path} line {line_number}: row is {_json_type(row)}, expected a JSON object per line",
                        skip_bad_rows)
            continue
        table._append(row, source, line_number)


def _read_json_list(text: str, path: Path, table: RowTable, skip_bad_rows: bool) -> None:
    """Parse a top-level JSON list item by item, remembering the line where each item starts (one pass)."""
    source = table._add_source(str(path), "line")
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line, counted_to = 1, 0
    index = 0
    length = len(text)

    def fail(at: int, message: str) -> MytuneError:
        return MytuneError(f"{path} line {text.count(chr(10), 0, at) + 1}: invalid JSON: {message}")

    while True:
        while position < length and text[position] in " \t\r\n":
            position += 1
        if position < length and text[position] == "]":
            position += 1
            break
        if index > 0:
            if position >= length or text[position] != ",":
                raise fail(position, "Expecting ',' delimiter or ']' after a list item")
            position += 1
            while position < length and text[position] in " \t\r\n":
                position += 1
        if position >= length:
            raise fail(position, "the list is not closed with ']'")
        start = position
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise MytuneError(f"{path} line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
        line += text.count("\n", counted_to, start)
        counted_to = start
        if isinstance(item, dict):
            table._append(item, source, line)
        else:
            table.skip(f"{path} line {line}: row {index} (0-based) is {_json_type(item)}, expected a JSON object",
                        skip_bad_rows)
        index += 1
    if text[position:].strip():
        raise fail(position, "extra data after the top-level list")


def _read_txt(text: str, path: Path, table: RowTable) -> None:
    source = table._add_source(str(path), "line")
    for line_number, line in _lines(text):
        table._append({"text": line.rstrip("\r")}, source, line_number)


def _read_csv(text: str, path: Path, table: RowTable, skip_bad_rows: bool) -> None:
    source = table._add_source(str(path), "line")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as err:
        raise MytuneError(f"{path} line 1: invalid CSV header: {err}") from None
    if len(set(header)) != len(header) or not all(header):
        raise MytuneError(f"{path} line 1: the CSV header needs unique, non-empty column names, got {header}")
    while True:
        start_line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise MytuneError(f"{path} line {start_line}: invalid CSV: {err}") from None
        if not record or (len(record) == 1 and not record[0].strip()):
            continue
        if len(record) != len(header):
            table.skip(f"{path} line {start_line}: {len(record)} values but the header has {len(header)} columns",
                        skip_bad_rows)
            continue
        table._append(dict(zip(header, record)), source, start_line)


def _read_parquet(path: Path, table: RowTable) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MytuneError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise MytuneError(f"{path}: not a readable parquet file ({err})") from None
    _extend_tabular(rows, str(path), table)


def open_hub_dataset(name: str, split: str) -> tuple[Any, str]:
    """The hub dataset `name` [`split`] opened by `datasets` (memory-mapped Arrow: no row is read into Python yet)
    and its fingerprint, which names the tokenization cache entry before any row is read."""
    try:
        import datasets
    except ImportError:
        raise MytuneError(
            f"{name}: not a local file or folder; to load it from the Hugging Face hub install the optional "
            "`datasets` package (pip install datasets), or check the path"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing dataset, missing split: all user-fixable
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MytuneError(f"{name}: could not load split {split!r} from the hub: {message}") from None
    return dataset, f"hub:{name}:{split}:{getattr(dataset, '_fingerprint', '')}:{len(dataset)}"


def _extend_tabular(rows: Iterable[dict], name: str, table: RowTable) -> None:
    source = table._add_source(name, "row")
    for index, row in enumerate(rows):
        table._append(dict(row), source, index)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
