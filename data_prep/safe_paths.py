"""One rule for names that become paths: a safe file name for every identifier, and paths that stay inside their root.

Identifiers come from inputs (StudyInstanceUIDs from DICOM headers and CSV tables, folder names, zip member names,
DICOMDIR ReferencedFileIDs) and from model folders (paths in model.json). None of them may decide where spinefrac
reads or writes: every file or folder name made from one is `safe_name(identifier)`, and every path made by joining
a name (or a relative path taken from an input) to a folder goes through `inside(root, relative)`, which refuses
anything that would leave the folder. Keys users see in tables (predictions.csv, boxes.csv, ...) keep the identifier
as it is; only names on disk use `safe_name` (docs/contracts.md, "Conventions used everywhere").

`valid_uid` is the DICOM rule for UIDs (PS3.5 9.1: digits and dots, at most 64 characters); a study found by its
StudyInstanceUID whose UID breaks it is keyed by `safe_name` of it, with a warning (data_prep.dicom.study_finder).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from data_prep.errors import InputError

UID_MAX_CHARS = 64
"""PS3.5 9.1: a UID has at most 64 characters."""
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
"""PS3.5 9.1: components of digits separated by dots, no leading zero in a component (pydicom's RE_VALID_UID)."""
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
"""Characters a file name keeps: ASCII letters, digits, '.', '_' and '-' (every other run becomes one '_')."""
VERBATIM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
"""A name kept as it is must start with a letter, digit or '_' (never '.', so never '.', '..' or hidden; never '-')."""
NAME_HASH_CHARS = 8
"""Hex digits of the SHA-256 of the identifier appended to a name that had to change (as the review report did)."""
HASHED = re.compile(rf"-[0-9a-f]{{{NAME_HASH_CHARS}}}$")
"""The ending of a name that was changed. A file whose name does not end like this belongs to the identifier of
that name; one that does may belong to another identifier (its record says which: data_prep.runs.resume.study_keys)."""
MAX_VERBATIM_CHARS = 100
"""Longest identifier kept as it is; longer ones are cut and hashed (file names of at most 255 bytes must also
hold suffixes such as '.level_boxes.csv' and a temporary name's '.<16 hex>.tmp')."""
SLUG_CHARS = 60
"""Characters of the identifier kept in a changed name, before '-' and the hash."""
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                              *(f"LPT{i}" for i in range(1, 10))})
"""Device names Windows refuses as file names (with any extension): changed too, so folders copy to any system."""
FOLLOW_HINT = "pass --follow-symlinks to read it anyway"


class UnsafePathError(InputError):
    """A name or relative path from an input or a model folder that would leave its folder (or is no name at all)."""


def safe_name(identifier: Any) -> str:
    """A file-name-safe, unique name for an identifier: itself when already safe, else a slug plus a short hash.

    Kept as it is: at most MAX_VERBATIM_CHARS characters of `A-Za-z0-9._-`, starting with a letter, digit or '_',
    not ending in '.' and not a Windows device name. Anything else becomes its safe characters (other runs -> '_',
    leading dots and dashes dropped, at most SLUG_CHARS), '-' and the first NAME_HASH_CHARS hex digits of the SHA-256
    of the identifier. A valid DICOM UID is always kept as it is, and so is a name made here (safe_name of a safe
    name is itself). Two identifiers share a name only if one was made to end in the other's hash (a detect run
    refuses such inputs: data_prep.dicom.study_inputs).
    """
    text = str(identifier)
    if is_verbatim(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:NAME_HASH_CHARS]
    slug = UNSAFE_CHARS.sub("_", text).lstrip(".-")[:SLUG_CHARS].rstrip(".") or "_"
    if slug.split(".")[0].upper() in WINDOWS_RESERVED:      # 'aux.txt' -> '_aux.txt-...': a kept name, once made
        slug = f"_{slug}"
    return f"{slug}-{digest}"


def is_verbatim(name: str) -> bool:
    """Whether `safe_name` keeps `name` as it is."""
    return (len(name) <= MAX_VERBATIM_CHARS and VERBATIM.fullmatch(name) is not None and not name.endswith(".")
            and name.split(".")[0].upper() not in WINDOWS_RESERVED)


def names_itself(name: str) -> bool:
    """Whether a file named `name` (without suffix) can only be the file of the identifier `name` itself.

    True for a kept name that does not end like a changed one; a name such as `my_study_1-065cd394` may be the
    file of `my study #1`, so its record must say whose it is.
    """
    return is_verbatim(name) and HASHED.search(name) is None


