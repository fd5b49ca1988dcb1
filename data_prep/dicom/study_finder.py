"""Finding CT studies as PACS and scanners export them, and choosing the one series of each to read.

`find_dicom_studies(path)` takes a folder tree of any depth with files of any name (or none), a DICOMDIR
(or a folder with one at its top), or a .zip. It reads headers only, groups the files by
StudyInstanceUID / SeriesInstanceUID, and chooses one series per study by the rules of `RULES`; every
other series is returned with the reason it was skipped (docs/contracts.md, "Study finder").
`detector.detect.find_studies` uses it for every input that is not in the Kaggle layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage, MediaStorageDirectoryStorage
from tqdm import tqdm

from data_prep.dicom.geometry import (
    GAP_FACTOR,
    POSITION_TOLERANCE_MM,
    SPACING_TOLERANCE_MM,
    SkippedSeries,
    slice_normal,
)
from data_prep.errors import InputError
from data_prep.safe_paths import (
    FOLLOW_HINT,
    UnsafePathError,
    inside,
    key_problem,
    name_problem,
    relative_problem,
    safe_name,
    valid_uid,
    within,
)

log = logging.getLogger("data_prep")

DICOMDIR_NAME = "DICOMDIR"
ZIP_SUFFIX = ".zip"
IMAGE_MODALITY = "CT"
NON_IMAGE_MODALITIES: frozenset[str] = frozenset({"SR", "KO", "PR", "DOC", "REG", "FID", "PLAN"})
"""Modalities of objects that hold no image (structured reports, key objects, presentation states, ...)."""
CT_SOP_CLASSES: frozenset[str] = frozenset({CTImageStorage, EnhancedCTImageStorage})
"""SOP classes that make a file without Modality a CT image."""
LOCALIZER_TYPE = "LOCALIZER"
"""ImageType value 3 of a scout / topogram / localizer (DICOM PS3.3 C.8.2.1.1.1, CT Image Type)."""
ORIGINAL_TYPES: frozenset[str] = frozenset({"ORIGINAL", "PRIMARY"})
DERIVED_TYPES: frozenset[str] = frozenset({"DERIVED", "SECONDARY"})
AXIAL_MAX_TILT_DEG = 30.0
"""A series is axial when its slice normal is within this angle of the patient z axis (gantry tilts on
head and neck CT reach about 30 degrees; sagittal and coronal series are at 90)."""
STANDARD_PLANE_DEG = 60.0
"""A non-axial series whose normal is further than this from z is named sagittal or coronal, else oblique."""
MIN_STACK_SLICES = 3
"""Fewer slices than this are no stack to read a neck from (a preference rule: kept only when alone)."""

BONE_KERNEL_PATTERNS: tuple[str, ...] = (
    r"BONE\w*", r"EDGE", r"LUNG",                      # GE: BONE, BONEPLUS, EDGE, LUNG
    r"(B|BR|H|HR|I|IR|U|UR|BL|HA)[5-9]\d\w*",         # Siemens syngo: letter(s) + sharpness >= 50 (B60f, Br64, H70h)
    r"D|E|EB|L|YC|YD|YE",                              # Philips: D, E, EB (bone), L (lung), YC/YD/YE (sharp)
    r"FC[38]\d",                                       # Canon/Toshiba: FC30-FC39 bone, FC80-FC89 sharp/lung
)
"""Bone or sharp reconstruction kernels (ConvolutionKernel, first value, matched whole and case-blind).

Compiled from the vendors' kernel naming conventions (GE LightSpeed/Revolution kernel names; Siemens syngo
CT, where the number grows with sharpness; Philips Brilliance/iCT filter letters; Canon/Toshiba Aquilion
FC numbers), not from a validated table: extend it when a site's bone kernel is not matched."""
SOFT_KERNEL_PATTERNS: tuple[str, ...] = (
    r"SOFT\w*", r"STANDARD", r"STND", r"SMOOTH\w*", r"DETAIL", r"CHEST",   # GE
    r"(B|BR|H|HR|I|IR|Q|QR|BV|J|JR)[0-4]\d\w*",                           # Siemens syngo: sharpness < 50
    r"A|B|C|CB|UA|UB|YA|YB",                                               # Philips soft-tissue filters
    r"FC[0-2]\d|FC4\d",                                                    # Canon/Toshiba body/head soft
)
"""Soft-tissue kernels, from the same conventions. A kernel in neither list is 'unknown' and ranks between."""
KERNEL_RANK = {"bone": 0, "unknown": 1, "soft": 2}
HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType", "ConvolutionKernel",
    "SeriesDescription", "SeriesNumber", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "Rows", "Columns", "InstanceNumber")
