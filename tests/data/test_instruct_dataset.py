"""InstructDataset: alpaca prompts, exact loss-mask positions, truncation, and row validation errors."""

import pytest

from mytune.data import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    InstructDataset,
    alpaca_prompt,
    load_rows,
)
from mytune.errors import MytuneError

ROW = {"instruction": "Add.", "input": "2 + 3", "output": "5"}


def _ids(text):
    return [ord(char) + 3 for char in text]


def test_alpaca_templates_are_the_stanford_text():
    assert alpaca_prompt("Do X.", "some input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nsome input\n\n### Response:\n"
    )
    assert alpaca_prompt("Do X.") == alpaca_prompt("Do X.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert ALPACA_PROMPT_WITH_INPUT.format(instruction="i", input="n") == alpaca_prompt("i", "n")
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="i") == alpaca_prompt("i")


def test_masks_exactly_the_prompt_positions(char_tokenizer):
    item = InstructDataset([ROW], char_tokenizer, max_seq_len=1000)[0]
    prompt = alpaca_prompt("Add.", "2 + 3")
    assert item["tokens"] == [1] + _ids(prompt) + _ids("5") + [2]
    assert item["labels"] == [-100] * (1 + len(prompt)) + _ids("5") + [2]


def test_missing_or_empty_or_null_input_uses_the_no_input_template(char_tokenizer):
    rows = [{"instruction": "Hi.", "output": "ok"}, {"instruction": "Hi.", "input": "", "output": "ok"},
            {"instruction": "Hi.", "input": None, "output": "ok"}]
    dataset = InstructDataset(rows, char_tokenizer, max_seq_len=1000)
    expected = [1] + _ids(alpaca_prompt("Hi.")) + _ids("ok") + [2]
    assert [dataset[i]["tokens"] for i in range(3)] == [expected] * 3


def test_train_on_input_keeps_every_label(char_tokenizer):
    item = InstructDataset([ROW], char_tokenizer, max_seq_len=1000, train_on_input=True)[0]
    assert item["labels"] == item["tokens"]


def test_tokenizer_without_bos(char_tokenizer_without_bos):
    item = InstructDataset([ROW], char_tokenizer_without_bos, max_seq_len=1000)[0]
    prompt = alpaca_prompt("Add.", "2 + 3")
    assert item["tokens"] == _ids(prompt) + _ids("5") + [2]
    assert item["labels"] == [-100] * len(prompt) + _ids("5") + [2]


def test_truncation_keeps_the_final_eos(char_tokenizer):
    row = {"instruction": "Say it.", "output": "a long answer"}
    full = InstructDataset([row], char_tokenizer, max_seq_len=1000)[0]
    prompt_len = 1 + len(alpaca_prompt("Say it."))
    max_seq_len = prompt_len + 4  # room for 3 answer characters and the eos
    item = InstructDataset([row], char_tokenizer, max_seq_len=max_seq_len)[0]
    assert len(item["tokens"]) == len(item["labels"]) == max_seq_len
    assert item["tokens"] == full["tokens"][: max_seq_len - 1] + [2]
    assert item["labels"] == [-100] * prompt_len + _ids("a l") + [2]
    exact = InstructDataset([row], char_tokenizer, max_seq_len=len(full["tokens"]))[0]
    assert exact == full


def test_prompt_longer_than_max_seq_len_leaves_only_the_eos_target(char_tokenizer):
    for train_on_input in (False, True):
        item = InstructDataset([ROW], char_tokenizer, max_seq_len=10, train_on_input=train_on_input)[0]
        assert len(item["tokens"]) == 10 and item["tokens"][-1] == 2 and item["labels"][-1] == 2
        assert item["labels"][:-1] == ([-100] * 9 if not train_on_input else item["tokens"][:-1])


