"""Atomic outputs and run locks.

Outputs appear under their final name only when complete: a writer works on a temporary
name in the same directory and renames it at the end (a rename within one file system is
atomic). A killed run leaves at most a ``*.tmp-<pid>`` entry, which the next run ignores and
removes when it writes the same output (or cleans the directory) and that pid is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from filterx.core.faults import crash_point

TMP_MARK = ".tmp-"


def tmp_name(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path``, unique to this process."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or directory to; rename it to ``path`` on success.

    On an exception the temporary output is removed and ``path`` is left as it was.
    An existing ``path`` is replaced (directories via a rename aside, then removal).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    remove(tmp)
    for stale in path.parent.glob(f"{glob.escape(path.name)}{TMP_MARK}*"):
        if _abandoned(stale):
            remove(stale)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    commit(tmp, path)


def commit(done: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the complete output ``done`` to ``path``, replacing what is there.

    A file replaces a file in one rename; a directory is swapped in with two (the old one
    renamed aside, then removed), so ``path`` is at every moment the old or the new output.
    """
    done, path = Path(done), Path(path)
    crash_point("commit")
    if done.is_dir() and path.exists():
        old = path.with_name(f"{path.name}{TMP_MARK}old-{os.getpid()}")
        remove(old)
        os.rename(path, old)
        os.rename(done, path)
        remove(old)
        return
    try:
        os.replace(done, path)
    except OSError:  # e.g. ``path`` is a directory: the complete output is not left beside it
        remove(done)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    try:  # a zombie (exited, not yet reaped by its parent) answers the signal but writes nothing
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner(tmp: Path) -> int | None:
    """The pid that ends a temporary's name (None: not a name filterx makes)."""
    pid = tmp.name.rpartition(TMP_MARK)[2].rpartition("-")[2]
    return int(pid) if pid.isdigit() else None


def _abandoned(tmp: Path) -> bool:
    """Whether a temporary was left by a process that is gone (its pid ends the name)."""
    pid = _owner(tmp)
    if pid is None:
        return True
    return pid != os.getpid() and not _alive(pid)


def clean_stale_tmp(directory: str | os.PathLike, wait: float = 0.0) -> int:
    """Remove temporaries left by killed runs in ``directory`` (not those of live processes,
    which may be writing them now); returns how many.

    ``wait``: seconds to wait, at most, for the other live processes that own temporaries
    here to end, and then remove theirs too (for a writer that holds the output's lock, so
    that such processes can only be a killed run's workers on their way out).
    """
    directory = Path(directory)
    deadline = time.monotonic() + wait
    n = 0
    while directory.is_dir():
        waiting = False
        for p in directory.iterdir():
            if TMP_MARK not in p.name:
                continue
            if _abandoned(p):
                with contextlib.suppress(FileNotFoundError):  # its writer may have just renamed it
                    remove(p)
                n += 1
            else:
                waiting = waiting or _owner(p) != os.getpid()
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return n


class LockedError(RuntimeError):
    """Another filterx process holds the lock on an output."""


_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds


def worker_init(*_) -> None:
    """Set-up for the worker processes a writing stage starts (a ProcessPoolExecutor
    ``initializer``, a DataLoader ``worker_init_fn``).

    A forked worker inherits the stage's lock descriptors, and with them the lock (an
    ``flock`` belongs to the open file, which fork shares): were the stage killed, its orphaned
    workers would hold the lock and refuse the re-run. So the worker closes them, and exits
    when its parent dies, rather than live on as an orphan that still writes.
    """
    import threading

    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="filterx-exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, what: str, output: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for the duration of a writing stage.

    A second run writing to the same output fails at once with LockedError instead of
    interleaving its writes with the first. The lock is released when the process dies.
    ``output``: what the refusal names (default: ``directory``), e.g. the one file written there.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_file = directory / f".filterx-{what}.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            gone = holder.isdigit() and not _alive(int(holder))
            raise LockedError(
                f"{output or directory} is being written by {what} in process {holder}; "
                + ("that process has ended and its workers are exiting: retry in a few seconds" if gone
                   else "wait for it to finish or stop it first")
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)