"""The only elements the finder reads from each header."""
ZIP_CACHE_DIR = "spinefrac-zip"
"""Zips are extracted under <temp dir>/<this>/<hash of the zip's path, size and mtime>/ unless told where."""
ZIP_FREE_SPACE_FACTOR = 1.1
"""Extraction needs this many times the zip's uncompressed size free on the target disk."""
HASH_CHARS = 16
EXTRACT_VERSION = 2
"""Part of a zip's cache key: 2 = members leading outside are not extracted (caches made before are not reused)."""
FILE_ID_SEPARATOR = "\\"
"""How a ReferencedFileID's components are written in messages (the DICOM value separator)."""
LISTED = 5
"""Paths named per message when a count is logged."""

_BONE = re.compile("|".join(f"(?:{p})" for p in BONE_KERNEL_PATTERNS), re.IGNORECASE)
_SOFT = re.compile("|".join(f"(?:{p})" for p in SOFT_KERNEL_PATTERNS), re.IGNORECASE)


@dataclass(frozen=True)
class FoundStudy:
    """One study found in the input and the series chosen to read (None with a `problem` when none fits)."""

    key: str
    study_uid: str
    series_uid: str | None
    paths: tuple[Path, ...]
    skipped: list[SkippedSeries] = field(default_factory=list)
    description: str = ""
    problem: str | None = None

    root: Path | None = None
    """Where the study was found (the input folder, DICOMDIR or zip), for messages and records."""

    @property
    def usable(self) -> bool:
        """True when a series was chosen."""
        return self.series_uid is not None

    @property
    def name(self) -> str:
        """The study's key, as `Path.name` is for a study folder of the Kaggle layout (outputs are named by it)."""
        return self.key

    @property
    def folder(self) -> Path:
        """The deepest folder holding every chosen file (the input root when no series was chosen)."""
        if self.paths:
            return Path(os.path.commonpath([str(p.parent) for p in self.paths]))
        return self.root if self.root is not None else Path(".")

    def __str__(self) -> str:
        where = f"{self.root} " if self.root is not None else ""
        return f"{where}study {self.study_uid} series {self.series_uid or '(none)'} ({self.folder})"


