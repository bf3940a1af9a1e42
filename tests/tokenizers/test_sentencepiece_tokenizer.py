"""SentencePiece tokenizer: ids equal the sentencepiece library and transformers; saved files load in AutoTokenizer."""

import json
import logging
import shutil

import pytest
import sentencepiece as spm

from mytune.errors import MytuneError
from mytune.tokenizers import Tokenizer, load_tokenizer, write_tokenizer_files
from mytune.tokenizers.sentencepiece_export import converts_exactly, read_sentencepiece_spec
from mytune.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer


def test_ids_equal_the_sentencepiece_library(sentencepiece_model, test_lines):
    tokenizer = load_tokenizer(sentencepiece_model)
    assert isinstance(tokenizer, SentencePieceTokenizer) and isinstance(tokenizer, Tokenizer)
    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 2, 400)
    for line in test_lines:
        ids = processor.encode(line)
        assert tokenizer.encode(line, add_bos=False) == ids
        assert tokenizer.encode(line) == [1, *ids]
        assert tokenizer.encode(line, add_eos=True) == [1, *ids, 2]
        assert tokenizer.decode([1, *ids, 2]) == processor.decode(ids)


def test_ids_equal_transformers_llama_tokenizer(sentencepiece_model, test_lines, tmp_path):
    """transformers' LlamaTokenizer built from the .model file agrees on every line except those starting with
    whitespace: transformers 5 prepends the dummy '▁' only when the text does not already start with one, while
    sentencepiece always does (mytune follows sentencepiece, the library the model was trained with)."""
    from transformers import LlamaTokenizer

    shutil.copy(sentencepiece_model, tmp_path / "tokenizer.model")
    reference = LlamaTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(sentencepiece_model)
    compared = 0
    for line in test_lines:
        if line[:1].isspace():
            continue
        assert ours.encode(line, add_bos=False) == reference(line, add_special_tokens=False)["input_ids"], repr(line)
        compared += 1
    assert compared > 2000


def test_written_files_load_in_autotokenizer_with_identical_ids(sentencepiece_model, test_lines, tmp_path):
    from transformers import AutoTokenizer

    ours = load_tokenizer(sentencepiece_model)
    written = write_tokenizer_files(ours, tmp_path)
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_id, ours.eos_id)
    for line in test_lines:  # every line, leading whitespace included
        ids = ours.encode(line)
        assert auto(line)["input_ids"] == ids, repr(line)
        assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids), repr(line)


def test_checkpoint_tokenizer_files_get_the_same_treatment(sentencepiece_model, tmp_path):
    from transformers import AutoTokenizer

    from mytune.checkpoint import save_hf_checkpoint
    from mytune.models import llama_tiny

    ours = load_tokenizer(sentencepiece_model)
    out = save_hf_checkpoint(llama_tiny(vocab_size=ours.vocab_size), tmp_path / "ckpt", tokenizer_files=ours.files)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == ours.encode("Hello world")
    reloaded = load_tokenizer(out)  # tokenizer.json preferred, and it agrees
    assert reloaded.encode("Hello  world\n") == ours.encode("Hello  world\n")
    assert (reloaded.bos_id, reloaded.eos_id) == (ours.bos_id, ours.eos_id)


def test_model_file_under_another_name_is_saved_as_tokenizer_model(sentencepiece_model, tmp_path):
    renamed = tmp_path / "src" / "demo.model"
    renamed.parent.mkdir()
    shutil.copy(sentencepiece_model, renamed)
    (tmp_path / "out").mkdir()
    write_tokenizer_files(load_tokenizer(renamed), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


def test_tokenizer_config_beside_the_model_sets_special_tokens(sentencepiece_model, tmp_path):
    shutil.copy(sentencepiece_model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>", "pad_token": "<s>"}))
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 0, 1)
    assert [p.name for p in tokenizer.files] == ["tokenizer.model", "tokenizer_config.json"]
    (tmp_path / "out").mkdir()
    write_tokenizer_files(tokenizer, tmp_path / "out")  # the user's config is kept, not regenerated
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["eos_token"] == "<unk>"


def test_decode_can_keep_special_tokens(sentencepiece_model):
    tokenizer = load_tokenizer(sentencepiece_model)
    ids = tokenizer.encode("hello world", add_eos=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>hello world</s>"
    assert tokenizer.decode(ids) == "hello world"


def test_spec_is_read_without_protobuf(sentencepiece_model, tmp_path):
    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    spec = read_sentencepiece_spec(processor)
    assert (spec.model_type, spec.byte_fallback, spec.normalizer_name) == (2, True, "identity")
    assert (spec.add_dummy_prefix, spec.remove_extra_whitespaces) == (True, False)
    assert converts_exactly(processor)


def test_unconvertible_model_gets_config_only_and_a_warning(tmp_path, caplog):
    """A unigram model with NFKC normalisation: no tokenizer.json rather than a subtly wrong one."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} with some words ﬁ ① and more" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "uni"), vocab_size=40,
                                   model_type="unigram", num_threads=1, minloglevel=2)
    tokenizer = load_tokenizer(tmp_path / "uni.model")
    assert not converts_exactly(tokenizer.processor)
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.WARNING):
        write_tokenizer_files(tokenizer, tmp_path / "out")
    assert "cannot be converted to tokenizer.json exactly" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]


def test_bad_files_are_user_errors(tmp_path, sentencepiece_model):
    with pytest.raises(MytuneError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(MytuneError, match="neither a SentencePiece model nor a tiktoken BPE file"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(MytuneError, match="holds no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(MytuneError, match="output directory .* does not exist"):
        write_tokenizer_files(load_tokenizer(sentencepiece_model), tmp_path / "nope")
