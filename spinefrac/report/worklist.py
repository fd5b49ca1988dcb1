"""The worklist: a prediction folder's studies ranked for review, with the operating point's flag.

Order: failed studies first (they have no model output and need a reader whatever their prior says), then by
patient_overall, highest first (ties keep predictions.csv order). `flagged` is 1 when patient_overall >= the
model folder's operating threshold (aggregator/operating_point.json), 0 below it and for failed studies, and empty
when the model folder has none (a warning says why). `warning` names what makes a finished study's prediction
unreliable: a study too short to hold C1-C7 (data_prep.dicom.geometry.short_coverage, from slices.csv).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pandera.pandas as pa

from aggregation.operating_point import describe, read_operating_point
from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import read_sidecar, write_csv_atomic, write_sidecar
from data_prep.runs.tables import read_csv_table, validate_frame

log = logging.getLogger("spinefrac")

PREDICTIONS_CSV = "predictions.csv"
ERRORS_CSV = "errors.csv"
SLICES_CSV = "slices.csv"
WORKLIST_CSV = "worklist.csv"
AGGREGATOR_DIR = "aggregator"
WORKLIST_COLUMNS = ("rank", registry.STUDY_COL, registry.PATIENT, *registry.LEVELS, "flagged", "failed", "error",
                    "warning")
_WARNED_NO_FLAG: set[str] = set()
"""Model folders whose missing operating point was already warned about in this process."""


def _probability(series: pd.Series) -> pd.Series:
    return series.between(0.0, 1.0)


PREDICTIONS_SCHEMA = pa.DataFrameSchema(
    {registry.STUDY_COL: pa.Column(str, nullable=False, unique=True, report_duplicates="all"),
     **{t: pa.Column(float, pa.Check(_probability, error="must be a probability in [0, 1]"), coerce=True,
                     nullable=False) for t in registry.TARGETS},
     "failed": pa.Column(int, pa.Check.isin([0, 1], error="must be 0 or 1"), coerce=True, nullable=False)},
    strict=False, name=PREDICTIONS_CSV)
"""predictions.csv as docs/contracts.md "Study-level outputs" defines it; extra columns pass."""


class OperatingPoint(NamedTuple):
    """The threshold record (None when there is none) and, when there is none, why."""

    record: dict[str, Any] | None
    reason: str


def read_predictions(pred_dir: str | os.PathLike) -> pd.DataFrame:
    """predictions.csv of a prediction folder, validated; an InputError names the file, row and column."""
    path = Path(pred_dir) / PREDICTIONS_CSV
    if not path.is_file():
        raise InputError(path, "not found: not a prediction folder (write one with spinefrac predict)")
    df = read_csv_table(path, (), "predictions", keep_default_na=False, na_values=[""])
    return validate_frame(df, PREDICTIONS_SCHEMA, path=path, name=PREDICTIONS_CSV)


def read_errors(pred_dir: str | os.PathLike) -> dict[str, str]:
    """{study: error text} from errors.csv (empty when the file is absent)."""
    path = Path(pred_dir) / ERRORS_CSV
    if not path.is_file():
        return {}
    df = read_csv_table(path, (registry.STUDY_COL, "error"), "detect errors", dtype=str, keep_default_na=False)
    return dict(zip(df[registry.STUDY_COL], df["error"], strict=True))


def read_warnings(pred_dir: str | os.PathLike) -> dict[str, str]:
    """{study: why its prediction is unreliable} for finished studies of slices.csv too short to hold C1-C7."""
    from data_prep.dicom.geometry import short_coverage

    path = Path(pred_dir) / SLICES_CSV
    if not path.is_file():
        return {}
    try:
        df = read_csv_table(path, (), "detect slices", usecols=[registry.STUDY_COL, "z_mm"])
    except InputError as exc:       # the warnings help review; without them the worklist still stands
        log.warning("worklist without coverage warnings: %s", exc)
        return {}
    found = {str(u): short_coverage(g["z_mm"].to_numpy(dtype=float)) for u, g in df.groupby(registry.STUDY_COL)}
    return {u: why for u, why in found.items() if why}


def model_dir_of(pred_dir: str | os.PathLike) -> Path | None:
    """The model folder predictions.csv was made with (its sidecar's inputs.model), or None."""
    try:
        model = read_sidecar(Path(pred_dir) / PREDICTIONS_CSV).get("inputs", {}).get("model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return Path(model) if model else None


def operating_point(model_dir: str | os.PathLike | None) -> OperatingPoint:
    """The model folder's operating point, or None with the reason (no model folder, or one trained before)."""
    if model_dir is None:
        return OperatingPoint(None, "no model folder known (predictions.csv.meta.json names none; pass --model)")
    if not Path(model_dir).is_dir():
        return OperatingPoint(None, f"model folder {model_dir} not found (pass --model)")
    record, reason = read_operating_point(Path(model_dir) / AGGREGATOR_DIR)
    return OperatingPoint(record, reason)


def worklist_table(predictions: pd.DataFrame, errors: dict[str, str],
                   threshold: float | None, warnings: dict[str, str] | None = None) -> pd.DataFrame:
    """The ranked worklist (WORKLIST_COLUMNS): failed studies first, then by patient_overall, highest first."""
    df = predictions.reset_index(drop=True).assign(_order=lambda d: range(len(d)))
    df = df.sort_values(["failed", registry.PATIENT, "_order"], ascending=[False, False, True], kind="stable")
    df = df.reset_index(drop=True)
    df["rank"] = range(1, len(df) + 1)
    failed = df["failed"].astype(bool)
    if threshold is None:
        df["flagged"] = pd.array([pd.NA] * len(df), dtype="Int64")
    else:
        df["flagged"] = ((df[registry.PATIENT] >= threshold) & ~failed).astype("Int64")
    df["error"] = [errors.get(u, "failed (no error recorded)") if f else ""
                   for u, f in zip(df[registry.STUDY_COL], failed, strict=True)]
    df["warning"] = ["" if f else (warnings or {}).get(str(u), "")
                     for u, f in zip(df[registry.STUDY_COL], failed, strict=True)]
    return df[list(WORKLIST_COLUMNS)]


def write_worklist(pred_dir: str | os.PathLike, *, model_dir: str | os.PathLike | None = None
                   ) -> tuple[pd.DataFrame, OperatingPoint]:
    """Write OUT/worklist.csv (+ sidecar) from predictions.csv and errors.csv; return it and the operating point."""
    pred_dir = Path(pred_dir)
    predictions = read_predictions(pred_dir)
    model_dir = Path(model_dir) if model_dir is not None else model_dir_of(pred_dir)
    point = operating_point(model_dir)
    if point.record is None:
        # once per model folder and process: a node writes a worklist per study (the sidecar keeps the reason)
        level = logging.INFO if str(model_dir) in _WARNED_NO_FLAG else logging.WARNING
        _WARNED_NO_FLAG.add(str(model_dir))
        log.log(level, "worklist without a flag: %s", point.reason)
    else:
        log.info("%s", describe(point.record))
    threshold = None if point.record is None else float(point.record["threshold"])
    table = worklist_table(predictions, read_errors(pred_dir), threshold, read_warnings(pred_dir))
    path = pred_dir / WORKLIST_CSV
    write_csv_atomic(path, table)
    write_sidecar(path, kind="worklist", inputs={"predictions": str(pred_dir / PREDICTIONS_CSV),
                                                 "model": str(model_dir) if model_dir else None},
                  counts={"studies": len(table), "failed": int(table["failed"].sum()),
                          "flagged": int(table["flagged"].fillna(0).sum()),
                          "warned": int((table["warning"] != "").sum())},
                  extra={"operating_point": point.record, "no_flag_reason": point.reason or None})
    return table, point