@dataclass(frozen=True)
class StudySearch:
    """Everything `search_dicom` found: the studies, the files it could not use, the DICOMDIR it followed."""

    root: Path
    studies: list[FoundStudy]
    non_dicom: list[Path]
    unreadable: list[tuple[Path, str]]
    dicomdir: Path | None = None
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(record, reason) of every DICOMDIR record, zip member or symbolic link that leads outside the input and was
    not read (data_prep.safe_paths)."""


@dataclass(frozen=True)
class _Header:
    path: Path
    study_uid: str
    series_uid: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    kernel: str
    description: str
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    thickness: float | None
    rows: int | None
    instance: int | None


@dataclass
class _Series:
    uid: str
    headers: list[_Header]

    @property
    def description(self) -> str:
        return self.headers[0].description


Rule = Callable[[list[_Series]], dict[str, str]]


def find_dicom_studies(path: str | os.PathLike, *, extract_to: str | os.PathLike | None = None,
                       progress: bool = False, follow_symlinks: bool = False) -> list[FoundStudy]:
    """Find the studies under a folder tree, DICOMDIR or .zip and choose one series of each (see `RULES`)."""
    return search_dicom(path, extract_to=extract_to, progress=progress, follow_symlinks=follow_symlinks).studies


def search_dicom(path: str | os.PathLike, *, extract_to: str | os.PathLike | None = None,
                 progress: bool = False, follow_symlinks: bool = False,
                 input_root: str | os.PathLike | None = None) -> StudySearch:
    """Like `find_dicom_studies`, also returning the non-DICOM and unreadable files that were skipped.

    Nothing outside the input is read: DICOMDIR records and zip members that lead outside it are refused (named in
    a warning and in `refused`), and so are symbolic links whose target lies outside `input_root` (default: `path`,
    or the DICOMDIR's folder) unless `follow_symlinks`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist (expected a folder of DICOM files, a DICOMDIR or a .zip)")
    refused: list[tuple[str, str]] = []
    if is_zip(path):
        root = extract_zip(path, extract_to)
        refused += [(f"{path}: member {name!r}", why) for name, why in zip_refusals(path)]
    elif path.is_file() and path.name.upper() != DICOMDIR_NAME:
        raise InputError(path, "is a file, but neither a DICOMDIR nor a .zip (give the folder that holds it)")
    else:
        root = path
    dicomdir = root if root.is_file() else _top_dicomdir(root)
    if input_root is not None and not is_zip(path):
        limit = Path(input_root)
    else:
        limit = dicomdir.parent if dicomdir is not None else root
    unreadable: list[tuple[Path, str]] = []
    if dicomdir is not None:
        files, missing, refused_records = _dicomdir_files(dicomdir, limit, follow_symlinks=follow_symlinks)
        unreadable += missing
        refused += refused_records
    else:
        files = _walk(root, unreadable, follow_symlinks=follow_symlinks)
        if not follow_symlinks:    # folders are not descended through links: only a linked file can lead out
            outside = {f for f in files if f.is_symlink() and not within(f, limit)}
            refused += [(str(f), f"a symbolic link to {os.path.realpath(f)}, outside the input folder {limit}; not "
                                 f"followed: {FOLLOW_HINT}") for f in sorted(outside)]
            files = [f for f in files if f not in outside]
    if refused:
        log.warning("%s: %d record(s), member(s) or link(s) lead outside the input and were not read: %s", path,
                    len(refused), "; ".join(f"{what}: {why}" for what, why in refused[:LISTED]))
    headers, non_dicom, bad = _read_headers(files, progress)
    unreadable += bad
    # files at the top of a zip form a Kaggle-like folder named after the zip, not after the cache folder
    names = {root: path.stem} if root != path else {}
    studies = [replace(s, root=path) for s in _group(headers, names)]
    if non_dicom:
        log.info("%s: %d file(s) are not DICOM and were skipped (e.g. %s)", path, len(non_dicom),
                 ", ".join(str(p) for p in non_dicom[:LISTED]))
    if unreadable:
        log.warning("%s: %d DICOM file(s) could not be read and were skipped: %s", path, len(unreadable),
                    "; ".join(f"{p}: {r}" for p, r in unreadable[:LISTED]))
    if not studies:
        log.warning("%s: no DICOM study found (%d non-DICOM, %d unreadable file(s))", path, len(non_dicom),
                    len(unreadable))
    return StudySearch(root=root, studies=studies, non_dicom=non_dicom, unreadable=unreadable, dicomdir=dicomdir,
                       refused=refused)


def is_zip(path: Path) -> bool:
    """True for a zip file, by its name (.zip) or its content (a zip without the extension)."""
    return path.is_file() and (path.suffix.lower() == ZIP_SUFFIX or zipfile.is_zipfile(path))


def kernel_class(kernel: str) -> str:
    """Classify a ConvolutionKernel value as 'bone' (bone or sharp), 'soft' or 'unknown'."""
    name = kernel.strip()
    if _BONE.fullmatch(name):
        return "bone"
    if _SOFT.fullmatch(name):
        return "soft"
    return "unknown"


def extract_zip(path: Path, extract_to: str | os.PathLike | None = None) -> Path:
    """Extract a zip once into a cache folder (never beside the input) and return that folder."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{EXTRACT_VERSION}".encode()
                            ).hexdigest()
    base = Path(extract_to) if extract_to is not None else Path(tempfile.gettempdir()) / ZIP_CACHE_DIR
    target = base / digest[:HASH_CHARS]
    if target.is_dir():
        log.info("%s: using its extraction in %s", path, target)
        return target
    try:
        with zipfile.ZipFile(path) as zf:
            size = sum(info.file_size for info in zf.infolist())
            base.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(base).free
            if size * ZIP_FREE_SPACE_FACTOR > free:
                raise InputError(path, f"extracting needs {size / 2**20:.0f} MiB but {base} has only "
                                       f"{free / 2**20:.0f} MiB free (pass another folder to extract to)")
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=base))
            refused = {name for name, _ in _member_refusals(zf)}
            try:    # a member whose name leads outside the zip's folder is never extracted (named by zip_refusals)
                zf.extractall(tmp, members=[i for i in zf.infolist() if i.filename not in refused])
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise InputError(path, f"is not a readable zip file: {exc}") from None
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process extracted it first
        if not target.is_dir():
            raise
    log.info("%s: extracted %d byte(s) to %s", path, size, target)
    return target


def zip_refusals(path: Path) -> list[tuple[str, str]]:
    """(member name, reason) of every member of a zip whose name would lead outside the folder it is extracted to."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _member_refusals(zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError):
        return []       # extract_zip has named the broken zip already


def _member_refusals(zf: zipfile.ZipFile) -> list[tuple[str, str]]:
    out = []
    for info in zf.infolist():
        problem = relative_problem(info.filename)
        if problem is not None and not info.filename.endswith("/"):
            out.append((info.filename, f"the member name {problem}; not extracted"))
        elif problem is not None and problem != "is empty (no file inside the folder)":
            out.append((info.filename, f"the folder name {problem}; not extracted"))
    return out


def _top_dicomdir(root: Path) -> Path | None:
    """The DICOMDIR at the top of a folder, if any."""
    for child in root.iterdir():
        if child.is_file() and child.name.upper() == DICOMDIR_NAME:
            return child
    return None


def _dicomdir_files(dicomdir: Path, root: Path, *, follow_symlinks: bool = False
                    ) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[str, str]]]:
    """The files a DICOMDIR's records reference (ReferencedFileID), those referenced but missing, and the records
    refused because they lead outside the DICOMDIR's folder (or, through a symbolic link, outside `root`)."""
    try:
        records = pydicom.dcmread(dicomdir).DirectoryRecordSequence
    except Exception as exc:  # pydicom raises many kinds on a broken DICOMDIR
        raise InputError(dicomdir, f"is not a readable DICOMDIR: {exc}") from None
    files, missing, refused = [], [], []
    for k, record in enumerate(records, start=1):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue  # a PATIENT, STUDY or SERIES record
        parts = [str(file_id)] if isinstance(file_id, str) else [str(p) for p in file_id]
        what = f"{dicomdir}: record {k} (ReferencedFileID {FILE_ID_SEPARATOR.join(parts)!r})"
        bad = next((f"component {p!r} {why}" for p in parts if (why := name_problem(p))), None)
        try:
            if bad is not None:
                raise UnsafePathError(dicomdir, bad)
            file = inside(dicomdir.parent, "/".join(parts), source=what, resolve=False)
            if not follow_symlinks and file.exists() and not within(file, root):
                raise UnsafePathError(file, f"a symbolic link to {os.path.realpath(file)}, outside the input folder "
                                            f"{root}; not followed: {FOLLOW_HINT}")
        except UnsafePathError as exc:
            refused.append((what, f"{exc.reason}; not read"))
            continue
        if file.is_file():
            files.append(file)
        else:
            missing.append((file, f"listed in {dicomdir} but missing"))
    log.info("%s: the DICOMDIR lists %d file(s)", dicomdir, len(files) + len(missing) + len(refused))
    return files, missing, refused


