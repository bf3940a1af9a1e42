"""The tokenization cache trusts the data's bytes, not its mtime; a damaged entry is rebuilt, never trained on; a
cache that cannot be written warns and the build goes on."""

import errno
import json
import os

import numpy as np
import pytest

import mytune.data.cache as cache_module
from mytune.data import build_sft_dataset
from mytune.data.cache import default_cache_dir

VOCAB = 300


class Tokenizer:
    """One token per character (code point + 3, all < VOCAB for ASCII); 0 pad, 1 bos, 2 eos."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, VOCAB

    def __init__(self):
        self.calls = 0

    def encode(self, text, *, add_bos=True, add_eos=False):
        self.calls += 1
        return [1] * add_bos + [ord(c) + 3 for c in text] + [2] * add_eos


def write_rows(path, outputs):
    path.write_text("".join(json.dumps({"instruction": "Say it.", "output": out}) + "\n" for out in outputs),
                    encoding="utf-8")
    return path


def build(path, cache_dir):
    return build_sft_dataset(path, Tokenizer(), max_seq_len=512, cache_dir=cache_dir)


def decoded_outputs(dataset):
    """The target text of each sample, decoded from the tokens the dataset serves."""
    texts = []
    for i in range(len(dataset)):
        item = dataset[i]
        texts.append("".join(chr(t - 3) for t, label in zip(item["tokens"], item["labels"]) if label != -100 and t > 2))
    return texts


@pytest.fixture
def data(tmp_path):
    return write_rows(tmp_path / "data.jsonl", ["alpha", "bravo", "charlie"])


@pytest.fixture
def entry(data, tmp_path):
    """The cache folder of `data`, written by a first build."""
    cache = tmp_path / "cache"
    assert build(data, cache).stats["cache"] == "written"
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return folder


# ---- keyed on content ------------------------------------------------------------------------------------------------
def test_an_in_place_edit_with_the_mtime_restored_is_seen(data, entry):
    stat = data.stat()
    write_rows(data, ["alpha", "bravo", "delta!!"])  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, rsync and tar do
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    dataset = build(data, entry.parent)
    assert dataset.stats["cache"] == "written"
    assert decoded_outputs(dataset) == ["alpha", "bravo", "delta!!"]


def test_a_touched_but_unchanged_file_still_hits(data, entry):
    os.utime(data, ns=(1, 1))
    assert build(data, entry.parent).stats["cache"] == "hit"


def test_a_folder_is_keyed_on_every_file(tmp_path):
    folder = tmp_path / "rows"
    folder.mkdir()
    write_rows(folder / "a.jsonl", ["one"])
    second = write_rows(folder / "b.jsonl", ["two"])
    cache = tmp_path / "cache"
    build(folder, cache)
    stat = second.stat()
    write_rows(second, ["owt"])
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dataset = build(folder, cache)
    assert dataset.stats["cache"] == "written" and decoded_outputs(dataset) == ["one", "owt"]


# ---- damaged entries -------------------------------------------------------------------------------------------------
def _save(folder, name, array):
    np.save(folder / name, array)


DAMAGE = {
    "meta_is_a_list": lambda f: (f / "meta.json").write_text("[1, 2]"),
    "meta_not_json": lambda f: (f / "meta.json").write_text("{"),
    "meta_missing_count": lambda f: (f / "meta.json").write_text(json.dumps({"rows": 3})),
    "meta_count_is_a_string": lambda f: (f / "meta.json").write_text(
        json.dumps({**json.loads((f / "meta.json").read_text()), "samples": "3"})),
    "id_above_vocab": lambda f: _save(f, "tokens.npy", np.where(np.load(f / "tokens.npy") == 1, VOCAB + 7,
                                                                np.load(f / "tokens.npy")).astype(np.int32)),
    "negative_id": lambda f: _save(f, "tokens.npy", -np.load(f / "tokens.npy")),
    "tokens_int64": lambda f: _save(f, "tokens.npy", np.load(f / "tokens.npy").astype(np.int64)),
    "tokens_truncated": lambda f: (f / "tokens.npy").write_bytes((f / "tokens.npy").read_bytes()[:-8]),
    "tokens_garbage": lambda f: (f / "tokens.npy").write_bytes(b"garbage"),
    "targets_short": lambda f: _save(f, "targets.npy", np.load(f / "targets.npy")[:-1]),
    "offsets_not_increasing": lambda f: _save(f, "offsets.npy", np.load(f / "offsets.npy")[[0, 2, 1, 3]]),
    "offsets_pickled": lambda f: _save(f, "offsets.npy", np.array([0, "x"], dtype=object)),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_entry_is_rebuilt_never_trained_on(data, entry, damage, capsys):
    expected = decoded_outputs(build(data, entry.parent))
    capsys.readouterr()
    damage(entry)
    dataset = build(data, entry.parent)
    assert dataset.stats["cache"] == "written"
    assert decoded_outputs(dataset) == expected
    assert all(0 <= t < VOCAB for i in range(len(dataset)) for t in dataset[i]["tokens"])
    warning = capsys.readouterr().err
    assert f"tokenization cache entry {entry} is damaged" in warning and "tokenizing again" in warning
    assert build(data, entry.parent).stats["cache"] == "hit", "the rebuilt entry replaced the damaged one"


def test_a_cache_built_for_a_larger_vocabulary_is_not_used(data, entry, monkeypatch, capsys):
    """Ids that do not fit the tokenizer's vocabulary (here: the key of a tokenizer with a smaller one)."""
    import mytune.data.sft as sft

    class Smaller(Tokenizer):
        vocab_size = 50

    same_key = cache_module.tokenizer_fingerprint(Tokenizer())
    monkeypatch.setattr(sft, "tokenizer_fingerprint", lambda tokenizer: same_key)
    dataset = build_sft_dataset(data, Smaller(), max_seq_len=512, cache_dir=entry.parent)
    assert dataset.stats["cache"] != "hit"
    assert "outside the tokenizer's vocabulary [0, 50)" in capsys.readouterr().err


