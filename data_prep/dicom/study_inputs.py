"""The studies of a run's inputs, in either layout, and the record of the series each study was read from.

`find_inputs` turns the paths given to detect / predict / inspect into studies:
- the Kaggle layout, as before: a folder holding `.dcm` files is one study (its folder name is its key), a folder
  of such folders is one study each; an empty leaf folder is a study that fails (listed in errors.csv);
- anything else (a folder tree of any depth, files with any name, a DICOMDIR, a .zip) goes to the study finder
  (data_prep.dicom.study_finder), which groups files by StudyInstanceUID / SeriesInstanceUID and chooses one series per
  study (key: the folder name of a flat one-study folder, else the StudyInstanceUID).
A Kaggle dataset root (its studies one level further down, in train_images/ or test_images/) stays an input error
naming the folder to give instead: reading every header of 300 GB to guess is not what the user meant.

`series_table` records, per study, the series read and every series left out with the reason (series.csv).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep.dicom.study_finder import DICOMDIR_NAME, FoundStudy, is_zip, search_dicom
from data_prep.errors import InputError
from data_prep.runs.registry import STUDY_COL
from data_prep.safe_paths import check_unique_names, describe_links, key_problem, leaving_links, safe_name

log = logging.getLogger("data_prep")

DICOM_GLOB = "*.dcm"
DATASET_ROOT_GLOB = "*/*/*.dcm"
"""A folder whose `.dcm` files lie two levels down is a Kaggle dataset root, not a folder of studies."""
EMPTY_LISTED = 10
"""Empty study folders named in the warning (errors.csv lists them all)."""
SERIES_COLUMNS: tuple[str, ...] = (STUDY_COL, "dicom_study_uid", "series_uid", "series_number", "description",
                                   "modality", "n_files", "chosen", "reason", "example_file", "sop_class_uid")
"""series.csv: one row per series seen in a study; `chosen` 1 for the series read (its first file in canonical
order is `example_file`), 0 for the others with the `reason` they were left out."""

Study = Path | FoundStudy
"""A study as detect reads it: a Kaggle-layout folder, or a study the finder chose a series of (both have `.name`)."""


def find_inputs(paths: Sequence[str | os.PathLike | Study] | str | os.PathLike, *,
                extract_to: str | os.PathLike | None = None, progress: bool = False,
                follow_symlinks: bool = False) -> list[Study]:
    """Expand input paths into studies: Kaggle study folders as Paths, anything else through the study finder.

    Each path is an input root: a study folder that is, or holds, a symbolic link leading outside it becomes a failed
    study naming the link (and the study finder refuses such links, DICOMDIR records and zip members) unless
    `follow_symlinks`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    studies: list[Study] = []
    empty: list[Path] = []
    for raw in paths:
        if isinstance(raw, FoundStudy):      # found already (predict passes its studies on to detect)
            studies.append(raw)
            continue
        path = Path(raw)
        if _for_finder(path):
            studies += _found(path, extract_to, progress, follow_symlinks)
            continue
        if not path.is_dir():
            raise InputError(path, "not a folder, a DICOMDIR or a .zip (expected a study folder, a folder of "
                                   "studies, a DICOMDIR or a zip of DICOM files)")
        if any(path.glob(DICOM_GLOB)):
            studies.append(kaggle_study(path, path, follow_symlinks))
            continue
        subs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        kaggle = [p for p in subs if any(p.glob(DICOM_GLOB))]
        if kaggle:
            for sub in subs:
                if sub in kaggle:
                    studies.append(kaggle_study(sub, path, follow_symlinks))
                elif not any(q.is_dir() for q in sub.iterdir()):
                    # a study folder whose files have no .dcm extension goes to the finder; without DICOM: empty
                    found_leaf = _found(sub, extract_to, progress, follow_symlinks, path) if _has_files(sub) else []
                    studies += found_leaf or [kaggle_study(sub, path, follow_symlinks)]
                    empty += [] if found_leaf else [sub]
            continue
        if next(path.glob(DATASET_ROOT_GLOB), None) is not None:
            raise InputError(path, "holds no .dcm files and no study folders with .dcm files: it looks like a "
                                   "dataset root; give its train_images/ or test_images/ folder")
        found_here = _found(path, extract_to, progress, follow_symlinks) if _has_files(path) else []
        if found_here:
            studies += found_here
            continue
        leaves = [p for p in subs if not any(q.is_dir() for q in p.iterdir())] if subs else [path]
        if not leaves:
            raise InputError(path, "holds no .dcm files and no study folders with .dcm files, and no DICOM study "
                                   "was found in it")
        empty += leaves
        studies += [kaggle_study(leaf, path, follow_symlinks) for leaf in leaves]
    if empty:
        log.warning("%d study folder(s) hold no .dcm files and will be reported as failed: %s", len(empty),
                    ", ".join(str(p) for p in empty[:EMPTY_LISTED]))
    keys = [s.name for s in studies]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise InputError(None, f"study keys must be unique (a Kaggle folder's name is its StudyInstanceUID, a "
                               f"found study's key its folder name or StudyInstanceUID): {dup[:3]}")
    check_unique_names(keys)                # two keys whose file names would be one: results would mix
    return studies


