"""Preference data: the three row formats, response-only labels equal to the SFT path's, truncation that keeps the
response, bad rows by file:line, column_map, the cache, split_validation, the collate's layout and the demo file."""

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from mytune.data import (
    CHATML_JINJA,
    PreferenceDataset,
    ResumableDataLoader,
    ResumableSampler,
    build_preference_dataset,
    build_sft_dataset,
    padded_collate,
    preference_collate,
    preference_dataset_from_rows,
    sft_dataset_from_rows,
    split_validation,
)
from mytune.errors import ConfigError, MytuneError
from mytune.tokenizers import load_tokenizer

from conftest import HFChatAdapter, make_hf

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_assets.py"
STANDARD = [{"prompt": f"Question {i}?", "chosen": f"right {i}", "rejected": f"wrong answer {i}"} for i in range(12)]


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def _labelled_text(tokens, labels):
    """The characters the loss trains on (char tokenizer: id = code point + 3; eos shown as '|')."""
    return "".join("|" if token == 2 else chr(token - 3) for token, label in zip(tokens, labels) if label != -100)


def _prompt(tokens, labels):
    """The tokens before the first labelled one."""
    return tokens[: next(i for i, label in enumerate(labels) if label != -100)]


def _sft_item(row, tokenizer, **options):
    return sft_dataset_from_rows([row], tokenizer, max_seq_len=10_000, **options)[0]


# ---- formats ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat_template", [None, "chatml", "llama3"])
def test_standard_rows_are_sft_instruct_rows(char_tokenizer, chat_template):
    dataset = preference_dataset_from_rows(STANDARD, char_tokenizer, max_seq_len=10_000, chat_template=chat_template)
    assert len(dataset) == len(STANDARD) and dataset.stats["dataset_format"] == "standard"
    for row, item in zip(STANDARD, _items(dataset)):
        for side in ("chosen", "rejected"):
            sft = _sft_item({"instruction": row["prompt"], "output": row[side]}, char_tokenizer,
                            chat_template=chat_template)
            assert item[f"{side}_tokens"] == sft["tokens"] and item[f"{side}_labels"] == sft["labels"]
            assert _labelled_text(item[f"{side}_tokens"], item[f"{side}_labels"]).startswith(row[side])


def test_standard_rows_with_the_demo_tokenizer_match_sft(demo_dir):
    tokenizer = load_tokenizer(demo_dir / "tokenizer.model")
    rows = [json.loads(line) for line in (demo_dir / "preference_demo.jsonl").read_text().splitlines()[:20]]
    dataset = preference_dataset_from_rows(rows, tokenizer, max_seq_len=10_000)
    for row, item in zip(rows, _items(dataset)):
        for side in ("chosen", "rejected"):
            sft = _sft_item({"instruction": row["prompt"], "output": row[side]}, tokenizer)
            assert item[f"{side}_tokens"] == sft["tokens"] and item[f"{side}_labels"] == sft["labels"]
            response = [token for token, label in zip(item[f"{side}_tokens"], item[f"{side}_labels"]) if label != -100]
            assert tokenizer.decode(response) == row[side]


def test_conversational_rows_are_sft_chat_rows(char_tokenizer):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, _user(f"Hi {i}?")],
             "chosen": [_assistant(f"Hello {i}.")], "rejected": [_assistant("Go away.")]} for i in range(3)]
    dataset = preference_dataset_from_rows(rows, char_tokenizer, max_seq_len=10_000, chat_template="chatml")
    assert dataset.stats["dataset_format"] == "conversational"
    for row, item in zip(rows, _items(dataset)):
        for side in ("chosen", "rejected"):
            sft = _sft_item({"messages": row["prompt"] + row[side]}, char_tokenizer, chat_template="chatml")
            assert item[f"{side}_tokens"] == sft["tokens"] and item[f"{side}_labels"] == sft["labels"]
            assert _labelled_text(item[f"{side}_tokens"], item[f"{side}_labels"]) == \
                row[side][0]["content"] + "<|im_end|>"


