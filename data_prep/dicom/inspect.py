"""`spinefrac inspect`: summarise one study, a folder of studies or a PACS export, and list every problem.

Study folders of the Kaggle layout are read as detect reads them; anything else (a tree of any depth, files of
any name, a DICOMDIR, a .zip) through the study finder, whose choice of series, and every series it left out
with the reason, is listed under "series".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.dicom.geometry import check_study, short_coverage
from data_prep.dicom.study_finder import FoundStudy
from data_prep.dicom.study_inputs import DICOM_GLOB, Study, find_inputs, kaggle_study
from data_prep.dicom.volume import decode_slices
from data_prep.errors import InputError
from data_prep.runs import registry

log = logging.getLogger("data_prep")

TS_SHORT: dict[str, str] = {
    registry.TS_EXPLICIT_LE: "explicit-LE",
    registry.TS_IMPLICIT_LE: "implicit-LE",
    registry.TS_JPEG_LOSSLESS_SV1: "JPEG-lossless",
    registry.TS_RLE: "RLE",
    registry.TS_JPEG2000_LOSSLESS: "J2K-lossless",
    registry.TS_JPEG2000: "J2K",
}
"""Short names of the usual transfer syntaxes for the summary table."""
KAGGLE_IMAGE_DIRS = ("train_images", "test_images")
TABLE_COLUMNS = ("study", "slices", "pixel mm", "thick mm", "z top..bottom mm", "InstanceNumber",
                 "transfer syntax", "HU min..max", "problems")


@dataclass
class StudySummary:
    """What `inspect` found in one study folder."""

    study_dir: Path
    name: str = ""
    series: list[str] = field(default_factory=list)
    """The series read and each one left out, with the reason (one line each)."""
    n_slices: int = 0
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    shape: tuple[int, int] | None = None
    z_range: tuple[float, float] | None = None
    instance_order_reversed: bool | None = None
    transfer_syntaxes: tuple[str, ...] = ()
    hu_range: tuple[float, float] | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        """Return this study's cells of the summary table."""
        dash = "-"
        order = dash if self.instance_order_reversed is None else (
            "reversed (feet first)" if self.instance_order_reversed else "head first")
        problems = ", ".join(part for part in (
            f"{len(self.errors)} error(s)" if self.errors else "",
            f"{len(self.warnings)} warning(s)" if self.warnings else "") if part) or "none"
        return [
            self.name or self.study_dir.name,
            str(self.n_slices) + (f" x {self.shape[0]}x{self.shape[1]}" if self.shape else ""),
            f"{self.pixel_spacing[0]:g} x {self.pixel_spacing[1]:g}" if self.pixel_spacing else dash,
            f"{self.slice_thickness:g}" if self.slice_thickness is not None else dash,
            f"{self.z_range[0]:.1f}..{self.z_range[1]:.1f}" if self.z_range else dash,
            order,
            ", ".join(TS_SHORT.get(ts, ts) for ts in self.transfer_syntaxes) or dash,
            f"{self.hu_range[0]:g}..{self.hu_range[1]:g}" if self.hu_range else dash,
            problems,
        ]


@dataclass
class InspectReport:
    """The summaries of every study under a path, and every problem found."""

    path: Path
    studies: list[StudySummary]

    @property
    def has_errors(self) -> bool:
        """True when any study cannot be read as one volume (or a slice cannot be decoded)."""
        return any(s.errors for s in self.studies)

    @property
    def has_warnings(self) -> bool:
        """True when any study has a warning (stray files, gaps, non-CT modality, ...)."""
        return any(s.warnings for s in self.studies)

    def format(self) -> str:
        """Return the human-readable summary table followed by every problem, one per line."""
        rows = [list(TABLE_COLUMNS)] + [s.row() for s in self.studies]
        widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
        lines = [f"inspect {self.path}: {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}"]
        for i, r in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        problems = [(s, "ERROR", m) for s in self.studies for m in s.errors] + \
                   [(s, "WARNING", m) for s in self.studies for m in s.warnings]
        lines.append("")
        if problems:
            lines.append("problems:")
            lines.extend(f"  {kind:<7} {s.name or s.study_dir.name}: {_relative(m, s.study_dir)}"
                         for s, kind, m in problems)
        else:
            lines.append("no problems found")
        chosen = [s for s in self.studies if len(s.series) > 1 or (s.series and s.name != s.study_dir.name)]
        if chosen:
            lines += ["", "series (the one read, then each left out and why):"]
            lines += [f"  {s.name}: {line}" for s in chosen for line in s.series]
        n_err = sum(1 for s in self.studies if s.errors)
        n_warn = sum(1 for s in self.studies if s.warnings and not s.errors)
        lines.append(f"summary: {len(self.studies)} studies, {n_err} with errors, {n_warn} with warnings only")
        return "\n".join(lines)


