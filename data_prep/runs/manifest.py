"""SHA-256 manifests of a folder: what a model folder held when it was written, checked before anything is loaded.

A manifest maps each file's POSIX path relative to the folder to its SHA-256. `verify_manifest` refuses a file
that changed, one that is missing, and an extra file that is executable or of a kind that some library could
load as code (`LOADABLE_SUFFIXES`); other extra files are reported in the log. Paths matching the `exclude` patterns
(`fnmatch` patterns on the relative path, where `*` also crosses `/`) are caches or work files and never checked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from data_prep.errors import InputError
from data_prep.safe_paths import UnsafePathError, inside

log = logging.getLogger("data_prep")

HASH_CHUNK = 1 << 20
LOADABLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".joblib", ".skops", ".npy", ".npz", ".py",
                               ".pyc", ".so", ".dll", ".dylib", ".safetensors", ".onnx", ".xml", ".bin", ".yaml",
                               ".yml", ".json"})
"""Suffixes of files a loader could pick up; an extra one (not in the manifest) is refused, not just logged."""
EXECUTABLE_BITS = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
"""An extra file with any execute permission bit is refused too."""


class ManifestError(InputError):
    """A folder whose files differ from its manifest (changed, missing or extra loadable files)."""


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for rel, sha in sorted(build_manifest(path).items()):
        digest.update(f"{rel}\0{sha}\n".encode())
    return digest.hexdigest()


def _excluded(rel: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in exclude)


def _files(root: Path, exclude: Iterable[str]) -> list[str]:
    """Return the relative POSIX paths of every regular file under `root` that no pattern excludes."""
    exclude = tuple(exclude)
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if not _excluded(rel, exclude):
                out.append(rel)
    return sorted(out)


def build_manifest(root: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, str]:
    """Return {relative path: SHA-256} for every file under `root` except those matching `exclude`."""
    root = Path(root)
    exclude = tuple(exclude)
    return {rel: file_sha256(root / rel) for rel in _files(root, exclude)}


def verify_manifest(root: str | os.PathLike, manifest: Mapping[str, str], exclude: Iterable[str] = ()) -> None:
    """Raise ManifestError naming the first changed or missing file, or any extra loadable file, under `root`."""
    root = Path(root)
    exclude = tuple(exclude)
    if not isinstance(manifest, Mapping) or not manifest:
        raise ManifestError(root, "has no file manifest: it cannot be checked, so it is not loaded")
    for rel, expected in sorted(manifest.items(), key=lambda kv: str(kv[0])):
        try:       # relative, no '..', and no symbolic link out of the folder: a manifest entry is data too
            path = inside(root, rel, source="an entry of the model folder's manifest", resolve=True)
        except UnsafePathError as exc:
            raise ManifestError(root, f"manifest entry {rel!r} points outside the folder ({exc.reason})") from None
        if not path.is_file():
            raise ManifestError(path, "listed in the model folder's manifest but missing: the folder is incomplete "
                                      "(copy it again, or retrain)")
        if file_sha256(path) != expected:
            raise ManifestError(path, "differs from the model folder's manifest (SHA-256 changed since training): "
                                      "the folder was modified or damaged; it is not loaded")
    extra = [rel for rel in _files(root, exclude) if rel not in manifest]
    loadable = [rel for rel in extra if Path(rel).suffix.lower() in LOADABLE_SUFFIXES
                or os.stat(root / rel).st_mode & EXECUTABLE_BITS]
    if loadable:
        raise ManifestError(root / loadable[0], f"not part of the model folder's manifest ({len(loadable)} such "
                                                "file(s)); an extra executable file, or one a loader could pick "
                                                "up, is refused: remove it")
    for rel in extra:
        log.warning("%s: not in the model folder's manifest (ignored)", root / rel)
