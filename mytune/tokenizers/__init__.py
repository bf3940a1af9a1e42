"""Tokenizers behind one small Protocol: SentencePiece, Hugging Face tokenizer.json and tiktoken (Llama 3)."""

from pathlib import Path

from mytune.errors import MytuneError
from mytune.tokenizers.base import Tokenizer
from mytune.tokenizers.files import copy_tokenizer_files, write_tokenizer_files

__all__ = ["Tokenizer", "copy_tokenizer_files", "load_tokenizer", "write_tokenizer_files"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `path`: a tokenizer.json (HF `tokenizers`), a tokenizer.model (SentencePiece, else tiktoken BPE), or a
    directory holding one of them (tokenizer.json preferred). bos/eos come from tokenizer_config.json when present."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise MytuneError(f"{path} holds no tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise MytuneError(f"tokenizer file {path} does not exist")
    if path.suffix == ".json":
        from mytune.tokenizers.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    from mytune.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
    from mytune.tokenizers.tiktoken_tokenizer import TikTokenTokenizer, looks_like_tiktoken_file

    try:
        return SentencePieceTokenizer(path)
    except MytuneError:
        if looks_like_tiktoken_file(path):  # the original Llama 3 tokenizer.model is tiktoken, not SentencePiece
            return TikTokenTokenizer(path)
        raise MytuneError(f"{path}: neither a SentencePiece model nor a tiktoken BPE file") from None