def test_assistant_turns_in_the_prompt_are_context_not_targets(char_tokenizer):
    prompt = [_user("Hi?"), _assistant("Earlier answer."), _user("And now?")]
    row = {"prompt": prompt, "chosen": [_assistant("Good.")], "rejected": [_assistant("Bad.")]}
    item = preference_dataset_from_rows([row], char_tokenizer, max_seq_len=10_000, chat_template="llama3")[0]
    sft = _sft_item({"messages": prompt + row["chosen"]}, char_tokenizer, chat_template="llama3")
    assert item["chosen_tokens"] == sft["tokens"]
    assert "Earlier answer." in _labelled_text(sft["tokens"], sft["labels"])  # SFT trains every assistant turn
    assert _labelled_text(item["chosen_tokens"], item["chosen_labels"]) == "Good.<|eot_id|>"
    assert _labelled_text(item["rejected_tokens"], item["rejected_labels"]) == "Bad.<|eot_id|>"


def test_implicit_prompt_conversations_equal_their_explicit_split(char_tokenizer):
    shared = [_user("Hi?"), _assistant("Hello."), _user("Tell me a fact.")]
    implicit = [{"chosen": shared + [_assistant("Water is wet.")], "rejected": shared + [_assistant("No.")]}]
    explicit = [{"prompt": shared, "chosen": [_assistant("Water is wet.")], "rejected": [_assistant("No.")]}]
    dataset = preference_dataset_from_rows(implicit, char_tokenizer, max_seq_len=10_000, chat_template="chatml")
    assert dataset.stats["dataset_format"] == "implicit"
    assert _items(dataset) == _items(preference_dataset_from_rows(explicit, char_tokenizer, max_seq_len=10_000,
                                                                  chat_template="chatml"))
    sharegpt = [{side: [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                        for m in implicit[0][side]] for side in ("chosen", "rejected")}]
    assert _items(preference_dataset_from_rows(sharegpt, char_tokenizer, max_seq_len=10_000,
                                               chat_template="chatml")) == _items(dataset)


def test_jinja_templates_label_the_same_response_tokens_as_the_builtin(hf_tokenizer_object):
    tokenizer = HFChatAdapter(make_hf(hf_tokenizer_object, bos_token="<s>", eos_token="</s>"))
    row = {"prompt": [_user("Hello world"), _assistant("I am fine."), _user("What is 2 + 2?")],
           "chosen": [_assistant("4")], "rejected": [_assistant("The system prompt says: be brief.")]}
    builtin = preference_dataset_from_rows([row], tokenizer, max_seq_len=10_000, chat_template="chatml")[0]
    jinja = preference_dataset_from_rows([row], tokenizer, max_seq_len=10_000, chat_template=CHATML_JINJA)[0]
    assert jinja == builtin
    for side in ("chosen", "rejected"):
        response = [t for t, label in zip(builtin[f"{side}_tokens"], builtin[f"{side}_labels"]) if label != -100]
        assert tokenizer.decode(response, skip_special_tokens=False) == row[side][0]["content"] + "<|im_end|>"


