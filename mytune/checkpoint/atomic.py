"""Write a directory atomically: build it under a temporary name next to the target, then rename it into place."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temp_dir_for(out_dir: Path) -> Path:
    """`out_dir.parent/.tmp-<name>-<pid>`: same filesystem as the target, so the final rename is atomic."""
    return out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `out_dir`, on error it is deleted.

    Readers never see a half-written `out_dir`: it is either the old complete directory or the new complete one.
    An existing `out_dir` is moved aside, the new one renamed in, and only then the old one removed.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out_dir)
    if tmp.exists():  # left over by a crashed run with the same pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out_dir.exists():
            old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    """Flush the files' contents to disk before the rename makes them visible under the final name."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