def _walk(root: Path, unreadable: list[tuple[Path, str]], *, follow_symlinks: bool = False) -> list[Path]:
    """Every file under `root` (any depth, any name), hidden files and folders left out, in a stable order.

    A folder that cannot be listed is added to `unreadable` with the system's reason. Folders reached through a
    symbolic link are descended only with `follow_symlinks` (each real folder once: a link loop ends there).
    """
    files = []
    seen: set[str] = set()

    def failed(exc: OSError) -> None:
        unreadable.append((Path(exc.filename or root), f"cannot list the folder ({exc.strerror or exc})"))

    for folder, dirs, names in os.walk(root, onerror=failed, followlinks=follow_symlinks):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    return files


def _read_headers(files: Sequence[Path], progress: bool
                  ) -> tuple[list[_Header], list[Path], list[tuple[Path, str]]]:
    """Read the headers of DICOM files; sort the rest into non-DICOM and unreadable (with the reason)."""
    headers, non_dicom, unreadable = [], [], []
    for path in tqdm(files, desc="DICOM headers", unit="file", disable=not progress):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        except InvalidDicomError:
            non_dicom.append(path)
            continue
        except Exception as exc:  # a truncated or corrupt header: pydicom raises many kinds
            unreadable.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if meta_class == MediaStorageDirectoryStorage:
            continue  # a DICOMDIR inside the tree: an index, not an object of a study
        try:
            header = _header(path, ds)
        except (ValueError, TypeError) as exc:
            unreadable.append((path, f"unusable header value: {exc}"))
            continue
        if header is None:
            unreadable.append((path, "no StudyInstanceUID"))
            continue
        headers.append(header)
    return headers, non_dicom, unreadable


