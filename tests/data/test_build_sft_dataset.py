"""build_sft_dataset: sources, format detection, column maps, errors naming file/line, skip counts, truncation,
parallel tokenization, validation split, and the on-disk cache."""

import csv
import json
import sys
import types

import numpy as np
import pytest

from mytune.data import alpaca_prompt, build_sft_dataset, read_rows, split_validation
from mytune.errors import MytuneError

ROWS = [{"instruction": f"Do {i}.", "input": "in" if i % 2 else "", "output": f"out {i}"} for i in range(20)]


def _ids(text):
    return [ord(char) + 3 for char in text]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _items(dataset):
    return [dataset[i] for i in range(len(dataset))]


# ---- sources ------------------------------------------------------------------------------------------------------
def test_every_local_source_gives_the_same_samples(tmp_path, char_tokenizer):
    reference = _items(build_sft_dataset(_jsonl(tmp_path / "a.jsonl", ROWS), char_tokenizer, max_seq_len=512))
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS)
    folder = tmp_path / "folder"
    folder.mkdir()
    _jsonl(folder / "part-0.jsonl", ROWS[:7])
    _jsonl(folder / "part-1.jsonl", ROWS[7:])
    for path in (tmp_path / "a.json", tmp_path / "a.csv", folder):
        assert _items(build_sft_dataset(path, char_tokenizer, max_seq_len=512)) == reference, path


def test_parquet(tmp_path, char_tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    expected = _items(build_sft_dataset(_jsonl(tmp_path / "a.jsonl", ROWS), char_tokenizer, max_seq_len=512))
    assert _items(build_sft_dataset(path, char_tokenizer, max_seq_len=512)) == expected
    bad = [dict(row) for row in ROWS]
    bad[12]["output"] = None
    pq.write_table(pa.Table.from_pylist(bad), path)
    with pytest.raises(MytuneError, match=r"a.parquet row 12 \(0-based\): column 'output' must be a string"):
        build_sft_dataset(path, char_tokenizer, max_seq_len=512)


def test_text_file_is_one_text_sample_per_line(tmp_path, char_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond line\n", encoding="utf-8")
    dataset = build_sft_dataset(path, char_tokenizer, max_seq_len=512)
    assert dataset.stats["dataset_format"] == "text" and len(dataset) == 2
    assert dataset[1] == {"tokens": [1, *_ids("second line"), 2], "labels": [-100, *_ids("second line"), 2]}
    assert read_rows(path).where(1) == f"{path} line 3"


def test_hub_datasets_load_through_the_datasets_library(monkeypatch, char_tokenizer):
    calls = []

    class FakeHubDataset(list):
        _fingerprint = "abc123"

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeHubDataset(ROWS[:3])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dataset = build_sft_dataset("tatsu-lab/alpaca", char_tokenizer, max_seq_len=512, split="train[:3]")
    assert calls == [("tatsu-lab/alpaca", "train[:3]")] and len(dataset) == 3
    assert read_rows("tatsu-lab/alpaca").where(2) == "tatsu-lab/alpaca [train] row 2 (0-based)"


def test_hub_name_without_the_datasets_library(monkeypatch, char_tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(MytuneError, match="pip install datasets"):
        build_sft_dataset("someone/some-data", char_tokenizer, max_seq_len=64)
    with pytest.raises(MytuneError, match="not found"):
        build_sft_dataset("missing/data.jsonl", char_tokenizer, max_seq_len=64)


def test_folder_mixing_kinds_of_files_is_refused(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "notes.txt").write_text("x\n", encoding="utf-8")
    with pytest.raises(MytuneError, match="mixes json and txt files"):
        read_rows(tmp_path)


# ---- formats --------------------------------------------------------------------------------------------------------
def test_format_detection_and_forcing(tmp_path, char_tokenizer):
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}]}])
    assert build_sft_dataset(chat, char_tokenizer, max_seq_len=512).stats["dataset_format"] == "chat"
    assert build_sft_dataset(_jsonl(tmp_path / "t.jsonl", [{"text": "x", "id": 1}]), char_tokenizer,
                             max_seq_len=512).stats["dataset_format"] == "text"
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "hello", "instruction": "i", "output": "o"}])
    assert build_sft_dataset(text, char_tokenizer, max_seq_len=512).stats["dataset_format"] == "instruct"
    forced = build_sft_dataset(text, char_tokenizer, max_seq_len=512, dataset_format="text")
    assert forced[0]["tokens"] == [1, *_ids("hello"), 2]
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(MytuneError, match=r"unknown.jsonl line 1: cannot tell the dataset format from the columns "
                                          r"\(question, answer\)"):
        build_sft_dataset(unknown, char_tokenizer, max_seq_len=512)
    with pytest.raises(MytuneError, match="dataset_format must be one of"):
        build_sft_dataset(unknown, char_tokenizer, max_seq_len=512, dataset_format="qa")


