"""StudyAggregator: calibrated gradient boosting from study x level features to C1-C7 and patient_overall.

- Level model: one `HistGradientBoostingClassifier` shared by the seven levels, with `level_idx` as a
  categorical feature (model.level_mode "shared", the default), or one model per level ("per_level").
- Patient model: the per-study `PATIENT_FEATURES` plus the level model's probabilities
  (`LEVEL_PREDICTION_FEATURES`). While fitting, those probabilities are out-of-fold (folds by study), so the
  patient model sees level predictions as noisy as at inference.
- Each model is wrapped in `CalibratedClassifierCV` (sigmoid or isotonic, internal stratified CV). On tiny data
  the folds shrink to the minority-class count; with fewer than two per class the booster is used
  uncalibrated, and with a single class a smoothed constant is predicted (never exactly 0 or 1).
- `patient_overall` is never below the largest level probability: a fracture at any level is a fracture.
- With model.monotone (the default), every feature that rises with a box or classifier score
  (`aggregation.features.FEATURE_SIGN`, and the level predictions the patient model reads) is constrained
  increasing (scikit-learn's `monotonic_cst`), a feature a rising score moves either way is left out, and a Platt
  calibrator with an inverted slope is clipped to a constant (`aggregation.monotone`): raising one score never
  lowers any of the eight outputs.
- Candidates (`aggregation.candidates`): `fit` also fits the constant prior and the max-score rule
  (`aggregation.rules`), compares them with this gradient-boosted model and their blend out of fold, and
  predicts with the chosen one (`chosen_`); every candidate keeps patient_overall >= the largest level.
- With model.sample_weights "metric", every model (boosters, calibrators, the out-of-fold level models) is
  fitted with each row's weight in the competition metric (`aggregation.metric.label_weights`: a level row
  1 negative / 2 positive, a patient row 7 / 14); "none" fits unweighted.
- The models use the features of features.groups only; a features table may carry the columns of other
  groups too (they are ignored), but a column no group knows, or a missing one, is a FeatureMismatchError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import GroupKFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import atomic_path, library_versions, write_json_atomic

from .blend import fit_blend, predict_blend
from .candidates import (
    AUTO,
    BLEND,
    CANDIDATES,
    CANDIDATES_FILE,
    GBM,
    HELDOUT_COLUMNS,
    MEMBERS,
    PRIOR,
    RULE,
    Comparison,
    compare,
    n_folds,
    read_table,
    write_table,
)
from .features import (
    FEATURE_GROUPS,
    LEVEL_COL,
    LEVEL_PREDICTION_FEATURES,
    MIXED,
    PRED_PREFIX,
    RISES,
    build_patient_features,
    level_feature_names,
    level_feature_signs,
    patient_feature_names,
    patient_feature_signs,
)
from .metric import label_weights
from .monotone import guard_sigmoid_calibration
from .rules import MaxScoreRule, rule_inputs

logger = logging.getLogger("aggregation")

MODEL_FILE = "aggregator.skops"
LEGACY_MODEL_FILE = "aggregator.joblib"
META_FILE = "aggregator.json"
FORMAT_VERSION = 2
TRUSTED_TYPES = frozenset({
    "aggregation.model.ConstantClassifier",
    "functools.partial",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.utils.validation.check_array",
})
"""Types beyond skops' defaults that a saved aggregator may hold; a file needing any other type is refused.
(`functools.partial` wraps `check_array` in the boosters' preprocessing; the function it wraps is checked too.)"""
LEVEL_IDX = "level_idx"
LEVEL_MODES = ("shared", "per_level")
CALIBRATION_METHODS = ("sigmoid", "isotonic", "none")
SAMPLE_WEIGHT_CHOICES = ("metric", "none")
MISSING_VALUE = -1.0
"""A missing feature (NaN, e.g. cls_* without a classifier) as the boosters see it: below every real feature value
(all are >= 0), so a split can still set it apart. Native NaN support is not used: scikit-learn's binning fails
on a column that is entirely NaN within one fit (seen with 1.9.1), which an internal fold can produce."""
LEGACY_SETTINGS: dict[str, dict[str, Any]] = {"features": {"groups": ["detector"]},
                                              "model": {"sample_weights": "none", "monotone": False},
                                              "candidates": {"choose": GBM}}
"""What a saved config without these keys meant (it was written before they existed); other absent keys take
today's defaults from configs/aggregation.yaml."""
MIN_CALIBRATION_FOLDS = 2
BUNDLE_CANDIDATE_KEYS = frozenset({"prior", "rule", "blend", "chosen"})
"""Keys a saved bundle holds beside level_models and patient_model since candidates (an older one has none)."""
CONSTANT_SMOOTHING = 0.5
"""Pseudo-count added to each class when a model sees a single class (Jeffreys-style smoothing)."""


class FeatureMismatchError(InputError):
    """Features given to (or expected by) a saved aggregator differ from those it was trained with."""


class ConstantClassifier(ClassifierMixin, BaseEstimator):
    """Predicts the smoothed training rate for every row; used when a fold holds a single class."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> ConstantClassifier:
        """Store the smoothed positive rate of `y`."""
        y = np.asarray(y, dtype=float)
        self.rate_ = float((y.sum() + CONSTANT_SMOOTHING) / (y.size + 2 * CONSTANT_SMOOTHING))
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return [1 - rate, rate] for every row."""
        n = len(X)
        return np.column_stack([np.full(n, 1.0 - self.rate_), np.full(n, self.rate_)])


def _model_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config["model"]


def fit_binary(X: np.ndarray, y: np.ndarray, *, categorical: np.ndarray | None,
               config: Mapping[str, Any], sample_weight: np.ndarray | None = None,
               monotonic: np.ndarray | None = None) -> Any:
    """Fit one calibrated HistGradientBoostingClassifier on (X, y), degrading gracefully on tiny data.

    `sample_weight` (one per row, or None) reaches the booster and, with calibration, both the boosters of
    the internal folds and the calibrators (scikit-learn's CalibratedClassifierCV routes it to both).
    `monotonic` (one of -1/0/1 per column, or None) becomes the booster's `monotonic_cst`; then a Platt
    calibrator never inverts it (`aggregation.monotone.guard_sigmoid_calibration`).
    """
    m = _model_section(config)
    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        logger.warning("a model sees a single class (%d rows, %d positive): predicting a smoothed constant",
                       y.size, counts[1])
        return ConstantClassifier().fit(X, y)
    booster = HistGradientBoostingClassifier(
        learning_rate=float(m["learning_rate"]), max_iter=int(m["max_iter"]),
        max_leaf_nodes=int(m["max_leaf_nodes"]), max_depth=m["max_depth"],
        min_samples_leaf=int(m["min_samples_leaf"]), l2_regularization=float(m["l2_regularization"]),
        categorical_features=categorical if categorical is not None and categorical.any() else None,
        monotonic_cst=None if monotonic is None or not np.any(monotonic) else np.asarray(monotonic, dtype=int),
        early_stopping=False, random_state=int(m["random_state"]))
    method = m["calibration"]
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"model.calibration must be one of {', '.join(CALIBRATION_METHODS)}, found {method!r}")
    folds = min(int(m["calibration_folds"]), int(counts.min()))
    if method == "none":
        return booster.fit(X, y, sample_weight=sample_weight)
    if folds < MIN_CALIBRATION_FOLDS:
        logger.warning("only %d rows of the minority class: boosting without calibration", counts.min())
        return booster.fit(X, y, sample_weight=sample_weight)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(m["random_state"]))
    model = CalibratedClassifierCV(booster, method=method, cv=cv).fit(X, y, sample_weight=sample_weight)
    if monotonic is not None and method == "sigmoid":
        guard_sigmoid_calibration(model, y, sample_weight)
    return model


