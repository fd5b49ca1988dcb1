"""The worklist's operating point: a patient-level threshold chosen on out-of-fold predictions at training time.

- Out-of-fold patient predictions: those of the candidate the aggregator chose (`aggregation.candidates`):
  the aggregator's studies cut `candidates.repeats` times into `operating.heldout_folds` folds by study
  (stratified by patient_overall), every study predicted by a candidate fitted without it, once per repeat.
- Threshold (`choose_threshold`): the largest threshold t such that the share of positive rows with
  probability >= t is at least `operating.target_sensitivity` (scikit-learn `roc_curve`, every threshold kept).
  A study is flagged when its patient_overall >= t.
- Unreachable: when that threshold also flags every negative row (specificity 0, e.g. a constant prior), the
  model cannot reach the target on its training studies: the file stores `threshold` null, `unreachable` true
  and a `reason` ("the model cannot reach sensitivity X on its training studies ..."), and the worklist and
  the report say so instead of flagging everything.
- Stored in the model folder's `aggregator/operating_point.json` (`OPERATING_FILE`) with the sensitivity and
  specificity it achieved on those predictions, and the predictions themselves in
  `aggregator/heldout_predictions.csv` (`HELDOUT_FILE`: StudyInstanceUID, repeat, fold, label, probability).
- Too few positives or negatives for two folds: the file is still written, with `threshold` null and a `reason`
  (the worklist is then written without a flag).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from data_prep.errors import InputError
from data_prep.runs.artifacts import write_csv_atomic, write_json_atomic

from .candidates import HELDOUT_COLUMNS

logger = logging.getLogger("aggregation")

OPERATING_FILE = "operating_point.json"
HELDOUT_FILE = "heldout_predictions.csv"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "target_sensitivity", "threshold", "sensitivity", "specificity",
                 "n_studies", "n_positive", "n_negative", "heldout_file")


def unreachable_reason(target: float, n_studies: int) -> str:
    """The reason stored (and shown in the worklist and report) when no threshold reaches `target` with specificity > 0."""
    return (f"the model cannot reach sensitivity {target:g} on its training studies ({n_studies} studies out of "
            "fold: every threshold reaching it flags every negative study); no flag")


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, target: float) -> dict[str, float]:
    """The largest threshold reaching `target` sensitivity, with the sensitivity and specificity it achieves."""
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    fpr, tpr, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    k = int(np.argmax(tpr >= target - 1e-12))          # thresholds fall as tpr rises: the first hit is the largest
    threshold = float(min(thresholds[k], 1.0))          # roc_curve's first threshold is +inf (nobody flagged)
    return {"threshold": threshold, **achieved(labels, probabilities, threshold)}


def achieved(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of flagging `probabilities >= threshold` against 0/1 `labels`."""
    labels = np.asarray(labels, dtype=int)
    flagged = np.asarray(probabilities, dtype=float) >= threshold
    pos, neg = labels == 1, labels == 0
    sens = float(flagged[pos].mean()) if pos.any() else math.nan
    spec = float((~flagged[neg]).mean()) if neg.any() else math.nan
    return {"sensitivity": sens, "specificity": spec}


def write_operating_point(directory: str | os.PathLike, heldout: pd.DataFrame, reason: str | None,
                          config: Mapping[str, Any]) -> dict[str, Any]:
    """Choose the threshold from out-of-fold patient rows (HELDOUT_COLUMNS); write HELDOUT_FILE and OPERATING_FILE.

    `reason` (why there are no rows) is stored when `heldout` is empty. Returns the stored record.
    """
    directory = Path(directory)
    target = float(config["operating"]["target_sensitivity"])
    heldout = heldout[list(HELDOUT_COLUMNS)]
    write_csv_atomic(directory / HELDOUT_FILE, heldout)
    labels_arr = heldout["label"].to_numpy(dtype=int)
    first = heldout[heldout["repeat"] == 0] if len(heldout) else heldout
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "target_sensitivity": target, "threshold": None,
        "sensitivity": None, "specificity": None, "n_studies": int(len(first)),
        "n_positive": int(first["label"].sum()), "n_negative": int((first["label"] == 0).sum()),
        "heldout_file": HELDOUT_FILE, "heldout_folds": int(heldout["fold"].nunique()) if len(heldout) else 0,
        "heldout_repeats": int(heldout["repeat"].nunique()) if len(heldout) else 0,
        "unreachable": False, "flag_rule": "patient_overall >= threshold"}
    if len(heldout) and len(np.unique(labels_arr)) == 2:
        point = choose_threshold(labels_arr, heldout["probability"].to_numpy(dtype=float), target)
        record.update(point)
        if point["specificity"] <= 0.0:
            record.update(threshold=None, unreachable=True, reason=unreachable_reason(target, record["n_studies"]),
                          unreachable_threshold=point["threshold"])
            logger.warning("operating point not set: %s", record["reason"])
        else:
            logger.info("operating point: patient_overall >= %.4f gives sensitivity %.3f, specificity %.3f on %d "
                        "out-of-fold rows (target sensitivity %.2f)", record["threshold"], record["sensitivity"],
                        record["specificity"], len(heldout), target)
    else:
        record["reason"] = reason or "no out-of-fold predictions with both classes"
        logger.warning("operating point not set: %s", record["reason"])
    write_json_atomic(directory / OPERATING_FILE, record)
    return record


def read_operating_point(directory: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """The stored operating point of an aggregator folder, or None and why there is none (an old model folder)."""
    path = Path(directory) / OPERATING_FILE
    if not path.is_file():
        return None, (f"{path} not found: the model was trained before operating points existed "
                      "(retrain with spinefrac train to get one)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise InputError(path, f"lacks key(s) {', '.join(missing)}")
    threshold = record["threshold"]
    if threshold is None and record.get("unreachable"):
        return None, str(record.get("reason") or unreachable_reason(float(record["target_sensitivity"]),
                                                                    int(record["n_studies"])))
    if threshold is None:
        return None, f"{path}: no threshold ({record.get('reason', 'no reason given')})"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InputError(path, f"threshold must be a number in [0, 1]; found {threshold!r}")
    return record, ""


def describe(record: Mapping[str, Any]) -> str:
    """One line for the log: the threshold and what it achieved on the held-out predictions."""
    return (f"operating point: flag patient_overall >= {record['threshold']:.4f} (out-of-fold sensitivity "
            f"{record['sensitivity']:.3f}, specificity {record['specificity']:.3f} on {record['n_studies']} studies; "
            f"target sensitivity {record['target_sensitivity']:.2f})")