def _header(path: Path, ds: pydicom.Dataset) -> _Header | None:
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not study:
        return None
    kernel = ds.get("ConvolutionKernel", "") or ""
    if isinstance(kernel, pydicom.multival.MultiValue):
        kernel = kernel[0] if kernel else ""
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    thickness = ds.get("SliceThickness")
    instance = ds.get("InstanceNumber")
    return _Header(
        path=path, study_uid=study, series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
        modality=str(ds.get("Modality", "") or "").strip().upper(), sop_class=str(ds.get("SOPClassUID", "")),
        image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or ())),
        kernel=str(kernel).strip(), description=str(ds.get("SeriesDescription", "") or "").strip(),
        orientation=tuple(float(v) for v in orientation) if orientation and len(orientation) == 6 else None,
        position=tuple(float(v) for v in position) if position and len(position) == 3 else None,
        thickness=float(thickness) if thickness not in (None, "") else None,
        rows=int(ds.Rows) if ds.get("Rows") not in (None, "") else None,
        instance=int(instance) if instance not in (None, "") else None)


def _group(headers: list[_Header], folder_names: dict[Path, str]) -> list[FoundStudy]:
    """Group headers into studies and series, choose a series per study, key each study.

    `folder_names` renames folders for the key (the extraction folder of a zip is named after the zip).
    """
    by_study: dict[str, dict[str, list[_Header]]] = {}
    for h in headers:
        by_study.setdefault(h.study_uid, {}).setdefault(h.series_uid, []).append(h)
    studies_in_folder: dict[Path, set[str]] = {}
    for h in headers:
        studies_in_folder.setdefault(h.path.parent, set()).add(h.study_uid)
    found = []
    for study_uid, groups in by_study.items():
        folders = {h.path.parent for hs in groups.values() for h in hs}
        folder = next(iter(folders))
        flat = len(folders) == 1 and studies_in_folder[folder] == {study_uid}
        key = folder_key(folder_names.get(folder, folder.name), folder) if flat else uid_key(study_uid, folder)
        found.append(_choose_series(key, study_uid, [_Series(uid, hs) for uid, hs in groups.items()]))
    keys = Counter(s.key for s in found)
    if any(n > 1 for n in keys.values()):
        # two Kaggle-like folders of the same name in different places: fall back to the UIDs
        found = [replace(s, key=uid_key(s.study_uid, s.key)) if keys[s.key] > 1 else s for s in found]
    dup = [k for k, n in Counter(s.key for s in found).items() if n > 1]
    if dup:
        raise InputError(None, f"study keys are not unique (a folder name equals another study's UID): {dup[:3]}")
    return sorted(found, key=lambda s: s.key)


def folder_key(name: str, where: Path | str) -> str:
    """A study's key from its folder's name: the name, or its safe_name (warned) when it holds a control character."""
    problem = key_problem(name)
    if problem is None:
        return name
    key = safe_name(name)
    log.warning("%s: %s; the study is keyed %s", where, problem, key)
    return key


def uid_key(study_uid: str, where: Path | str) -> str:
    """A study's key from its StudyInstanceUID: the UID when it is a valid DICOM UID, else its safe_name (warned)."""
    if valid_uid(study_uid):
        return study_uid
    key = safe_name(study_uid)
    log.warning("%s: StudyInstanceUID %r is not a valid DICOM UID (digits and dots, at most 64 characters); the "
                "study is keyed %s", where, study_uid[:80], key)
    return key


