"""SentencePiece `tokenizer.model` files (Llama 2, Mistral), through the `sentencepiece` library."""

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from mytune.errors import MytuneError
from mytune.tokenizers.base import (
    read_add_bos_token,
    read_chat_template,
    read_special_tokens,
    sibling_config_files,
    with_special,
)


class SentencePieceTokenizer:
    """Wraps `sentencepiece.SentencePieceProcessor`; ids are exactly the library's.

    bos/eos/pad come from the model itself, overridden by a tokenizer_config.json beside the file when it names
    tokens that exist in the vocabulary; `chat_template` comes from that file too (None when it has none).
    `add_bos` (is bos prepended to raw text) is that file's `add_bos_token`, as transformers' LlamaTokenizer reads it;
    without one, Llama's rule (bos added; transformers 4's default, and what the saved tokenizer files then state).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise MytuneError(f"{self.path}: not a SentencePiece model ({err})") from None
        special = read_special_tokens(self.path.parent)
        self.bos_id = self._special_id(special.get("bos_token"), self.processor.bos_id())
        eos_id = self._special_id(special.get("eos_token"), self.processor.eos_id())
        if eos_id is None:
            raise MytuneError(f"{self.path}: the model has no eos piece; name one as eos_token in "
                              "tokenizer_config.json")
        self.eos_id = eos_id
        pad_id = self._special_id(special.get("pad_token"), self.processor.pad_id())
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.bos_token = self.processor.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.processor.id_to_piece(self.eos_id)
        self.chat_template = read_chat_template(self.path.parent)
        add_bos_token = read_add_bos_token(self.path.parent)
        self.add_bos = self.bos_id is not None and (add_bos_token is None or add_bos_token)
        self.vocab_size = self.processor.vocab_size()
        self.files = [self.path, *sibling_config_files(self.path)]

    def _special_id(self, token: str | None, model_id: int) -> int | None:
        if token is not None and self.processor.id_to_piece(self.processor.piece_to_id(token)) == token:
            return self.processor.piece_to_id(token)
        return model_id if model_id >= 0 else None

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        add_bos = self.add_bos if add_bos is None else add_bos
        return with_special(self.processor.encode(text), self.bos_id, self.eos_id, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.processor.decode([i for i in ids if not self.processor.is_control(i)])
        # sentencepiece always drops control pieces; decode the runs between them and spell the controls out.
        parts, run = [], []
        for i in ids:
            if self.processor.is_control(i):
                parts.append(self.processor.decode(run))
                parts.append(self.processor.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self.processor.decode(run))
        return "".join(parts)
