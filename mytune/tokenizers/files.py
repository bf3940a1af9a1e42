"""Copy a tokenizer's files into a checkpoint so that `transformers.AutoTokenizer.from_pretrained(dir)` loads it."""

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from mytune.errors import MytuneError
from mytune.tokenizers.base import TOKENIZER_CONFIG_NAME, Tokenizer

logger = logging.getLogger(__name__)
SENTENCEPIECE_NAME = "tokenizer.model"
TOKENIZER_JSON_NAME = "tokenizer.json"


def copy_tokenizer_files(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """Copy `files` into `out_dir` and add what transformers needs next to a SentencePiece `tokenizer.model`.

    A SentencePiece model (under any file name) is stored as tokenizer.model; when the directory then has no
    tokenizer.json / tokenizer_config.json, they are generated (see `sentencepiece_export`). Returns written paths.
    """
    out_dir = Path(out_dir)
    written = []
    sentencepiece_file = None
    for file in map(Path, files):
        if not file.is_file():
            raise MytuneError(f"tokenizer file {file} does not exist")
        name = file.name
        if file.suffix == ".model" and _is_sentencepiece(file):
            name, sentencepiece_file = SENTENCEPIECE_NAME, out_dir / SENTENCEPIECE_NAME
        shutil.copyfile(file, out_dir / name)
        written.append(out_dir / name)
    if sentencepiece_file is not None and not (out_dir / TOKENIZER_JSON_NAME).exists():
        written += _write_sentencepiece_extras(sentencepiece_file, out_dir)
    return written


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: str | Path) -> list[Path]:
    """Copy `tokenizer.files` into `out_dir` (plus a generated tokenizer.json / tokenizer_config.json for a
    SentencePiece model that lacks them). Returns the paths written."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MytuneError(f"output directory {out_dir} does not exist")
    return copy_tokenizer_files(tokenizer.files, out_dir)


def _is_sentencepiece(path: Path) -> bool:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor().Load(str(path))
        return True
    except (OSError, RuntimeError):
        return False


def _write_sentencepiece_extras(model_file: Path, out_dir: Path) -> list[Path]:
    from mytune.tokenizers.sentencepiece_export import converts_exactly, write_sentencepiece_hf_files
    from mytune.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(model_file)  # reads the copied tokenizer_config.json, if any
    has_config = (out_dir / TOKENIZER_CONFIG_NAME).exists()
    if not converts_exactly(tokenizer.processor):
        logger.warning("%s cannot be converted to tokenizer.json exactly; transformers will rebuild it from "
                       "tokenizer.model, and its ids may differ from sentencepiece's", model_file)
    pad_id = tokenizer.pad_id if tokenizer.pad_id != tokenizer.eos_id else None
    return write_sentencepiece_hf_files(tokenizer.processor, out_dir, bos_id=tokenizer.bos_id,
                                        eos_id=tokenizer.eos_id, pad_id=pad_id, write_config=not has_config,
                                        add_bos=tokenizer.add_bos)