def test_bad_row_fails_up_front_naming_source_and_index(char_tokenizer):
    rows = [dict(ROW) for _ in range(1000)]
    del rows[900]["output"]
    tokenizer = char_tokenizer
    with pytest.raises(MytuneError) as info:
        InstructDataset(rows, tokenizer, max_seq_len=64, source="alpaca.jsonl")
    message = str(info.value)
    assert message.startswith("alpaca.jsonl row 900 (0-based): missing column 'output'")
    assert "instruction, input" in message and "\n" not in message
    assert tokenizer.encode_calls == 0, "validation must happen before any tokenization"


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": 3, "output": "x"}, "column 'instruction' must be a string, got int"),
        ({"instruction": "x", "input": ["a"], "output": "x"}, "column 'input' must be a string, got list"),
        ({"instruction": "x", "output": None}, "column 'output' must be a string, got NoneType"),
        ({"input": "x", "output": "y"}, "missing column 'instruction'"),
        ("just text", "expected an object"),
    ],
)
def test_bad_row_messages(char_tokenizer, row, expected):
    with pytest.raises(MytuneError, match="data.json row 1 \\(0-based\\): " + expected.replace("(", "\\(")):
        InstructDataset([ROW, row], char_tokenizer, max_seq_len=64, source="data.json")


@pytest.mark.parametrize("max_seq_len", [1, 0, "64", None])
def test_bad_max_seq_len(char_tokenizer, max_seq_len):
    with pytest.raises(MytuneError, match="max_seq_len"):
        InstructDataset([ROW], char_tokenizer, max_seq_len=max_seq_len)


def test_no_rows(char_tokenizer):
    with pytest.raises(MytuneError, match="<rows>: no rows"):
        InstructDataset([], char_tokenizer, max_seq_len=64)


def test_items_are_fresh_lists(char_tokenizer):
    dataset = InstructDataset([ROW], char_tokenizer, max_seq_len=1000)
    dataset[0]["labels"][0] = 7
    assert dataset[0]["labels"][0] == -100 and isinstance(dataset[0]["tokens"][0], int)
    assert len(dataset) == 1 and dataset.token_counts() == [len(dataset[0]["tokens"])]


def test_sentencepiece_tokens_are_the_whole_text_and_targets_the_output(demo_tokenizer, demo_dir):
    """Prompt and output are tokenized as one string (as at inference), not as two (which would add a '▁')."""
    rows = load_rows(demo_dir / "alpaca_demo.jsonl")[:50]
    dataset = InstructDataset(rows, demo_tokenizer, max_seq_len=512)
    for row, item in zip(rows, (dataset[i] for i in range(len(rows)))):
        prompt = alpaca_prompt(row["instruction"], row["input"])
        prompt_ids = demo_tokenizer.encode(prompt, add_bos=False)
        whole = demo_tokenizer.encode(prompt + row["output"], add_bos=False)
        assert whole[: len(prompt_ids)] == prompt_ids, "the demo prompt ends in a newline: a clean token boundary"
        assert item["tokens"] == [demo_tokenizer.bos_id] + whole + [demo_tokenizer.eos_id]
        targets = [token for token, label in zip(item["tokens"], item["labels"]) if label != -100]
        assert item["labels"][: 1 + len(prompt_ids)] == [-100] * (1 + len(prompt_ids))
        assert targets == whole[len(prompt_ids):] + [demo_tokenizer.eos_id]
        assert demo_tokenizer.decode(targets[:-1]) == row["output"]


def test_with_the_mytune_tokenizer_loader(demo_tokenizer, demo_dir):
    """The same masking through mytune.tokenizers.load_tokenizer, once that module provides it."""
    load_tokenizer = getattr(pytest.importorskip("mytune.tokenizers"), "load_tokenizer", None)
    if load_tokenizer is None:
        pytest.skip("mytune.tokenizers.load_tokenizer not available yet")
    tokenizer = load_tokenizer(demo_dir / "tokenizer.model")
    rows = load_rows(demo_dir / "alpaca_demo.jsonl")[:20]
    ours = InstructDataset(rows, tokenizer, max_seq_len=512)
    reference = InstructDataset(rows, demo_tokenizer, max_seq_len=512)
    assert [ours[i] for i in range(20)] == [reference[i] for i in range(20)]
    item = ours[0]
    targets = [token for token, label in zip(item["tokens"], item["labels"]) if label != -100]
    assert tokenizer.decode(targets) == rows[0]["output"]
