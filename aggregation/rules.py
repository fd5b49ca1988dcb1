"""The calibrated max-score rule: the detector's one strong signal, kept monotone and almost free of parameters.

- Levels: p(C_L) = expit(c + d_L + a * max_score + b * cls_max + e * cls_missing), one fit over every study x
  level row. The slopes a, b are shared by the seven levels and bounded below by 0 (a higher box or
  classifier score never lowers a probability); the level offsets d_L carry the levels' base rates and are
  shrunk toward 0 (L2), so a level with two positives borrows from the others. cls_max is the vertebra
  classifier's score (0 where it is missing, and cls_missing = 1 there); with the classifier group off,
  or the detector group off, the rule uses the inputs its groups provide.
- Patient: p = expit(c + a * study_max_score + b * study_cls_max + e * cls_missing), study_max_score the
  highest box score of the study whatever its level (the user's "max box score" rule) and study_cls_max
  the highest level cls_max; then never below the largest level probability.
- With model.sample_weights "metric", each row weighs what it weighs in the per-study competition metric (its
  metric weight over its study's total: `aggregation.metric.per_study_weights`), so the fit aims at that metric;
  "none" fits unweighted. The penalty `candidates.l2` counts in rows of average weight.
One logistic fit with both scores (rather than a second rule for the classifier): a score that carries nothing
gets a slope of 0, so a useless classifier costs a parameter, not a candidate more to choose among on few studies.
The fitted rule is plain numbers (`MaxScoreRule.to_dict`), saved inside the aggregator's skops file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from data_prep.runs import registry

from .features import LEVEL_COL, selected_groups
from .metric import per_study_weights
from .monotone import fit_monotone_logistic

LEVEL_SCORE, STUDY_SCORE, CLS_SCORE, CLS_MISSING = "max_score", "study_max_score", "cls_max", "cls_missing"


def rule_inputs(config: Mapping[str, Any]) -> list[str]:
    """Return the rule's inputs for a config's feature groups: box score, classifier score and its missing flag."""
    groups = selected_groups(config)
    return [*([LEVEL_SCORE] if "detector" in groups else []),
            *([CLS_SCORE, CLS_MISSING] if "classifier" in groups else [])]


def _columns(n: int, score: np.ndarray | None, cls: np.ndarray | None) -> np.ndarray:
    """Stack the rule's input columns for n rows: score, then cls (NaN as 0) and its missing flag."""
    cols = [] if score is None else [np.asarray(score, dtype=float)]
    if cls is not None:
        cls = np.asarray(cls, dtype=float)
        cols += [np.nan_to_num(cls, nan=0.0), np.isnan(cls).astype(float)]
    return np.column_stack(cols) if cols else np.zeros((n, 0))


def level_inputs(features: pd.DataFrame, inputs: list[str]) -> np.ndarray:
    """Return the (rows, len(inputs)) level design of a long features table."""
    score = features[LEVEL_SCORE].to_numpy(dtype=float) if LEVEL_SCORE in inputs else None
    cls = features[CLS_SCORE].to_numpy(dtype=float) if CLS_SCORE in inputs else None
    return _columns(len(features), score, cls)


def patient_inputs(features: pd.DataFrame, inputs: list[str]) -> tuple[list[str], np.ndarray]:
    """Return (study order, (studies, len(inputs)) patient design) of a long features table."""
    g = features.groupby(registry.STUDY_COL, sort=False)
    uids = [str(u) for u in g.size().index]
    score = g[STUDY_SCORE].max().to_numpy(dtype=float) if LEVEL_SCORE in inputs else None
    cls = g[CLS_SCORE].max().to_numpy(dtype=float) if CLS_SCORE in inputs else None   # NaN when all levels NaN
    return uids, _columns(len(uids), score, cls)


