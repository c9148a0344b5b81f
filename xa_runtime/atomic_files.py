"""Writing a set of files all or nothing: hidden temporary names that carry the writer's
process id, a lock on the folder while the set moves into place, the previous set restored
when any move fails, and the temporaries of writers that died (SIGKILL, power loss)
removed by the next writer. Every tool that writes results (xa-generate, xa-export,
xa-bench) goes through here, so that a failed, interrupted or concurrent run never leaves a
mix of two sets or a stray temporary file.

Hand-written: the usual libraries (atomicwrites, filelock) handle one file, not a set that
must replace another set as a unit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import threading
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: moves are not locked against a concurrent writer
    fcntl = None  # type: ignore[assignment]

TEMP_TAG = "xa-tmp-"  # hidden temporaries: .NAME.xa-tmp-PID-XXXX[.tmp] (files), .[NAME-]xa-tmp-PID-XXXX (folders)
_TEMP = re.compile(r"^\..*" + TEMP_TAG + r"(\d+)-[^/]+$")


def temp_prefix(name: str = "") -> str:
    """The prefix of this process's temporaries beside `name` (for mkstemp / mkdtemp)."""
    return f".{name}{'.' if name else ''}{TEMP_TAG}{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # a name that only looks like ours
        return False
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries (files or folders) in `folder` left by writers whose
    process is gone; returns what was removed. Those of running processes stay."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file to leave behind) while the body
    runs: two writers of one folder move their sets in one after the other, never interleaved."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def file_mode() -> int:
    """The mode open() gives a new file (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_temp(target: Path, data: bytes) -> str:
    """`data` in a hidden temporary file beside `target`, flushed to the disk (a full disk
    fails here, not later when the kernel writes back); returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _keep_old(target: Path) -> str | None:
    """A hard link to `target`'s current file under a hidden name (None if there is none),
    so that the old file can come back if the new set does not complete."""
    if not os.path.lexists(target) or os.path.isdir(target):
        return None
    backup = tempfile.mktemp(prefix=temp_prefix(target.name), suffix=".old", dir=target.parent)
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        shutil.copy2(target, backup, follow_symlinks=False)  # a file system without hard links
    return backup


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT / SIGTERM wait while the set moves (a few renames): they are recorded and sent
    again afterwards. (Blocking them with pthread_sigmask would not do: the kernel hands a
    process's signal to any thread that does not block it, and Python then runs the handler
    in the main thread at once.) Python runs handlers in the main thread only, so a writer in
    another thread is not interrupted by them anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught:
            signal.raise_signal(s)


def move_all_or_nothing(moves: Sequence[tuple[str | os.PathLike, Path]]) -> None:
    """Move each (source, target) into place, in order, under a lock on the targets' folders
    and with SIGINT / SIGTERM held. On any error the targets already moved get their old
    files back (or go, if there was none) and the sources left are removed."""
    moves = [(str(src), Path(target)) for src, target in moves]
    moved: list[tuple[Path, str | None]] = []  # (target, link to its old file or None)
    pending = [src for src, _ in moves]
    try:
        with contextlib.ExitStack() as held:
            for folder in sorted({str(t.parent) for _, t in moves}):
                held.enter_context(folder_lock(folder))
            held.enter_context(_signals_held())
            try:
                for src, target in moves:
                    backup = _keep_old(target)
                    try:
                        os.replace(src, target)
                    except BaseException:
                        if backup is not None:
                            os.unlink(backup)
                        raise
                    moved.append((target, backup))
                    pending.remove(src)
            except BaseException:
                for target, backup in reversed(moved):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, target)
                        else:
                            os.unlink(target)
                raise
            for _, backup in moved:
                if backup is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(backup)
    except BaseException:
        for src in pending:
            with contextlib.suppress(OSError):
                shutil.rmtree(src) if os.path.isdir(src) and not os.path.islink(src) else os.unlink(src)
        raise


def write_all_or_nothing(contents: Mapping[Path, bytes]) -> None:
    """Write every file of the set to a hidden temporary beside its target, then move them
    all into place (move_all_or_nothing). On any error or signal the folder holds the old set
    whole and none of the temporaries: the new set appears whole or not at all."""
    targets = [Path(t) for t in contents]
    for folder in sorted({str(t.parent) for t in targets}):
        remove_stale_temps(folder)
    temps: list[str] = []
    try:
        for target, data in contents.items():
            temps.append(write_temp(Path(target), data))
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    move_all_or_nothing(list(zip(temps, targets)))