def test_column_map(tmp_path, char_tokenizer):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "Add.", "context": "2 + 3", "answer": "5"}])
    column_map = {"instruction": "question", "input": "context", "output": "answer"}
    item = build_sft_dataset(path, char_tokenizer, max_seq_len=512, column_map=column_map)[0]
    prompt = alpaca_prompt("Add.", "2 + 3")
    assert item["tokens"] == [1, *_ids(prompt), *_ids("5"), 2]
    assert item["labels"] == [-100] * (1 + len(prompt)) + _ids("5") + [2]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "Add.", "answer": 5}])
    with pytest.raises(MytuneError, match=r"bad.jsonl line 1: column 'answer' \(mapped from 'output'\) must be a "
                                          r"string, got int"):
        build_sft_dataset(bad, char_tokenizer, max_seq_len=512, column_map=column_map)
    with pytest.raises(MytuneError, match="column_map key 'response'"):
        build_sft_dataset(path, char_tokenizer, max_seq_len=512, column_map={"response": "answer"})


# ---- bad input ------------------------------------------------------------------------------------------------------
BAD_LINES = [
    ('{"instruction": "a" "output": "b"}', "line 3: invalid JSON: Expecting ',' delimiter"),
    ('{"instruction": "a"}', "line 3: missing column 'output'"),
    ('{"instruction": "a", "output": ["b"]}', "line 3: column 'output' must be a string, got list"),
    ('["a", "b"]', "line 3: row is a list, expected a JSON object per line"),
]


@pytest.mark.parametrize("line, expected", BAD_LINES)
def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path, char_tokenizer, line, expected):
    path = tmp_path / "data.jsonl"
    good = json.dumps(ROWS[0])
    path.write_text("\n".join([good, good, line, good]) + "\n", encoding="utf-8")
    with pytest.raises(MytuneError) as info:
        build_sft_dataset(path, char_tokenizer, max_seq_len=512)
    message = str(info.value)
    assert message.startswith(f"{path} {expected}") and "skip_bad_rows=true" in message and "\n" not in message
    dataset = build_sft_dataset(path, char_tokenizer, max_seq_len=512, skip_bad_rows=True)
    assert len(dataset) == 3 and dataset.stats["bad_rows_skipped"] == 1 and dataset.stats["rows"] == 4
    assert dataset.stats["skipped_examples"][0].startswith(f"{path} {expected}")
    assert "1 bad rows skipped" in dataset.summary()


