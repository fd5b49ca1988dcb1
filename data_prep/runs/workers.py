"""Worker processes that die with the process that owns their pool: no orphan keeps decoding or writing.

    ProcessPoolExecutor(max_workers=n, mp_context=ctx, **dies_with_parent(own_initializer))

The owner keeps the write end of a pipe that only it holds; each worker gets the read end and a
daemon thread that waits on it. When the owner exits for any reason (SIGTERM, SIGKILL, a crash) the
kernel closes the write end, the read end sees EOF and the worker ends at once. A worker's parent is
the forkserver, not the owner, and the forkserver itself lives as long as any worker does, so the
parent pid (and Linux's PR_SET_PDEATHSIG) cannot tell that the owner is gone; the pipe can. The
thread also checks every WATCH_INTERVAL_S that the owner's pid still runs, in case another child of
the owner inherited the write end.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

WATCH_INTERVAL_S = 1.0      # how often a worker also checks that the owner's pid still runs
ORPHAN_EXIT_STATUS = 1      # exit status of a worker that ends because its owner is gone
ZOMBIE_STATE = "Z"          # /proc/<pid>/stat state of a process that has exited but is not reaped yet

_OWNER_ENDS: list[Connection] = []   # write ends held by this process for as long as it lives


def dies_with_parent(initializer: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Return `initializer`/`initargs` for a ProcessPoolExecutor whose workers end when this process ends."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    _OWNER_ENDS.append(writer)
    return {"initializer": _start_worker, "initargs": (reader, os.getpid(), initializer)}


def _start_worker(reader: Connection, owner: int, initializer: Callable[[], Any] | None) -> None:
    """Worker initializer: watch the owner, then run the pool's own initializer."""
    for end in _OWNER_ENDS:      # a forked worker must not keep its owner's write end open
        end.close()
    _OWNER_ENDS.clear()
    threading.Thread(target=_watch_owner, args=(reader, owner), name="dies-with-parent", daemon=True).start()
    if initializer is not None:
        initializer()


def _watch_owner(reader: Connection, owner: int) -> None:
    """End the worker at once (no cleanup: nobody waits for it any more) when its owner is gone."""
    while True:
        try:
            if reader.poll(WATCH_INTERVAL_S):
                reader.recv_bytes()      # the owner never sends: readable means EOF
        except (EOFError, OSError):
            os._exit(ORPHAN_EXIT_STATUS)
        if not _running(owner):
            os._exit(ORPHAN_EXIT_STATUS)


def _running(pid: int) -> bool:
    """Return whether `pid` exists and has not exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True              # no /proc (not Linux): the pipe alone decides
    return state != ZOMBIE_STATE
