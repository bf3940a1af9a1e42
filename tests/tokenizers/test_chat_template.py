"""Tokenizers expose `chat_template` (from tokenizer_config.json or chat_template.jinja beside their files) and their
bos/eos strings, and the data pipeline renders prompts through that template: ids equal transformers'
`apply_chat_template` on the same directory."""

import json
import shutil

import pytest

from mytune.data import sft_dataset_from_rows
from mytune.errors import MytuneError
from mytune.tokenizers import load_tokenizer, write_tokenizer_files

# A Zephyr-like template (none of the built-in formats): it uses bos_token and eos_token.
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6, thanks for asking."}]


def with_config(source_dir, target_dir, **updates):
    """A copy of a tokenizer directory whose tokenizer_config.json gets `updates`."""
    shutil.copytree(source_dir, target_dir)
    path = target_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **updates}))
    return target_dir


def test_hf_tokenizer_template_renders_like_transformers(bpe_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    directory = with_config(bpe_tokenizer_dir, tmp_path / "tok", chat_template=TEMPLATE)
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_template == TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|im_end|>")  # from the config

    dataset = sft_dataset_from_rows([{"messages": MESSAGES}], tokenizer, max_seq_len=4096)  # no chat_template given
    assert dataset.stats["chat_template"] == "<jinja>"
    item = dataset[0]
    reference = AutoTokenizer.from_pretrained(directory).apply_chat_template(MESSAGES, tokenize=True,
                                                                             return_dict=False)
    assert item["tokens"] == reference
    targets = [t for t, label in zip(item["tokens"], item["labels"]) if label != -100]
    assert tokenizer.decode(targets, skip_special_tokens=False) == "4<|im_end|>6, thanks for asking.<|im_end|>"

    # A built-in name still wins over the tokenizer's own template.
    builtin = sft_dataset_from_rows([{"messages": MESSAGES}], tokenizer, max_seq_len=4096, chat_template="chatml")
    assert builtin.stats["chat_template"] == "chatml" and builtin[0]["tokens"] != item["tokens"]


def test_sentencepiece_tokenizer_reads_the_template_beside_its_model(sentencepiece_model, tmp_path):
    directory = tmp_path / "spm"
    directory.mkdir()
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    assert load_tokenizer(directory).chat_template is None  # no config: the data code falls back to alpaca / chatml
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_template == TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")

    item = sft_dataset_from_rows([{"messages": MESSAGES}], tokenizer, max_seq_len=4096)[0]
    assert item["tokens"][0] == tokenizer.bos_id  # the template's bos_token became the bos id, not text
    assert item["tokens"].count(tokenizer.eos_id) == len(MESSAGES)  # each eos_token too
    assert tokenizer.decode(item["tokens"]).startswith("<|system|>\nBe brief.")


def test_template_list_and_jinja_file_forms_and_saved_copies(bpe_tokenizer_dir, tmp_path):
    listed = with_config(bpe_tokenizer_dir, tmp_path / "listed",
                         chat_template=[{"name": "tool_use", "template": "{{ 'tools' }}"},
                                        {"name": "default", "template": TEMPLATE}])
    assert load_tokenizer(listed).chat_template == TEMPLATE

    no_default = with_config(bpe_tokenizer_dir, tmp_path / "no_default",
                             chat_template=[{"name": "tool_use", "template": "{{ 'tools' }}"}])
    with pytest.raises(MytuneError, match="none named 'default'"):
        load_tokenizer(no_default)

    jinja_file = with_config(bpe_tokenizer_dir, tmp_path / "jinja_file")  # transformers >= 4.50 saves it this way
    (jinja_file / "chat_template.jinja").write_text(TEMPLATE)
    tokenizer = load_tokenizer(jinja_file)
    assert tokenizer.chat_template == TEMPLATE

    out = tmp_path / "checkpoint"
    out.mkdir()
    write_tokenizer_files(tokenizer, out)  # a saved checkpoint keeps the template
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    assert load_tokenizer(out).chat_template == TEMPLATE