def _positive_proba(model: Any, X: np.ndarray) -> np.ndarray:
    proba = model.predict_proba(X)
    return proba[:, list(model.classes_).index(1)] if proba.shape[1] > 1 else np.zeros(len(X))


class StudyAggregator:
    """Study-level fracture probabilities (C1..C7, patient_overall) from the long features table."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        if config is None:
            from data_prep.runs.config import load_config

            config = load_config("aggregation")
        self.config: dict[str, Any] = config.to_dict() if hasattr(config, "to_dict") else _plain(config)
        mode = self.config["model"]["level_mode"]
        if mode not in LEVEL_MODES:
            raise ValueError(f"model.level_mode must be one of {', '.join(LEVEL_MODES)}, found {mode!r}")
        weights = self.config["model"]["sample_weights"]
        if weights not in SAMPLE_WEIGHT_CHOICES:
            raise ValueError(f"model.sample_weights must be one of {', '.join(SAMPLE_WEIGHT_CHOICES)}, "
                             f"found {weights!r}")
        if "candidates" not in self.config:       # a config from before candidates: the booster, as it was
            from data_prep.runs.config import load_config

            self.config["candidates"] = {**load_config("aggregation")["candidates"].to_dict(),
                                         **LEGACY_SETTINGS["candidates"]}
        choose = self.config["candidates"]["choose"]
        if choose not in (AUTO, *CANDIDATES):
            raise ValueError(f"candidates.choose must be one of {', '.join((AUTO, *CANDIDATES))}, found {choose!r}")
        self.monotone = bool(self.config["model"].get("monotone", False))
        level_signs = level_feature_signs(self.config)
        patient_signs = patient_feature_signs(self.config)
        keep = (lambda sign: sign is not MIXED) if self.monotone else (lambda sign: True)
        self.level_features: list[str] = [c for c, sign in level_signs.items() if keep(sign)]
        self.known_level_features: set[str] = set(level_feature_names(self.config, groups=FEATURE_GROUPS))
        self.patient_features: list[str] = [c for c in (*patient_feature_names(self.config), *LEVEL_PREDICTION_FEATURES)
                                            if keep(patient_signs[c])]
        self._signs = {**level_signs, **patient_signs}
        self.level_models_: dict[str, Any] | None = None
        self.patient_model_: Any = None
        self.prior_: dict[str, float] | None = None
        self.rule_: dict[str, Any] | None = None
        self.blend_: dict[str, Any] | None = None
        self.chosen_: str = GBM
        self.comparison_: Comparison | None = None
        self.candidates_: pd.DataFrame | None = None
        self.comparison_note_: str = ""
        self.training_: dict[str, Any] = {}

    # ------------------------------------------------------------ fitting
    def _threads(self) -> Any:
        """Limit OpenMP threads while boosting (model.threads; null = library default)."""
        return threadpool_limits(limits=self.config["model"]["threads"])

    def fit(self, features: pd.DataFrame, labels: pd.DataFrame, *, compare_candidates: bool = True) -> StudyAggregator:
        """Fit every candidate on the features table and train.csv-style labels; choose one out of fold.

        With `compare_candidates` False (or candidates.choose naming a candidate other than the blend) no
        out-of-fold comparison is run: the named candidate is used (auto or blend: the gradient-boosted model).
        """
        with self._threads():
            return self._fit(features, labels, compare_candidates)

    def _fit(self, features: pd.DataFrame, labels: pd.DataFrame, compare_candidates: bool) -> StudyAggregator:
        self._check_features(features)
        features = _str_uids(features)
        y_wide = _labels_for(features, labels)
        self.level_models_, self.patient_model_, self.prior_, rule = self._fit_members(features, y_wide)
        self.rule_ = rule.to_dict()
        cand = self.config["candidates"]
        choose = cand["choose"]
        self.chosen_ = GBM if choose in (AUTO, BLEND) else choose
        self.comparison_ = self.candidates_ = self.blend_ = None
        self.comparison_note_ = ""
        if compare_candidates and choose in (AUTO, BLEND):
            self._compare(features, y_wide)
        self.training_ = {"n_studies": int(len(y_wide)),
                          "positives": {t: int(y_wide[t].sum()) for t in registry.TARGETS},
                          "chosen": self.chosen_}
        logger.info("aggregator fitted on %d studies (%d patient positives); predicting with %s", len(y_wide),
                    self.training_["positives"][registry.PATIENT], self.chosen_)
        return self

    def _compare(self, features: pd.DataFrame, y_wide: pd.DataFrame) -> None:
        """Out-of-fold comparison of the candidates (aggregation.candidates); sets chosen_, blend_, candidates_."""
        cand, m = self.config["candidates"], self.config["model"]
        folds = int(self.config["operating"]["heldout_folds"])
        uids = list(y_wide.index)
        y = y_wide[list(registry.TARGETS)].to_numpy(dtype=float)
        by_study = features.groupby(registry.STUDY_COL, sort=False).indices

        def rows(studies: Sequence[str]) -> pd.DataFrame:
            return features.iloc[np.concatenate([by_study[u] for u in studies])]

        def fit_predict(train: Sequence[str], held: Sequence[str]) -> dict[str, np.ndarray]:
            level_models, patient_model, prior, rule = self._fit_members(rows(train), y_wide.loc[list(train)])
            return self._member_predictions(rows(held), held, level_models, patient_model, prior, rule)

        if n_folds(y[:, len(registry.LEVELS)], folds) < MIN_CALIBRATION_FOLDS:
            self.chosen_ = PRIOR
            self.comparison_note_ = (f"{int(y_wide[registry.PATIENT].sum())} positive and "
                                     f"{int((y_wide[registry.PATIENT] == 0).sum())} negative studies: too few to "
                                     "compare candidates out of fold; predicting the constant prior")
            logger.warning("aggregator: %s", self.comparison_note_)
            return
        comp = compare(uids, y, fit_predict, folds=folds, repeats=int(cand["repeats"]), seed=int(m["random_state"]),
                       l2=float(cand["l2"]), sample_weights=m["sample_weights"], choose=cand["choose"])
        oof_all = {k: v.reshape(-1, len(registry.TARGETS)) for k, v in comp.oof.items()}
        self.blend_ = fit_blend(MEMBERS, [oof_all[k] for k in MEMBERS], np.tile(y, (comp.folds.shape[0], 1)),
                                l2=float(cand["l2"]), sample_weights=m["sample_weights"])
        self.comparison_, self.candidates_, self.chosen_ = comp, comp.table, comp.chosen

    def _fit_members(self, features: pd.DataFrame, y_wide: pd.DataFrame
                     ) -> tuple[dict[str, Any], Any, dict[str, float], MaxScoreRule]:
        """Fit the gradient-boosted level and patient models, the prior and the max-score rule on these studies."""
        level_models = self._fit_levels(features, y_wide)
        oof = self._oof_level_predictions(features, y_wide, level_models)
        xp = self._patient_matrix(features, oof)
        y_patient = y_wide.loc[xp[registry.STUDY_COL], registry.PATIENT].to_numpy(dtype=int)
        patient_model = fit_binary(_matrix(xp, self.patient_features), y_patient, categorical=None,
                                   config=self.config, sample_weight=self.sample_weights(y_patient, patient=True),
                                   monotonic=self._constraints(self.patient_features))
        n = len(y_wide)     # smoothed as ConstantClassifier: a fold without a C3 positive must not predict 1e-15
        prior = {t: float((y_wide[t].sum() + CONSTANT_SMOOTHING) / (n + 2 * CONSTANT_SMOOTHING))
                 for t in registry.TARGETS}
        rule = MaxScoreRule(rule_inputs(self.config), float(self.config["candidates"]["l2"]),
                            self.config["model"]["sample_weights"]).fit(features, y_wide)
        return level_models, patient_model, prior, rule

    def _member_predictions(self, features: pd.DataFrame, uids: Sequence[str], level_models: Mapping[str, Any],
                            patient_model: Any, prior: Mapping[str, float], rule: MaxScoreRule
                            ) -> dict[str, np.ndarray]:
        """Return {member: (len(uids), 8) probabilities} of the prior, the rule and the booster for `uids`."""
        uids = [str(u) for u in uids]
        gbm = self._predict_gbm(features, level_models, patient_model).set_index(registry.STUDY_COL)
        rule_p = rule.predict_wide(features).set_index(registry.STUDY_COL)
        return {PRIOR: np.tile([prior[t] for t in registry.TARGETS], (len(uids), 1)),
                RULE: rule_p.loc[uids, list(registry.TARGETS)].to_numpy(dtype=float),
                GBM: gbm.loc[uids, list(registry.TARGETS)].to_numpy(dtype=float)}

    def sample_weights(self, y: np.ndarray, *, patient: bool = False) -> np.ndarray | None:
        """Return the fitting weights of 0/1 labels `y` (level rows, or patient rows): the metric's, or None."""
        if self.config["model"]["sample_weights"] == "none":
            return None
        return label_weights(y, patient=patient)

    def _constraints(self, columns: Sequence[str]) -> np.ndarray | None:
        """Return the booster's monotonic_cst for `columns` (1 where a feature rises with a score), or None."""
        if not self.monotone:
            return None
        return np.array([1 if self._signs.get(c) == RISES else 0 for c in columns], dtype=int)

    def _level_matrix(self, df: pd.DataFrame, *, with_level: bool) -> tuple[np.ndarray, np.ndarray]:
        cols = self._level_columns(with_level)
        return _matrix(df, cols), np.array([c == LEVEL_IDX for c in cols])

    def _level_columns(self, with_level: bool) -> list[str]:
        return self.level_features if with_level else [c for c in self.level_features if c != LEVEL_IDX]

    def _fit_levels(self, features: pd.DataFrame, y_wide: pd.DataFrame) -> dict[str, Any]:
        y = _level_targets(features, y_wide)
        if self.config["model"]["level_mode"] == "shared":
            X, cat = self._level_matrix(features, with_level=True)
            return {"shared": fit_binary(X, y, categorical=cat, config=self.config, sample_weight=self.sample_weights(y),
                                         monotonic=self._constraints(self._level_columns(True)))}
        models = {}
        for lv in registry.LEVELS:
            rows = (features[LEVEL_COL] == lv).to_numpy()
            X, _ = self._level_matrix(features[rows], with_level=False)
            models[lv] = fit_binary(X, y[rows], categorical=None, config=self.config,
                                    sample_weight=self.sample_weights(y[rows]),
                                    monotonic=self._constraints(self._level_columns(False)))
        return models

    def _predict_levels(self, models: Mapping[str, Any], features: pd.DataFrame) -> pd.DataFrame:
        """Return a wide (StudyInstanceUID, C1..C7) table of level probabilities."""
        p = np.zeros(len(features))
        if "shared" in models:
            X, _ = self._level_matrix(features, with_level=True)
            p = _positive_proba(models["shared"], X)
        else:
            for lv in registry.LEVELS:
                rows = (features[LEVEL_COL] == lv).to_numpy()
                if rows.any():
                    X, _ = self._level_matrix(features[rows], with_level=False)
                    p[rows] = _positive_proba(models[lv], X)
        long = pd.DataFrame({registry.STUDY_COL: features[registry.STUDY_COL].to_numpy(),
                             LEVEL_COL: features[LEVEL_COL].to_numpy(), "p": p})
        wide = long.pivot(index=registry.STUDY_COL, columns=LEVEL_COL, values="p")
        order = pd.unique(features[registry.STUDY_COL])
        return wide.loc[order, list(registry.LEVELS)].reset_index()

    def _oof_level_predictions(self, features: pd.DataFrame, y_wide: pd.DataFrame,
                               level_models: Mapping[str, Any]) -> pd.DataFrame:
        """Return level probabilities for the training studies, each from a model that never saw the study."""
        uids = features[registry.STUDY_COL].to_numpy()
        n_studies = len(pd.unique(uids))
        folds = min(int(self.config["model"]["patient_oof_folds"]), n_studies)
        if folds < MIN_CALIBRATION_FOLDS:
            logger.warning("patient model learns from in-sample level predictions (patient_oof_folds=%d, %d studies)",
                           folds, n_studies)
            return self._predict_levels(level_models, features)
        parts = []
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=int(self.config["model"]["random_state"]))
        for train_idx, val_idx in splitter.split(features, groups=uids):
            tr = features.iloc[train_idx]
            models = self._fit_levels(tr, y_wide.loc[pd.unique(tr[registry.STUDY_COL])])
            parts.append(self._predict_levels(models, features.iloc[val_idx]))
        oof = pd.concat(parts).set_index(registry.STUDY_COL)
        return oof.loc[pd.unique(uids)].reset_index()

    def _patient_matrix(self, features: pd.DataFrame, level_pred: pd.DataFrame) -> pd.DataFrame:
        pf = build_patient_features(features, config=self.config)
        lp = level_pred.set_index(registry.STUDY_COL)[list(registry.LEVELS)]
        lp = lp.loc[pf[registry.STUDY_COL]]
        for lv in registry.LEVELS:
            pf[f"{PRED_PREFIX}{lv}"] = lp[lv].to_numpy()
        p = lp.to_numpy(dtype=float)
        pf["pred_max"] = p.max(axis=1)
        pf["pred_noisy_or"] = 1.0 - np.prod(1.0 - p, axis=1)
        return pf

    # ------------------------------------------------------------ prediction
    def predict_proba(self, features: pd.DataFrame) -> pd.DataFrame:
        """Return StudyInstanceUID, C1..C7, patient_overall probabilities of the chosen candidate, one row per study."""
        return self.predict_candidate(features, self.chosen_)

    def predict_candidate(self, features: pd.DataFrame, candidate: str) -> pd.DataFrame:
        """Return the predictions (as predict_proba) of one candidate fitted on every training study."""
        return self.predict_candidates(features, [candidate])[candidate]

    def predict_candidates(self, features: pd.DataFrame,
                           candidates: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
        """Return {candidate: predictions as predict_proba} for `candidates` (default: every one this model has)."""
        if self.level_models_ is None or self.patient_model_ is None:
            raise RuntimeError("StudyAggregator is not fitted: call fit() or load() first")
        has_members = self.prior_ is not None and self.rule_ is not None
        if candidates is None:
            candidates = [c for c in CANDIDATES if c == GBM or (has_members and (c != BLEND or self.blend_))]
        for c in candidates:
            if c not in CANDIDATES:
                raise ValueError(f"unknown candidate {c!r}; choose from {', '.join(CANDIDATES)}")
            if c != GBM and not has_members:
                raise ValueError(f"this aggregator was saved before candidates existed: it has no {c!r}")
            if c == BLEND and self.blend_ is None:
                raise ValueError("this aggregator has no blend (no out-of-fold comparison was run)")
        cols = [registry.STUDY_COL, *registry.TARGETS]
        with self._threads():
            self._check_features(features)
            features = _str_uids(features)
            if list(candidates) == [GBM]:
                return {GBM: self._predict_gbm(features, self.level_models_, self.patient_model_)[cols]}
            assert self.prior_ is not None and self.rule_ is not None
            uids = [str(u) for u in pd.unique(features[registry.STUDY_COL])]
            members = self._member_predictions(features, uids, self.level_models_, self.patient_model_,
                                               self.prior_, MaxScoreRule.from_dict(self.rule_))
            if BLEND in candidates:
                members[BLEND] = predict_blend(self.blend_, [members[k] for k in self.blend_["members"]])
            return {c: pd.DataFrame(members[c], columns=list(registry.TARGETS)).assign(
                **{registry.STUDY_COL: uids})[cols] for c in candidates}

    def _predict_gbm(self, features: pd.DataFrame, level_models: Mapping[str, Any], patient_model: Any) -> pd.DataFrame:
        levels = self._predict_levels(level_models, features)
        xp = self._patient_matrix(features, levels)
        patient = _positive_proba(patient_model, _matrix(xp, self.patient_features))
        out = levels.set_index(registry.STUDY_COL).loc[xp[registry.STUDY_COL]].reset_index()
        out[registry.PATIENT] = np.maximum(patient, out[list(registry.LEVELS)].max(axis=1).to_numpy())
        return out[[registry.STUDY_COL, *registry.TARGETS]]

    def heldout_patient(self) -> tuple[pd.DataFrame, str | None]:
        """Return the chosen candidate's out-of-fold patient rows (candidates.HELDOUT_COLUMNS), or why there are none."""
        if self.comparison_ is None:
            return (pd.DataFrame(columns=list(HELDOUT_COLUMNS)),
                    self.comparison_note_ or "no out-of-fold comparison was run (candidates.choose names a candidate)")
        return self.comparison_.heldout(), None

    def _check_features(self, features: pd.DataFrame, path: str | os.PathLike | None = None) -> None:
        given = [c for c in features.columns if c not in (registry.STUDY_COL, LEVEL_COL)]
        needed = [*self.level_features, *(c for c in rule_inputs(self.config) if c in self.known_level_features)]
        missing = [c for c in dict.fromkeys(needed) if c not in given]
        extra = [c for c in given if c not in self.level_features and c not in self.known_level_features]
        for key in (registry.STUDY_COL, LEVEL_COL):
            if key not in features.columns:
                raise FeatureMismatchError(path, f"features table lacks the key column {key}")
        if missing or extra:
            raise FeatureMismatchError(path, _mismatch_text(missing, extra, "the features table"))

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write aggregator.skops, aggregator.json (features, label order, config, versions) and candidates.csv."""
        if self.level_models_ is None:
            raise RuntimeError("StudyAggregator is not fitted: nothing to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        import skops.io as sio

        bundle = {"level_models": self.level_models_, "patient_model": self.patient_model_,
                  "prior": self.prior_, "rule": self.rule_, "blend": self.blend_, "chosen": self.chosen_}
        with atomic_path(directory / MODEL_FILE) as tmp:
            sio.dump(bundle, tmp)
            unknown = sorted(set(sio.get_untrusted_types(file=tmp)) - TRUSTED_TYPES)
            if unknown:  # this code made a model it would refuse to load: fail now, not at predict time
                raise RuntimeError(f"aggregator holds types outside TRUSTED_TYPES: {', '.join(unknown)}")
        if self.candidates_ is not None and self.comparison_ is not None:
            write_table(directory, self.candidates_, config=self.config,
                        extra={"chosen": self.chosen_, "folds": int(self.comparison_.folds.max()) + 1,
                               "repeats": int(self.comparison_.folds.shape[0]),
                               "n_studies": len(self.comparison_.uids)})
        else:
            (directory / CANDIDATES_FILE).unlink(missing_ok=True)
            (directory / (CANDIDATES_FILE + ".meta.json")).unlink(missing_ok=True)
        write_json_atomic(directory / META_FILE, {
            "format_version": FORMAT_VERSION,
            "targets": list(registry.TARGETS),
            "level_mode": self.config["model"]["level_mode"],
            "level_features": self.level_features,
            "patient_features": self.patient_features,
            "chosen": self.chosen_,
            "comparison_note": self.comparison_note_ or None,
            "config": self.config,
            "training": self.training_,
            "versions": library_versions(),
        })
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> StudyAggregator:
        """Load a saved aggregator; raise FeatureMismatchError when its features differ from this code's."""
        import json

        directory = Path(directory)
        meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
        legacy = directory / LEGACY_MODEL_FILE
        if legacy.exists() and not model_path.exists():
            raise InputError(legacy, "a joblib (pickle) aggregator, which could run code when loaded: it is not "
                                     "loaded; retrain the aggregator with this version (spinefrac train)")
        for p in (meta_path, model_path):
            if not p.is_file():
                raise InputError(p, "aggregator file not found (write it with StudyAggregator.save / spinefrac train)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(meta_path, f"not valid JSON: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION or meta.get("targets") != list(registry.TARGETS):
            raise InputError(meta_path, f"format {meta.get('format_version')} / targets {meta.get('targets')} "
                                        f"differ from this code ({FORMAT_VERSION}, {list(registry.TARGETS)})")
        agg = cls(_upgrade_config(meta["config"]))
        for kind, saved, current in (("level", meta["level_features"], agg.level_features),
                                     ("patient", meta["patient_features"], agg.patient_features)):
            missing = [c for c in saved if c not in current]
            extra = [c for c in current if c not in saved]
            if missing or extra or saved != current:
                raise FeatureMismatchError(meta_path, f"{kind} features: " + _mismatch_text(
                    missing, extra, "this code", order_only=not (missing or extra)))
        versions = library_versions()
        for lib in ("scikit-learn", "numpy"):
            if meta["versions"].get(lib) != versions.get(lib):
                logger.warning("%s: trained with %s %s, running %s", meta_path, lib, meta["versions"].get(lib),
                               versions.get(lib))
        bundle = load_trusted(model_path)
        base = {"level_models", "patient_model"}
        if not isinstance(bundle, dict) or set(bundle) not in (base, base | BUNDLE_CANDIDATE_KEYS):
            raise InputError(model_path, "not a saved aggregator (expected level_models and patient_model, and "
                                         "prior, rule, blend and chosen when it has candidates)")
        agg.level_models_, agg.patient_model_ = bundle["level_models"], bundle["patient_model"]
        agg.prior_, agg.rule_, agg.blend_ = bundle.get("prior"), bundle.get("rule"), bundle.get("blend")
        chosen = bundle.get("chosen", GBM)
        if chosen not in CANDIDATES or (chosen != GBM and agg.rule_ is None) or (chosen == BLEND and agg.blend_ is None):
            raise InputError(model_path, f"chosen candidate {chosen!r} is unknown or was not saved")
        agg.chosen_ = chosen
        agg.candidates_ = read_table(directory)
        agg.comparison_note_ = meta.get("comparison_note") or ""
        agg.training_ = meta.get("training", {})
        return agg


def load_trusted(path: Path) -> Any:
    """Load a skops file whose every non-default type is in TRUSTED_TYPES; refuse it otherwise, naming the file."""
    import zipfile

    import skops.io as sio

    try:
        needed = set(sio.get_untrusted_types(file=path))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise InputError(path, f"not a skops file ({exc}); a pickle renamed .skops is refused too") from None
    unknown = sorted(needed - TRUSTED_TYPES)
    if unknown:
        raise InputError(path, f"would need types that are not on the aggregator's allow-list: {', '.join(unknown)};"
                               " it is not loaded")
    try:
        return sio.load(path, trusted=sorted(needed))
    except Exception as exc:  # skops raises many types for damaged content; none of them may escape raw
        raise InputError(path, f"cannot be read as a saved aggregator ({type(exc).__name__}: {exc})") from None


def _mismatch_text(missing: list[str], extra: list[str], where: str, order_only: bool = False) -> str:
    if order_only:
        return f"same features as the model but in another order in {where}"
    parts = []
    if missing:
        parts.append(f"missing in {where}: {', '.join(missing)}")
    if extra:
        parts.append(f"not known to the model (extra): {', '.join(extra)}")
    return "feature mismatch with the trained aggregator; " + "; ".join(parts)


def _matrix(df: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """Return the float matrix of `cols` with missing values (NaN) as MISSING_VALUE."""
    return np.nan_to_num(df[cols].to_numpy(dtype=float), nan=MISSING_VALUE)


def _upgrade_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Return a saved aggregator config with keys added since it was written (LEGACY_SETTINGS, else defaults)."""
    from data_prep.runs.config import load_config

    config = _plain(saved)
    defaults = load_config("aggregation").to_dict()
    for section in ("features", "model", "candidates", "operating"):
        part = config.setdefault(section, {})
        for key, value in defaults[section].items():
            if key not in part:
                part[key] = LEGACY_SETTINGS.get(section, {}).get(key, value)
    return config


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _str_uids(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(**{registry.STUDY_COL: df[registry.STUDY_COL].astype(str)}).reset_index(drop=True)


def _labels_for(features: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Return the labels (indexed by study) of the studies in `features`, raising when one is missing."""
    missing = [c for c in (registry.STUDY_COL, *registry.TARGETS) if c not in labels.columns]
    if missing:
        raise InputError(None, f"labels lack column(s) {', '.join(missing)}")
    lab = labels.assign(**{registry.STUDY_COL: labels[registry.STUDY_COL].astype(str)})
    lab = lab.drop_duplicates(registry.STUDY_COL).set_index(registry.STUDY_COL)[list(registry.TARGETS)]
    uids = pd.unique(features[registry.STUDY_COL].astype(str))
    absent = [u for u in uids if u not in lab.index]
    if absent:
        raise InputError(None, f"{len(absent)} studies of the features table have no labels, e.g. {absent[0]}")
    return lab.loc[uids].astype(int)


def _level_targets(features: pd.DataFrame, y_wide: pd.DataFrame) -> np.ndarray:
    """Return the 0/1 label of every study x level row of `features`."""
    sub = y_wide.loc[features[registry.STUDY_COL].astype(str).to_numpy(), list(registry.LEVELS)].to_numpy()
    col = np.array([registry.level_index(lv) for lv in features[LEVEL_COL]])
    return sub[np.arange(len(features)), col].astype(int)
