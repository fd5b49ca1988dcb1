"""A study's pixels: slices decoded in order by thread or process pools, the whole volume or chunks with their neighbours, and the read-ahead's scan in a process."""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.dicom.geometry import StudyGeometry, as_study, scan_study
from data_prep.dicom.slice_file import read_slice_hu
from data_prep.errors import DicomReadError
from data_prep.runs.workers import dies_with_parent

log = logging.getLogger("data_prep")
EXECUTORS = ("process", "thread")
DEFAULT_EXECUTOR = "thread"
"""Threads: no pool start-up and no copying of decoded slices between processes. Measured with
benchmarks/bench_decode.py on the shared 2-core machine, 2 threads were as fast as or faster than
2 processes for uncompressed, RLE and JPEG 2000 (processes pay ~1 MB of IPC per 512x512 slice);
re-measure on a quiet machine before changing this."""
SCAN_PROCESSES = 1
"""Worker processes of scan_study_async: the read-ahead scans one study at a time, ahead of the decoders."""
PREFETCH_CHUNKS = 1
"""iter_chunks decodes this many chunks ahead of the one being consumed (bounded memory)."""


@dataclass
class Chunk:
    """Consecutive canonical slices [start, stop) plus `context` neighbours each side, held as [lo, hi)."""

    start: int
    stop: int
    lo: int
    hi: int
    hu: np.ndarray
    n_slices: int

    def get(self, index: int) -> np.ndarray:
        """Return the HU slice at canonical `index`, clamped to the study and to what this chunk holds."""
        index = min(max(int(index), 0, self.lo), self.n_slices - 1, self.hi - 1)
        return self.hu[index - self.lo]

    def indices(self) -> range:
        """Return the canonical indices of the centre slices."""
        return range(self.start, self.stop)


def scan_study_async(study_dir: Any) -> Future:
    """scan_study in a worker process (a Future of its StudyGeometry): header parsing off this process's GIL."""
    return _pool(SCAN_PROCESSES, "process").submit(scan_study, as_study(study_dir))


def read_volume(geometry: StudyGeometry, *, workers: int = 1, executor: str = DEFAULT_EXECUTOR) -> np.ndarray:
    """Decode every slice of a study into a float32 HU volume (n, rows, cols) in canonical order."""
    out = np.empty((len(geometry), *geometry.shape), dtype=np.float32)
    for i, hu in _decode_in_order(geometry, range(len(geometry)), workers, executor):
        out[i] = hu
    return out


def iter_chunks(geometry: StudyGeometry, *, chunk_size: int = 16, context: int = 0, workers: int = 1,
                executor: str = DEFAULT_EXECUTOR) -> Iterator[Chunk]:
    """Stream canonical slices in chunks of `chunk_size`, each with `context` neighbours on both sides."""
    if chunk_size < 1 or context < 0:
        raise ValueError(f"chunk_size must be >= 1 and context >= 0, got {chunk_size}, {context}")
    n = len(geometry)
    bounds = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        bounds.append((start, stop, max(0, start - context), min(n, stop + context)))
    order = [i for _, _, lo, hi in bounds for i in range(lo, hi)]
    order = list(dict.fromkeys(order))  # each slice decoded once, in the order chunks need them
    ahead = (PREFETCH_CHUNKS + 1) * (chunk_size + 2 * context)
    cache: dict[int, np.ndarray] = {}
    decoded = _decode_in_order(geometry, order, workers, executor, ahead=ahead)
    for start, stop, lo, hi in bounds:
        while any(i not in cache for i in range(lo, hi)):
            i, hu = next(decoded)
            cache[i] = hu
        for i in [i for i in cache if i < lo]:
            del cache[i]
        yield Chunk(start=start, stop=stop, lo=lo, hi=hi, hu=np.stack([cache[i] for i in range(lo, hi)]),
                    n_slices=n)


def decode_slices(paths: Sequence[Path], *, workers: int = 1, executor: str = DEFAULT_EXECUTOR
                  ) -> Iterator[tuple[Path, np.ndarray | DicomReadError]]:
    """Decode files in order and yield (path, HU slice or the DicomReadError it raised); never stops early."""
    if workers <= 1 or len(paths) <= 1:
        for path in paths:
            try:
                yield Path(path), read_slice_hu(path)
            except DicomReadError as exc:
                yield Path(path), exc
        return
    pool = _pool(workers, executor)
    futures = [pool.submit(_decode_worker, str(p)) for p in paths]
    try:
        for path, future in zip(paths, futures, strict=True):
            result = future.result()
            if isinstance(result, tuple):
                cls, where, reason = result
                yield Path(path), cls(where, reason)
            else:
                yield Path(path), result
    finally:
        for future in futures:
            future.cancel()


def _decode_worker(path: str) -> np.ndarray | tuple[type, str, str]:
    """Decode in a worker; return the failure as (class, path, reason) because InputError cannot be pickled."""
    try:
        return read_slice_hu(path)
    except DicomReadError as exc:
        return (type(exc), str(exc.path), exc.reason)


def _unwrap(result: np.ndarray | tuple[type, str, str]) -> np.ndarray:
    if isinstance(result, tuple):
        cls, path, reason = result
        raise cls(path, reason)
    return result


def _decode_in_order(geometry: StudyGeometry, indices: Sequence[int], workers: int, executor: str,
                     ahead: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, HU slice) in the given order, decoding up to `ahead` slices in advance in a pool."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if workers <= 1 or len(indices) <= 1:
        for i in indices:
            yield i, read_slice_hu(geometry.paths[i])
        return
    pool = _pool(workers, executor)
    ahead = ahead or len(indices)
    pending: dict[int, Future] = {}
    queue = iter(indices)
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [f.cancel() for f in pending.values()])
        submitted = []
        for i in queue:
            pending[i] = pool.submit(_decode_worker, str(geometry.paths[i]))
            submitted.append(i)
            if len(submitted) >= ahead:
                break
        pos = 0
        while pos < len(submitted):
            i = submitted[pos]
            pos += 1
            result = pending.pop(i).result()
            nxt = next(queue, None)
            if nxt is not None:
                pending[nxt] = pool.submit(_decode_worker, str(geometry.paths[nxt]))
                submitted.append(nxt)
            yield i, _unwrap(result)


_POOLS: dict[tuple[str, int], Executor] = {}


def _pool(workers: int, executor: str) -> Executor:
    """Return a long-lived pool (one per kind and size), so a batch of studies pays the start-up once."""
    key = (executor, workers)
    if key not in _POOLS:
        if executor == "thread":
            _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-decode")
        else:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["data_prep.dicom.geometry"])
            _POOLS[key] = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **dies_with_parent())
    return _POOLS[key]


@atexit.register
def shutdown_pools() -> None:
    """Stop the decoding worker pools (called at exit; safe to call any time)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()
