"""The RSNA 2022 competition metric: weighted log loss over C1-C7 and patient_overall.

Row weights come from `data_prep.runs.registry` through `label_weights` (which the StudyAggregator also uses as
sample weights): a vertebra row weighs 1 when negative and 2 when positive, `patient_overall` 7 when
negative and 14 when positive. Probabilities are clipped to
[PROB_CLIP, 1 - PROB_CLIP]. Two normalisations are reported:

- `competition_loss`: per study, the weighted mean of its eight row losses; then the mean over studies.
- `global_loss`: the weighted mean over every row of every study at once (one normaliser for all).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.errors import InputError
from data_prep.runs import registry


def label_weights(y: np.ndarray, *, patient: bool = False) -> np.ndarray:
    """Return the metric weight of each 0/1 label: of a vertebra row (C1..C7), or of patient_overall when `patient`."""
    neg, pos = ((registry.WEIGHT_PATIENT_NEG, registry.WEIGHT_PATIENT_POS) if patient
                else (registry.WEIGHT_LEVEL_NEG, registry.WEIGHT_LEVEL_POS))
    return np.where(np.asarray(y, dtype=float) > 0.5, pos, neg)


def row_weights(y: np.ndarray) -> np.ndarray:
    """Return the metric weight of every entry of an (n_studies, 8) 0/1 label matrix in TARGETS order."""
    y = np.asarray(y, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(registry.TARGETS):
        raise ValueError(f"labels must be (n_studies, {len(registry.TARGETS)}) in TARGETS order, got {y.shape}")
    n_levels = len(registry.LEVELS)
    return np.column_stack([label_weights(y[:, :n_levels]), label_weights(y[:, n_levels:], patient=True)])


def per_study_weights(y: np.ndarray) -> np.ndarray:
    """Return each entry's weight in `competition_loss`: its metric weight over its study's total weight ((n, 8)).

    A weighted mean of row losses with these weights, times the number of studies, is the competition metric: a
    fit minimising it aims at that metric exactly (the raw weights, 7 / 14 for patient_overall, aim at the
    globally normalised one and overshoot the per-study metric's patient rate).
    """
    w = row_weights(y)
    return w / w.sum(axis=1, keepdims=True)


def row_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Return the unweighted binary log loss of every entry, with probabilities clipped as in the competition."""
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), registry.PROB_CLIP, 1.0 - registry.PROB_CLIP)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def aligned_arrays(labels: pd.DataFrame, preds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return (y, p) as (n_studies, 8) arrays for the studies of `labels`, in label order; check columns."""
    for name, df in (("labels", labels), ("predictions", preds)):
        missing = [c for c in (registry.STUDY_COL, *registry.TARGETS) if c not in df.columns]
        if missing:
            raise InputError(None, f"{name} table lacks column(s) {', '.join(missing)}")
    if preds[registry.STUDY_COL].duplicated().any():
        dup = preds.loc[preds[registry.STUDY_COL].duplicated(), registry.STUDY_COL].iloc[0]
        raise InputError(None, f"predictions hold study {dup} more than once")
    p_tab = preds.set_index(registry.STUDY_COL)[list(registry.TARGETS)]
    uids = labels[registry.STUDY_COL].astype(str)
    absent = sorted(set(uids) - set(p_tab.index.astype(str)))
    if absent:
        raise InputError(None, f"{len(absent)} labelled studies have no prediction, e.g. {', '.join(absent[:3])}")
    p_tab.index = p_tab.index.astype(str)
    p = p_tab.loc[uids.to_numpy()].to_numpy(dtype=float)
    if np.isnan(p).any():
        raise InputError(None, "predictions hold missing (NaN) probabilities")
    y = labels[list(registry.TARGETS)].to_numpy(dtype=float)
    return y, p


def competition_loss(labels: pd.DataFrame, preds: pd.DataFrame) -> float:
    """Return the per-study-normalised weighted log loss (mean over the studies of `labels`)."""
    y, p = aligned_arrays(labels, preds)
    return competition_loss_arrays(y, p)


def global_loss(labels: pd.DataFrame, preds: pd.DataFrame) -> float:
    """Return the globally normalised weighted log loss (sum of weighted losses / sum of weights)."""
    y, p = aligned_arrays(labels, preds)
    return global_loss_arrays(y, p)


def competition_loss_arrays(y: np.ndarray, p: np.ndarray) -> float:
    """Return the per-study-normalised metric from (n_studies, 8) label and probability arrays."""
    w = row_weights(y)
    per_study = (w * row_losses(y, p)).sum(axis=1) / w.sum(axis=1)
    return float(per_study.mean())


def global_loss_arrays(y: np.ndarray, p: np.ndarray) -> float:
    """Return the globally normalised metric from (n_studies, 8) label and probability arrays."""
    w = row_weights(y)
    return float((w * row_losses(y, p)).sum() / w.sum())
