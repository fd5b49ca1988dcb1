"""Reading one CT study into a canonical axial volume in HU (index 0 = most superior).

A study is a folder (the Kaggle layout: its files, the largest series) or a study the finder chose a series of
(data_prep.dicom.study_finder.FoundStudy: its `key` names the study, its `paths` are the chosen series' files).

`scan_study` reads headers only and fixes the canonical order from ImagePositionPatient projected on
the slice normal; `read_volume` and `iter_chunks` decode the pixels (optionally in parallel) and apply
RescaleSlope/RescaleIntercept. Every problem names the file and the reason (see docs/contracts.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_prep.dicom.slice_file import (
    EXPECTED_MODALITY,
    NoPixelDataError,
    NotCTError,
    NotDicomError,
    SliceHeader,
    read_header,
)
from data_prep.errors import DicomReadError, GeometryError, InputError

log = logging.getLogger("data_prep")

# --- named constants -------------------------------------------------------------------------------
POSITION_TOLERANCE_MM = 1e-3
"""Two slices closer than this along the normal are duplicates."""
GAP_FACTOR = 1.5
"""A step between neighbouring slices larger than GAP_FACTOR x the median step is reported as missing slices."""
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between two slices' ImageOrientationPatient values still counted as the same."""
SPACING_TOLERANCE_MM = 1e-3
"""Largest difference between two slices' PixelSpacing values still counted as the same."""
MIN_POSITIONED_SHARE = 0.5
"""When some files lack ImagePositionPatient they are left out; if fewer than this share of the files have
one, the study cannot be ordered and fails instead (a handful of slices would not be the study)."""
LISTED_FILES = 20
"""How many excluded file names a warning spells out (StudyGeometry.excluded holds them all)."""
MIN_CERVICAL_SPAN_MM = 80.0
"""A study covering less than this along its slice normal cannot hold C1-C7: from the top of C1 to the bottom of C7
the adult cervical spine measures about 100-130 mm (the synthetic studies place 100-150 mm of it inside 200 mm);
80 mm leaves room for small patients and steep lordosis. Such a study is flagged (`short_coverage`: a warning in
`spinefrac inspect`, the `warning` column of worklist.csv), not refused."""


# --- specific errors (all DicomReadError/GeometryError subclasses, so they name the file) ----------


class EmptyStudyError(DicomReadError):
    """A study folder holding no readable CT slice."""


class InconsistentSlicesError(GeometryError):
    """Slices of one study that differ in size, orientation or pixel spacing."""


class DuplicatePositionError(GeometryError):
    """Two slices at the same position along the slice normal."""


class AmbiguousSeriesError(GeometryError):
    """A study folder holding two or more series with the same, largest number of slices."""


class UnorderableStudyError(GeometryError):
    """Too few slices carry ImagePositionPatient to put the study in order."""


