"""The worklist's operating point: a patient-level threshold chosen on held-out predictions at training time.

- Held-out patient predictions (`heldout_patient_predictions`): the aggregator's studies are cut into
  `operating.heldout_folds` folds by study (stratified by patient_overall, seed `model.random_state`); for each
  fold an aggregator with the same config is trained on the other folds and predicts this fold's
  patient_overall. Every study thus gets a probability from a model that never saw it.
- Threshold (`choose_threshold`): the largest threshold t such that the share of positive studies with
  probability >= t is at least `operating.target_sensitivity` (scikit-learn `roc_curve`, every threshold kept).
  A study is flagged when its patient_overall >= t.
- Stored in the model folder's `aggregator/operating_point.json` (`OPERATING_FILE`) with the sensitivity and
  specificity it achieved on those predictions, and the predictions themselves in
  `aggregator/heldout_predictions.csv` (`HELDOUT_FILE`: StudyInstanceUID, fold, label, probability).
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
from sklearn.model_selection import StratifiedGroupKFold

from data_prep import registry
from data_prep.artifacts import write_csv_atomic, write_json_atomic
from data_prep.errors import InputError

logger = logging.getLogger("aggregation")

OPERATING_FILE = "operating_point.json"
HELDOUT_FILE = "heldout_predictions.csv"
FORMAT_VERSION = 1
MIN_FOLDS = 2
HELDOUT_COLUMNS = (registry.STUDY_COL, "fold", "label", "probability")
REQUIRED_KEYS = ("format_version", "target_sensitivity", "threshold", "sensitivity", "specificity",
                 "n_studies", "n_positive", "n_negative", "heldout_file")


def heldout_patient_predictions(features: pd.DataFrame, labels: pd.DataFrame,
                                config: Mapping[str, Any]) -> tuple[pd.DataFrame, str | None]:
    """Held-out patient_overall of every study of `features` (HELDOUT_COLUMNS), or an empty table and the reason."""
    from .model import StudyAggregator, _labels_for, _str_uids

    features = _str_uids(features)
    y = _labels_for(features, labels)[registry.PATIENT]
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    folds = min(int(config["operating"]["heldout_folds"]), n_pos, n_neg)
    if folds < MIN_FOLDS:
        return (pd.DataFrame(columns=list(HELDOUT_COLUMNS)),
                f"{n_pos} positive and {n_neg} negative aggregator studies: too few for {MIN_FOLDS} held-out folds")
    uids = features[registry.STUDY_COL].to_numpy()
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=int(config["model"]["random_state"]))
    parts = []
    for fold, (train_idx, val_idx) in enumerate(splitter.split(features, y.loc[uids].to_numpy(), groups=uids)):
        train = features.iloc[train_idx]
        model = StudyAggregator(config).fit(train, labels)
        pred = model.predict_proba(features.iloc[val_idx])
        parts.append(pd.DataFrame({registry.STUDY_COL: pred[registry.STUDY_COL].astype(str), "fold": fold,
                                   "label": y.loc[pred[registry.STUDY_COL].astype(str)].to_numpy(dtype=int),
                                   "probability": pred[registry.PATIENT].to_numpy(dtype=float)}))
    out = pd.concat(parts, ignore_index=True).set_index(registry.STUDY_COL)
    return out.loc[pd.unique(uids)].reset_index()[list(HELDOUT_COLUMNS)], None


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


def write_operating_point(directory: str | os.PathLike, features: pd.DataFrame, labels: pd.DataFrame,
                          config: Mapping[str, Any]) -> dict[str, Any]:
    """Compute the held-out predictions and the threshold; write HELDOUT_FILE and OPERATING_FILE; return the record."""
    directory = Path(directory)
    target = float(config["operating"]["target_sensitivity"])
    heldout, reason = heldout_patient_predictions(features, labels, config)
    write_csv_atomic(directory / HELDOUT_FILE, heldout)
    labels_arr = heldout["label"].to_numpy(dtype=int)
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "target_sensitivity": target, "threshold": None,
        "sensitivity": None, "specificity": None, "n_studies": int(len(heldout)),
        "n_positive": int(labels_arr.sum()), "n_negative": int((labels_arr == 0).sum()),
        "heldout_file": HELDOUT_FILE, "heldout_folds": int(heldout["fold"].nunique()) if len(heldout) else 0,
        "flag_rule": "patient_overall >= threshold"}
    if reason is None:
        record.update(choose_threshold(labels_arr, heldout["probability"].to_numpy(dtype=float), target))
        logger.info("operating point: patient_overall >= %.4f gives sensitivity %.3f, specificity %.3f on %d "
                    "held-out studies (target sensitivity %.2f)", record["threshold"], record["sensitivity"],
                    record["specificity"], len(heldout), target)
    else:
        record["reason"] = reason
        logger.warning("operating point not set: %s", reason)
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
    if threshold is None:
        return None, f"{path}: no threshold ({record.get('reason', 'no reason given')})"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InputError(path, f"threshold must be a number in [0, 1]; found {threshold!r}")
    return record, ""


def describe(record: Mapping[str, Any]) -> str:
    """One line for the log: the threshold and what it achieved on the held-out predictions."""
    return (f"operating point: flag patient_overall >= {record['threshold']:.4f} (held-out sensitivity "
            f"{record['sensitivity']:.3f}, specificity {record['specificity']:.3f} on {record['n_studies']} studies; "
            f"target sensitivity {record['target_sensitivity']:.2f})")
