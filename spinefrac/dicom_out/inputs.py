"""What the DICOM results are made of: the documented files of a prediction folder, read and checked once.

Reads predictions.csv, boxes.csv, slices.csv (with `sop_instance_uid`), series.csv, overlays/<key>/ and the header
of each study's `example_file` (docs/contracts.md "Detection outputs", "Study-level outputs", "DICOM results").
Every problem of every requested study is collected first and raised as one `InputError`, before anything is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import pandas as pd
import pandera.pandas as pa
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.tables import FINITE, INTEGRAL, NOT_BLANK, read_csv_table, validate_frame
from detector.detect_outputs import BOXES_CSV, SERIES_CSV, SLICES_CSV, SOP_UID_COL, overlay_dir
from detector.overlays import SLICE_PNG_PATTERN
from spinefrac.report.worklist import PREDICTIONS_CSV, PREDICTIONS_SCHEMA

log = logging.getLogger("spinefrac")


MIN_BOX_SCORE = 0.05
"""Boxes below this detector score are left out of the SR (the overlays' default `overlays.min_score`: a box that
is not drawn on an overlay is not reported either)."""
MAX_BOXES = 100
"""At most this many boxes per study go into the SR, the highest scores first (ties keep boxes.csv order)."""

BOX_COLUMNS = (registry.STUDY_COL, "slice_index", "x", "y", "width", "height", "score")
SLICE_COLUMNS = (registry.STUDY_COL, "slice_number", "slice_index", SOP_UID_COL)
SERIES_COLUMNS = (registry.STUDY_COL, "dicom_study_uid", "series_uid", "series_number", "description",
                  "chosen", "example_file", "sop_class_uid")
TEXT_COLUMNS = (registry.STUDY_COL, SOP_UID_COL, "dicom_study_uid", "series_uid", "description", "modality",
                "reason", "example_file", "sop_class_uid", "level")
"""Columns read as text (UIDs must keep every digit; empty cells stay empty strings)."""


def _level_or_empty(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str).isin(("", *registry.LEVELS))


UID_TEXT = pa.Column(str, NOT_BLANK, nullable=False)

BOXES_SCHEMA = pa.DataFrameSchema(
    {registry.STUDY_COL: UID_TEXT,
     "slice_index": pa.Column(float, [INTEGRAL, pa.Check.ge(0)], coerce=True, nullable=False),
     "x": pa.Column(float, FINITE, coerce=True, nullable=False),
     "y": pa.Column(float, FINITE, coerce=True, nullable=False),
     "width": pa.Column(float, [FINITE, pa.Check.gt(0)], coerce=True, nullable=False),
     "height": pa.Column(float, [FINITE, pa.Check.gt(0)], coerce=True, nullable=False),
     "score": pa.Column(float, pa.Check.in_range(0.0, 1.0), coerce=True, nullable=False),
     "level": pa.Column(str, pa.Check(_level_or_empty, error="must be C1..C7 or empty"), nullable=True,
                        required=False)},
    strict=False, name=BOXES_CSV)
SLICES_SCHEMA = pa.DataFrameSchema(
    {registry.STUDY_COL: UID_TEXT,
     "slice_number": pa.Column(float, INTEGRAL, coerce=True, nullable=False),
     "slice_index": pa.Column(float, [INTEGRAL, pa.Check.ge(0)], coerce=True, nullable=False),
     SOP_UID_COL: pa.Column(str, nullable=False)},       # empty when the slice's file has no SOPInstanceUID
    unique=[registry.STUDY_COL, "slice_index"], report_duplicates="all", strict=False, name=SLICES_CSV)
SERIES_SCHEMA = pa.DataFrameSchema(
    {registry.STUDY_COL: UID_TEXT, "dicom_study_uid": UID_TEXT, "series_uid": pa.Column(str, nullable=False),
     "chosen": pa.Column(int, pa.Check.isin([0, 1], error="must be 0 or 1"), coerce=True, nullable=False)},
    strict=False, name=SERIES_CSV)
"""The parts of boxes.csv, slices.csv and series.csv this package relies on; other columns pass unchecked."""


@dataclass(frozen=True)
class SourceSeries:
    """The series a study was read from (its series.csv row with chosen = 1) and the header of its first slice."""

    dicom_study_uid: str
    series_uid: str
    sop_class_uid: str
    example_file: Path
    header: Dataset


@dataclass(frozen=True)
class Overlay:
    """One top-slice PNG of overlays/<key>/: its rank, slice number and the source slice's SOPInstanceUID."""

    rank: int
    slice_number: int
    path: Path
    sop_instance_uid: str | None


