"""Chat rendering: built-in formats equal transformers' apply_chat_template (text and ids); masks train every
assistant turn; the tokenizer's own Jinja template gives the same tokens and masks through prefix rendering."""

import json

import pytest

from conftest import HFChatAdapter, make_hf
from mytune.data import (
    LLAMA2_JINJA,
    LLAMA3_JINJA,
    PromptRenderer,
    build_sft_dataset,
    sft_dataset_from_rows,
)
from mytune.data.encoding import TextEncoder
from mytune.data.formats import Example
from mytune.data.templates import JINJA_OF_BUILTIN
from mytune.errors import MytuneError

SPECIALS = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "chatml": ("<|begin_of_text|>", "<|im_end|>"),
            "llama2": ("<s>", "</s>")}
JINJA = JINJA_OF_BUILTIN

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world, how are you?"}, {"role": "assistant", "content": "I am fine."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2 + 2?\n"},
     {"role": "assistant", "content": " 4 \n"}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, thanks for asking."}],
    [{"role": "user", "content": "Ünïcode ✓\n\nwith blank lines"}, {"role": "assistant", "content": "\n\nok\n\n"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": ""}],
]

# What the loss must see of each assistant turn (content as the template writes it, plus its end marker).
EXPECTED_TARGETS = {
    "llama3": lambda content: content.strip() + "<|eot_id|>",
    "chatml": lambda content: content + "<|im_end|>",
    "llama2": lambda content: " " + content.strip() + " </s>",
}


def _example(messages):
    return Example("chat", messages=tuple((m["role"], m["content"]) for m in messages))


def _adapter(hf_tokenizer_object, name, native_specials=True, chat_template=None):
    bos, eos = SPECIALS[name]
    hf = make_hf(hf_tokenizer_object, bos_token=bos, eos_token=eos)
    return HFChatAdapter(hf, native_specials=native_specials, chat_template=chat_template)


@pytest.mark.parametrize("native_specials", [True, False], ids=["native-specials", "split-specials"])
@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2"])
def test_builtin_rendering_and_ids_equal_apply_chat_template(hf_tokenizer_object, name, native_specials):
    tokenizer = _adapter(hf_tokenizer_object, name, native_specials)
    renderer = PromptRenderer(name, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    encoder = TextEncoder(tokenizer)
    for messages in CONVERSATIONS:
        if name == "llama2" and messages[-1]["content"] == "":
            continue
        rendered = renderer(_example(messages))
        assert rendered.text == tokenizer.hf.apply_chat_template(messages, chat_template=JINJA[name], tokenize=False)
        ids, _ = encoder.encode_rendered(rendered)
        reference = tokenizer.hf.apply_chat_template(messages, chat_template=JINJA[name], tokenize=True,
                                                     return_dict=False)
        assert ids == reference


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_generation_prompt_renders_like_transformers(hf_tokenizer_object, name):
    from mytune.data.templates import render_chatml, render_llama3

    tokenizer = _adapter(hf_tokenizer_object, name)
    messages = CONVERSATIONS[1][:2]
    ours = (render_llama3(messages, bos_token=tokenizer.bos_token, add_generation_prompt=True) if name == "llama3"
            else render_chatml(messages, add_generation_prompt=True))
    assert ours.text == tokenizer.hf.apply_chat_template(messages, chat_template=JINJA[name], tokenize=False,
                                                         add_generation_prompt=True)


@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2"])
def test_every_assistant_turn_is_trained_and_nothing_else(hf_tokenizer_object, name):
    tokenizer = _adapter(hf_tokenizer_object, name)
    messages = CONVERSATIONS[1]
    dataset = sft_dataset_from_rows([{"messages": messages}], tokenizer, max_seq_len=4096, chat_template=name)
    item = dataset[0]
    runs, current = [], []
    for token, label in zip(item["tokens"], item["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tokenizer.hf.decode(run, skip_special_tokens=False) for run in runs]
    expected = [EXPECTED_TARGETS[name](m["content"]) for m in messages if m["role"] == "assistant"]
    if hf_tokenizer_object.pre_tokenizer.__class__.__name__ == "Metaspace":  # decoding drops a run's leading space
        decoded, expected = [d.lstrip(" ") for d in decoded], [e.lstrip(" ") for e in expected]
    assert decoded == expected


def test_masks_equal_transformers_generation_masks(hf_tokenizer_object):
    """transformers computes assistant masks from character offsets of {% generation %} blocks: the same tokens."""
    tokenizer = _adapter(hf_tokenizer_object, "chatml")
    generation_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    )
    for messages in CONVERSATIONS:
        out = tokenizer.hf.apply_chat_template(messages, chat_template=generation_template, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        item = sft_dataset_from_rows([{"messages": messages}], tokenizer, max_seq_len=4096, chat_template="chatml")[0]
        assert item["tokens"] == out["input_ids"]
        assert [int(label != -100) for label in item["labels"]] == out["assistant_masks"]


@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2"])
def test_tokenizer_own_template_matches_the_builtin(hf_tokenizer_object, name):
    """The tokenizer's Jinja template (rendered by transformers, masks from prefixes) == our built-in renderer."""
    own = _adapter(hf_tokenizer_object, name, chat_template=JINJA[name])
    rows = [{"messages": m} for m in CONVERSATIONS if not (name == "llama2" and m[-1]["content"] == "")]
    from_jinja = sft_dataset_from_rows(rows, own, max_seq_len=4096)  # chat_template=None: the tokenizer's own
    builtin = sft_dataset_from_rows(rows, own, max_seq_len=4096, chat_template=name)
    assert from_jinja.stats["chat_template"] == "<jinja>" and builtin.stats["chat_template"] == name
    assert [from_jinja[i] for i in range(len(rows))] == [builtin[i] for i in range(len(rows))]


def test_own_template_with_unusual_markers(hf_tokenizer_object):
    """A Zephyr-like template none of our built-ins knows: ids equal transformers', assistant turns are targets."""
    template = ("{% for message in messages %}"
                "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    tokenizer = _adapter(hf_tokenizer_object, "llama2", chat_template=template)
    messages = CONVERSATIONS[1]
    item = sft_dataset_from_rows([{"messages": messages}], tokenizer, max_seq_len=4096)[0]
    assert item["tokens"] == tokenizer.hf.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                              return_dict=False)
    targets = [t for t, label in zip(item["tokens"], item["labels"]) if label != -100]
    expected = "".join(m["content"] + "</s>" for m in messages if m["role"] == "assistant")
    assert tokenizer.hf.decode(targets, skip_special_tokens=False).replace(" ", "") == expected.replace(" ", "")


def test_train_on_input_trains_every_token(hf_tokenizer_object):
    tokenizer = _adapter(hf_tokenizer_object, "llama3")
    item = sft_dataset_from_rows([{"messages": CONVERSATIONS[1]}], tokenizer, max_seq_len=4096,
                                 chat_template="llama3", train_on_input=True)[0]
    assert item["labels"] == item["tokens"]


def test_sharegpt_equals_messages(hf_tokenizer_object):
    tokenizer = _adapter(hf_tokenizer_object, "chatml")
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATIONS[1]]
    a = sft_dataset_from_rows([{"conversations": sharegpt}], tokenizer, max_seq_len=4096)[0]
    b = sft_dataset_from_rows([{"messages": CONVERSATIONS[1]}], tokenizer, max_seq_len=4096)[0]
    assert a == b


def test_instruct_rows_with_a_chat_template_become_one_exchange(hf_tokenizer_object):
    tokenizer = _adapter(hf_tokenizer_object, "llama3", chat_template=LLAMA3_JINJA)
    row = {"instruction": "Reverse the words.", "input": "apple river", "output": "river apple"}
    item = sft_dataset_from_rows([row], tokenizer, max_seq_len=4096)[0]  # the tokenizer's template, not alpaca
    messages = [{"role": "user", "content": "Reverse the words.\n\napple river"},
                {"role": "assistant", "content": "river apple"}]
    assert item["tokens"] == tokenizer.hf.apply_chat_template(messages, chat_template=LLAMA3_JINJA, tokenize=True,
                                                              return_dict=False)
    alpaca = sft_dataset_from_rows([row], tokenizer, max_seq_len=4096, chat_template="alpaca")[0]
    assert alpaca["tokens"][0] == tokenizer.bos_id and alpaca["tokens"][-1] == tokenizer.eos_id


def test_llama2_role_order_error_names_the_line(tmp_path, hf_tokenizer_object):
    tokenizer = _adapter(hf_tokenizer_object, "llama2")
    good = {"messages": CONVERSATIONS[0]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n", encoding="utf-8")
    with pytest.raises(MytuneError, match=r"chat.jsonl line 3: Conversation roles must alternate"):
        build_sft_dataset(path, tokenizer, max_seq_len=512, chat_template="llama2")
    dataset = build_sft_dataset(path, tokenizer, max_seq_len=512, chat_template="llama2", skip_bad_rows=True)
    assert len(dataset) == 3 and dataset.stats["bad_rows_skipped"] == 1
    jinja = _adapter(hf_tokenizer_object, "llama2", chat_template=LLAMA2_JINJA)
    with pytest.raises(MytuneError, match=r"chat.jsonl line 3: the chat template failed: Conversation roles"):
        build_sft_dataset(path, jinja, max_seq_len=512)


def test_alpaca_for_chat_data_is_a_config_error(hf_tokenizer_object):
    tokenizer = _adapter(hf_tokenizer_object, "chatml")
    with pytest.raises(MytuneError, match="alpaca"):
        sft_dataset_from_rows([{"messages": CONVERSATIONS[0]}], tokenizer, max_seq_len=64, chat_template="alpaca")
    with pytest.raises(MytuneError, match="not a known prompt format"):
        sft_dataset_from_rows([{"messages": CONVERSATIONS[0]}], tokenizer, max_seq_len=64, chat_template="vicuna")
    with pytest.raises(MytuneError, match="has no chat template"):
        sft_dataset_from_rows([{"messages": CONVERSATIONS[0]}], tokenizer, max_seq_len=64, chat_template="tokenizer")


def test_with_mytune_hf_tokenizer_loader(tmp_path, hf_tokenizer_object):
    """The same ids through mytune.tokenizers.load_tokenizer(tokenizer.json), once that module provides it."""
    load_tokenizer = getattr(pytest.importorskip("mytune.tokenizers"), "load_tokenizer", None)
    if load_tokenizer is None:
        pytest.skip("mytune.tokenizers.load_tokenizer not available yet")
    hf_tokenizer_object.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    reference = _adapter(hf_tokenizer_object, "llama3")
    rows = [{"messages": m} for m in CONVERSATIONS]
    ours = sft_dataset_from_rows(rows, tokenizer, max_seq_len=4096, chat_template="llama3")
    for i, messages in enumerate(CONVERSATIONS):
        assert ours[i]["tokens"] == reference.hf.apply_chat_template(messages, chat_template=LLAMA3_JINJA,
                                                                     tokenize=True, return_dict=False)
    assert [ours[i] for i in range(len(rows))] == [
        sft_dataset_from_rows(rows, reference, max_seq_len=4096, chat_template="llama3")[i] for i in range(len(rows))]
