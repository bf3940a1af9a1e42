"""Shared fixtures for the data tests: a char-level fake tokenizer and the shipped demo SentencePiece tokenizer."""

from pathlib import Path

import pytest
import sentencepiece as spm

import mytune.data

DEMO_DIR = Path(mytune.data.__file__).resolve().parents[1] / "assets" / "demo"


class CharTokenizer:
    """One token per character (id = code point + 3); 0 pad, 1 bos, 2 eos. Positions are trivial to compute by hand."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, with_bos: bool = True):
        if not with_bos:
            self.bos_id = None
        self.encode_calls = 0

    def encode(self, text, *, add_bos=True, add_eos=False):
        self.encode_calls += 1
        ids = [ord(char) + 3 for char in text]
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + ([self.eos_id] if add_eos else [])


class SentencePieceAdapter:
    """The demo tokenizer.model behind the InstructTokenizer protocol, using sentencepiece alone."""

    def __init__(self, path: Path):
        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id = self.eos_id  # the model has no pad piece

    def encode(self, text, *, add_bos=True, add_eos=False):
        return self.processor.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids):
        return self.processor.decode(list(ids))


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture
def char_tokenizer_without_bos():
    return CharTokenizer(with_bos=False)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture(scope="session")
def demo_tokenizer():
    return SentencePieceAdapter(DEMO_DIR / "tokenizer.model")


# ---- a tiny Hugging Face tokenizer trained here, for chat-template parity with transformers ------------------------
CHAT_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CHAT_CORPUS = [
    "Hello world, how are you today? I am fine, thanks for asking.",
    "The assistant answers the user. The system prompt says: be brief and kind.",
    "  leading spaces and trailing  ", "Ünïcode ✓ text\nwith newlines\n\nand blank lines\n\n\n",
    "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nWhat is 2 + 2? [/INST] 4 ",
    "user\nassistant\nsystem\n\n", "Reverse the words: apple river stone -> stone river apple.",
]


def train_hf_tokenizer(kind: str):
    """A BPE `tokenizers.Tokenizer` (vocab 400) with the chat special tokens.

    `bytelevel`: GPT-2 style byte-level BPE. `metaspace`: llama-2 style, a "▁" before every text section (as
    SentencePiece's dummy prefix), ASCII and the corpus' characters as the alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = kind == "bytelevel"
    tokenizer = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>", byte_fallback=not byte_level))
    if kind == "bytelevel":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        specials = CHAT_SPECIAL_TOKENS
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = sorted(set("".join(CHAT_CORPUS) + "".join(map(chr, range(33, 127)))) - {" "} | {"▁"})
        specials = ["<unk>", *CHAT_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(CHAT_CORPUS * 3, trainer)
    return tokenizer


class HFChatAdapter:
    """A transformers `PreTrainedTokenizerFast` behind the mytune Tokenizer protocol.

    `native_specials=True`: encode() turns special-token strings in text into their ids (as mytune's HFTokenizer does).
    False: encode() spells them as text (as SentencePiece or tiktoken do) and `special_tokens` lists them instead, so
    the data code must split them out itself.
    """

    def __init__(self, hf, *, native_specials: bool = True, chat_template: str | None = None):
        self.hf = hf
        self.native_specials = native_specials
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id
        self.pad_id = hf.eos_token_id
        self.vocab_size = len(hf)
        self.bos_token = hf.bos_token
        self.eos_token = hf.eos_token
        self.chat_template = chat_template
        self.files = []
        if not native_specials:
            self.special_tokens = {token: hf.convert_tokens_to_ids(token) for token in CHAT_SPECIAL_TOKENS}

    def encode(self, text, *, add_bos=True, add_eos=False):
        ids = self.hf.encode(text, add_special_tokens=False, split_special_tokens=not self.native_specials)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, *, skip_special_tokens=True):
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="session", params=["bytelevel", "metaspace"])
def hf_tokenizer_object(request):
    return train_hf_tokenizer(request.param)


def make_hf(tokenizer_object, *, bos_token, eos_token):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token=bos_token, eos_token=eos_token)
