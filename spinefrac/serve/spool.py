"""The spool of `spinefrac serve`: received instances on disk, one folder per study, moved from state to state.

Layout (docs/contracts.md "DICOM node (`spinefrac serve`)"):
    tmp/                      instances being written (temp file, fsync, then renamed into incoming/)
    incoming/<study uid>/     <SOPInstanceUID>.dcm as received (DICOM file format with its file meta)
    ready/<study uid>/        complete (no new instance for quiet_seconds): being predicted or sent
    done/<study uid>/         predicted and sent (or written, without a destination)
    failed/<study uid>/       prediction failed, or its results could not be sent after `tries` sends
    state/<study uid>.json    the study's record: version, instances, times, predicted, send tries, status

Every move is one rename inside the spool (one file system), and every file and rename is fsynced, so a
study is always whole in exactly one of incoming/, ready/, done/ or failed/ (or, while instances of a new
version arrive, in incoming/ and one of the others), across crashes and restarts. Instances of a study that
is already in ready/, done/ or failed/ start a new version: when it is quiet they are merged into that folder
(same SOPInstanceUID: the new file wins) and the whole study is predicted and sent again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.errors import SpinefracError
from data_prep.runs.artifacts import write_json_atomic
from data_prep.safe_paths import inside, safe_name, valid_uid

log = logging.getLogger("spinefrac")

INCOMING, READY, DONE, FAILED, STATE, TMP = "incoming", "ready", "done", "failed", "state", "tmp"
STUDY_STATES = (INCOMING, READY, DONE, FAILED)
"""The folders a study can be in, in the order it moves through them."""
DICOM_SUFFIX = ".dcm"
MB = 2 ** 20


class SpoolError(SpinefracError):
    """An instance the spool refuses: `status` is the DIMSE status the C-STORE answers with."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


OUT_OF_RESOURCES = 0xA700
"""C-STORE failure: out of resources (disk full or nearly, the spool holds max_spool_studies, a write error)."""
INVALID_UID = 0xC000
"""C-STORE failure (cannot understand): a UID that is not a valid DICOM UID, never used as a file name."""