class UnknownInstanceError(InputError, KeyError):
    """An InstanceNumber (slice_number) that the study does not hold."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class SkippedSeries(NamedTuple):
    """A series of a study that was not read, and why."""

    series_uid: str
    description: str
    reason: str


# --- geometry --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StudyGeometry:
    """Headers of one study in canonical order (index 0 = most superior); no pixels."""

    study_uid: str
    study_dir: Path
    paths: tuple[Path, ...]
    instance_numbers: np.ndarray
    z_mm: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    shape: tuple[int, int]
    transfer_syntaxes: tuple[str, ...]
    instance_order_reversed: bool
    warnings: tuple[str, ...] = ()
    series_uid: str | None = None
    excluded: tuple[tuple[Path, str], ...] = ()
    sop_uids: tuple[str, ...] = ()
    """SOPInstanceUID of each slice in canonical order ("" where a file has none)."""
    sop_class_uid: str | None = None
    dicom_study_uid: str | None = None
    """StudyInstanceUID from the headers (`study_uid` is the study's key: the folder name or the finder's key)."""
    series_description: str = ""
    series_number: int | None = None
    modality: str | None = None
    skipped_series: tuple[SkippedSeries, ...] = ()
    """Series of the folder left out (another series than its main one)."""
    _index: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[int, int] = {}
        for i, n in enumerate(self.instance_numbers):
            index.setdefault(int(n), i)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.paths)

    def index_of_instance(self, instance_number: int) -> int:
        """Return the canonical slice_index of the file with this InstanceNumber (slice_number)."""
        try:
            return self._index[int(instance_number)]
        except KeyError:
            raise UnknownInstanceError(self.study_dir, f"study {self.study_uid} has no slice with InstanceNumber "
                                       f"{instance_number} (it holds {min(self._index)}..{max(self._index)})"
                                       ) from None

    def affine(self) -> np.ndarray:
        """Return the 4x4 matrix mapping canonical voxel (slice_index, row, col, 1) to LPS mm."""
        row_dir, col_dir = self.orientation[:3], self.orientation[3:]
        out = np.eye(4)
        n = len(self)
        if n > 1:
            out[:3, 0] = (self.positions[-1] - self.positions[0]) / (n - 1)
        else:
            out[:3, 0] = -slice_normal(self.orientation) * self.slice_thickness
        out[:3, 1] = col_dir * self.pixel_spacing[0]  # moving down one row
        out[:3, 2] = row_dir * self.pixel_spacing[1]  # moving right one column
        out[:3, 3] = self.positions[0]
        return out


@dataclass
class ScanResult:
    """Everything learnt from a study's headers: the geometry (None if unusable), errors and warnings."""

    study_dir: Path
    geometry: StudyGeometry | None
    errors: list[InputError]
    warnings: list[str]


# --- public API ------------------------------------------------------------------------------------
def as_study(study: Any) -> Any:
    """A study as the readers take it: a FoundStudy (anything with `key` and `paths`) as is, else its folder Path."""
    return study if hasattr(study, "paths") and hasattr(study, "key") else Path(study)


def scan_study(study_dir: Any, *, max_bytes: int | None = None) -> StudyGeometry:
    """Read the headers of one study (folder or FoundStudy) and return its canonical geometry; raise on the first error."""
    result = check_study(study_dir, max_bytes=max_bytes)
    if result.errors:
        first = result.errors[0]
        if len(result.errors) > 1:
            log.error("%s: %d problems; first: %s", result.study_dir, len(result.errors), first)
        raise first
    assert result.geometry is not None
    return result.geometry