class MaxScoreRule:
    """Monotone logistic calibration of the max box score (and cls_max) per level and for the patient."""

    def __init__(self, inputs: list[str], l2: float, sample_weights: str) -> None:
        self.inputs = list(inputs)
        self.l2 = float(l2)
        self.sample_weights = sample_weights
        self.level_: dict[str, Any] = {}
        self.patient_: dict[str, Any] = {}

    def _study_weights(self, y_wide: pd.DataFrame) -> pd.DataFrame | None:
        """Per-study normalised metric weights (study x TARGETS), or None when unweighted."""
        if self.sample_weights != "metric":
            return None
        y = y_wide[list(registry.TARGETS)].to_numpy(dtype=float)
        return pd.DataFrame(per_study_weights(y), index=y_wide.index, columns=list(registry.TARGETS))

    def fit(self, features: pd.DataFrame, y_wide: pd.DataFrame) -> MaxScoreRule:
        """Fit the level and patient logistic fits on a long features table and labels indexed by study."""
        increasing = np.array([c != CLS_MISSING for c in self.inputs])
        weights = self._study_weights(y_wide)
        X = level_inputs(features, self.inputs)
        idx = np.array([registry.level_index(lv) for lv in features[LEVEL_COL]])
        onehot = np.eye(len(registry.LEVELS))[idx]
        row_uids = features[registry.STUDY_COL].astype(str).to_numpy()
        y = y_wide.loc[row_uids, list(registry.LEVELS)].to_numpy()[np.arange(len(features)), idx].astype(float)
        w = None if weights is None else weights.loc[row_uids, list(registry.LEVELS)].to_numpy()[
            np.arange(len(features)), idx]
        coef, c = fit_monotone_logistic(np.column_stack([X, onehot]), y, weights=w,
                                        increasing=np.r_[increasing, np.zeros(len(registry.LEVELS), bool)],
                                        penalised=np.ones(X.shape[1] + len(registry.LEVELS), bool), l2=self.l2)
        k = X.shape[1]
        self.level_ = {"coef": coef[:k].tolist(), "offsets": coef[k:].tolist(), "intercept": c}
        uids, Xp = patient_inputs(features, self.inputs)
        yp = y_wide.loc[uids, registry.PATIENT].to_numpy(dtype=float)
        wp = None if weights is None else weights.loc[uids, registry.PATIENT].to_numpy()
        coef, c = fit_monotone_logistic(Xp, yp, weights=wp, increasing=increasing,
                                        penalised=np.ones(Xp.shape[1], bool), l2=self.l2)
        self.patient_ = {"coef": coef.tolist(), "intercept": c}
        return self

    def predict_wide(self, features: pd.DataFrame) -> pd.DataFrame:
        """Return StudyInstanceUID, C1..C7, patient_overall (patient never below the largest level)."""
        from scipy.special import expit

        X = level_inputs(features, self.inputs)
        idx = np.array([registry.level_index(lv) for lv in features[LEVEL_COL]])
        z = self.level_["intercept"] + X @ np.asarray(self.level_["coef"]) + np.asarray(self.level_["offsets"])[idx]
        long = pd.DataFrame({registry.STUDY_COL: features[registry.STUDY_COL].astype(str).to_numpy(),
                             LEVEL_COL: features[LEVEL_COL].to_numpy(), "p": expit(z)})
        uids, Xp = patient_inputs(features, self.inputs)
        wide = long.pivot(index=registry.STUDY_COL, columns=LEVEL_COL, values="p").loc[uids, list(registry.LEVELS)]
        patient = expit(self.patient_["intercept"] + Xp @ np.asarray(self.patient_["coef"]))
        wide[registry.PATIENT] = np.maximum(patient, wide.to_numpy().max(axis=1))
        return wide.rename_axis(index=registry.STUDY_COL, columns=None).reset_index()

    def to_dict(self) -> dict[str, Any]:
        """Return the fitted rule as plain numbers (saved in the aggregator's skops file)."""
        return {"inputs": self.inputs, "l2": self.l2, "sample_weights": self.sample_weights,
                "level": self.level_, "patient": self.patient_}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaxScoreRule:
        """Rebuild a fitted rule from `to_dict`'s output."""
        rule = cls(list(d["inputs"]), float(d["l2"]), str(d["sample_weights"]))
        rule.level_, rule.patient_ = dict(d["level"]), dict(d["patient"])
        return rule
