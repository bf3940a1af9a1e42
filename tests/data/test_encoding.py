"""TextEncoder: whole-string tokens, target boundaries inside merged text, and special-token splitting."""

from mytune.data.encoding import TextEncoder, special_token_strings
from mytune.data.templates import Rendered


class GreedyTokenizer:
    """Longest-match over a tiny vocabulary: "ab" merges across any boundary between "a" and "b"."""

    VOCAB = {"<s>": 1, "</s>": 2, "<|sep|>": 3, "ab": 4, "a": 5, "b": 6, "c": 7, " ": 8, "<": 9, ">": 10, "|": 11,
             "s": 12, "e": 13, "p": 14, "/": 15}
    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, specials_in_text=False):
        self.specials_in_text = specials_in_text

    def encode(self, text, *, add_bos=True, add_eos=False):
        ids, i = [], 0
        while i < len(text):
            for length in (7, 4, 3, 2, 1):
                piece = text[i:i + length]
                special = piece.startswith("<") and piece.endswith(">") and length > 1
                if piece in self.VOCAB and (self.specials_in_text or not special):
                    ids.append(self.VOCAB[piece])
                    i += length
                    break
            else:
                raise AssertionError(f"cannot encode {text[i]!r}")
        return [1] * add_bos + ids + [2] * add_eos


def test_straddling_token_belongs_to_the_target():
    encoder = TextEncoder(GreedyTokenizer())
    ids, targets = encoder.encode_rendered(Rendered("cab", [(2, 3)], special_text=False))  # target "b"
    assert ids == [7, 4] and targets == [False, True], "'ab' holds the target's first character"
    ids, targets = encoder.encode_rendered(Rendered("cab", [(1, 3)], special_text=False))
    assert ids == [7, 4] and targets == [False, True]
    ids, targets = encoder.encode_rendered(Rendered("cabc", [(3, 4)], add_bos=True, add_eos=True,
                                                    special_text=False))
    assert ids == [1, 7, 4, 7, 2] and targets == [False, False, False, True, True]


def test_special_strings_become_their_ids_only_in_template_text():
    encoder = TextEncoder(GreedyTokenizer())  # encode() spells "<s>" and "<|sep|>" as characters
    assert special_token_strings(encoder.tokenizer) == ("<s>", "</s>")
    ids, targets = encoder.encode_rendered(Rendered("<s>ab<|sep|>c</s>", [(12, 17)]))
    assert ids == [1, 4, 9, 11, 12, 13, 14, 11, 10, 7, 2], "<|sep|> is not one token of this tokenizer: text"
    assert targets == [False] * 9 + [True, True]
    plain, _ = encoder.encode_rendered(Rendered("<s>ab", [], special_text=False))
    assert plain == [9, 12, 10, 4], "user text (alpaca/text formats) goes to encode() unchanged"
    native = TextEncoder(GreedyTokenizer(specials_in_text=True))
    ids, _ = native.encode_rendered(Rendered("<s>ab<|sep|>c</s>", [(12, 17)]))
    assert ids == [1, 4, 3, 7, 2]
