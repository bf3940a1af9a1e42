"""Custom row transforms (`row_transform=module:function`): applied before format detection, errors name the row,
bad rows skip with skip_bad_rows, and the tokenization cache key follows the function's source."""

import json

import pytest

from mytune.data import build_sft_dataset, sft_dataset_from_rows
from mytune.errors import ConfigError, MytuneError

TRANSFORM = """
def to_chat(row):
    if row.get("boom"):
        raise ValueError("no answer in " + row["q"])
    if row.get("weird"):
        return ["not", "a", "dict"]
    return {"messages": [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]}


def to_nothing(row):
    return {"question": row["q"]}


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def transform_module(tmp_path, monkeypatch):
    """A module `my_rows_<n>` written to tmp_path and importable; returns its name."""
    package = tmp_path / "pkg"
    package.mkdir()
    name = f"my_rows_{abs(hash(str(tmp_path))) % 10**8}"
    (package / f"{name}.py").write_text(TRANSFORM)
    monkeypatch.syspath_prepend(str(package))
    return name


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _chat_ids(tokenizer, question, answer):
    """The reference: the same conversation given as a built-in chat row."""
    reference = sft_dataset_from_rows(
        [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}],
        tokenizer, max_seq_len=512)
    return reference.sample(0)


def test_transform_turns_raw_rows_into_chat(tmp_path, char_tokenizer, transform_module):
    path = _write(tmp_path / "raw.jsonl", [{"q": "hi", "a": "hello"}, {"q": "2+2?", "a": "4"}])
    dataset = build_sft_dataset(path, char_tokenizer, max_seq_len=512, row_transform=f"{transform_module}:to_chat")
    assert dataset.stats["dataset_format"] == "chat"
    assert dataset.sample(0) == _chat_ids(char_tokenizer, "hi", "hello")
    assert dataset.sample(1) == _chat_ids(char_tokenizer, "2+2?", "4")


def test_exception_in_transform_names_file_line_and_error(tmp_path, char_tokenizer, transform_module):
    path = _write(tmp_path / "raw.jsonl", [{"q": "hi", "a": "x"}, {"q": "ok", "a": "y"}, {"q": "bad", "boom": 1}])
    with pytest.raises(MytuneError) as info:
        build_sft_dataset(path, char_tokenizer, max_seq_len=512, row_transform=f"{transform_module}:to_chat")
    message = str(info.value)
    assert "\n" not in message
    assert f"{path} line 3: row_transform {transform_module}:to_chat raised ValueError: no answer in bad" in message

    skipped = build_sft_dataset(path, char_tokenizer, max_seq_len=512, skip_bad_rows=True,
                                row_transform=f"{transform_module}:to_chat")
    assert skipped.num_samples == 2 and skipped.stats["bad_rows_skipped"] == 1
    assert "line 3" in skipped.stats["skipped_examples"][0]


def test_non_dict_and_unknown_format_returns_are_one_line(tmp_path, char_tokenizer, transform_module):
    path = _write(tmp_path / "raw.jsonl", [{"q": "hi", "a": "x"}, {"q": "w", "weird": 1}])
    with pytest.raises(MytuneError, match=r"line 2: row_transform .*:to_chat returned list, expected a dict") as info:
        build_sft_dataset(path, char_tokenizer, max_seq_len=512, row_transform=f"{transform_module}:to_chat")
    assert "\n" not in str(info.value)
    with pytest.raises(MytuneError, match=r"line 1: row_transform .*:to_nothing returned a row that is in no known "
                                          r"format: .*question") as info:
        build_sft_dataset(path, char_tokenizer, max_seq_len=512, row_transform=f"{transform_module}:to_nothing")
    assert "\n" not in str(info.value)
    with pytest.raises(MytuneError, match=r"line 1: row_transform .*:to_nothing returned a row that is not chat: "
                                          r"missing column 'messages'"):
        build_sft_dataset(path, char_tokenizer, max_seq_len=512, dataset_format="chat",
                          row_transform=f"{transform_module}:to_nothing")


@pytest.mark.parametrize("spec, expected", [
    ("no_such_module_xyz:f", "row_transform=no_such_module_xyz:f: cannot import module 'no_such_module_xyz'"),
    ("{module}:missing", "row_transform={module}:missing: module '{module}' has no 'missing'"),
    ("{module}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
    ("just_a_name", "row_transform must be an import path module:function"),
])
def test_import_errors_name_the_field_and_path(tmp_path, char_tokenizer, transform_module, spec, expected):
    path = _write(tmp_path / "raw.jsonl", [{"q": "hi", "a": "x"}])
    with pytest.raises(ConfigError) as info:
        build_sft_dataset(path, char_tokenizer, max_seq_len=512, row_transform=spec.format(module=transform_module))
    assert expected.format(module=transform_module) in str(info.value)
    assert "\n" not in str(info.value)


def test_cache_key_follows_the_function_source(tmp_path, char_tokenizer, transform_module, monkeypatch):
    import importlib
    import sys

    path = _write(tmp_path / "raw.jsonl", [{"q": "hi", "a": "hello"}])
    cache = tmp_path / "cache"
    spec = f"{transform_module}:to_chat"
    first = build_sft_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache, row_transform=spec)
    again = build_sft_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache, row_transform=spec)
    plain = build_sft_dataset(_write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]),
        char_tokenizer, max_seq_len=512, cache_dir=cache)
    assert (first.stats["cache"], again.stats["cache"], plain.stats["cache"]) == ("written", "hit", "written")

    # Edit the function (answer upper-cased) and reload the module: the cache must miss and the tokens change.
    module_file = sys.modules[transform_module].__file__
    source = open(module_file).read().replace('"content": row["a"]}', '"content": row["a"].upper()}')
    open(module_file, "w").write(source)
    importlib.reload(sys.modules[transform_module])
    edited = build_sft_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache, row_transform=spec)
    assert edited.stats["cache"] == "written"
    assert edited.sample(0) == _chat_ids(char_tokenizer, "hi", "HELLO") != first.sample(0)
