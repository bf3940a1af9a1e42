"""load_rows: .json / .jsonl / folders, and one-line errors that name the file and line."""

import json

import pytest

from mytune.data import load_rows
from mytune.errors import MytuneError

ROWS = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]


def _error(path) -> str:
    with pytest.raises(MytuneError) as info:
        load_rows(path)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert load_rows(path) == ROWS


def test_json_list_and_str_path(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_rows(str(path)) == ROWS


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "data.json"  # as datasets.Dataset.to_json writes it
    path.write_text("\n".join(json.dumps(row) for row in ROWS), encoding="utf-8")
    assert load_rows(path) == ROWS


def test_utf8_bom_and_unicode_line_separator(tmp_path):
    path = tmp_path / "data.jsonl"
    row = {"instruction": "x\u2028y", "output": "é"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    assert load_rows(path) == [row]


def test_folder_reads_files_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps([ROWS[0]]), encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_rows(tmp_path) == ROWS


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    lines = [json.dumps(ROWS[0])] * 6 + ['{"instruction": "a" "output": "b"}'] + [json.dumps(ROWS[1])]
    path.write_text("\n".join(lines), encoding="utf-8")
    message = _error(path)
    assert "alpaca.jsonl line 7: invalid JSON: Expecting ',' delimiter" in message


def test_invalid_json_list_names_line(tmp_path):
    path = tmp_path / "alpaca.json"
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a", output: "b"}\n]'
    path.write_text(text, encoding="utf-8")
    assert "alpaca.json line 3: invalid JSON" in _error(path)


def test_jsonl_row_not_an_object(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(["a", "b"]) + "\n", encoding="utf-8")
    message = _error(path)
    assert "alpaca.jsonl line 2" in message and "a list" in message and "object" in message


def test_json_list_item_not_an_object_names_its_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"},\n  "oops"\n]',
                    encoding="utf-8")
    message = _error(path)
    assert "alpaca.json line 4" in message and "row 2" in message and "a string" in message


def test_json_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps({"data": ROWS}, indent=1), encoding="utf-8")
    message = _error(path)
    assert "alpaca.json" in message and "list of objects" in message


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert f"{name}: file is empty" in _error(path)


def test_empty_json_list(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]", encoding="utf-8")
    assert "none.json: file has no rows" in _error(path)


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "not found" in message


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("a,b\n", encoding="utf-8")
    message = _error(path)
    assert "data.xlsx" in message and ".jsonl" in message and ".parquet" in message


def test_folder_without_data_files(tmp_path):
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    assert "folder has no data files" in _error(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    assert "latin.jsonl: not UTF-8" in _error(path)