def _choose_series(key: str, study_uid: str, series: list[_Series]) -> FoundStudy:
    """Apply `RULES` in order: each drops some series with a reason; the one left (best ranked) is chosen."""
    candidates = list(series)
    skipped: list[SkippedSeries] = []
    for _name, rule, required in RULES:
        reasons = rule(candidates)
        if not required and len(reasons) == len(candidates):
            continue  # a preference no candidate meets does not decide
        skipped += [SkippedSeries(s.uid, s.description, reasons[s.uid]) for s in candidates if s.uid in reasons]
        candidates = [s for s in candidates if s.uid not in reasons]
        if not candidates:
            problem = (f"no usable CT series among {len(series)}: "
                       + "; ".join(f"{k.description or k.series_uid}: {k.reason}" for k in skipped))
            log.warning("study %s: %s", key, problem)
            return FoundStudy(key, study_uid, None, (), skipped, problem=problem)
    chosen, *rest = sorted(candidates, key=lambda s: (-len(s.headers), s.uid))
    skipped += [SkippedSeries(s.uid, s.description, f"the same as the chosen series by every rule; it has "
                              f"{len(s.headers)} file(s), the chosen one {len(chosen.headers)}") for s in rest]
    paths = tuple(h.path for h in sorted(chosen.headers, key=lambda h: (h.instance is None, h.instance or 0,
                                                                         str(h.path))))
    log.info("study %s: series %s (%s, %d files) chosen", key, chosen.uid, chosen.description, len(paths))
    for s in skipped:
        log.info("study %s: skipped series %s (%s): %s", key, s.series_uid, s.description, s.reason)
    return FoundStudy(key, study_uid, chosen.uid, paths, skipped, chosen.description)


# --- the rules, in the order they apply -------------------------------------------------------------

def _not_image(candidates: list[_Series]) -> dict[str, str]:
    out = {}
    for s in candidates:
        h = s.headers[0]
        if h.modality in NON_IMAGE_MODALITIES or all(x.rows is None for x in s.headers):
            name = UID(h.sop_class).name if h.sop_class else "no SOP class"
            out[s.uid] = f"not an image ({name}, Modality {h.modality or 'missing'})"
    return out


def _not_ct(candidates: list[_Series]) -> dict[str, str]:
    return {s.uid: f"Modality {s.headers[0].modality or 'missing'} and SOP class "
                   f"{UID(s.headers[0].sop_class).name if s.headers[0].sop_class else 'missing'}: not {IMAGE_MODALITY}"
            for s in candidates if not _is_ct(s.headers[0])}


def _is_ct(h: _Header) -> bool:
    """Modality CT; or no Modality (the RSNA files have none) and a CT SOP class, or no SOP class either."""
    if h.modality:
        return h.modality == IMAGE_MODALITY
    return not h.sop_class or h.sop_class in CT_SOP_CLASSES


def _localizer(candidates: list[_Series]) -> dict[str, str]:
    return {s.uid: f"scout/localizer (ImageType {'/'.join(s.headers[0].image_type)})"
            for s in candidates if any(LOCALIZER_TYPE in h.image_type for h in s.headers)}


def _not_axial(candidates: list[_Series]) -> dict[str, str]:
    out = {}
    for s in candidates:
        normal = _normal(s)
        if normal is None:
            continue  # no orientation anywhere: read as axial, as dicom_io does (with its warning)
        tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
        if tilt > AXIAL_MAX_TILT_DEG:
            plane = ("oblique" if tilt < STANDARD_PLANE_DEG else
                     "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal")
            out[s.uid] = (f"not axial: slice normal {(np.round(normal, 3) + 0.0).tolist()} is {tilt:.0f} deg from z "
                          f"(> {AXIAL_MAX_TILT_DEG:g}; {plane})")
    return out


def _derived(candidates: list[_Series]) -> dict[str, str]:
    return {s.uid: f"derived (ImageType {'/'.join(s.headers[0].image_type)}); an ORIGINAL/PRIMARY series exists"
            for s in candidates if _is_derived(s)}


def _kernel(candidates: list[_Series]) -> dict[str, str]:
    ranks = {s.uid: KERNEL_RANK[kernel_class(s.headers[0].kernel)] for s in candidates}
    best = min(ranks.values())
    out = {}
    for s in candidates:
        cls = kernel_class(s.headers[0].kernel)
        if ranks[s.uid] > best:
            what = "soft-tissue kernel" if cls == "soft" else "kernel not known as bone"
            out[s.uid] = f"{what} {s.headers[0].kernel or '(none)'}; a series with a sharper kernel exists"
    return out


