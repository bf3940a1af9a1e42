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