def inspect_path(path: str | os.PathLike, *, workers: int = 2, progress: bool = True,
                 follow_symlinks: bool = False) -> InspectReport:
    """Inspect a study folder, or every study folder under `path`, decoding pixels for the HU range.

    Symbolic links leading outside `path` are not followed (the study is reported with an error naming the link)
    unless `follow_symlinks`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    studies = _study_dirs(path, follow_symlinks)
    summaries = [_inspect_guarded(d, workers=workers)
                 for d in tqdm(studies, desc="inspect", unit="study", disable=not progress or len(studies) < 2)]
    return InspectReport(path=path, studies=summaries)


def _inspect_guarded(study_dir: Study, *, workers: int) -> StudySummary:
    """Inspect one study; whatever goes wrong in it becomes an error of that study, never the end of the report."""
    try:
        return inspect_study(study_dir, workers=workers)
    except Exception as exc:  # noqa: BLE001 - one study's failure is reported, the others still are
        log.debug("inspect %s failed", study_dir, exc_info=True)
        message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        return StudySummary(study_dir=_folder(study_dir), name=study_dir.name,
                            errors=[f"cannot be inspected: {message}"])


def inspect_study(study_dir: Study, *, workers: int = 2) -> StudySummary:
    """Check one study's headers, then decode every slice to find its HU range and undecodable files."""
    scan = check_study(study_dir)
    summary = StudySummary(study_dir=_folder(study_dir), name=study_dir.name, errors=[str(e) for e in scan.errors],
                           warnings=list(scan.warnings))
    geom = scan.geometry
    skipped = study_dir.skipped if isinstance(study_dir, FoundStudy) else (geom.skipped_series if geom else ())
    if geom is not None:
        summary.series.append(f"read series {geom.series_uid} ({geom.series_description or 'no description'}, "
                              f"{len(geom)} files)")
    summary.series += [f"left out {k.series_uid or '(no SeriesInstanceUID)'} ({k.description or 'no description'})"
                       f": {k.reason}" for k in skipped]
    if geom is None:
        return summary
    too_short = short_coverage(geom.z_mm)
    if too_short is not None:
        summary.warnings.append(too_short)
    summary.n_slices = len(geom)
    summary.pixel_spacing = geom.pixel_spacing
    summary.slice_thickness = geom.slice_thickness
    summary.shape = geom.shape
    summary.z_range = (float(geom.z_mm[0]), float(geom.z_mm[-1]))
    summary.instance_order_reversed = geom.instance_order_reversed
    summary.transfer_syntaxes = geom.transfer_syntaxes
    lo, hi = np.inf, -np.inf
    for _, result in decode_slices(geom.paths, workers=workers):
        if isinstance(result, Exception):
            summary.errors.append(str(result))
        else:
            lo, hi = min(lo, float(result.min())), max(hi, float(result.max()))
    if np.isfinite(lo):
        summary.hu_range = (lo, hi)
    return summary


def _folder(study: Study) -> Path:
    """The folder a study's messages are relative to."""
    return study.folder if isinstance(study, FoundStudy) else Path(study)


def _study_dirs(path: Path, follow_symlinks: bool = False) -> list[Study]:
    """The studies under `path`: itself, its sub-folders, those of a Kaggle root's image folders, or found ones."""
    if not path.is_dir():      # a zip or a DICOMDIR (anything else: an input error naming it)
        return find_inputs(path, follow_symlinks=follow_symlinks)
    found = _kaggle_dirs(path)
    if any(any(d.glob(DICOM_GLOB)) for d in found):
        return [kaggle_study(d, path, follow_symlinks) for d in found]
    return find_inputs(path, follow_symlinks=follow_symlinks)


def _kaggle_dirs(path: Path) -> list[Path]:
    """The study folders of the Kaggle layout under `path` (itself, its sub-folders, or a dataset root's)."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    subdirs = sorted(p for p in entries if p.is_dir())
    if not subdirs or any(p.is_file() and p.suffix.lower() == ".dcm" for p in entries):
        return [path]
    image_roots = [p for p in subdirs if p.name in KAGGLE_IMAGE_DIRS]
    if image_roots:  # a dataset root such as data/synth: inspect train_images/* and test_images/*
        return [s for root in image_roots for s in sorted(p for p in root.iterdir() if p.is_dir())]
    return subdirs


def _relative(message: str, study_dir: Path) -> str:
    """Shorten absolute file paths inside a message to names relative to the study folder."""
    return message.replace(str(study_dir) + os.sep, "").replace(str(study_dir) + ": ", "")