def check_unique_names(keys: Any, where: str | os.PathLike | None = None) -> None:
    """Raise InputError when two keys would share one `safe_name` (their files would mix), naming them."""
    seen: dict[str, str] = {}
    for key in keys:
        name = safe_name(key)
        if name in seen and seen[name] != key:
            raise InputError(where, f"study keys {seen[name]!r} and {key!r} would share the file name {name!r}: "
                                    "rename one of them")
        seen[name] = key


def key_problem(key: str) -> str | None:
    """Why a folder name cannot be a study key that tables hold as it is (None when it can): a control character.

    A carriage return, for one, ends a CSV row for pandas even where the writer did not quote it.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return f"the name {key!r} holds a control character (tables could not hold it as a key)"
    return None


def valid_uid(value: Any) -> bool:
    """Whether `value` is a valid DICOM UID: digits and dots, at most UID_MAX_CHARS characters."""
    text = str(value) if value is not None else ""
    return 0 < len(text) <= UID_MAX_CHARS and UID_PATTERN.fullmatch(text) is not None


def name_problem(name: Any) -> str | None:
    """Why `name` cannot be one path component taken from an input (None when it can).

    Refused: empty, '.', '..', a '/' or '\\' separator, a NUL or other control character, a drive ('C:').
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a name"
    if name in ("", ".", ".."):
        return "is no file name" if not name else f"is {name!r}, which names a folder itself or its parent"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds a NUL or control character"
    if ":" in name:
        return "holds ':' (a drive or a stream on Windows)"
    return None


def relative_problem(relative: Any) -> str | None:
    """Why `relative` cannot be a relative path inside a folder (None when it can): absolute, a drive, '..', NUL."""
    if not isinstance(relative, (str, os.PathLike)):
        return f"is a {type(relative).__name__}, not a path"
    text = os.fspath(relative)
    if not isinstance(text, str):
        return "is not text"
    if not text or text in (".", "./"):
        return "is empty (no file inside the folder)"
    if "\0" in text:
        return "holds a NUL character"
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        return "is an absolute path"
    parts = re.split(r"[\\/]+", text)
    if ".." in parts:
        return "climbs out with '..'"
    return None


def inside(root: str | os.PathLike, relative: str | os.PathLike, *, source: str | None = None,
           resolve: bool = False) -> Path:
    """`root / relative`, refused (UnsafePathError naming the root, the name and `source`) unless it stays inside root.

    `relative` must be relative, without '..', NUL or a drive; '\\' counts as a separator. With `resolve`, symbolic
    links are followed too and the real path must lie inside the real root (for reading inputs: a link leaving the
    input folder is refused). The path returned is the plain join (symlinks not resolved).
    """
    where = f" ({source})" if source else ""
    problem = relative_problem(relative)
    if problem is None:
        parts = [p for p in re.split(r"[\\/]+", os.fspath(relative)) if p not in ("", ".")]
        if not parts:
            problem = "is empty (no file inside the folder)"
    if problem is not None:
        raise UnsafePathError(root, f"{os.fspath(relative)!r}{where} {problem}: it must name something inside this "
                                    "folder, so it is refused")
    target = Path(root).joinpath(*parts)
    if resolve and not within(target, root):
        raise UnsafePathError(target, f"{where.strip(' ()') or 'this path'} leads outside {root} through a symbolic "
                                      f"link (to {_real(target)}); {FOLLOW_HINT}")
    return target


def within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether the real path of `path` (symbolic links followed) lies inside the real path of `root`."""
    real_root = _real(root)
    real = _real(path)
    return real == real_root or real_root in real.parents


def _real(path: str | os.PathLike) -> Path:
    """The real path (symbolic links and '..' resolved, as far as they exist)."""
    return Path(os.path.realpath(os.fspath(path)))


def leaving_links(folder: str | os.PathLike, root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(link, real target) of `folder` itself, or else of each of its entries, when a symbolic link leaves `root`.

    Only symbolic links are resolved (a folder's other entries cost no system call), so checking every study folder
    of a dataset before reading it is cheap.
    """
    folder = Path(folder)
    if not within(folder, root):
        return [(folder, _real(folder))]
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink() and not within(entry.path, root):
                    found.append((Path(entry.path), _real(entry.path)))
    except OSError:
        return found        # an unreadable folder is reported by the reader, with the system's reason
    return found


def describe_links(links: list[tuple[Path, Path]], root: str | os.PathLike) -> str:
    """One message for links leaving an input folder: the first link, its target, the count and the way out."""
    link, target = links[0]
    more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
    return f"{link} is a symbolic link to {target}, outside the input folder {root}{more}; not followed: {FOLLOW_HINT}"