def test_conversational_and_implicit_tokens_equal_trls(hf_tokenizer_object):
    """TRL's DPO tokenization (its data_utils functions, as DPOTrainer calls them) gives the same ids; TRL trains on
    every token after the prompt, we on the assistant spans as SFT does: the same start, and past the end-of-turn
    token we leave out only the template's whitespace."""
    trl_data = pytest.importorskip("trl.data_utils")
    hf = make_hf(hf_tokenizer_object, bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHATML_JINJA
    tokenizer = HFChatAdapter(hf, chat_template=CHATML_JINJA)
    prompt = [_user("Hello world"), _assistant("I am fine."), _user("What is 2 + 2?")]
    conversational = {"prompt": prompt, "chosen": [_assistant("4")], "rejected": [_assistant("The answer is 5.")]}
    implicit = {side: prompt + conversational[side] for side in ("chosen", "rejected")}
    for row in (conversational, implicit):
        item = preference_dataset_from_rows([row], tokenizer, max_seq_len=10_000)[0]
        split = trl_data.extract_prompt(row) if "prompt" not in row else row
        prompt_ids = trl_data._tokenize(hf, split["prompt"], add_generation_prompt=True)["input_ids"]
        for side in ("chosen", "rejected"):
            full = trl_data._tokenize(hf, split["prompt"] + split[side])["input_ids"]
            start = trl_data.common_prefix_length(prompt_ids, full)
            tokens, labels = item[f"{side}_tokens"], item[f"{side}_labels"]
            assert tokens == full and len(_prompt(tokens, labels)) == start
            last = max(i for i, label in enumerate(labels) if label != -100)
            assert all(label != -100 for label in labels[start: last + 1])
            assert hf.decode(tokens[last + 1:]).strip() == ""


@pytest.mark.parametrize("chosen, rejected, message", [
    ([_user("a"), _assistant("b")], [_user("x"), _assistant("c")], "share no first message"),
    ([_user("a"), _assistant("b")], [_user("a"), _assistant("b")], "do not differ after their shared messages"),
    ([_user("a"), _assistant("b")], [_user("a"), _assistant("c"), _user("d")], "must end in an assistant message"),
    ([_user("a"), _assistant("b"), _user("c"), _assistant("d")], [_user("a"), _assistant("e"), _user("c"),
                                                                  _assistant("f")], "differ before their final"),
])
def test_implicit_rows_that_do_not_split_fail_naming_file_and_line(tmp_path, char_tokenizer, chosen, rejected,
                                                                   message):
    good = {"chosen": [_user("q"), _assistant("yes")], "rejected": [_user("q"), _assistant("no")]}
    path = _jsonl(tmp_path / "hh.jsonl", [good, good, {"chosen": chosen, "rejected": rejected}])
    with pytest.raises(MytuneError, match=rf"hh.jsonl line 3: .*{message}"):
        build_preference_dataset(path, char_tokenizer, max_seq_len=512, chat_template="chatml")


# ---- truncation ---------------------------------------------------------------------------------------------------
def test_truncation_cuts_the_prompt_from_the_left_keeping_bos_and_the_response(char_tokenizer):
    full = preference_dataset_from_rows(STANDARD[:1], char_tokenizer, max_seq_len=10_000)[0]
    longest = max(len(full["chosen_tokens"]), len(full["rejected_tokens"]))
    cut = preference_dataset_from_rows(STANDARD[:1], char_tokenizer, max_seq_len=longest - 10)
    item = cut[0]
    for side in ("chosen", "rejected"):
        tokens, labels = item[f"{side}_tokens"], item[f"{side}_labels"]
        assert tokens[0] == char_tokenizer.bos_id and len(tokens) <= longest - 10
        assert tokens[1:] == full[f"{side}_tokens"][11:], "ten prompt tokens after the BOS are gone"
        assert _labelled_text(tokens, labels) == _labelled_text(full[f"{side}_tokens"], full[f"{side}_labels"])
    assert _prompt(item["chosen_tokens"], item["chosen_labels"]) == \
        _prompt(item["rejected_tokens"], item["rejected_labels"]), "both responses follow the same (cut) prompt"
    assert cut.stats["truncated_prompt"] == 1 and cut.stats["truncated_response"] == 0
    assert "1 prompts and 0 responses truncated" in cut.summary()


def test_a_response_that_alone_does_not_fit_loses_its_end_keeping_eos(char_tokenizer_without_bos):
    row = {"prompt": "P" * 50, "chosen": "c" * 30, "rejected": "r" * 5}
    dataset = preference_dataset_from_rows([row], char_tokenizer_without_bos, max_seq_len=20, chat_template="chatml")
    item = dataset[0]
    assert len(item["chosen_tokens"]) == 20 and item["chosen_tokens"][-1] == 2 and item["chosen_labels"][-1] == 2
    assert item["chosen_labels"][0] == -100, "the prompt keeps its last token: every response token is predicted"
    assert _labelled_text(item["chosen_tokens"], item["chosen_labels"]) == "c" * 18 + "|"
    assert _labelled_text(item["rejected_tokens"], item["rejected_labels"]) == "r" * 5 + "<|im_end|>"
    assert len(item["rejected_tokens"]) <= 20
    assert dataset.stats["truncated_prompt"] == 1 and dataset.stats["truncated_response"] == 1


def test_drop_leaves_out_pairs_that_do_not_fit(char_tokenizer):
    rows = STANDARD[:4] + [{"prompt": "long " * 100, "chosen": "a", "rejected": "b"}]
    dataset = preference_dataset_from_rows(rows, char_tokenizer, max_seq_len=300, truncation="drop")
    assert len(dataset) == 4 and dataset.stats["dropped_too_long"] == 1
    assert _items(dataset) == _items(preference_dataset_from_rows(STANDARD[:4], char_tokenizer, max_seq_len=300))
    with pytest.raises(ConfigError, match="truncation must be one of truncate, drop"):
        preference_dataset_from_rows(rows, char_tokenizer, max_seq_len=300, truncation="left")


# ---- bad rows and column maps -------------------------------------------------------------------------------------
def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path, char_tokenizer):
    rows = [*STANDARD[:3], {"prompt": "Q?", "chosen": 5, "rejected": "no"}, *STANDARD[3:6],
            {"prompt": "Q?", "chosen": "yes"}]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(MytuneError, match=r"pairs.jsonl line 4: column 'chosen' must be a string.*skip_bad_rows"):
        build_preference_dataset(path, char_tokenizer, max_seq_len=512)
    dataset = build_preference_dataset(path, char_tokenizer, max_seq_len=512, skip_bad_rows=True)
    assert len(dataset) == 6 and dataset.stats["bad_rows_skipped"] == 2 and dataset.stats["rows"] == 8
    assert any("pairs.jsonl line 8: missing column 'rejected'" in m for m in dataset.stats["skipped_examples"])
    assert "2 bad rows skipped" in dataset.summary()