class Spool:
    """The spool folder: atomic writes of received instances and the moves of studies between states.

    One lock orders the receiving threads' renames into incoming/ against the worker's moves of a study, so
    an instance is never renamed into a folder that is being moved away.
    """

    def __init__(self, root: str | os.PathLike, *, max_studies: int = 0, min_free_mb: int = 0) -> None:
        self.root = Path(root)
        self.opened = time.time()
        """When this node opened the spool: a study waiting in incoming/ from before is quiet only a full quiet period
        after it (while the node was down its sender could not finish; it may send the rest now)."""
        self.max_studies = int(max_studies)
        self.min_free_mb = int(min_free_mb)
        self.lock = threading.RLock()
        for name in (*STUDY_STATES, STATE, TMP):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / TMP).iterdir():     # a write cut short by a crash: never acknowledged
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------ receiving
    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance (DICOM file bytes) durably to incoming/<study>/<sop>.dcm; raise SpoolError if refused."""
        for what, uid in (("StudyInstanceUID", study_uid), ("SOPInstanceUID", sop_uid)):
            if not valid_uid(uid):
                raise SpoolError(INVALID_UID, f"{what} {str(uid)[:80]!r} is not a valid DICOM UID")
        self._check_room(study_uid)
        tmp = inside(self.root / TMP, f"{safe_name(sop_uid)}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            with self.lock:
                folder = self.folder(INCOMING, study_uid)
                new = not folder.is_dir()
                folder.mkdir(exist_ok=True)
                target = inside(folder, f"{safe_name(sop_uid)}{DICOM_SUFFIX}")
                os.replace(tmp, target)
                _fsync_dir(folder)
                if new:
                    _fsync_dir(folder.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(OUT_OF_RESOURCES, f"cannot write {study_uid}/{sop_uid} into {self.root}: {exc}") from None
        return target

    def _check_room(self, study_uid: str) -> None:
        """Refuse an instance when the disk is nearly full, or when it would start one study too many."""
        if self.min_free_mb:
            free = shutil.disk_usage(self.root).free
            if free < self.min_free_mb * MB:
                raise SpoolError(OUT_OF_RESOURCES, f"{self.root}: {free // MB} MiB free, below worker.min_free_mb "
                                                   f"{self.min_free_mb}")
        if self.max_studies:
            waiting = set(self.studies(INCOMING)) | set(self.studies(READY))
            if study_uid not in waiting and len(waiting) >= self.max_studies:
                raise SpoolError(OUT_OF_RESOURCES, f"{self.root}: {len(waiting)} studies wait already "
                                                   f"(worker.max_spool_studies {self.max_studies})")

    # ------------------------------------------------------------ looking
    def folder(self, state: str, uid: str) -> Path:
        """The folder of study `uid` in `state` (incoming, ready, done or failed): <state>/<safe_name(uid)>."""
        return inside(self.root / state, safe_name(uid), source=f"study {uid!r}")

    def studies(self, state: str) -> list[str]:
        """The studies in `state`, oldest folder first."""
        base = self.root / state
        found = [p for p in base.iterdir() if p.is_dir() and valid_uid(p.name)] if base.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]

    def instances(self, state: str, uid: str) -> list[Path]:
        """The instance files of a study in `state`."""
        folder = self.folder(state, uid)
        return sorted(folder.glob(f"*{DICOM_SUFFIX}")) if folder.is_dir() else []

    def last_received(self, state: str, uid: str) -> float | None:
        """The newest modification time (epoch s) of the study's instances in `state` (None when it has none)."""
        times = []
        for path in self.instances(state, uid):
            with contextlib.suppress(FileNotFoundError):
                times.append(path.stat().st_mtime)
        return max(times) if times else None

    def quiet_studies(self, quiet_seconds: float, now: float | None = None) -> list[str]:
        """Studies in incoming/ whose newest instance is at least `quiet_seconds` old (and the spool's opening too)."""
        now = time.time() if now is None else now
        out = []
        for uid in self.studies(INCOMING):
            newest = self._quiet_since(uid)
            if newest is not None and now - newest >= quiet_seconds:
                out.append(uid)
        return out

    def _quiet_since(self, uid: str) -> float | None:
        """Since when a study in incoming/ has been quiet: its newest instance, or this node's start if later."""
        newest = self.last_received(INCOMING, uid)
        return None if newest is None else max(newest, self.opened)

    def where(self, uid: str) -> str | None:
        """The state folder (ready, done or failed) holding a previous version of the study, if any."""
        for state in (READY, DONE, FAILED):
            if self.folder(state, uid).is_dir():
                return state
        return None

    # ------------------------------------------------------------ moving
    def promote(self, uid: str, quiet_seconds: float) -> str | None:
        """Move a quiet study from incoming/ to ready/, merging it into a previous version; return the old state.

        Returns None when it was a new study. Does nothing (returns "busy") when an instance arrived since the
        caller looked (the study is no longer quiet).
        """
        with self.lock:
            newest = self._quiet_since(uid)
            if newest is not None and time.time() - newest < quiet_seconds:
                return "busy"
            previous = self.where(uid)
            if previous not in (None, READY):
                self.move(uid, previous, READY)      # the earlier version comes back to ready/ ...
            self.move(uid, INCOMING, READY)          # ... and the new instances join it (they win)
        return previous

    def move(self, uid: str, source: str, target: str) -> Path:
        """Move a study's folder from `source` to `target`; return it. A folder already there (left by a crash)
        is merged with, never deleted: its instances stay, the moved ones win on the same SOPInstanceUID."""
        with self.lock:
            dest = self.folder(target, uid)
            if dest.exists():
                for path in sorted(self.folder(source, uid).iterdir()):
                    os.replace(path, dest / path.name)
                _fsync_dir(dest)
                self.folder(source, uid).rmdir()
            else:
                os.replace(self.folder(source, uid), dest)
            _fsync_dir(self.root / source)
            _fsync_dir(self.root / target)
        return dest

    # ------------------------------------------------------------ records
    def state_path(self, uid: str) -> Path:
        """The study's state record (state/<safe_name(uid)>.json)."""
        return inside(self.root / STATE, f"{safe_name(uid)}.json", source=f"study {uid!r}")

    def read_state(self, uid: str) -> dict[str, Any]:
        """The study's state record ({} when there is none or it is unreadable: the study is then predicted anew)."""
        try:
            data = json.loads(self.state_path(uid).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, uid: str, record: dict[str, Any]) -> None:
        """Write the study's state record atomically."""
        write_json_atomic(self.state_path(uid), record)

    def states(self) -> Iterator[dict[str, Any]]:
        """Every study's state record."""
        for path in sorted((self.root / STATE).glob("*.json")):
            data = self.read_state(path.stem)
            if data:
                yield data


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into or out of it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
