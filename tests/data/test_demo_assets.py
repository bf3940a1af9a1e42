"""The shipped demo dataset and tokenizer: valid, small, llama-2 style ids, and reproducible by their script."""

import importlib.util
import statistics
from pathlib import Path

import sentencepiece as spm

from mytune.data import InstructDataset, load_rows

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_assets.py"


def test_every_demo_row_is_valid_and_short(demo_tokenizer, demo_dir):
    rows = load_rows(demo_dir / "alpaca_demo.jsonl")
    assert len(rows) == 152 * 8, "152 facts, 8 phrasings each"
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)
    assert 100 < sum(not row["input"] for row in rows) < 1000, "some, not most, rows have an empty input"
    assert len({row["output"] for row in rows}) < len(rows) / 3, "each fact's answer recurs across its phrasings"
    assert len({(row["instruction"], row["input"]) for row in rows}) == len(rows), "no duplicate prompts"
    dataset = InstructDataset(rows, demo_tokenizer, max_seq_len=10_000, source="alpaca_demo.jsonl")
    lengths = dataset.token_counts()
    assert statistics.mean(lengths) < 128 and max(lengths) <= 256
    output_lengths = [len(demo_tokenizer.encode(row["output"], add_bos=False)) for row in rows]
    assert max(output_lengths) <= 32


def test_tokenizer_is_small_llama2_style_bpe(demo_dir):
    path = demo_dir / "tokenizer.model"
    assert path.stat().st_size < 50_000
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"  # byte fallback pieces
    text = "Ünïcode ✓ and\nnew lines, 123  spaces"
    ids = sp.encode(text)
    assert 0 not in ids, "byte fallback: nothing maps to <unk>"
    assert sp.decode(ids) == text, "identity normalization round-trips text exactly"
    assert sp.encode("123", out_type=str) == ["▁", "1", "2", "3"]  # digits split, as in llama-2


def test_script_reproduces_the_shipped_assets(tmp_path, demo_dir):
    spec = importlib.util.spec_from_file_location("make_demo_assets", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out-dir", str(tmp_path)])
    for name in ("alpaca_demo.jsonl", "tokenizer.model", "preference_demo.jsonl"):
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes(), f"{name} is stale: rerun {SCRIPT.name}"