@dataclass(frozen=True)
class StudyInputs:
    """Everything one study's SR and SC are made of."""

    key: str
    probabilities: dict[str, float]
    source: SourceSeries
    boxes: pd.DataFrame
    """The reported boxes (BOX_COLUMNS, `level` ('' when unknown), `sop_instance_uid` of the box's slice)."""
    overlays: tuple[Overlay, ...]


@dataclass(frozen=True)
class PredictionFolder:
    """The tables of a prediction folder, validated, indexed by study key."""

    path: Path
    predictions: pd.DataFrame
    boxes: pd.DataFrame | None
    slices: pd.DataFrame | None
    series: pd.DataFrame | None

    def failed(self, key: str) -> bool:
        """Whether predictions.csv marks the study failed."""
        return bool(self.predictions.loc[key, "failed"])


def read_prediction_folder(pred_dir: str | os.PathLike, keys: Sequence[str] | None) -> PredictionFolder:
    """Read and validate predictions.csv (+ boxes, slices, series when a study needs them); InputError names the file."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(pred_dir, ("is a file" if pred_dir.exists() else "not found") +
                         ": expected a prediction folder (written by spinefrac predict)")
    predictions = _read(pred_dir / PREDICTIONS_CSV, PREDICTIONS_SCHEMA, ())
    predictions = predictions.set_index(registry.STUDY_COL, drop=False)
    wanted = list(predictions.index) if keys is None else list(keys)
    unknown = [k for k in wanted if k not in predictions.index]
    if unknown:
        raise InputError(pred_dir / PREDICTIONS_CSV, f"has no row for study {', '.join(map(repr, unknown))}")
    if all(bool(predictions.loc[k, "failed"]) for k in wanted):   # nothing to write: no other table needed
        return PredictionFolder(pred_dir, predictions, None, None, None)
    boxes = _read(pred_dir / BOXES_CSV, BOXES_SCHEMA, BOX_COLUMNS)
    if "level" not in boxes.columns:
        boxes["level"] = ""
    boxes["level"] = boxes["level"].fillna("").astype(str)
    slices = _read(pred_dir / SLICES_CSV, SLICES_SCHEMA, SLICE_COLUMNS)
    series = _read(pred_dir / SERIES_CSV, SERIES_SCHEMA, SERIES_COLUMNS)
    return PredictionFolder(pred_dir, predictions, boxes, slices, series)


def study_inputs(folder: PredictionFolder, key: str) -> StudyInputs:
    """Gather one finished study's inputs and read its source header; InputError names the file and the study."""
    assert folder.boxes is not None and folder.slices is not None and folder.series is not None
    row = folder.predictions.loc[key]
    probabilities = {t: float(row[t]) for t in registry.TARGETS}
    slices = folder.slices[folder.slices[registry.STUDY_COL] == key]
    if slices.empty:
        raise InputError(folder.path / SLICES_CSV, f"study {key}: no rows (a finished study has one per slice)")
    uid_of_index = dict(zip(slices["slice_index"].astype(int), slices[SOP_UID_COL], strict=True))
    source = _source_series(folder, key, uid_of_index)
    boxes = _study_boxes(folder, key, uid_of_index)
    return StudyInputs(key, probabilities, source, boxes, _overlays(folder.path, key, slices))


