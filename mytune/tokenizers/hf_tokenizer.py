"""Hugging Face `tokenizer.json` files (Llama 3, Qwen, most recent models), through the `tokenizers` library."""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

from mytune.errors import MytuneError
from mytune.tokenizers.base import read_chat_template, read_special_tokens, sibling_config_files, with_special

# Tried in order when no tokenizer_config.json names the eos token.
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class HFTokenizer:
    """Wraps `tokenizers.Tokenizer`; bos/eos/pad and the chat template from tokenizer_config.json /
    special_tokens_map.json (/ chat_template.jinja) beside the file.

    `encode` never lets the file's post-processor add special tokens itself: `add_bos` records whether it prepends
    bos (as transformers 5 does, the post-processor decides, whatever tokenizer_config.json's `add_bos_token` says),
    so `encode(text)` matches `transformers`' `tokenizer(text)` and `add_bos=`/`add_eos=` override it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.tokenizer = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust side raises plain Exception for malformed files
            raise MytuneError(f"{self.path}: not a Hugging Face tokenizer.json ({err})") from None
        special = read_special_tokens(self.path.parent)
        if "bos_token" in special:
            self.bos_id = self._token_id(special["bos_token"], "bos_token") if special["bos_token"] else None
        else:
            self.bos_id = self._first_known(_BOS_CANDIDATES)
        eos = special.get("eos_token")
        self.eos_id = self._token_id(eos, "eos_token") if eos else self._first_known(_EOS_CANDIDATES)
        if self.eos_id is None:
            raise MytuneError(f"{self.path}: cannot tell the eos token; add a tokenizer_config.json naming eos_token")
        pad = special.get("pad_token")
        self.pad_id = self._token_id(pad, "pad_token") if pad else self.eos_id
        self.bos_token = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.tokenizer.id_to_token(self.eos_id)
        self.chat_template = read_chat_template(self.path.parent)
        self.add_bos = self._post_processor_adds_bos()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.files = [self.path, *sibling_config_files(self.path)]

    def _token_id(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise MytuneError(f"{self.path.parent}: {role} {token!r} is not in the vocabulary of {self.path.name}")
        return token_id

    def _first_known(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            if (token_id := self.tokenizer.token_to_id(token)) is not None:
                return token_id
        return None

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor (a TemplateProcessing, alone or in a Sequence) prepends bos:
        asked of the `tokenizers` library itself, which applies it for transformers."""
        if self.bos_id is None or self.tokenizer.post_processor is None:
            return False
        probe = "a"
        plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
        full = self.tokenizer.encode(probe, add_special_tokens=True).ids
        return full[:1] == [self.bos_id] and full[1:len(plain) + 1] == plain

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        return with_special(ids, self.bos_id, self.eos_id, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