def test_a_file_in_no_preference_format_says_which_columns_it_needs(tmp_path, char_tokenizer):
    path = _jsonl(tmp_path / "sft.jsonl", [{"instruction": "Do.", "output": "Done."}])
    with pytest.raises(MytuneError, match=r"sft.jsonl line 1: cannot tell the preference format .*column_map"):
        build_preference_dataset(path, char_tokenizer, max_seq_len=512)
    strings = _jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi"}])
    with pytest.raises(MytuneError, match=r"hh.jsonl line 1: 'chosen' and 'rejected' are strings but there is no "
                                          r"'prompt' column"):
        build_preference_dataset(strings, char_tokenizer, max_seq_len=512)


def test_column_map_renames_the_columns(char_tokenizer):
    renamed = [{"question": row["prompt"], "good": row["chosen"], "bad": row["rejected"]} for row in STANDARD]
    column_map = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert _items(preference_dataset_from_rows(renamed, char_tokenizer, max_seq_len=512, column_map=column_map)) == \
        _items(preference_dataset_from_rows(STANDARD, char_tokenizer, max_seq_len=512))
    broken = [*renamed[:2], {"question": "Q?", "good": "a"}]
    with pytest.raises(MytuneError, match=r"row 2 \(0-based\): missing column 'bad' \(mapped from 'rejected'\)"):
        preference_dataset_from_rows(broken, char_tokenizer, max_seq_len=512, column_map=column_map)
    with pytest.raises(ConfigError, match="column_map key 'output' is not a column preference data reads"):
        preference_dataset_from_rows(renamed, char_tokenizer, max_seq_len=512, column_map={"output": "good"})


# ---- cache --------------------------------------------------------------------------------------------------------
def test_cache_hit_and_never_an_sft_entry(tmp_path, char_tokenizer, capsys):
    # Rows both paths can read: SFT sees instruct rows, preference sees standard rows.
    rows = [{**row, "instruction": row["prompt"], "output": row["chosen"]} for row in STANDARD]
    path = _jsonl(tmp_path / "both.jsonl", rows)
    cache = tmp_path / "cache"
    sft = build_sft_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache)
    assert sft.stats["cache"] == "written"
    first = build_preference_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache)
    assert first.stats["cache"] == "written", "the SFT entry of the same file is not read as pairs"
    second = build_preference_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache)
    assert second.stats["cache"] == "hit" and second.cache_key == first.cache_key
    assert _items(second) == _items(first) and second.summary() == first.summary().replace("written", "hit")
    assert build_preference_dataset(path, char_tokenizer, max_seq_len=256, cache_dir=cache).stats["cache"] == \
        "written", "another setting is another entry"
    # An SFT entry under the preference key (a hand-copied folder) is rebuilt, never trained on as pairs.
    sft_folder = next(p for p in cache.iterdir() if "kind" not in json.loads((p / "meta.json").read_text()))
    shutil.rmtree(cache / first.cache_key)
    shutil.copytree(sft_folder, cache / first.cache_key)
    rebuilt = build_preference_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache)
    assert rebuilt.stats["cache"] == "written" and _items(rebuilt) == _items(first)
    assert "does not hold preference pairs" in capsys.readouterr().err
    assert build_preference_dataset(path, char_tokenizer, max_seq_len=512, cache_dir=cache).stats["cache"] == "hit"