def check_study(study_dir: Any, *, max_bytes: int | None = None) -> ScanResult:
    """Read the headers of one study (folder or FoundStudy) and collect every problem instead of stopping at the first.

    Files of another series than the folder's main one (the series with the most files) and files
    without ImagePositionPatient are left out, named in a warning and in `StudyGeometry.excluded`.
    A FoundStudy's files are its chosen series' (the finder has left the other series out already).
    """
    study = as_study(study_dir)
    errors: list[InputError] = []
    notes: list[str] = []
    if isinstance(study, Path):
        study_dir, key = study, study.name
        if not study_dir.is_dir():
            return ScanResult(study_dir, None, [EmptyStudyError(study_dir, "is not a folder")], notes)
        files = sorted((p for p in study_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=_natural_key)
    else:
        study_dir, key, files = Path(study.folder), str(study.key), list(study.paths)
        if getattr(study, "problem", None):
            return ScanResult(study_dir, None, [EmptyStudyError(study_dir, f"study {key}: {study.problem}")], notes)
    headers: list[SliceHeader] = []
    for path in files:
        try:
            headers.append(read_header(path, max_bytes=max_bytes))
        except (NotDicomError, NoPixelDataError) as exc:
            _warn(notes, f"{exc}; skipped")
        except DicomReadError as exc:
            errors.append(exc)
    if not headers:
        if not errors:
            errors.append(EmptyStudyError(study_dir, "holds no DICOM image files"))
        return ScanResult(study_dir, None, errors, notes)
    geometry = None
    try:
        headers, excluded, skipped = _main_series(study_dir, headers, notes)
        not_ct = next((h for h in headers if h.modality is not None and h.modality.strip().upper() != EXPECTED_MODALITY),
                      None)
        if not_ct is not None:   # the study finder refuses such series too; no Modality at all (RSNA) is CT
            raise NotCTError(not_ct.path, f"Modality is {not_ct.modality!r}, not {EXPECTED_MODALITY}: spinefrac reads "
                                          "CT studies only (HU values of another modality mean nothing to its models)")
        _check_uids(headers, notes)
        geometry = _build_geometry(study_dir, headers, notes, excluded, key=key, skipped=skipped)
    except InputError as exc:  # DicomReadError and GeometryError alike: reported, never a crash
        errors.append(exc)
    return ScanResult(study_dir, geometry, errors, notes)


def short_coverage(z_mm: Sequence[float] | np.ndarray) -> str | None:
    """Why a study with slices at `z_mm` cannot hold C1-C7 (None when it can): it covers < MIN_CERVICAL_SPAN_MM.

    Coverage = the distance between the first and last slice plus one median slice step (0 for one slice).
    """
    z = np.sort(np.asarray(z_mm, dtype=float))
    if z.size == 0:
        return None
    step = float(np.median(np.diff(z))) if z.size > 1 else 0.0
    span = float(z[-1] - z[0]) + step
    if span >= MIN_CERVICAL_SPAN_MM:
        return None
    return (f"too short to hold C1-C7: {z.size} slice(s) covering {span:.1f} mm along z (C1-C7 need about "
            f"{MIN_CERVICAL_SPAN_MM:g} mm or more); its prediction is unreliable")


def _check_uids(headers: Sequence[SliceHeader], notes: list[str]) -> None:
    """Warn once per kind about a StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID that is no valid DICOM UID."""
    from data_prep.safe_paths import valid_uid

    for what, attr in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"), ("SOPInstanceUID", "sop_uid")):
        bad = next((h for h in headers if getattr(h, attr) is not None and not valid_uid(getattr(h, attr))), None)
        if bad is not None:
            _warn(notes, f"{bad.path}: {what} {str(getattr(bad, attr))[:80]!r} is not a valid DICOM UID (digits and "
                         "dots, at most 64 characters); it is kept as data only, never as a file name")


# --- decoding --------------------------------------------------------------------------------------


# --- header helpers --------------------------------------------------------------------------------


def _main_series(study_dir: Path, headers: list[SliceHeader], notes: list[str]
                 ) -> tuple[list[SliceHeader], list[tuple[Path, str]], list[SkippedSeries]]:
    """Keep the series the folder is about (the most files); name and leave out the others' files.

    Files without SeriesInstanceUID count as one series of their own. Two series tied for the most
    files are an AmbiguousSeriesError: which one the folder is about cannot be told.
    """
    groups: dict[str | None, list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault(h.series, []).append(h)
    if len(groups) == 1:
        return headers, [], []
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    (main, kept), (second, rival) = ranked[0], ranked[1]
    if len(rival) == len(kept):
        raise AmbiguousSeriesError(study_dir, f"holds {len(groups)} series with the same number of files "
                                              f"({len(kept)}): {main} and {second}; keep one series per folder")
    foreign = [h for series, group in ranked[1:] for h in group]
    reason = f"another series than the study's {main}"
    _warn(notes, f"{study_dir}: {len(foreign)} file(s) belong to {reason} and are left out: "
                 f"{_names(foreign, LISTED_FILES)} (series {', '.join(str(s) for s, _ in ranked[1:])})")
    excluded = [(h.path, f"SeriesInstanceUID {h.series} is {reason}") for h in foreign]
    skipped = [SkippedSeries(series or "", group[0].description, f"{len(group)} file(s); fewer than the study's "
                             f"main series ({len(kept)} files) in the same folder") for series, group in ranked[1:]]
    return kept, excluded, skipped


def _build_geometry(study_dir: Path, headers: list[SliceHeader], notes: list[str],
                    excluded: list[tuple[Path, str]] | None = None, *, key: str | None = None,
                    skipped: Sequence[SkippedSeries] = ()) -> StudyGeometry:
    """Check that the slices fit together and sort them into canonical order (`key`: the study's key, else the folder name)."""
    excluded = list(excluded or [])
    unplaced = [h for h in headers if h.position is None]
    if unplaced and len(unplaced) < len(headers):
        placed = len(headers) - len(unplaced)
        if placed < MIN_POSITIONED_SHARE * len(headers):
            raise UnorderableStudyError(unplaced[0].path, f"{len(unplaced)} of {len(headers)} files lack "
                                                          f"ImagePositionPatient (e.g. {_names(unplaced)}): "
                                                          "too few positioned slices to order the study")
        _warn(notes, f"{study_dir}: {len(unplaced)} file(s) lack ImagePositionPatient and are left out: "
                     f"{_names(unplaced, LISTED_FILES)}; the other {placed} keep their geometric order")
        excluded += [(h.path, "no ImagePositionPatient") for h in unplaced]
        headers = [h for h in headers if h.position is not None]
    ref = _majority(headers, lambda h: h.shape)
    odd = [h for h in headers if h.shape != ref.shape]
    if odd:
        raise InconsistentSlicesError(odd[0].path, f"slice size {odd[0].shape[0]}x{odd[0].shape[1]} differs from "
                                                   f"the study's {ref.shape[0]}x{ref.shape[1]} "
                                                   f"({len(odd)} file(s) differ, e.g. {_names(odd)})")
    with_orient = [h for h in headers if h.orientation is not None]
    if with_orient:
        ref_o = _majority(with_orient, lambda h: tuple(np.round(h.orientation, 3)))
        odd = [h for h in with_orient if np.abs(h.orientation - ref_o.orientation).max() > ORIENTATION_TOLERANCE]
        if odd:
            raise InconsistentSlicesError(odd[0].path, f"ImageOrientationPatient {odd[0].orientation.tolist()} "
                                                       f"differs from the study's {ref_o.orientation.tolist()} "
                                                       f"({len(odd)} file(s), e.g. {_names(odd)})")
        orientation = ref_o.orientation
        if len(with_orient) < len(headers):
            _warn(notes, f"{study_dir}: {len(headers) - len(with_orient)} file(s) lack ImageOrientationPatient; "
                         "using the other slices' value")
    else:
        orientation = np.array([1.0, 0, 0, 0, 1.0, 0])
        _warn(notes, f"{study_dir}: no ImageOrientationPatient in any file; assuming axial [1,0,0,0,1,0]")
    with_spacing = [h for h in headers if h.spacing is not None]
    if with_spacing:
        ref_s = _majority(with_spacing, lambda h: tuple(np.round(h.spacing, 3)))
        odd = [h for h in with_spacing if max(abs(a - b) for a, b in zip(h.spacing, ref_s.spacing, strict=True))
               > SPACING_TOLERANCE_MM]
        if odd:
            raise InconsistentSlicesError(odd[0].path, f"PixelSpacing {list(odd[0].spacing)} differs from the "
                                                       f"study's {list(ref_s.spacing)} ({len(odd)} file(s))")
        spacing = ref_s.spacing
    else:
        spacing = (1.0, 1.0)
        _warn(notes, f"{study_dir}: no PixelSpacing in any file; assuming 1 x 1 mm")
    normal = slice_normal(orientation)
    if abs(normal[2]) < 0.5:
        _warn(notes, f"{study_dir}: slices are not axial (normal {np.round(normal, 3).tolist()}); "
                     "the canonical order runs along the slice normal")
    if normal[2] < 0:
        normal = -normal  # orient towards superior (+z in LPS)

    instances = [h.instance for h in headers]
    if all(h.position is not None for h in headers):
        positions = np.stack([h.position for h in headers])
        z = positions @ normal
        tie = np.array([n if n is not None else 0 for n in instances])
        order = np.lexsort((tie, -z))  # z descending (superior first), InstanceNumber breaks ties
    else:
        missing = [h for h in headers if h.position is None]
        if any(n is None for n in instances):
            raise GeometryError(missing[0].path, "neither ImagePositionPatient nor InstanceNumber: cannot order "
                                                 f"the slices ({len(missing)} file(s) without a position)")
        _warn(notes, f"{study_dir}: no file has ImagePositionPatient; ordering by InstanceNumber, "
                     "assuming 1 = most superior")
        order = np.argsort(np.array(instances), kind="stable")
        thickness0 = _majority_value([h.thickness for h in headers if h.thickness]) or 1.0
        z = np.empty(len(headers))
        z[order] = -np.arange(len(headers)) * thickness0
        positions = np.stack([h.position if h.position is not None else np.array([0.0, 0.0, zz])
                              for h, zz in zip(headers, z, strict=True)])
    headers = [headers[i] for i in order]
    positions, z = positions[order], z[order]

    steps = -np.diff(z)
    dup = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    if dup.size:
        a, b = headers[dup[0]], headers[dup[0] + 1]
        raise DuplicatePositionError(b.path, f"same position as {a.path.name} (z = {z[dup[0]]:.3f} mm along the "
                                             f"slice normal); {dup.size} duplicate pair(s) in {study_dir.name}")
    if steps.size:
        median = float(np.median(steps))
        for g in np.flatnonzero(steps > GAP_FACTOR * median):
            a, b = headers[g], headers[g + 1]
            _warn(notes, f"{study_dir}: missing slices between {a.path.name} (z={z[g]:.2f} mm) and {b.path.name} "
                         f"(z={z[g + 1]:.2f} mm): gap {steps[g]:.2f} mm, usual step {median:.2f} mm "
                         f"(about {round(steps[g] / median) - 1} slice(s) missing)")

    if any(n is None for n in instances):
        _warn(notes, f"{study_dir}: some files lack InstanceNumber; using the file name stem instead")
    numbers = np.array([h.instance if h.instance is not None else _stem_number(h.path) for h in headers])
    if len(set(numbers.tolist())) != len(numbers):
        _warn(notes, f"{study_dir}: InstanceNumber is not unique; index_of_instance uses the first match")
    thicknesses = [h.thickness for h in headers if h.thickness]
    thickness = _majority_value(thicknesses)
    if thickness is None:
        thickness = float(np.median(steps)) if steps.size else 1.0
        _warn(notes, f"{study_dir}: no SliceThickness; using the slice step {thickness:.3f} mm")
    elif any(abs(t - thickness) > SPACING_TOLERANCE_MM for t in thicknesses):
        _warn(notes, f"{study_dir}: SliceThickness varies ({min(thicknesses)}..{max(thicknesses)} mm)")
    reversed_ = bool(len(numbers) > 1 and numbers[-1] < numbers[0])
    return StudyGeometry(
        study_uid=key if key is not None else study_dir.name, study_dir=study_dir, paths=tuple(h.path for h in headers),
        instance_numbers=numbers.astype(np.int64), z_mm=z.astype(np.float64), positions=positions,
        orientation=np.asarray(orientation, dtype=np.float64), pixel_spacing=(float(spacing[0]), float(spacing[1])),
        shape=headers[0].shape, slice_thickness=float(thickness),
        transfer_syntaxes=tuple(sorted({h.ts for h in headers})), instance_order_reversed=reversed_,
        warnings=tuple(notes), series_uid=headers[0].series, excluded=tuple(excluded),
        sop_uids=tuple(h.sop_uid or "" for h in headers), sop_class_uid=headers[0].sop_class,
        dicom_study_uid=headers[0].study, series_description=headers[0].description,
        series_number=headers[0].series_number, modality=headers[0].modality, skipped_series=tuple(skipped))


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """The unit normal of slices with this ImageOrientationPatient (row x column direction; zero when degenerate)."""
    n = np.cross(orientation[:3], orientation[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _warn(notes: list[str], message: str) -> None:
    log.warning("%s", message)
    notes.append(message)


def _majority(headers: list[SliceHeader], key):
    counts: dict = {}
    for h in headers:
        counts.setdefault(key(h), []).append(h)
    return max(counts.values(), key=len)[0]


def _majority_value(values: list[float]) -> float | None:
    if not values:
        return None
    rounded = [round(v, 3) for v in values]
    return max(set(rounded), key=rounded.count)


def _names(headers: Sequence[SliceHeader], limit: int = 3) -> str:
    names = [h.path.name for h in headers[:limit]]
    return ", ".join(names) + (", ..." if len(headers) > limit else "")


def _natural_key(path: Path) -> tuple:
    stem = path.stem
    return (0, int(stem), path.name) if stem.isdigit() else (1, 0, path.name)


def _stem_number(path: Path) -> int:
    return int(path.stem) if path.stem.isdigit() else -1


