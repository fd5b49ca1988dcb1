"""Read studies ahead: while one study is in the models, the next one is scanned and its first chunks decoded.

A batch of studies is read by one background thread, in order: it scans a study's headers, then streams its
chunks (data_prep.dicom.volume.iter_chunks, decoded by the worker pool) into that study's bounded queue, then moves
on to the next study as soon as the last chunk is queued. So the decoders never wait for the models to finish a
study, and memory stays bounded: at most `depth` chunks are held ahead of the consumer, plus the chunk the
reader is filling, whatever the number of studies.

    for stream in read_ahead(study_dirs, chunk_size=16, context=lambda g: 0, workers=2, depth=8):
        with stream:                      # closing a stream the consumer gave up on frees the reader
            geometry = stream.geometry     # raises the study's scan error, if any
            for chunk in stream.chunks():  # raises the study's decode error where it happened
                ...
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from data_prep.dicom.geometry import StudyGeometry, as_study, scan_study
from data_prep.dicom.volume import Chunk, iter_chunks, scan_study_async

POLL_S = 0.1
"""How often a blocked reader checks whether its consumer has gone (s)."""

_END = object()


class StudyStream:
    """One study as the reader thread delivers it: its geometry (or scan error) and a queue of its chunks."""

    def __init__(self, study_dir: Any, depth: int) -> None:
        self.study_dir = as_study(study_dir)
        self._geometry: StudyGeometry | None = None
        self._error: BaseException | None = None
        self._chunks: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()

    @property
    def geometry(self) -> StudyGeometry:
        """The study's headers in canonical order; raises the error scanning them raised."""
        if self._error is not None:
            raise self._error
        assert self._geometry is not None
        return self._geometry

    def chunks(self) -> Iterator[Chunk]:
        """Yield the study's chunks in order; raise the decode error where the reader met it."""
        self.geometry   # noqa: B018 - a study that could not be scanned has no chunks: raise its error
        while True:
            kind, item = self._chunks.get()
            if kind == "chunk":
                yield item
            elif kind == "error":
                raise item
            else:
                return

    def close(self) -> None:
        """Tell the reader this study is no longer wanted (it drops the rest and moves on)."""
        self._closed.set()

    def __enter__(self) -> StudyStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _put(self, kind: str, item: Any, stop: threading.Event) -> bool:
        """Queue an item unless the consumer closed this stream or the whole read stopped; False then."""
        while not (self._closed.is_set() or stop.is_set()):
            try:
                self._chunks.put((kind, item), timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False


def read_ahead(study_dirs: Sequence[Any], *, chunk_size: int, context: Callable[[StudyGeometry], int],
               workers: int, depth: int, scan_ahead: bool = True) -> Iterator[StudyStream]:
    """Yield a StudyStream per study, in order, filled by one background reader `depth` chunks ahead.

    scan_ahead: parse each study's headers in a worker process, one study ahead (dicom_io.scan_study_async),
    so the header parsing (pure Python) does not compete with the models' process for its GIL.
    """
    streams: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                streams.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    scans: dict[int, Future] = {}

    def scan(i: int) -> None:
        if scan_ahead and i < len(study_dirs) and i not in scans:
            scans[i] = scan_study_async(study_dirs[i])

    def work() -> None:
        for i, study_dir in enumerate(study_dirs):
            stream = StudyStream(study_dir, depth)
            scan(i)
            scan(i + 1)       # the next study's headers are parsed while this one decodes
            try:
                stream._geometry = scans.pop(i).result() if scan_ahead else scan_study(study_dir)
            except Exception as exc:   # noqa: BLE001 - the consumer raises it in the study's context
                stream._error = exc
            if not offer(stream):
                return
            if stream._error is not None:
                continue
            chunks = None
            try:
                geometry = stream._geometry
                chunks = iter_chunks(geometry, chunk_size=chunk_size, context=context(geometry), workers=workers)
                for chunk in chunks:
                    if not stream._put("chunk", chunk, stop):
                        break
                else:
                    stream._put("end", _END, stop)
            except Exception as exc:   # noqa: BLE001 - raised where the consumer meets it
                stream._put("error", exc, stop)
            finally:
                if chunks is not None:
                    chunks.close()    # a dropped study: its queued decodes are cancelled now
        offer(_END)
        for future in scans.values():
            future.cancel()

    thread = threading.Thread(target=work, name="study-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = streams.get()
            if item is _END:
                return
            yield item
    finally:
        stop.set()