def test_hub_datasets_are_read_and_cached_by_their_fingerprint(monkeypatch, tmp_path, char_tokenizer):
    class FakeHubDataset(list):
        _fingerprint = "abc123"

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeHubDataset([*STANDARD[:3], {"prompt": "Q?", "chosen": "a"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(MytuneError, match=r"someone/pairs \[test\] row 3 \(0-based\): missing column 'rejected'"):
        build_preference_dataset("someone/pairs", char_tokenizer, max_seq_len=512, split="test")
    build = dict(max_seq_len=512, split="test", skip_bad_rows=True, cache_dir=tmp_path)
    first = build_preference_dataset("someone/pairs", char_tokenizer, **build)
    second = build_preference_dataset("someone/pairs", char_tokenizer, **build)
    assert len(first) == 3 and (first.stats["cache"], second.stats["cache"]) == ("written", "hit")
    assert _items(second) == _items(first) and calls == [("someone/pairs", "test")] * 3


# ---- split, sampler, collate --------------------------------------------------------------------------------------
def test_split_validation_splits_pairs(char_tokenizer):
    dataset = preference_dataset_from_rows(STANDARD, char_tokenizer, max_seq_len=512)
    train, val = split_validation(dataset, 0.25, seed=3)
    assert isinstance(train, PreferenceDataset) and (len(train), len(val)) == (9, 3)
    assert sorted([*train.indices, *val.indices]) == list(range(len(STANDARD)))
    assert [val[i] for i in range(3)] == [dataset[int(j)] for j in val.indices]
    again_train, again_val = split_validation(dataset, 0.25, seed=3)
    assert list(again_val.indices) == list(val.indices) and list(again_train.indices) == list(train.indices)
    sampler = ResumableSampler(train, rank=0, world_size=1, seed=0)
    loader = ResumableDataLoader(train, batch_size=4, sampler=sampler,
                                 collate_fn=lambda items: preference_collate(items, pad_id=0))
    batches = list(loader)
    assert len(batches) == 2 and all(batch["tokens"].shape[0] == 8 for batch in batches)


def test_preference_collate_is_padded_collate_chosen_then_rejected(char_tokenizer):
    dataset = preference_dataset_from_rows(STANDARD, char_tokenizer, max_seq_len=512)
    items = [dataset[i] for i in (4, 0, 11)]
    batch = preference_collate(items, pad_id=0)
    sides = [{"tokens": item["chosen_tokens"], "labels": item["chosen_labels"]} for item in items] + \
            [{"tokens": item["rejected_tokens"], "labels": item["rejected_labels"]} for item in items]
    expected = padded_collate(sides, pad_id=0)
    assert batch.keys() == expected.keys()
    assert all(batch[key].equal(expected[key]) for key in batch)
    for row, item in enumerate(items):
        assert batch["tokens"][row, : len(item["chosen_tokens"])].tolist() == item["chosen_tokens"]
        assert batch["labels"][3 + row, : len(item["rejected_labels"])].tolist() == item["rejected_labels"]
        assert batch["seq_lens"][3 + row] == len(item["rejected_tokens"])


def test_parallel_tokenization_gives_the_same_pairs(char_tokenizer):
    one = preference_dataset_from_rows(STANDARD, char_tokenizer, max_seq_len=64, num_proc=1)
    two = preference_dataset_from_rows(STANDARD, char_tokenizer, max_seq_len=64, num_proc=2)
    assert _items(one) == _items(two) and one.stats == two.stats


# ---- the shipped demo ---------------------------------------------------------------------------------------------
def test_demo_preference_file_tokenizes_without_unknown_tokens(demo_dir):
    tokenizer = load_tokenizer(demo_dir / "tokenizer.model")
    dataset = build_preference_dataset(demo_dir / "preference_demo.jsonl", tokenizer, max_seq_len=256)
    assert len(dataset) == 820 and dataset.stats["dataset_format"] == "standard"  # the facts' no-input phrasings
    assert dataset.stats["truncated"] == 0 and dataset.stats["bad_rows_skipped"] == 0
    unk = tokenizer.processor.unk_id()
    for item in _items(dataset):
        assert unk not in item["chosen_tokens"] and unk not in item["rejected_tokens"]
        chosen = [t for t, label in zip(item["chosen_tokens"], item["chosen_labels"]) if label != -100]
        rejected = [t for t, label in zip(item["rejected_tokens"], item["rejected_labels"]) if label != -100]
        assert chosen != rejected


def test_script_reproduces_the_shipped_preference_file(tmp_path, demo_dir):
    spec = importlib.util.spec_from_file_location("make_demo_assets", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out-dir", str(tmp_path), "--preference-only"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preference_demo.jsonl"]
    assert (tmp_path / "preference_demo.jsonl").read_bytes() == (demo_dir / "preference_demo.jsonl").read_bytes()
