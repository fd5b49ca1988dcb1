"""StudyAggregator: outputs, consistency, save/load round trip, feature mismatches, tiny data, held-out signal."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from aggregation.features import build_features
from aggregation.model import META_FILE, FeatureMismatchError, StudyAggregator
from data_prep.config import load_config
from data_prep.errors import InputError
from data_prep.registry import LEVELS, PATIENT, STUDY_COL, TARGETS


def simulate_detections(n_studies: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tiny detector outputs with signal: fractured levels get a run of high-scoring boxes, all get noise."""
    rng = np.random.default_rng(seed)
    boxes, slices, labels = [], [], []
    per_level = 4                                    # 28 slices per study, 4 per level
    for s in range(n_studies):
        uid = f"1.2.3.{seed}.{s}"
        y = (rng.random(7) < 0.15).astype(int)
        labels.append({STUDY_COL: uid, PATIENT: int(y.any()), **dict(zip(LEVELS, y.tolist(), strict=True))})
        hits = [(j * per_level + k, rng.uniform(0.4, 0.95), j) for j in np.flatnonzero(y)
                for k in range(int(rng.integers(1, per_level + 1)))]
        noise = [(int(i), rng.uniform(0.05, 0.5), int(i) // per_level) for i in rng.integers(0, 7 * per_level, 2)]
        for i, score, j in hits + noise:
            boxes.append({STUDY_COL: uid, "slice_number": i + 1, "slice_index": i, "z_mm": -float(i), "x": 1.0,
                          "y": 1.0, "width": 30.0, "height": 20.0, "score": score, "level": LEVELS[j],
                          **{f"w_{lv}": float(q == j) for q, lv in enumerate(LEVELS)}})
        for i in range(7 * per_level):
            slices.append({STUDY_COL: uid, "slice_number": i + 1, "slice_index": i, "z_mm": -float(i),
                           "max_score": 0.0, "n_boxes": 0,
                           **{f"p_{lv}": float(q == i // per_level) for q, lv in enumerate(LEVELS)}})
    return pd.DataFrame(boxes), pd.DataFrame(slices), pd.DataFrame(labels)


FAST = ["model.max_iter=10", "model.calibration_folds=2", "model.patient_oof_folds=2"]


@pytest.fixture(scope="module")
def data():
    boxes, slices, labels = simulate_detections(60, seed=5)
    cfg = load_config("aggregation", overrides=FAST)
    return build_features(boxes, slices, config=cfg), labels, cfg


def test_predictions_are_complete_and_consistent(data):
    feats, labels, cfg = data
    agg = StudyAggregator(cfg).fit(feats, labels)
    pred = agg.predict_proba(feats)
    assert list(pred.columns) == [STUDY_COL, *TARGETS]
    assert list(pred[STUDY_COL]) == list(pd.unique(feats[STUDY_COL]))
    p = pred[list(TARGETS)].to_numpy()
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    # patient_overall is never below the largest level probability
    assert (pred[PATIENT].to_numpy() >= pred[list(LEVELS)].max(axis=1).to_numpy() - 1e-12).all()
    # feature row order does not matter
    shuffled = agg.predict_proba(feats.sample(frac=1.0, random_state=1)).set_index(STUDY_COL)
    assert np.allclose(shuffled.loc[pred[STUDY_COL], list(TARGETS)].to_numpy(), p)


def test_save_load_round_trip_gives_identical_probabilities(data, tmp_path):
    feats, labels, cfg = data
    agg = StudyAggregator(cfg).fit(feats, labels)
    agg.save(tmp_path / "aggregator")
    meta = json.loads((tmp_path / "aggregator" / META_FILE).read_text())
    assert meta["targets"] == list(TARGETS)
    assert meta["level_features"] == [c for c in feats.columns if c not in (STUDY_COL, "level")]
    assert "scikit-learn" in meta["versions"] and meta["config"]["model"]["max_iter"] == 10
    loaded = StudyAggregator.load(tmp_path / "aggregator")
    a = agg.predict_proba(feats)[list(TARGETS)].to_numpy()
    b = loaded.predict_proba(feats)[list(TARGETS)].to_numpy()
    assert np.array_equal(a, b)


def test_feature_mismatch_fails_loudly(data, tmp_path):
    feats, labels, cfg = data
    agg = StudyAggregator(cfg).fit(feats, labels)
    with pytest.raises(FeatureMismatchError, match="missing.*longest_run"):
        agg.predict_proba(feats.drop(columns=["longest_run"]))
    with pytest.raises(FeatureMismatchError, match="extra.*mystery"):
        agg.predict_proba(feats.assign(mystery=1.0))
    agg.save(tmp_path / "m")
    meta_path = tmp_path / "m" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["level_features"] = [("old_max" if c == "max_score" else c) for c in meta["level_features"]]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FeatureMismatchError) as err:
        StudyAggregator.load(tmp_path / "m")
    assert "old_max" in str(err.value) and "max_score" in str(err.value) and str(meta_path) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        StudyAggregator.load(tmp_path / "nowhere")


def test_missing_labels_and_unfitted_use_are_errors(data):
    feats, labels, cfg = data
    with pytest.raises(InputError, match="no labels"):
        StudyAggregator(cfg).fit(feats, labels.iloc[1:])
    with pytest.raises(RuntimeError, match="not fitted"):
        StudyAggregator(cfg).predict_proba(feats)


def test_tiny_and_single_class_data_degrade_gracefully(data):
    feats, labels, cfg = data
    uids = list(pd.unique(feats[STUDY_COL]))
    neg = labels[labels[PATIENT] == 0][STUDY_COL].tolist()[:4]
    pos = labels[labels[PATIENT] == 1][STUDY_COL].tolist()[:1]
    few = feats[feats[STUDY_COL].isin(neg + pos)]
    pred = StudyAggregator(cfg).fit(few, labels).predict_proba(feats)
    p = pred[list(TARGETS)].to_numpy()
    assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    only_neg = feats[feats[STUDY_COL].isin(neg)]
    const = StudyAggregator(cfg).fit(only_neg, labels).predict_proba(feats)
    # a single class: a smoothed constant rate (0.5 pseudo-count each side), never exactly 0;
    # the shared level model saw 7 rows per study, the patient model one.
    assert np.allclose(const[list(LEVELS)].to_numpy(), 0.5 / (7 * len(neg) + 1))
    assert np.allclose(const[PATIENT], 0.5 / (len(neg) + 1))
    assert len(const) == len(uids)


def test_per_level_mode(data):
    feats, labels, _ = data
    cfg = load_config("aggregation", overrides=[*FAST, "model.level_mode=per_level"])
    pred = StudyAggregator(cfg).fit(feats, labels).predict_proba(feats)
    assert pred[list(TARGETS)].notna().all().all()
    with pytest.raises(ValueError, match="level_mode"):
        StudyAggregator(load_config("aggregation", overrides=["model.level_mode=both"]))


@pytest.mark.slow
def test_default_model_learns_signal_on_held_out_studies():
    boxes, slices, labels = simulate_detections(200, seed=11)
    feats = build_features(boxes, slices)
    uids = list(pd.unique(feats[STUDY_COL]))
    train, test = uids[:140], uids[140:]
    agg = StudyAggregator().fit(feats[feats[STUDY_COL].isin(train)], labels)
    pred = agg.predict_proba(feats[feats[STUDY_COL].isin(test)]).set_index(STUDY_COL)
    y = labels.set_index(STUDY_COL).loc[test]
    assert roc_auc_score(y[PATIENT], pred.loc[test, PATIENT]) > 0.85
    # levels, pooled
    yl = y[list(LEVELS)].to_numpy().ravel()
    pl = pred.loc[test, list(LEVELS)].to_numpy().ravel()
    assert roc_auc_score(yl, pl) > 0.85
