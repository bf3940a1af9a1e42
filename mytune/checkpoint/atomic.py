"""Write a directory atomically: build it under a temporary name next to the target, then rename it into place.

A write that fails (disk full, read-only or missing permissions, a file where a directory should be) leaves the
previous directory as it was and raises one `MytuneError` line naming the path, the cause and what to do.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from mytune.config.validation import file_in_the_way
from mytune.errors import MytuneError

# What a failed write raises: safetensors reports I/O errors (disk full included) as SafetensorError. (torch.save's
# zip writer raises RuntimeError("... unexpected pos ..."): its callers catch that around the write alone.)
WRITE_ERRORS = (OSError, SafetensorError)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_LOW_FREE_BYTES = 1 << 20  # a write failing with less free space than this most likely failed for want of space


def temp_dir_for(out_dir: Path) -> Path:
    """`out_dir.parent/.tmp-<name>-<pid>`: same filesystem as the target, so the final rename is atomic."""
    return out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `out_dir`, on error it is deleted.

    Readers never see a half-written `out_dir`: it is either the old complete directory or the new complete one.
    An existing `out_dir` is moved aside, the new one renamed in, and only then the old one removed. A write error
    in the block or here (see `WRITE_ERRORS`) becomes one MytuneError line (`describe_write_error`).
    """
    out_dir = Path(out_dir)
    tmp = temp_dir_for(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crashed run with the same pid
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        raise MytuneError(f"cannot write {out_dir}: {describe_write_error(err, out_dir)}") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_directory(tmp, out_dir)
    except BaseException as err:
        message = describe_write_error(err, out_dir) if isinstance(err, WRITE_ERRORS) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if message is None:
            raise
        previous = " (the previous one is kept)" if out_dir.is_dir() else ""
        raise MytuneError(f"cannot write {out_dir}{previous}: {message}") from None


def _replace_directory(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is moved aside first and put back if the rename fails."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush the files' contents to disk before the rename makes them visible under the final name."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def describe_write_error(err: BaseException, path: str | Path) -> str:
    """Why writing the file or directory `path` failed and what to do, in words, e.g. "no space left on the device
    of /ckpt: free space there or write to another disk". For messages that start "cannot write <path>: "."""
    path = Path(path)
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        return f"{blocker} is a file, not a directory: choose a directory path (or move the file away)"
    directory = _existing_ancestor(path.parent)
    code = getattr(err, "errno", None)
    disk_full = f"no space left on the device of {directory}: free space there or write to another disk"
    if code in _DISK_FULL_ERRNOS or any(text in str(err) for text in _DISK_FULL_TEXTS):
        return disk_full
    if code == errno.EROFS:
        return f"{directory} is on a read-only filesystem: write to a writable directory instead"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied in {directory}: make it writable or write to another directory"
    if _low_free_space(directory):
        return disk_full
    detail = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
    return f"{detail}: check the disk and the path, or write to another directory"


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing ancestor."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _low_free_space(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < _LOW_FREE_BYTES
    except OSError:
        return False
