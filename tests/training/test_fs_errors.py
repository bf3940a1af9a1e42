"""A save that cannot be written (disk full, read-only, a file in the way) is one MytuneError line naming the path and
what to do, and the previous checkpoint stays intact. CI runs as root, where chmod stops nothing: the failures are
simulated with the exception types the real ones raise (checked on a 64 KiB tmpfs: safetensors raises
SafetensorError "... No space left on device (os error 28)", torch.save RuntimeError "unexpected pos ...")."""

import errno
import io
import os
import pathlib
import shutil

import pytest
import torch
from safetensors import SafetensorError

import mytune.checkpoint.atomic as atomic_module
import mytune.checkpoint.hf as hf_module
import mytune.training.recipe_state as recipe_state_module
from mytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from mytune.models import ModelArgs, TransformerDecoder
from mytune.modules.lora import apply_lora
from mytune.training.recipe_state import RECIPE_STATE_FILE, latest_checkpoint, save_recipe_state
from tests.support import one_line_error

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TransformerDecoder(ModelArgs(**TINY))


@pytest.fixture
def run(tmp_path, model):
    """An output_dir holding a complete step_1; returns (output_dir, optimizer, snapshot of step_1's bytes)."""
    output_dir = tmp_path / "out"
    optimizer = torch.optim.AdamW(model.parameters())
    save(model, optimizer, output_dir / "step_1")
    return output_dir, optimizer, snapshot(output_dir / "step_1")


def save(model, optimizer, step_dir):
    save_hf_checkpoint(model, step_dir, dtype=torch.float32)
    save_recipe_state(step_dir, optimizer=optimizer, lr_scheduler=None, dataloader_state=None, global_step=1, epoch=0)


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}



def assert_intact(output_dir, before):
    assert snapshot(output_dir / "step_1") == before
    assert latest_checkpoint(output_dir) == output_dir / "step_1"
    assert [p.name for p in output_dir.iterdir() if p.name.startswith(".")] == [], "no temp leftovers"


def disk_full_safetensors(monkeypatch):
    real = hf_module.save_file

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        os.truncate(path, os.path.getsize(path) // 2)  # a part written, then the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf_module, "save_file", save_file)


@pytest.mark.parametrize("step", ["step_2", "step_1"], ids=["new_step", "same_step_again"])
def test_disk_full_while_writing_the_weights(run, model, monkeypatch, step):
    output_dir, _, before = run
    disk_full_safetensors(monkeypatch)
    message = one_line_error(save_hf_checkpoint, model, output_dir / step, dtype=torch.float32)
    assert f"cannot write {output_dir / step}" in message and "no space left on the device" in message
    assert ("previous one is kept" in message) == (step == "step_1")
    assert_intact(output_dir, before)


def test_disk_full_while_writing_the_recipe_state(run, model, monkeypatch):
    output_dir, optimizer, before = run
    real_save = torch.save

    def save(obj, f):
        if isinstance(f, io.BytesIO):  # the in-memory check of the values, not the file
            return real_save(obj, f)
        real_save(obj, f)
        f.truncate(100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(recipe_state_module.torch, "save", save)
    monkeypatch.setattr(atomic_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
    for step_dir in (output_dir / "step_1", output_dir / "step_2"):
        message = one_line_error(save_recipe_state, step_dir, optimizer=optimizer, lr_scheduler=None, dataloader_state=None,
                           global_step=2, epoch=0)
        assert str(step_dir / RECIPE_STATE_FILE) in message and "no space left on the device" in message
    assert not (output_dir / "step_2" / RECIPE_STATE_FILE).exists()
    assert [p.name for p in (output_dir / "step_2").iterdir() if p.name.startswith(".")] == []
    assert_intact(output_dir, before)


def test_a_failed_rename_puts_the_previous_directory_back(run, model, monkeypatch):
    output_dir, _, before = run
    real_replace = os.replace

    def replace(src, dst):
        if pathlib.Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", replace)
    message = one_line_error(save_hf_checkpoint, model, output_dir / "step_1", dtype=torch.float32)
    assert "previous one is kept" in message
    assert_intact(output_dir, before)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only filesystem"), (errno.EACCES, "permission denied"),
                                         (errno.ENOSPC, "no space left")])
def test_unwritable_output_dir(run, model, monkeypatch, code, words):
    """A read-only output_dir, as a read-only mount answers (root passes chmod, so mkdir is made to fail)."""
    output_dir, optimizer, before = run

    def mkdir(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    message = one_line_error(save_hf_checkpoint, model, output_dir / "step_2", dtype=torch.float32)
    assert words in message and str(output_dir / "step_2") in message
    message = one_line_error(save_recipe_state, output_dir / "step_2", optimizer=optimizer, lr_scheduler=None,
                       dataloader_state=None, global_step=2, epoch=0)
    assert words in message
    assert_intact(output_dir, before)


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, model):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    optimizer = torch.optim.AdamW(model.parameters())
    for step_dir in (a_file / "step_1", a_file / "run" / "step_1"):
        message = one_line_error(save_hf_checkpoint, model, step_dir, dtype=torch.float32)
        assert f"{a_file} is a file, not a directory" in message
        message = one_line_error(save_recipe_state, step_dir, optimizer=optimizer, lr_scheduler=None,
                           dataloader_state=None, global_step=1, epoch=0)
        assert f"{a_file} is a file, not a directory" in message
    assert a_file.read_text() == "x"


def test_disk_full_while_writing_an_adapter(tmp_path, model, monkeypatch):
    import mytune.checkpoint.peft as peft_module

    apply_lora(model, ["q_proj"], rank=2, alpha=4.0)
    adapter = save_peft_adapter(model, tmp_path / "adapter")
    before = snapshot(adapter)

    def save_file(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft_module, "save_file", save_file)
    message = one_line_error(save_peft_adapter, model, adapter)
    assert "no space left" in message and "previous one is kept" in message
    assert snapshot(adapter) == before
