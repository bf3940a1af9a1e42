"""tokenizer.json (HF `tokenizers`) and tiktoken (Llama 3 tokenizer.model) behind the same Protocol."""

import base64
import json
import shutil

import pytest

from mytune.errors import MytuneError
from mytune.tokenizers import Tokenizer, load_tokenizer, write_tokenizer_files
from mytune.tokenizers.hf_tokenizer import HFTokenizer
from mytune.tokenizers.tiktoken_tokenizer import LLAMA3_PATTERN, TikTokenTokenizer, llama3_special_tokens


def test_hf_ids_equal_transformers(bpe_tokenizer_dir, test_lines):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = load_tokenizer(bpe_tokenizer_dir)
    assert isinstance(ours, HFTokenizer) and isinstance(ours, Tokenizer)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    # bos/eos/pad from tokenizer_config.json; eos is an added token beyond the trained 600
    assert ours.bos_id == auto.bos_token_id == reference.convert_tokens_to_ids("<|begin_of_text|>")
    assert ours.eos_id == auto.eos_token_id == 600 and ours.pad_id == auto.pad_token_id == 601
    assert ours.vocab_size == len(auto) == 602
    assert not ours.add_bos  # the file has no post-processor: transformers prepends nothing, and neither do we
    for line in test_lines:
        ids = reference(line, add_special_tokens=False)["input_ids"]
        assert ours.encode(line, add_bos=False) == ids == auto(line, add_special_tokens=False)["input_ids"]
        assert ours.encode(line) == auto(line)["input_ids"] == ids
        assert ours.encode(line, add_bos=True, add_eos=True) == [ours.bos_id, *ids, ours.eos_id]
        assert ours.decode(ids) == auto.decode(ids) == line


def test_hf_special_tokens_are_skipped_or_kept_on_decode(bpe_tokenizer_dir):
    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    ids = tokenizer.encode("hello", add_bos=True, add_eos=True)
    assert tokenizer.decode(ids) == "hello"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>hello<|im_end|>"


def test_hf_without_bos_token(bpe_tokenizer_dir, tmp_path):
    """Qwen-style: tokenizer_config.json sets bos_token null, so add_bos adds nothing."""
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|end_of_text|>"}))
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.bos_id is None and tokenizer.pad_id == tokenizer.eos_id == 1
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_bos=False)


def test_hf_without_config_guesses_common_names_or_says_what_to_add(bpe_tokenizer_dir, tmp_path):
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)  # <|begin_of_text|>, <|end_of_text|>
    from tokenizers import Tokenizer as RustTokenizer, models

    RustTokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "bare.json"))
    with pytest.raises(MytuneError, match="cannot tell the eos token; add a tokenizer_config.json"):
        load_tokenizer(tmp_path / "bare.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(MytuneError, match="eos_token '<nope>' is not in the vocabulary of tokenizer.json"):
        load_tokenizer(tmp_path)


def test_hf_files_are_copied_with_their_config(bpe_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    assert [p.name for p in tokenizer.files] == ["tokenizer.json", "tokenizer_config.json"]
    write_tokenizer_files(tokenizer, tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto("some text", add_special_tokens=False)["input_ids"] == tokenizer.encode("some text", add_bos=False)
    assert auto.eos_token == "<|im_end|>"


def test_directory_prefers_tokenizer_json(bpe_tokenizer_dir, sentencepiece_model, tmp_path):
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(sentencepiece_model, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_malformed_tokenizer_json_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MytuneError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    """A Llama-3-format tokenizer.model: every byte plus BPE merges learnt on the test corpus."""
    from tiktoken._educational import bpe_train

    from tests.tokenizers.conftest import varied_lines

    ranks = bpe_train("\n".join(varied_lines(300, seed=0)), vocab_size=400, pat_str=LLAMA3_PATTERN)
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                            for token, rank in sorted(ranks.items(), key=lambda item: item[1])))
    return path, ranks


def test_tiktoken_file_is_detected_and_matches_tiktoken(tiktoken_file, test_lines):
    import tiktoken

    path, ranks = tiktoken_file
    tokenizer = load_tokenizer(path)  # sentencepiece refuses it, so the tiktoken format is tried
    assert isinstance(tokenizer, TikTokenTokenizer) and isinstance(tokenizer, Tokenizer)
    specials = {token: len(ranks) + i for i, token in enumerate(llama3_special_tokens())}
    assert len(specials) == 256 and specials["<|eot_id|>"] == len(ranks) + 9
    reference = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (specials["<|begin_of_text|>"], specials["<|end_of_text|>"])
    assert tokenizer.pad_id == specials["<|finetune_right_pad_id|>"] and tokenizer.vocab_size == len(ranks) + 256
    for line in test_lines:
        ids = reference.encode_ordinary(line)
        assert tokenizer.encode(line, add_bos=False) == ids
        assert tokenizer.encode(line, add_eos=True) == [tokenizer.bos_id, *ids, tokenizer.eos_id]
        assert tokenizer.decode([tokenizer.bos_id, *ids]) == line


def test_tiktoken_treats_special_token_text_as_text(tiktoken_file):
    tokenizer = load_tokenizer(tiktoken_file[0])
    ids = tokenizer.encode("<|begin_of_text|>", add_bos=False)
    assert tokenizer.bos_id not in ids and tokenizer.decode(ids) == "<|begin_of_text|>"
    assert tokenizer.decode([tokenizer.bos_id, *ids], skip_special_tokens=False).startswith("<|begin_of_text|><|")


def test_tiktoken_special_token_strings(tiktoken_file):
    """The strings chat templates write for bos/eos; no template without a tokenizer_config.json beside the file."""
    tokenizer = load_tokenizer(tiktoken_file[0])
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert tokenizer.special_tokens[tokenizer.bos_token] == tokenizer.bos_id
    assert tokenizer.chat_template is None
