"""The detect folder: its file names and table columns, per-study markers and parts, and the combined tables rebuilt from finished studies (docs/contracts.md "Detection outputs")."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep.dicom.study_inputs import SERIES_COLUMNS, Study
from data_prep.runs.artifacts import remove_stale_temps, write_csv_atomic, write_sidecar
from data_prep.runs.registry import LEVELS, STUDY_COL
from data_prep.runs.resume import StudyMarkers, study_file, study_keys
from data_prep.safe_paths import inside, safe_name
from detector.roi import ROI_COLUMNS

log = logging.getLogger("detector")
BOXES_CSV = "boxes.csv"
SLICES_CSV = "slices.csv"
ERRORS_CSV = "errors.csv"
DONE_DIR = "done"
PARTS_DIR = "parts"
ERRORS_DIR = "errors"
OVERLAYS_DIR = "overlays"
STUDY_DIRS = (DONE_DIR, PARTS_DIR, ERRORS_DIR, OVERLAYS_DIR)
"""The folders of a detect output that hold per-study files."""
BOXES_SUFFIX = ".boxes.csv"
SLICES_SUFFIX = ".slices.csv"
LEVEL_BOXES_SUFFIX = ".level_boxes.csv"
LEVEL_BOXES_CSV = "level_boxes.csv"
VERTEBRAE_SUFFIX = ".vertebrae.csv"
VERTEBRAE_CSV = "vertebrae.csv"
SERIES_SUFFIX = ".series.csv"
SOP_UID_COL = "sop_instance_uid"
"""slices.csv: the SOPInstanceUID of each slice's file."""
SERIES_CSV = "series.csv"
BOX_COLUMNS: tuple[str, ...] = (STUDY_COL, "slice_number", "slice_index", "z_mm", "x", "y", "width", "height",
                                "score")
SLICE_COLUMNS: tuple[str, ...] = (STUDY_COL, "slice_number", "slice_index", "z_mm", "max_score", "n_boxes",
                                  *ROI_COLUMNS, SOP_UID_COL)
ERROR_COLUMNS: tuple[str, ...] = (STUDY_COL, "path", "stage", "error")
LEVEL_BOX_COLUMNS: tuple[str, ...] = ("level", *(f"w_{lv}" for lv in LEVELS))
LEVEL_SLICE_COLUMNS: tuple[str, ...] = tuple(f"p_{lv}" for lv in LEVELS)


def plan_studies(study_dirs: Sequence[Study], markers: StudyMarkers, *, overwrite: bool
                 ) -> tuple[list[str], list[Study]]:
    """(finished studies skipped, studies to run) of a detect run into markers.root.

    Finished studies made with other settings raise SettingsChangedError here, before any work, unless
    `overwrite` (then every study is redone and failure records made with other settings are dropped).
    """
    plan = markers.plan([s.name for s in study_dirs], overwrite=overwrite)
    remove_stale_temps(markers.root, STUDY_DIRS)     # a killed run's temporaries (the caller holds the lock)
    if overwrite:
        _drop_other_errors(markers.root, markers.key)
    skipped = list(plan.skip)
    todo = [s for s in study_dirs if s.name not in set(skipped)]
    if skipped:
        log.info("detect: %d of %d studies already finished in %s (skipped; --overwrite redoes them)",
                 len(skipped), len(study_dirs), markers.root)
    return skipped, todo


def detected_studies(out: str | os.PathLike) -> list[str]:
    """Every study a detect folder holds: finished (done markers) or failed (errors/<uid>.json), sorted."""
    return sorted(set(detect_markers(out).done_uids()) | set(failed_studies(out)))


def failed_studies(out: str | os.PathLike) -> list[str]:
    """The studies of a detect folder with a failure record (errors/<safe_name(uid)>.json), by the key it records."""
    return study_keys(Path(out) / ERRORS_DIR)


def error_record(out: str | os.PathLike, uid: str) -> Path:
    """The failure record of a study in a detect folder: errors/<safe_name(uid)>.json (data_prep.safe_paths)."""
    return study_file(Path(out) / ERRORS_DIR, uid, ".json")


def overlay_dir(out: str | os.PathLike, uid: str) -> Path:
    """A study's overlay folder in a detect folder: overlays/<safe_name(uid)>/ (data_prep.safe_paths)."""
    return inside(Path(out) / OVERLAYS_DIR, safe_name(uid), source=f"study {uid!r}")


def detect_markers(out: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> StudyMarkers:
    """The done markers and parts of a detect output folder (for `settings`, when checking or writing)."""
    return StudyMarkers(Path(out), dict(settings or {}), done_dir=DONE_DIR, parts_dir=PARTS_DIR, what="detect",
                        how="rerun with --overwrite to redo every study with the new settings, or choose a new "
                            "--out folder")


def rebuild_outputs(out: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                    runtime_s: float | None = None, extra: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Rebuild boxes.csv, slices.csv and errors.csv from finished studies' parts; return (finished, failed)."""
    out = Path(out)
    markers = detect_markers(out)
    uids = markers.done_uids()
    boxes = markers.read_parts(BOXES_SUFFIX, uids, dtype={STUDY_COL: str})
    slices = markers.read_parts(SLICES_SUFFIX, uids, dtype={STUDY_COL: str})
    errors = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / ERRORS_DIR).glob("*.json"))] \
        if (out / ERRORS_DIR).is_dir() else []
    box_df = _concat(boxes, BOX_COLUMNS)
    slice_df = _concat(slices, SLICE_COLUMNS)
    err_df = pd.DataFrame(errors, columns=list(ERROR_COLUMNS))
    cfg = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config is not None else None)
    tables = [(out / BOXES_CSV, box_df, "detect_boxes"), (out / SLICES_CSV, slice_df, "detect_slices"),
              (out / ERRORS_CSV, err_df, "detect_errors")]
    frames = markers.read_parts(LEVEL_BOXES_SUFFIX, uids, dtype={STUDY_COL: str})
    if frames:
        tables.append((out / LEVEL_BOXES_CSV, pd.concat(frames, ignore_index=True), "detect_level_boxes"))
    frames = markers.read_parts(VERTEBRAE_SUFFIX, uids, dtype={STUDY_COL: str})
    if frames:
        tables.append((out / VERTEBRAE_CSV, pd.concat(frames, ignore_index=True), "detect_vertebrae"))
    frames = markers.read_parts(SERIES_SUFFIX, uids, dtype={STUDY_COL: str, "dicom_study_uid": str, "series_uid": str,
                                                           "series_number": "Int64", "n_files": "Int64"})
    if frames:
        tables.append((out / SERIES_CSV, pd.concat(frames, ignore_index=True)[list(SERIES_COLUMNS)], "detect_series"))
    for path, df, kind in tables:
        write_csv_atomic(path, df)
        write_sidecar(path, kind=kind, config=cfg, counts={"rows": len(df), "studies_finished": len(uids),
                                                           "studies_failed": len(err_df)},
                      runtime_s=runtime_s, extra=extra)
    return len(uids), len(err_df)


def _drop_other_errors(out: Path, key: str) -> None:
    """Remove failure records made with other settings (with overwrite: errors.csv then speaks of this run only)."""
    for path in sorted((out / ERRORS_DIR).glob("*.json")) if (out / ERRORS_DIR).is_dir() else []:
        try:
            made_with = json.loads(path.read_text(encoding="utf-8")).get("settings_key")
        except (OSError, ValueError):
            made_with = None
        if made_with != key:
            path.unlink(missing_ok=True)


def _concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(columns))
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values([STUDY_COL, "slice_index"], kind="stable").reset_index(drop=True)
