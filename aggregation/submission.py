"""predictions.csv and the Kaggle submission.csv: complete by construction.

A study that is missing from the model's predictions, has a missing probability, or whose processing
failed gets the training prior for all eight targets and `failed = 1` in predictions.csv; each is logged.
So a submission always holds every requested row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import write_csv_atomic
from data_prep.runs.tables import read_table

logger = logging.getLogger("aggregation")


FAILED_COL = "failed"
ROW_ID = "row_id"
FRACTURED = "fractured"
TEST_REQUIRED: tuple[str, ...] = (ROW_ID,)


class _StrictRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PriorRate = Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
Prior = create_model("Prior", __base__=_StrictRecord, __doc__="prior.json: the training positive rate of "
                     "each of the eight targets, finite and strictly in (0, 1).",
                     **{t: (PriorRate, ...) for t in registry.TARGETS})


def validate_prior(data: Any, path: str | os.PathLike | None = None) -> dict[str, float]:
    """Return the eight prior rates in competition order; raise InputError naming the file and the bad target."""
    if not isinstance(data, Mapping):
        raise InputError(path, f"the prior must be a JSON object {{target: rate}}, found {type(data).__name__}")
    try:
        prior = Prior.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                problems.append(f"target {key} is missing")
            elif err["type"] == "extra_forbidden":
                problems.append(f"{key!r} is not a target ({', '.join(registry.TARGETS)})")
            else:
                problems.append(f"{key} = {err.get('input')!r}: must be a finite number strictly between 0 and 1")
        raise InputError(path, "invalid prior: " + "; ".join(problems)) from None
    return {t: float(getattr(prior, t)) for t in registry.TARGETS}


def load_prior(path: str | os.PathLike) -> dict[str, float]:
    """Read and validate a prior.json (a model folder's training prior)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "prior not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    return validate_prior(data, path)


def model_prior(labels: pd.DataFrame) -> dict[str, float]:
    """Return the training prior kept in a model folder: positive rates kept off exactly 0 and 1 (finite loss)."""
    return {t: float(np.clip(p, registry.PROB_CLIP, 1.0 - registry.PROB_CLIP))
            for t, p in training_prior(labels).items()}


def training_prior(labels: pd.DataFrame) -> dict[str, float]:
    """Return the positive rate of each of the eight targets in train.csv-style labels."""
    missing = [c for c in registry.TARGETS if c not in labels.columns]
    if missing:
        raise InputError(None, f"labels lack column(s) {', '.join(missing)}")
    if labels.empty:
        raise InputError(None, "labels are empty: no prior can be computed")
    return {t: float(labels[t].astype(float).mean()) for t in registry.TARGETS}


def prior_predictions(prior: Mapping[str, float], studies: Iterable[str]) -> pd.DataFrame:
    """Return a predictions table giving every study the prior (the constant-prior baseline)."""
    uids = [str(u) for u in studies]
    return pd.DataFrame({registry.STUDY_COL: uids, **{t: [float(prior[t])] * len(uids) for t in registry.TARGETS}})


def complete_predictions(predictions: pd.DataFrame, *, studies: Iterable[str], prior: Mapping[str, float],
                         failed: Iterable[str] = ()) -> pd.DataFrame:
    """Return predictions for exactly `studies` (in order), prior-filled and flagged where missing or failed."""
    missing_t = [t for t in registry.TARGETS if t not in prior]
    if missing_t:
        raise ValueError(f"prior lacks target(s) {', '.join(missing_t)}")
    if predictions.empty and not len(predictions.columns):      # nothing predicted at all: every study gets the prior
        predictions = pd.DataFrame(columns=[registry.STUDY_COL, *registry.TARGETS])
    cols = [c for c in (registry.STUDY_COL, *registry.TARGETS) if c not in predictions.columns]
    if cols:
        raise InputError(None, f"predictions lack column(s) {', '.join(cols)}")
    uids = list(dict.fromkeys(str(u) for u in studies))
    pred = predictions.assign(**{registry.STUDY_COL: predictions[registry.STUDY_COL].astype(str)})
    pred = pred.drop_duplicates(registry.STUDY_COL, keep="last").set_index(registry.STUDY_COL)
    out = pred.reindex(uids)[list(registry.TARGETS)].astype(float)
    failed_set = {str(u) for u in failed}
    absent = out.isna().any(axis=1).to_numpy()
    flagged = absent | np.array([u in failed_set for u in uids], dtype=bool)
    for uid, gone in zip(np.array(uids)[flagged], absent[flagged], strict=True):
        reason = "no prediction" if gone and uid not in failed_set else "processing failed"
        logger.warning("study %s: %s; submitting the training prior", uid, reason)
    out.loc[flagged] = np.array([float(prior[t]) for t in registry.TARGETS])
    out = out.clip(0.0, 1.0).reset_index().rename(columns={"index": registry.STUDY_COL})
    out[FAILED_COL] = flagged.astype(int)
    return out


def read_test_csv(test_csv: str | os.PathLike) -> pd.DataFrame:
    """Read Kaggle test.csv (row_id[, StudyInstanceUID, prediction_type]) and check every row_id parses."""
    df = read_table(test_csv, "test")
    parsed = [registry.split_row_id(r) for r in df[ROW_ID]]
    df["_uid"], df["_target"] = [u for u, _ in parsed], [t for _, t in parsed]
    return df


def make_submission(predictions: pd.DataFrame, *, test_csv: Path | pd.DataFrame | None, prior: Mapping[str, float],
                    failed: set[str]) -> pd.DataFrame:
    """Return row_id,fractured: the row_ids of test.csv in its order when given, else 8 rows per predicted study.

    `test_csv` is a path or a table already read with `read_test_csv`. Every row gets a finite
    probability in [0, 1] (the prior where the model has none); anything else is a bug and raises.
    """
    if test_csv is not None:
        test = test_csv if isinstance(test_csv, pd.DataFrame) else read_test_csv(test_csv)
        studies = list(dict.fromkeys(test["_uid"]))
        full = complete_predictions(predictions, studies=studies, prior=prior, failed=failed)
        table = full.set_index(registry.STUDY_COL)
        values = [float(table.at[u, t]) for u, t in zip(test["_uid"], test["_target"], strict=True)]
        submission = pd.DataFrame({ROW_ID: test[ROW_ID].to_numpy(), FRACTURED: values})
    else:
        predicted = predictions[registry.STUDY_COL].astype(str) if registry.STUDY_COL in predictions.columns else []
        studies = list(dict.fromkeys([*predicted, *sorted(map(str, failed))]))
        full = complete_predictions(predictions, studies=studies, prior=prior, failed=failed)
        submission = submission_from_predictions(full)
    values = submission[FRACTURED].to_numpy(dtype=float)
    bad = ~(np.isfinite(values) & (values >= 0.0) & (values <= 1.0))
    if bad.any():
        raise ValueError(f"submission row {submission[ROW_ID].iloc[int(np.argmax(bad))]} has probability "
                         f"{values[bad][0]!r}, not a finite number in [0, 1]")
    return submission


def submission_from_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Return the 8-rows-per-study submission (study order kept, targets in competition order)."""
    rows = [(registry.row_id(str(u), t), float(p))
            for u, *ps in predictions[[registry.STUDY_COL, *registry.TARGETS]].itertuples(index=False)
            for t, p in zip(registry.TARGETS, ps, strict=True)]
    return pd.DataFrame(rows, columns=[ROW_ID, FRACTURED])


def predictions_from_submission(submission: pd.DataFrame, path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Return the wide predictions table (StudyInstanceUID, C1..C7, patient_overall) from row_id,fractured."""
    for c in (ROW_ID, FRACTURED):
        if c not in submission.columns:
            raise InputError(path, f"submission lacks column {c}")
    try:
        parsed = [registry.split_row_id(str(r)) for r in submission[ROW_ID]]
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    long = pd.DataFrame({registry.STUDY_COL: [u for u, _ in parsed], "target": [t for _, t in parsed],
                         FRACTURED: submission[FRACTURED].astype(float).to_numpy()})
    if long.duplicated([registry.STUDY_COL, "target"]).any():
        raise InputError(path, "submission holds a row_id more than once")
    wide = long.pivot(index=registry.STUDY_COL, columns="target", values=FRACTURED)
    missing = [t for t in registry.TARGETS if t not in wide.columns]
    incomplete = wide.index[wide.reindex(columns=list(registry.TARGETS)).isna().any(axis=1)]
    if missing or len(incomplete):
        uid = incomplete[0] if len(incomplete) else "every study"
        raise InputError(path, f"submission is incomplete: {uid} lacks some of {', '.join(registry.TARGETS)}")
    order = pd.unique(long[registry.STUDY_COL])
    return wide.loc[order, list(registry.TARGETS)].reset_index().rename_axis(columns=None)


def write_predictions(predictions: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write predictions.csv (StudyInstanceUID, C1..C7, patient_overall, failed) atomically."""
    cols = [registry.STUDY_COL, *registry.TARGETS, FAILED_COL]
    df = predictions if FAILED_COL in predictions.columns else predictions.assign(**{FAILED_COL: 0})
    return write_csv_atomic(path, df[cols])


def write_submission(submission: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write submission.csv (row_id, fractured) atomically."""
    return write_csv_atomic(path, submission[[ROW_ID, FRACTURED]])