def absolute_study(study: Study | str | os.PathLike) -> Study:
    """The study with absolute paths (for workers whose working folder is not the driver's)."""
    if isinstance(study, FoundStudy):
        return replace(study, paths=tuple(p.absolute() for p in study.paths),
                       root=study.root.absolute() if study.root is not None else None)
    return Path(study).absolute()


def series_table(study: Study, geometry: Any) -> pd.DataFrame:
    """series.csv rows of one read study: the series read (from its geometry) and each one left out, with why."""
    key = study.name
    chosen = {STUDY_COL: key, "dicom_study_uid": geometry.dicom_study_uid or "", "series_uid": geometry.series_uid
              or "", "series_number": geometry.series_number, "description": geometry.series_description,
              "modality": geometry.modality or "", "n_files": len(geometry.paths), "chosen": 1, "reason": "",
              "example_file": str(Path(geometry.paths[0]).absolute()), "sop_class_uid": geometry.sop_class_uid or ""}
    skipped = study.skipped if isinstance(study, FoundStudy) else geometry.skipped_series
    rows = [chosen] + [{STUDY_COL: key, "dicom_study_uid": chosen["dicom_study_uid"], "series_uid": s.series_uid,
                        "series_number": None, "description": s.description, "modality": "", "n_files": None,
                        "chosen": 0, "reason": s.reason, "example_file": "", "sop_class_uid": ""} for s in skipped]
    df = pd.DataFrame(rows, columns=list(SERIES_COLUMNS))
    return df.astype({"series_number": "Int64", "n_files": "Int64"})   # whole numbers, empty where unknown


def _for_finder(path: Path) -> bool:
    """A zip, a DICOMDIR, or a folder with a DICOMDIR at its top: read through the study finder."""
    if path.is_file():
        return is_zip(path) or path.name.upper() == DICOMDIR_NAME
    return path.is_dir() and any(p.name.upper() == DICOMDIR_NAME and p.is_file() for p in path.iterdir())


def _has_files(path: Path) -> bool:
    """True when any non-hidden file lies anywhere under `path`."""
    for _folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not n.startswith(".") for n in names):
            return True
    return False


def _found(path: Path, extract_to: str | os.PathLike | None, progress: bool, follow_symlinks: bool,
           input_root: Path | None = None) -> list[FoundStudy]:
    """The studies the finder sees under `path` (it logs each series chosen and skipped)."""
    return search_dicom(path, extract_to=extract_to, progress=progress, follow_symlinks=follow_symlinks,
                        input_root=input_root).studies


def kaggle_study(folder: Path, root: Path, follow_symlinks: bool) -> Study:
    """A Kaggle-layout study folder; a failed study naming the link when it is, or holds, a link leaving `root`, or
    naming the folder when its name cannot be a key (a control character: the study is keyed by its safe name)."""
    bad_name = key_problem(folder.name)
    if bad_name is not None:
        key = safe_name(folder.name)
        problem = f"{bad_name}: rename the folder (the study is reported as {key})"
        log.warning("%s: %s", folder.parent, problem)
        return FoundStudy(key, key, None, (), problem=problem, root=folder)
    links = [] if follow_symlinks else leaving_links(folder, root)
    if not links:
        return folder
    problem = describe_links(links, root)
    log.warning("study %s: %s", folder.name, problem)
    return FoundStudy(folder.name, folder.name, None, (), problem=problem, root=folder)
