"""padded_collate: right padding with pad_id / ignore_index, shapes and dtypes."""

from functools import partial

import pytest
import torch

from mytune.data import InstructDataset, padded_collate


def test_pads_right_to_the_longest_item():
    batch = [{"tokens": [5, 6, 7], "labels": [-100, 6, 7]}, {"tokens": [8], "labels": [8]}]
    out = padded_collate(batch, pad_id=0)
    assert out["tokens"].dtype == out["labels"].dtype == torch.long
    assert out["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_custom_pad_and_ignore_index():
    batch = [{"tokens": [1, 2], "labels": [1, 2]}, {"tokens": [3, 4, 5, 6], "labels": [3, 4, 5, 6]}]
    out = padded_collate(batch, pad_id=2, ignore_index=-1)
    assert out["tokens"].shape == out["labels"].shape == (2, 4)
    assert out["tokens"][0].tolist() == [1, 2, 2, 2] and out["labels"][0].tolist() == [1, 2, -1, -1]


def test_mismatched_lengths_are_a_bug():
    with pytest.raises(ValueError, match="batch item 0"):
        padded_collate([{"tokens": [1, 2], "labels": [1]}], pad_id=0)


def test_dataloader_over_instruct_dataset(char_tokenizer):
    rows = [{"instruction": "x" * n, "output": "y"} for n in (1, 5, 9)]
    dataset = InstructDataset(rows, char_tokenizer, max_seq_len=1000)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=partial(padded_collate, pad_id=0))
    batch = next(iter(loader))
    lengths = dataset.token_counts()
    assert batch["tokens"].shape == (3, max(lengths))
    for row, length in enumerate(lengths):
        assert batch["tokens"][row, :length].tolist() == dataset[row]["tokens"]
        assert (batch["tokens"][row, length:] == 0).all() and (batch["labels"][row, length:] == -100).all()


def test_seq_lens_count_a_final_eos_that_equals_pad_id():
    """pad_id == eos_id (the demo tokenizer, Llama 2): the real length still counts each sample's eos."""
    out = padded_collate([{"tokens": [1, 7, 2], "labels": [1, 7, 2]}, {"tokens": [1, 2], "labels": [1, 2]}], pad_id=2)
    assert out["tokens"].tolist() == [[1, 7, 2], [1, 2, 2]]
    assert out["seq_lens"].tolist() == [3, 2] and int((out["tokens"] != 2).sum()) == 3


def test_pad_to_multiple_of_rounds_the_length_up_with_unlabelled_padding():
    batch = padded_collate([{"tokens": [5, 6, 7], "labels": [5, 6, 7]}, {"tokens": [8], "labels": [8]}], pad_id=0,
                           pad_to_multiple_of=4)
    assert batch["tokens"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["seq_lens"].tolist() == [3, 1]
    even = padded_collate([{"tokens": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}], pad_id=0, pad_to_multiple_of=2)
    assert even["tokens"].shape == (1, 4)
