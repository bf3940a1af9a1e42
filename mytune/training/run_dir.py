"""What a training run owns: its output_dir, for the run's life, and nothing another run wrote there.

- `claim_output_dir` takes the output_dir's lock (`output_dir/.mytune.lock`, an `fcntl.flock` the kernel drops when
  the process dies, so a lock of a killed run is reclaimed by the next one; the file names the holder's pid, host and
  start time), removes the leftovers of killed saves, picks the checkpoint to resume from and refuses a start that
  would mix this run's `step_<N>` with another run's (see `check_checkpoints_ahead`).
- `remove_stale_cache_temps` removes the `.tmp-` folders killed tokenizations left in the data cache.

The recipes call these on rank 0 at start; the lock is released by `RunLock.release` at the end (or by the process's
death).
"""

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from mytune.checkpoint.atomic import describe_write_error
from mytune.errors import MytuneError
from mytune.training.recipe_state import RECIPE_STATE_FILE, discard, resolve_resume_dir, step_checkpoints

LOCK_FILE = ".mytune.lock"
# `.tmp-<name>-<pid>` / `.old-<name>-<pid>`: atomic_directory's temporary and moved-aside dirs, prune's doomed dirs.
_LEFTOVER = re.compile(r"\.(tmp|old)-.+-\d+")
_STATE_TEMP = re.compile(re.escape(f".{RECIPE_STATE_FILE}.tmp-") + r"\d+")  # save_recipe_state's temporary file
CACHE_TEMP_MAX_AGE_S = 3600.0  # a cache `.tmp-` folder nothing wrote to for an hour belongs to a dead process


