"""Tokenizers trained inside the test session (no downloads) and a few thousand deliberately awkward lines."""

import json
import random
from pathlib import Path

import pytest

WORDS = ("the quick brown fox jumps over a lazy dog while hello world return import class print value "
         "naïve café résumé über straße 東京 日本語 你好 Привет мир 😀 🚀 ñandú 12 345 6789 3.14 x=1; {} [] () -> => != "
         "def lambda self _private __dunder__ snake_case CamelCase don't I'm we'll").split()
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "if x != None and y >= 3:\n\tpass", "SELECT * FROM users WHERE id = 42;", "<div class=\"a\">&amp;</div>",
        "print(f\"{name!r:>10}\")  # comment", "λx. x + 1", "a\r\nb\r\n", "    indented\n        more"]
ODD = ["", " ", "  ", "\t", "\n", "\n\n\n", " leading", "trailing ", "  two  spaces  ", "tab\tseparated\tvalues",
       "mixed \t \n whitespace", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "e\u0301 combining", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
       "emoji 👩‍👩‍👧 family", "\x00control\x07chars", "ĀЖ한국어ไทย", "'''quotes\"\"\"", "a" * 200, "1234567890" * 5]


def varied_lines(count: int, seed: int) -> list[str]:
    """Words, code, unicode and whitespace runs mixed at random; the fixed odd cases always included."""
    rng = random.Random(seed)
    alphabet = "abcXYZ 019 \t\n  éü東😀𝔘ñ{}()[];:'\"\\/#@!?.,-_=+<>~`^%$&*|Ж你\u200b\r\u00a0"
    lines = list(ODD) + CODE
    while len(lines) < count:
        kind = rng.random()
        if kind < 0.45:
            separators = [" ", " ", " ", "  ", "\t", "\n", ", ", "   "]
            lines.append("".join(rng.choice(WORDS) + rng.choice(separators) for _ in range(rng.randint(1, 12))))
        elif kind < 0.65:
            lines.append(rng.choice(CODE) + rng.choice(WORDS))
        elif kind < 0.9:
            lines.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
        else:
            lines.append(rng.choice([" ", "\n", "\t", "  "]) * rng.randint(1, 4) + rng.choice(WORDS))
    return lines


@pytest.fixture(scope="session")
def test_lines() -> list[str]:
    return varied_lines(3000, seed=1)


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A Llama-2-style SentencePiece BPE model (byte fallback, identity normalisation, digits split), ~400 pieces."""
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("spm")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(line.replace("\n", " ") for line in varied_lines(600, seed=0)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity", split_digits=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2,
    )
    return directory / "tokenizer.model"


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (Llama 3 / Qwen style) with special tokens and a tokenizer_config.json whose
    eos is an added token beyond the trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("bpe")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(varied_lines(600, seed=0), trainer=trainer)
    tokenizer.add_special_tokens(["<|im_end|>", "<|pad|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}  # the dict form real checkpoints use
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": eos,
              "pad_token": "<|pad|>", "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