def _read(path: Path, schema: pa.DataFrameSchema, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV with UIDs as text and floats exactly as written (round trip), then validate it."""
    df = read_csv_table(path, required, schema.name, dtype={c: str for c in TEXT_COLUMNS},
                        keep_default_na=False, na_values={c: [""] for c in ("x", "y", "width", "height", "score")},
                        float_precision="round_trip")
    return validate_frame(df, schema, path=path, name=str(schema.name))


def _source_series(folder: PredictionFolder, key: str, uid_of_index: dict[int, str]) -> SourceSeries:
    """The chosen series of a study and its example file's header (which must be slice_index 0's file)."""
    path = folder.path / SERIES_CSV
    assert folder.series is not None
    rows = folder.series[(folder.series[registry.STUDY_COL] == key) & (folder.series["chosen"] == 1)]
    if len(rows) != 1:
        raise InputError(path, f"study {key}: {len(rows)} rows with chosen = 1 (expected exactly one: the series read)")
    rec = rows.iloc[0]
    example = Path(str(rec["example_file"]))
    if not str(rec["example_file"]).strip():
        raise InputError(path, f"study {key}: the chosen series has no example_file")
    if not str(rec["sop_class_uid"]).strip():
        raise InputError(path, f"study {key}: the chosen series has no sop_class_uid")
    try:
        header = dcmread(example, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError, KeyError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise InputError(example, f"study {key}: cannot read the source DICOM header named by {path} "
                                  f"({reason}); the results copy the patient and study modules from it") from None
    found = {"StudyInstanceUID": (header.get("StudyInstanceUID"), rec["dicom_study_uid"])}
    if uid_of_index.get(0):               # empty when the file has no SOPInstanceUID
        found["SOPInstanceUID"] = (header.get("SOPInstanceUID"), uid_of_index[0])
    for keyword, (value, wanted) in found.items():
        if value is None or str(value) != str(wanted):
            raise InputError(example, f"study {key}: {keyword} {value} is not {wanted} ({SERIES_CSV} / {SLICES_CSV}): "
                                      "the source changed since the prediction (predict again)")
    series_uid = str(rec["series_uid"]).strip() or str(header.get("SeriesInstanceUID", "")).strip()
    if not series_uid:
        raise InputError(example, f"study {key}: the source series has no SeriesInstanceUID ({SERIES_CSV} nor the "
                                  "header): DICOM results cannot reference its images")
    return SourceSeries(str(rec["dicom_study_uid"]), series_uid, str(rec["sop_class_uid"]), example, header)


def _study_boxes(folder: PredictionFolder, key: str, uid_of_index: dict[int, str]) -> pd.DataFrame:
    """The study's reported boxes (score >= MIN_BOX_SCORE, at most MAX_BOXES, best first), each with its slice UID."""
    assert folder.boxes is not None
    boxes = folder.boxes[folder.boxes[registry.STUDY_COL] == key]
    boxes = boxes[boxes["score"] >= MIN_BOX_SCORE].sort_values("score", ascending=False, kind="stable")
    boxes = boxes.head(MAX_BOXES).copy()
    boxes["slice_index"] = boxes["slice_index"].astype(int)
    unknown = sorted(set(boxes["slice_index"]) - set(uid_of_index))
    if unknown:
        raise InputError(folder.path / BOXES_CSV, f"study {key}: slice_index {unknown[:5]} not in {SLICES_CSV}")
    boxes[SOP_UID_COL] = boxes["slice_index"].map(uid_of_index)
    unnamed = boxes[SOP_UID_COL].str.strip() == ""
    if unnamed.any():
        log.warning("study %s: %d box(es) on slices whose file has no SOPInstanceUID (%s) are left out of the SR: "
                    "an image region must reference its image", key, int(unnamed.sum()), SLICES_CSV)
    return boxes[~unnamed].reset_index(drop=True)


def _overlays(pred_dir: Path, key: str, slices: pd.DataFrame) -> tuple[Overlay, ...]:
    """The study's top-slice PNGs in rank order (none when detect drew none)."""
    folder = overlay_dir(pred_dir, key)
    if not folder.is_dir():
        log.info("study %s: no %s folder: no secondary capture", key, folder)
        return ()
    uid_of_number = dict(zip(slices["slice_number"].astype(int), slices[SOP_UID_COL], strict=False))
    found = []
    for path in folder.iterdir():
        match = SLICE_PNG_PATTERN.match(path.name)
        if match:
            if not cv2.haveImageReader(str(path)):
                raise InputError(path, f"study {key}: not a PNG image OpenCV can read (overlay of the secondary capture)")
            number = int(match["slice_number"])
            found.append(Overlay(int(match["rank"]), number, path, uid_of_number.get(number) or None))
    return tuple(sorted(found, key=lambda o: (o.rank, o.slice_number)))