def _incomplete(candidates: list[_Series]) -> dict[str, str]:
    out = {}
    for s in candidates:
        gap = _stack_problem(s)
        if gap:
            out[s.uid] = f"incomplete stack: {gap}"
    return out


def _thicker(candidates: list[_Series]) -> dict[str, str]:
    widths = {s.uid: _thickness(s) for s in candidates}
    known = [w for w in widths.values() if w is not None]
    if not known:
        return {}
    best = min(known)
    return {uid: (f"thicker: {w:g} mm slices, the chosen series has {best:g} mm" if w is not None
                  else f"slice thickness unknown; another series has {best:g} mm")
            for uid, w in widths.items() if w is None or w > best + SPACING_TOLERANCE_MM}


RULES: tuple[tuple[str, Rule, bool], ...] = (
    ("an image (not an SR, dose report, key object or presentation state)", _not_image, True),
    (f"Modality {IMAGE_MODALITY}", _not_ct, True),
    ("not a scout/localizer", _localizer, True),
    ("axial", _not_axial, True),
    ("ORIGINAL/PRIMARY before DERIVED/SECONDARY", _derived, False),
    ("bone kernel before unknown before soft-tissue", _kernel, False),
    ("a complete stack (no gaps, no duplicate positions)", _incomplete, False),
    ("the thinnest slices", _thicker, False),
)
"""(name, rule, required). A required rule drops a series outright; a preference drops the series it
names only when some candidate passes it. Ties after all rules go to the series with more files."""


def _is_derived(s: _Series) -> bool:
    kinds = s.headers[0].image_type[:2]
    return bool(kinds) and bool(DERIVED_TYPES & set(kinds))


def _normal(s: _Series) -> np.ndarray | None:
    orientations = [h.orientation for h in s.headers if h.orientation is not None]
    if not orientations:
        return None
    normal = slice_normal(np.array(Counter(tuple(np.round(v, 3)) for v in orientations).most_common(1)[0][0]))
    return normal if np.linalg.norm(normal) else None


def _positions_along_normal(s: _Series) -> np.ndarray | None:
    normal = _normal(s)
    if normal is None:
        normal = np.array([0.0, 0.0, 1.0])
    positions = [h.position for h in s.headers if h.position is not None]
    if len(positions) < len(s.headers):
        return None
    return np.sort(np.asarray(positions) @ normal)


def _stack_problem(s: _Series) -> str | None:
    """Why a series is no complete stack (too few slices, a gap, duplicate or missing positions), or None."""
    if len(s.headers) < MIN_STACK_SLICES:
        return f"{len(s.headers)} slice(s), fewer than {MIN_STACK_SLICES}"
    z = _positions_along_normal(s)
    if z is None:
        return "some files lack ImagePositionPatient"
    steps = np.diff(z)
    if (steps < POSITION_TOLERANCE_MM).any():
        return f"{int((steps < POSITION_TOLERANCE_MM).sum())} duplicate position(s)"
    median = float(np.median(steps))
    gaps = steps[steps > GAP_FACTOR * median]
    if gaps.size:
        return f"{gaps.size} gap(s) of up to {gaps.max():.2f} mm (usual step {median:.2f} mm)"
    return None


def _thickness(s: _Series) -> float | None:
    """SliceThickness (most common value), else the median spacing of positions."""
    values = [h.thickness for h in s.headers if h.thickness]
    if values:
        return float(Counter(round(v, 3) for v in values).most_common(1)[0][0])
    z = _positions_along_normal(s)
    if z is not None and z.size > 1:
        return round(float(np.median(np.diff(z))), 3)
    return None


def describe(studies: Iterable[FoundStudy]) -> list[str]:
    """One line per study and per skipped series, for logs and reports."""
    lines = []
    for s in studies:
        head = (f"{s.key}: series {s.series_uid} ({s.description}, {len(s.paths)} files)" if s.usable
                else f"{s.key}: {s.problem}")
        lines.append(head)
        lines += [f"  skipped {k.series_uid or '(no SeriesInstanceUID)'} ({k.description}): {k.reason}"
                  for k in s.skipped]
    return lines