class RunLock:
    """The held lock on an output_dir; `release` unlocks it and removes the lock file (idempotent), and the
    output_dir too when the lock created it and the run wrote nothing there (e.g. it failed on its data)."""

    def __init__(self, path: Path | None, fd: int | None, *, created_dir: bool = False):
        self.path, self._fd, self._created_dir = path, fd, created_dir

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
            if self._created_dir:
                self.path.parent.rmdir()  # only if empty
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def lock_output_dir(output_dir: str | Path) -> RunLock:
    """Create `output_dir` and lock it for this process; another live run's lock is one MytuneError line naming it.

    A lock whose process died (kill -9, a crashed node's reboot) is free again: flock locks die with their process.
    Where the filesystem has no flock (some network filesystems), the run goes on unlocked after a warning.
    """
    import fcntl

    output_dir = Path(output_dir)
    path = output_dir / LOCK_FILE
    created_dir = not output_dir.exists()
    for _ in range(10):  # retried only when the holder removed the file between our open and our lock
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MytuneError(f"cannot write {output_dir}: {describe_write_error(err, output_dir)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise MytuneError(f"output_dir {output_dir} is in use by another run ({holder}): wait for it to end or "
                              f"stop it, or set another output_dir") from None
        except OSError as err:  # ENOLCK / EOPNOTSUPP: no locks on this filesystem
            os.close(fd)
            print(f"warning: cannot lock output_dir {output_dir} ({err.strerror}): nothing stops a second run from "
                  f"writing there at the same time", file=sys.stderr, flush=True)
            return RunLock(None, None)
        if not _same_file(fd, path):
            os.close(fd)
            continue
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        return RunLock(path, fd, created_dir=created_dir)
    raise MytuneError(f"cannot lock output_dir {output_dir}: its lock file keeps being replaced")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Remove what killed runs left in `output_dir`: `.tmp-*` / `.old-*` directories of interrupted saves and
    prunes (each a full model copy) and `.recipe_state.pt.tmp-*` files in the step directories. Call it holding the
    output_dir's lock: then no other process is writing there, so every such entry is a dead process's."""
    output_dir = Path(output_dir)
    removed = [path for path in output_dir.iterdir() if _LEFTOVER.fullmatch(path.name)]
    removed += [path for _, step in step_checkpoints(output_dir) for path in step.iterdir()
                if _STATE_TEMP.fullmatch(path.name)]
    for path in removed:
        discard(path)
    if removed:
        print(f"removed {len(removed)} leftover(s) of interrupted saves from {output_dir}: "
              f"{', '.join(path.name for path in removed)}", flush=True)
    return removed


def remove_stale_cache_temps(cache_dir: str | Path, max_age_s: float = CACHE_TEMP_MAX_AGE_S) -> list[Path]:
    """Remove the `.tmp-*` folders of a data cache that nothing wrote to for `max_age_s` (a killed tokenization's).

    Several runs share a cache, so a folder another live run is writing must stay: its files' modification times
    are recent. (The folders' names hold no pid, and a pid would not tell about processes on other hosts anyway.)
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    now, removed = time.time(), []
    for path in cache_dir.glob(".tmp-*"):
        try:
            newest = max([path.stat().st_mtime] + [child.stat().st_mtime for child in path.iterdir()])
        except OSError:  # gone already (a concurrent writer renamed it into place), or not a folder
            continue
        if now - newest > max_age_s:
            discard(path)
            removed.append(path)
    return removed


def check_checkpoints_ahead(output_dir: str | Path, resume_dir: Path | None, *, overwrite: bool,
                            latest: bool) -> None:
    """Refuse (one MytuneError line) a start that would mix this run's checkpoints with another run's.

    The checkpoints "ahead" are the `step_<N>` in output_dir past the step this run starts from (all of them for a
    fresh run): this run would write its own `step_<N>` among them, `latest` and `generate` could pick theirs, and
    pruning would keep theirs. `overwrite` deletes them; with `latest` the only ones ahead are incomplete (no
    recipe_state.pt: a save killed half-way), which are deleted too.
    """
    start = 0
    if resume_dir is not None:
        match = re.fullmatch(r"step_(\d+)", resume_dir.name)
        if match is None:
            return  # a checkpoint under another name: its step is not known before loading it
        start = int(match.group(1))
    ahead = [path for step, path in step_checkpoints(output_dir) if step > start]
    if not ahead:
        return
    names = ", ".join(path.name for path in ahead)
    incomplete = not any((path / RECIPE_STATE_FILE).is_file() for path in ahead)
    if overwrite or (latest and incomplete):
        why = "overwrite_output_dir=true" if overwrite else "incomplete: saves interrupted before recipe_state.pt"
        print(f"deleting {names} from {output_dir} ({why})", flush=True)
        for path in ahead:
            discard(path)
        return
    if resume_dir is None:
        raise MytuneError(f"output_dir {output_dir} already holds checkpoints of another run ({names}): continue it "
                          f"with resume_from_checkpoint=latest, start over with overwrite_output_dir=true (deletes "
                          f"them), or set another output_dir")
    raise MytuneError(f"output_dir {output_dir} holds checkpoints past {resume_dir} ({names}): this run would mix its "
                      f"steps with theirs; delete them with overwrite_output_dir=true, resume the newest with "
                      f"resume_from_checkpoint=latest, or set another output_dir")


def claim_output_dir(output_dir: str | Path, resume_from_checkpoint: str, *, overwrite: bool,
                     needs: tuple[str, ...] = ()) -> tuple[RunLock, Path | None]:
    """Lock `output_dir`, clean its leftovers, resolve `resume_from_checkpoint` (see `resolve_resume_dir`) and check
    the checkpoints ahead; returns the held lock and the directory to resume from (None: a fresh run).
    On rank 0 only; on an error the lock is released before the error propagates."""
    lock = lock_output_dir(output_dir)
    try:
        remove_leftovers(output_dir)
        resume_dir = resolve_resume_dir(resume_from_checkpoint, output_dir, needs=needs)
        check_checkpoints_ahead(output_dir, resume_dir, overwrite=overwrite, latest=resume_from_checkpoint == "latest")
    except BaseException:
        lock.release()
        raise
    return lock, resume_dir