# ---- a cache that cannot be written ----------------------------------------------------------------------------------
def test_cache_dir_that_is_a_file_warns_and_goes_on(data, tmp_path, capsys):
    a_file = tmp_path / "cache_file"
    a_file.write_text("x")
    for cache_dir in (a_file, a_file / "sub"):
        dataset = build(data, cache_dir)
        assert dataset.stats["cache"] == "not written" and decoded_outputs(dataset) == ["alpha", "bravo", "charlie"]
        warning = capsys.readouterr().err.strip()
        assert len(warning.splitlines()) == 1 and f"{a_file} is a file" in warning and "goes on" in warning
    assert a_file.read_text() == "x"


def test_unwritable_home_warns_and_goes_on(data, tmp_path, monkeypatch, capsys):
    """A HOME that cannot be written (here: a path under a file, as chmod does not stop root) and the default
    cache dir under it."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.delenv("MYTUNE_DATA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(a_file / "home"))
    assert str(default_cache_dir()).startswith(str(a_file))
    dataset = build(data, default_cache_dir())
    assert dataset.stats["cache"] == "not written" and len(dataset) == 3
    assert "tokenization cache not written" in capsys.readouterr().err


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_a_failing_cache_write_warns_and_leaves_no_temp_folder(data, tmp_path, monkeypatch, capsys, code, words):
    real_save = np.save

    def failing_save(path, array, *args, **kwargs):
        real_save(path, array[: len(array) // 2], *args, **kwargs)  # part written, then the error
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(cache_module.np, "save", failing_save)
    cache = tmp_path / "cache"
    dataset = build(data, cache)
    assert dataset.stats["cache"] == "not written" and decoded_outputs(dataset) == ["alpha", "bravo", "charlie"]
    warning = capsys.readouterr().err
    assert words in warning and str(cache) in warning
    assert list(cache.iterdir()) == []
