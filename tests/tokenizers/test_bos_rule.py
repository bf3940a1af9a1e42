"""BOS follows the tokenizer's own rule: `encode(text)` equals `AutoTokenizer.from_pretrained(dir)(text)`.

transformers adds bos only where the files say so: for a tokenizer.json, its post-processor; for a SentencePiece
tokenizer.model, `add_bos_token` in tokenizer_config.json. Each kind is built here (no downloads) and compared on
lines that do not start with whitespace (transformers 5's LlamaTokenizer and sentencepiece differ there; see
test_sentencepiece_tokenizer.py).
"""

import base64
import json
import shutil

import pytest
from tokenizers import Tokenizer as RustTokenizer, processors

from mytune.tokenizers import load_tokenizer, write_tokenizer_files

LINES = ["hello world", "the quick brown fox", "x=1; 東京", "def f(x):\n    return x ** 2\n"]


def _auto_ids(directory, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


def _assert_rule(directory, expect_bos: bool):
    """Our default encode equals transformers' on every line, and bos is there exactly when expected."""
    ours = load_tokenizer(directory)
    assert ours.add_bos is expect_bos
    for line in LINES:
        ids = ours.encode(line)
        assert ids == _auto_ids(directory, line), repr(line)
        assert (ids[:1] == [ours.bos_id]) is expect_bos
        assert ours.encode(line, add_bos=True)[0] == ours.bos_id  # an explicit request still adds it
        assert ours.encode(line, add_bos=False) == ids[int(expect_bos):]


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_sentencepiece_follows_add_bos_token(sentencepiece_model, tmp_path, add_bos_token):
    shutil.copy(sentencepiece_model, tmp_path / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": add_bos_token}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _assert_rule(tmp_path, add_bos_token)


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_sentencepiece_export_keeps_the_rule(sentencepiece_model, tmp_path, add_bos_token):
    """A saved checkpoint's generated tokenizer.json / tokenizer_config.json carry the same rule to transformers."""
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir(), out.mkdir()
    shutil.copy(sentencepiece_model, source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": add_bos_token}))
    write_tokenizer_files(load_tokenizer(source / "tokenizer.model"), out)
    shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")  # as copied from the source
    assert (out / "tokenizer.json").is_file()
    _assert_rule(out, add_bos_token)
    assert load_tokenizer(out / "tokenizer.model").add_bos is add_bos_token


def test_bare_sentencepiece_export_writes_the_rule_explicitly(sentencepiece_model, tmp_path):
    """Without a tokenizer_config.json mytune keeps Llama's rule (bos added) and writes it down, so transformers,
    whose LlamaTokenizer default changed between versions, agrees on the saved files."""
    tokenizer = load_tokenizer(sentencepiece_model)
    assert tokenizer.add_bos is True
    write_tokenizer_files(tokenizer, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    _assert_rule(tmp_path, True)


@pytest.mark.parametrize("post_processor_bos", [True, False])
def test_tokenizer_json_follows_its_post_processor(bpe_tokenizer_dir, tmp_path, post_processor_bos):
    """Llama 3 style (a TemplateProcessing that prepends bos) and Qwen/`<s>`-naming style (bos named, none added)."""
    tokenizer = RustTokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    if post_processor_bos:
        bos = "<|begin_of_text|>"
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.token_to_id(bos))])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(bpe_tokenizer_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    _assert_rule(tmp_path, post_processor_bos)


def test_tokenizer_json_post_processor_in_a_sequence(bpe_tokenizer_dir, tmp_path):
    """Llama 3.1's real tokenizer.json: Sequence([ByteLevel, TemplateProcessing(bos)])."""
    tokenizer = RustTokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tokenizer.token_to_id(bos))]),
    ])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(bpe_tokenizer_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    _assert_rule(tmp_path, True)


def test_tiktoken_adds_bos_as_llama3_does(tmp_path):
    """The original Llama 3 tokenizer.model (tiktoken): bos always, as Meta's tokenizer.json post-processor does;
    transformers reads the same file through its tiktoken converter."""
    from tiktoken._educational import bpe_train

    from mytune.tokenizers.tiktoken_tokenizer import LLAMA3_PATTERN, TikTokenTokenizer
    from tests.tokenizers.conftest import varied_lines

    ranks = bpe_train("\n".join(varied_lines(200, seed=0)), vocab_size=300, pat_str=LLAMA3_PATTERN)
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                                      for token, rank in sorted(ranks.items(), key=lambda i: i[1])))
    ours = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(ours, TikTokenTokenizer) and ours.add_bos is True
    for line in LINES:
        assert ours.encode(line) == [ours.bos_id, *ours.encode(line, add_bos=False)]
