"""Writing stage outputs safely: atomic files, JSON sidecars, run folders that never overwrite."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

SIDECAR_SUFFIX = ".meta.json"
NEW_FILE_MODE = 0o666  # before the umask: outputs get the same mode as any file the user creates
TEMP_NAME_TRIES = 100  # unique temp names tried before giving up (a collision needs 64 random bits to repeat)
TEMP_NAME = re.compile(r"^\..+\.(tmp(\.[A-Za-z0-9]+)?|tmp-\d+|old-\d+)$")
"""Names of the temporary files and folders spinefrac's writers make beside their targets: `.<name>.<hex>.tmp`
(atomic_path), `.<name>.<pid>.tmp.png` (images, overlays), `.<name>.tmp-<pid>` and `.<name>.old-<pid>` (folders
replaced whole). A run that was killed leaves them; the next run over the same folder removes them."""

log = logging.getLogger("data_prep")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    The temporary file is created with mode 0666 & ~umask (not mkstemp's 0600), so outputs are as
    readable as the user's umask allows. An OSError without a file name (e.g. ENOSPC raised by a write)
    is re-raised naming `path`.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp(path)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is None or (tmp_path is not None and exc.filename == str(tmp_path)):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _create_temp(path: Path) -> Path:
    """Create an empty, unique temporary file beside `path` with mode NEW_FILE_MODE & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(TEMP_NAME_TRIES):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(candidate, flags, NEW_FILE_MODE)
        except FileExistsError:
            continue
        except OSError as exc:       # name the file the caller asked for, not its temporary name
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, "no unique temporary name found", str(path))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write an object as indented JSON to `path` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv_atomic(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index) to `path` atomically.

    A table with a carriage return inside a text cell (a path from an input can hold one) is written with every
    field quoted: pandas leaves such a cell unquoted, and reading it back would split its row.
    """
    quoting = csv.QUOTE_ALL if _has_carriage_return(df) else csv.QUOTE_MINIMAL
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, quoting=quoting)
    return Path(path)


def _has_carriage_return(df: pd.DataFrame) -> bool:
    """Whether any text cell of `df` holds a carriage return."""
    texts = (df[name] for name in df.columns)
    return any("\r" in "".join(v for v in column.tolist() if isinstance(v, str))
               for column in texts if column.dtype == object or pd.api.types.is_string_dtype(column))


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put a finished temp folder in place of `final`: the old one renamed aside, the new one in, the old deleted."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temps(root: str | os.PathLike, subdirs: Sequence[str] = ()) -> int:
    """Delete temporaries (TEMP_NAME) a killed run left at the top of `root` and anywhere under its `subdirs`.

    Call it only while holding the folder's lock (data_prep.runs.locks), before any worker starts: no live writer can own
    them then. Returns how many were removed (logged).
    """
    root = Path(root)
    found: list[Path] = []
    if root.is_dir():
        found += [p for p in root.iterdir() if TEMP_NAME.match(p.name)]
    for sub in subdirs:
        for folder, dirs, names in os.walk(root / sub):
            found += [Path(folder) / n for n in (*dirs, *names) if TEMP_NAME.match(n)]
            dirs[:] = [d for d in dirs if not TEMP_NAME.match(d)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if found:
        log.info("%s: removed %d temporary file(s) left by an interrupted run (e.g. %s)", root, len(found),
                 found[0].relative_to(root))
    return len(found)


def config_hash(config: Mapping[str, Any]) -> str:
    """Return a short stable hash of a (nested) config mapping."""
    blob = json.dumps(config, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    """Return the versions of Python and the libraries whose behaviour shapes the outputs."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("spinefrac", "numpy", "pandas", "pydicom", "nibabel", "opencv-python", "scikit-learn",
                "torch", "ultralytics"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def write_sidecar(artifact: str | os.PathLike, *, kind: str, config: Mapping[str, Any] | None = None,
                  inputs: Mapping[str, Any] | None = None, counts: Mapping[str, Any] | None = None,
                  runtime_s: float | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `<artifact>.meta.json` describing what made the artefact (version, config hash, inputs, counts)."""
    artifact = Path(artifact)
    meta: dict[str, Any] = {
        "kind": kind,
        "artifact": artifact.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }
    if config is not None:
        meta["config_hash"] = config_hash(config)
        meta["config"] = dict(config)
    for key, value in (("inputs", inputs), ("counts", counts), ("extra", extra)):
        if value is not None:
            meta[key] = dict(value)
    if runtime_s is not None:
        meta["runtime_s"] = round(float(runtime_s), 3)
    sidecar = artifact.with_name(artifact.name + SIDECAR_SUFFIX)
    return write_json_atomic(sidecar, meta)


def read_sidecar(artifact: str | os.PathLike) -> dict[str, Any]:
    """Read the `<artifact>.meta.json` sidecar that write_sidecar wrote."""
    artifact = Path(artifact)
    return json.loads(artifact.with_name(artifact.name + SIDECAR_SUFFIX).read_text(encoding="utf-8"))


def next_run_dir(base: str | os.PathLike, name: str = "run") -> Path:
    """Return `base/name`, or `base/name2`, `base/name3`, ... : the first that does not exist yet."""
    base = Path(base)
    candidate = base / name
    i = 2
    while candidate.exists():
        candidate = base / f"{name}{i}"
        i += 1
    return candidate


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
