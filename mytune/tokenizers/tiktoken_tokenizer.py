"""The original Llama 3 `tokenizer.model`: a tiktoken BPE file (`<base64 token> <rank>` per line) plus 256 special
tokens appended after the ranks."""

import base64
from collections.abc import Sequence
from pathlib import Path

from mytune.errors import MytuneError
from mytune.tokenizers.base import read_chat_template, with_special

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_LLAMA3_SPECIAL_TOKENS = 256
_NAMED_LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.1+, in id order after the BPE ranks."""
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(2, 2 + NUM_LLAMA3_SPECIAL_TOKENS - len(_NAMED_LLAMA3_SPECIAL_TOKENS))]
    return _NAMED_LLAMA3_SPECIAL_TOKENS + reserved


def looks_like_tiktoken_file(path: Path) -> bool:
    """True when the first line reads `<base64> <int>`, the tiktoken BPE format."""
    try:
        with open(path, "rb") as f:
            first = f.readline().split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, ValueError):
        return False


class TikTokenTokenizer:
    """Llama 3 over `tiktoken`: bos `<|begin_of_text|>`, eos `<|end_of_text|>`, pad `<|finetune_right_pad_id|>`.

    Special-token strings inside text are encoded as ordinary text (never as control ids); the data pipeline splits
    the ones a chat template writes out itself (`special_tokens`). `chat_template` comes from a tokenizer_config.json
    beside the file, when there is one (the original Meta download has none).
    """

    def __init__(self, path: str | Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.path = Path(path)
        try:
            ranks = load_tiktoken_bpe(str(self.path))
        except (OSError, ValueError) as err:
            raise MytuneError(f"{self.path}: not a tiktoken BPE file ({err})") from None
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(llama3_special_tokens())}
        self.encoding = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.add_bos = True  # Llama 3's rule: its tokenizer.json post-processor prepends <|begin_of_text|>
        self.chat_template = read_chat_template(self.path.parent)
        self.stop_ids = [self.eos_id, self.special_tokens["<|eom_id|>"], self.special_tokens["<|eot_id|>"]]
        self.vocab_size = self.encoding.n_vocab
        self.files = [self.path]

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        ids = self.encoding.encode(text, allowed_special=set(), disallowed_special=())
        add_bos = self.add_bos if add_bos is None else add_bos
        return with_special(ids, self.bos_id, self.eos_id, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        special_ids = set(self.special_tokens.values())
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in special_ids)]
        return self.encoding.decode(ids)
