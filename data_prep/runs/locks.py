"""A lock on an output folder: a second concurrent run on the same folder refuses at once, naming the holder.

The lock is an OS file lock (`filelock`: flock on POSIX, released by the kernel when its process dies) on
`<folder>/.spinefrac.lock`; beside it `<folder>/.spinefrac.lock.json` names the holder (pid, host, start
time, command). A holder file left by a run that died on this host is a stale lock: it is taken over
with a warning. One process may take the same folder's lock again (predict locks its folder, then detect
writes into it): the lock is released when the outermost holder finishes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from data_prep.errors import InputError
from data_prep.runs.artifacts import write_json_atomic

log = logging.getLogger("data_prep")

LOCK_NAME = ".spinefrac.lock"
HOLDER_NAME = ".spinefrac.lock.json"
LOCK_FILES = (LOCK_NAME, HOLDER_NAME)
"""Files the lock keeps in a locked folder (kept when a run clears its folder, ignored by manifests)."""
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

F = TypeVar("F", bound=Callable[..., Any])
_HELD: dict[Path, list[Any]] = {}     # resolved folder -> [FileLock, depth] held by this process


class FolderLockedError(InputError):
    """Another run holds the output folder's lock; the message names it (pid, host, start time, command)."""


def holder_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record of a folder's lock (None when there is none or it is unreadable)."""
    path = Path(folder) / HOLDER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """One line naming a lock holder."""
    if not holder:
        return "a run that left no holder record"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # it exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, *, command: str | None = None) -> Iterator[Path]:
    """Hold the lock of an output folder (created if needed) while the block runs; refuse if another run holds it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:                       # this process holds it already (e.g. predict, then detect)
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    try:
        lock = _acquire(folder)
    except BaseException:
        if created:
            _remove_if_unused(folder)
        raise
    try:
        write_json_atomic(folder / HOLDER_NAME, {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime(TIME_FORMAT),
            "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])})
    except BaseException:
        lock.release()
        if created:
            _remove_if_unused(folder)
        raise
    _HELD[key] = [lock, 1]
    try:
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            (folder / HOLDER_NAME).unlink()
        lock.release()
        if created:                       # a run refused before any work leaves no folder behind
            _remove_if_unused(folder)


def _remove_if_unused(folder: Path) -> None:
    """Remove a folder this run created if it holds nothing but the lock files."""
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= set(LOCK_FILES):
            for name in LOCK_FILES:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()


def locks_output(param: str = "out") -> Callable[[F], F]:
    """Decorate a stage function so that it holds the lock of its `param` folder while it runs."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments[param]
            with output_lock(folder):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def clear_folder(folder: str | os.PathLike) -> None:
    """Remove everything in a folder except its lock files (`--clean` of a folder this run has locked)."""
    for path in Path(folder).iterdir():
        if path.name in LOCK_FILES:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _acquire(folder: Path) -> FileLock:
    """Take the OS lock at once, or raise FolderLockedError naming the live holder; take over a stale one."""
    lock = FileLock(str(folder / LOCK_NAME), timeout=0, thread_local=False, preserve_lock_file=True)
    try:
        lock.acquire()
    except Timeout:
        holder = holder_info(folder)
        if not _stale(holder):
            raise FolderLockedError(folder, f"another run is writing into this folder: {describe_holder(holder)}. "
                                            "Wait for it to finish, or choose another output folder") from None
        # a soft lock (no OS locking on this file system) left by a dead process: remove it and try once more
        (folder / LOCK_NAME).unlink(missing_ok=True)
        try:
            lock.acquire()
        except Timeout:
            raise FolderLockedError(folder, f"another run is writing into this folder: "
                                            f"{describe_holder(holder_info(folder))}") from None
    previous = holder_info(folder)
    if previous is not None:
        if previous.get("host") not in (None, socket.gethostname()):
            lock.release()
            raise FolderLockedError(folder, f"locked by {describe_holder(previous)}, another host, which this host "
                                            f"cannot check. If that run is no longer running, delete "
                                            f"{folder / HOLDER_NAME} and rerun")
        log.warning("%s: taking over a stale lock of a run that is no longer running (%s)", folder,
                    describe_holder(previous))
    return lock


def _stale(holder: dict[str, Any] | None) -> bool:
    """A holder record from this host whose process no longer runs."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        return not pid_alive(int(holder.get("pid", -1)))
    except (TypeError, ValueError):
        return False