def test_bad_chat_messages(tmp_path, char_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
            {"messages": "hello"}]
    expected = ["line 1: the conversation has no assistant message", "line 1: messages[0]: unknown role 'robot'",
                "line 1: conversations[0]: 'value' must be a string, got int",
                "line 1: column 'messages' must be a non-empty list"]
    for row, message in zip(rows, expected):
        path = _jsonl(tmp_path / "chat.jsonl", [row])
        with pytest.raises(MytuneError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build_sft_dataset(path, char_tokenizer, max_seq_len=512)


def test_empty_file_and_all_rows_bad(tmp_path, char_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(MytuneError, match="empty.jsonl: file is empty"):
        build_sft_dataset(empty, char_tokenizer, max_seq_len=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(MytuneError, match=r"no usable rows \(1 bad rows skipped"):
        build_sft_dataset(bad, char_tokenizer, max_seq_len=64, skip_bad_rows=True)


# ---- length ---------------------------------------------------------------------------------------------------------
def test_truncate_keeps_eos_and_drop_leaves_out_and_both_count(tmp_path, char_tokenizer):
    rows = [{"text": "short"}, {"text": "a much longer text than fits"}, {"text": "tiny"}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    truncated = build_sft_dataset(path, char_tokenizer, max_seq_len=10)
    assert truncated.stats["truncated"] == 1 and len(truncated) == 3
    assert truncated[1]["tokens"] == [1, *_ids("a much l"), 2] and truncated[1]["labels"][-1] == 2
    dropped = build_sft_dataset(path, char_tokenizer, max_seq_len=10, truncation="drop")
    assert dropped.stats["dropped_too_long"] == 1 and dropped.stats["truncated"] == 0 and len(dropped) == 2
    assert [item["tokens"] for item in _items(dropped)] == [[1, *_ids("short"), 2], [1, *_ids("tiny"), 2]]
    with pytest.raises(MytuneError, match="no usable samples"):
        build_sft_dataset(path, char_tokenizer, max_seq_len=3, truncation="drop")
    with pytest.raises(MytuneError, match="truncation must be one of"):
        build_sft_dataset(path, char_tokenizer, max_seq_len=10, truncation="cut")


# ---- speed and caching -----------------------------------------------------------------------------------------------
def test_parallel_tokenization_equals_serial(demo_dir, demo_tokenizer):
    path = demo_dir / "alpaca_demo.jsonl"
    serial = build_sft_dataset(path, demo_tokenizer, max_seq_len=64, num_proc=1)
    parallel = build_sft_dataset(path, demo_tokenizer, max_seq_len=64, num_proc=2)
    assert serial.stats == parallel.stats and serial.stats["truncated"] > 0
    assert np.array_equal(serial._tokens, parallel._tokens) and np.array_equal(serial._targets, parallel._targets)


def test_parallel_errors_name_the_line(tmp_path, char_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3000
    rows[2500] = {"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(MytuneError, match="chat.jsonl line 2501: Conversation roles must alternate"):
        build_sft_dataset(path, char_tokenizer, max_seq_len=64, chat_template="llama2", num_proc=2)
    dataset = build_sft_dataset(path, char_tokenizer, max_seq_len=64, chat_template="llama2", num_proc=2,
                                skip_bad_rows=True)
    assert len(dataset) == 2999 and dataset.stats["bad_rows_skipped"] == 1


class CountingTokenizer:
    """The char tokenizer, counting encode calls."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 300

    def __init__(self, offset=3):
        self.offset = offset
        self.calls = 0

    def encode(self, text, *, add_bos=True, add_eos=False):
        self.calls += 1
        return [1] * add_bos + [ord(c) + self.offset for c in text] + [2] * add_eos


def test_second_build_is_a_cache_hit(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    cache = tmp_path / "cache"
    tokenizer = CountingTokenizer()
    first = build_sft_dataset(path, tokenizer, max_seq_len=64, cache_dir=cache)
    assert first.stats["cache"] == "written" and tokenizer.calls > len(ROWS)
    tokenizer.calls = 0
    second = build_sft_dataset(path, tokenizer, max_seq_len=64, cache_dir=cache)
    assert second.stats["cache"] == "hit" and tokenizer.calls <= 2, "only the tokenizer fingerprint's probe"
    assert _items(second) == _items(first)
    assert {k: v for k, v in second.stats.items() if k != "cache"} == \
        {k: v for k, v in first.stats.items() if k != "cache"}
    # train_on_input and packing are applied on load: the same entry serves them
    packed = build_sft_dataset(path, tokenizer, max_seq_len=64, cache_dir=cache, packed=True, train_on_input=True)
    assert packed.stats["cache"] == "hit" and packed.num_samples == len(ROWS)
    assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("change", ["settings", "tokenizer", "data", "damaged"])
def test_cache_misses_when_anything_changes(tmp_path, change):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    cache = tmp_path / "cache"
    build_sft_dataset(path, CountingTokenizer(), max_seq_len=64, cache_dir=cache)
    kwargs = {"max_seq_len": 64, "cache_dir": cache}
    tokenizer = CountingTokenizer()
    if change == "settings":
        kwargs["max_seq_len"] = 32
    elif change == "tokenizer":
        tokenizer = CountingTokenizer(offset=4)
    elif change == "data":
        _jsonl(path, ROWS[:-1])
    else:
        (next(cache.iterdir()) / "tokens.npy").unlink()
    dataset = build_sft_dataset(path, tokenizer, **kwargs)
    assert dataset.stats["cache"] == "written"
    if change == "tokenizer":
        assert dataset[0]["tokens"][1] == ord(alpaca_prompt("Do 0.")[0]) + 4
    if change == "damaged":
        assert build_sft_dataset(path, tokenizer, **kwargs).stats["cache"] == "hit"


# ---- validation split -----------------------------------------------------------------------------------------------
def test_split_validation(char_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    dataset = build_sft_dataset(path, char_tokenizer, max_seq_len=512)
    train, val = split_validation(dataset, 0.25, seed=1)
    assert (len(train), len(val)) == (15, 5)
    all_items = [tuple(dataset[i]["tokens"]) for i in range(len(dataset))]
    train_items = [tuple(train[i]["tokens"]) for i in range(len(train))]
    val_items = [tuple(val[i]["tokens"]) for i in range(len(val))]
    assert sorted(train_items + val_items) == sorted(all_items) and not set(train_items) & set(val_items)
    assert train_items == [t for t in all_items if t in set(train_items)], "original order kept"
    again, _ = split_validation(dataset, 0.25, seed=1)
    assert [again[i] for i in range(len(again))] == [train[i] for i in range(len(train))]
    packed = build_sft_dataset(path, char_tokenizer, max_seq_len=512, packed=True)
    packed_train, packed_val = split_validation(packed, 0.25, seed=1)
    assert packed_train.packed and packed_val.num_samples == 5
    assert sum(packed_val.token_counts()) == sum(map(len, val_items))
    for bad in (0, 1, 1.5, "0.1"):
        with pytest.raises(MytuneError, match="val_fraction"):
            split_validation(dataset, bad)


def test_a_cached_hub_dataset_is_opened_but_no_row_is_read(monkeypatch, char_tokenizer, tmp_path):
    """The cache key of a hub dataset comes from the opened dataset's fingerprint, so a cache hit (e.g. every
    rank after rank 0 tokenized) never turns the rows into Python dicts."""
    rows_read = []

    class FakeHubDataset(list):
        _fingerprint = "abc123"

        def __iter__(self):
            rows_read.append(len(self))
            return super().__iter__()

    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda name, split: FakeHubDataset(ROWS[:3])))
    first = build_sft_dataset("tatsu-lab/alpaca", char_tokenizer, max_seq_len=512, cache_dir=tmp_path)
    assert first.stats["cache"] == "written" and rows_read == [3]
    second = build_sft_dataset("tatsu-lab/alpaca", char_tokenizer, max_seq_len=512, cache_dir=tmp_path)
    assert second.stats["cache"] == "hit" and rows_read == [3]  # not read again
    assert [second[i] for i in range(3)] == [first[i] for i in range(3)]
