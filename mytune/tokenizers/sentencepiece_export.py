"""Turn a SentencePiece BPE model into the files `transformers.AutoTokenizer` needs: tokenizer.json and
tokenizer_config.json.

Given only tokenizer.model, transformers 5 rebuilds it as a BPE whose ids differ from sentencepiece's for text that
starts with whitespace (and some of its conversion paths need `protobuf`); the tokenizer.json written here is exact
and loads the same in transformers 4 and 5. The conversion follows transformers' LlamaConverter and is exact for Llama-style models (BPE, byte fallback,
identity normalisation, no whitespace squashing); other models get no tokenizer.json rather than a wrong one.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

SPIECE_UNDERLINE = "▁"
_BPE = 2  # TrainerSpec.ModelType
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER_DEFINED = 1, 2, 3, 4  # SentencePiece.Type


@dataclass(frozen=True)
class SentencePieceSpec:
    """The few ModelProto settings that decide how text is split (defaults as in sentencepiece_model.proto)."""

    model_type: int = 1                  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    normalizer_name: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    @property
    def convertible(self) -> bool:
        """Whether these settings are ones `sentencepiece_to_tokenizer_json` reproduces exactly."""
        return (self.model_type == _BPE and self.byte_fallback and not self.precompiled_charsmap
                and not self.remove_extra_whitespaces and self.escape_whitespaces)


def converts_exactly(processor: spm.SentencePieceProcessor) -> bool:
    """True for Llama-style models: supported settings and no user-defined pieces (which sentencepiece matches
    inside the dummy-prefixed text, something a tokenizer.json added token cannot express)."""
    return read_sentencepiece_spec(processor).convertible and _PIECE_USER_DEFINED not in read_piece_types(processor)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Top-level fields of a serialized protobuf message: {field number: [values]} (varints as int, rest as bytes)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def read_sentencepiece_spec(processor: spm.SentencePieceProcessor) -> SentencePieceSpec:
    """Parse TrainerSpec (field 2) and NormalizerSpec (field 3) of the model proto, without needing `protobuf`."""
    model = _proto_fields(processor.serialized_model_proto())
    trainer = _proto_fields(model.get(2, [b""])[0])
    normalizer = _proto_fields(model.get(3, [b""])[0])
    defaults = SentencePieceSpec()

    def last(fields: dict, number: int, default):
        return fields[number][-1] if number in fields else default

    return SentencePieceSpec(
        model_type=last(trainer, 3, defaults.model_type),
        byte_fallback=bool(last(trainer, 35, defaults.byte_fallback)),
        normalizer_name=last(normalizer, 1, defaults.normalizer_name.encode()).decode(),
        precompiled_charsmap=last(normalizer, 2, b""),
        add_dummy_prefix=bool(last(normalizer, 3, defaults.add_dummy_prefix)),
        remove_extra_whitespaces=bool(last(normalizer, 4, defaults.remove_extra_whitespaces)),
        escape_whitespaces=bool(last(normalizer, 5, defaults.escape_whitespaces)),
    )


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float], skip: set[str]) -> list[tuple[str, str]]:
    """BPE merges recovered from the vocabulary: a piece's splits into two known pieces, ranked by the piece's
    score (SentencePiece merges higher scores first), as transformers' `generate_merges` does."""
    merges = []
    for piece, score in scores.items():
        if piece in skip:
            continue
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab and piece[:i] not in skip and piece[i:] not in skip]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def sentencepiece_to_tokenizer_json(processor: spm.SentencePieceProcessor, *, bos_id: int | None,
                                    eos_id: int, add_bos: bool = True) -> Tokenizer:
    """A `tokenizers.Tokenizer` giving the same ids as `processor` for plain text (callers check `converts_exactly`).

    With `add_bos` (the tokenizer's rule) its post-processor adds bos (as LlamaTokenizerFast does), so
    `AutoTokenizer(text)` = `[bos] + encode(text)`; without, it adds nothing.
    """
    spec = read_sentencepiece_spec(processor)
    size = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    types = read_piece_types(processor)
    special = {pieces[i] for i in range(size) if types[i] in (_PIECE_CONTROL, _PIECE_UNKNOWN)}
    scores = {pieces[i]: processor.get_score(i) for i in range(size)}
    unk = pieces[processor.unk_id()] if processor.unk_id() >= 0 else None

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(vocab, scores, special), unk_token=unk,
                                     fuse_unk=True, byte_fallback=True, dropout=None))
    # The "legacy" Llama normaliser: sentencepiece always adds the dummy prefix, even before leading spaces, which
    # Metaspace(prepend_scheme="first") would skip.
    prefix = [normalizers.Prepend(SPIECE_UNDERLINE)] if spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tokenizer.pre_tokenizer = None
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                                  for i in range(size) if pieces[i] in special])
    if add_bos and bos_id is not None:
        bos = pieces[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer


def read_piece_types(processor: spm.SentencePieceProcessor) -> list[int]:
    """Each piece's SentencePiece.Type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    model = _proto_fields(processor.serialized_model_proto())
    return [_proto_fields(piece).get(3, [_PIECE_NORMAL])[-1] for piece in model.get(1, [])]


def tokenizer_config_for_sentencepiece(processor: spm.SentencePieceProcessor, *, bos_id: int | None, eos_id: int,
                                       pad_id: int | None, has_tokenizer_json: bool, add_bos: bool = True) -> dict:
    """A tokenizer_config.json for transformers: the fast class when a tokenizer.json is written, else LlamaTokenizer
    (which then rebuilds itself from tokenizer.model)."""
    def piece(i: int | None) -> str | None:
        return processor.id_to_piece(i) if i is not None and i >= 0 else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast" if has_tokenizer_json else "LlamaTokenizer",
        "bos_token": piece(bos_id),
        "eos_token": piece(eos_id),
        "unk_token": piece(processor.unk_id()),
        "pad_token": piece(pad_id) if pad_id is not None and pad_id != eos_id else None,
        "add_bos_token": add_bos and bos_id is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
    }


def write_sentencepiece_hf_files(processor: spm.SentencePieceProcessor, out_dir: Path, *, bos_id: int | None,
                                 eos_id: int, pad_id: int | None, write_config: bool = True,
                                 add_bos: bool = True) -> list[Path]:
    """Write tokenizer.json (when the model converts exactly) and, if `write_config`, tokenizer_config.json; both
    state the bos rule `add_bos`."""
    written = []
    has_json = converts_exactly(processor)
    if has_json:
        tokenizer = sentencepiece_to_tokenizer_json(processor, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)
        tokenizer.save(str(out_dir / "tokenizer.json"))
        written.append(out_dir / "tokenizer.json")
    if write_config:
        config = tokenizer_config_for_sentencepiece(processor, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                                                    has_tokenizer_json=has_json, add_bos=add_bos)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written.append(out_dir / "tokenizer_config.json")
    return written
