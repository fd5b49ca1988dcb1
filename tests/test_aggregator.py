"""StudyAggregator: outputs, consistency, save/load round trip, feature mismatches, tiny data, held-out signal."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from aggregation.features import build_features
from aggregation.model import META_FILE, FeatureMismatchError, StudyAggregator
from data_prep.errors import InputError
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL, TARGETS


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


FAST = ["model.max_iter=10", "model.calibration_folds=2", "model.patient_oof_folds=2", "candidates.repeats=1",
        "operating.heldout_folds=3"]


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
    # a monotone model leaves out the one feature a rising score moves either way (the score-weighted box area)
    assert meta["level_features"] == [c for c in feats.columns if c not in (STUDY_COL, "level", "box_area_px")]
    assert meta["chosen"] == agg.chosen_ and (tmp_path / "aggregator" / "candidates.csv").is_file()
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
    fitted = StudyAggregator(cfg).fit(only_neg, labels)
    assert fitted.chosen_ == "prior" and "too few to compare" in fitted.comparison_note_   # nothing to compare with
    const = fitted.predict_candidate(feats, "gbm")
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


# ---------------------------------------------------------------- sample weights, feature groups (issue 12)
def _record_fits(monkeypatch) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Record (y, sample_weight) of every fit_binary call the aggregator makes."""
    from aggregation import model

    calls: list[tuple[np.ndarray, np.ndarray | None]] = []
    real = model.fit_binary

    def spy(X, y, *, categorical, config, sample_weight=None, monotonic=None):
        calls.append((np.asarray(y).copy(), None if sample_weight is None else np.asarray(sample_weight).copy()))
        return real(X, y, categorical=categorical, config=config, sample_weight=sample_weight, monotonic=monotonic)

    monkeypatch.setattr(model, "fit_binary", spy)
    return calls


def test_weights_the_model_passes_are_the_metrics(data, monkeypatch):
    from aggregation.metric import competition_loss

    feats, labels, cfg = data
    calls = _record_fits(monkeypatch)
    StudyAggregator(cfg).fit(feats, labels, compare_candidates=False)
    # the shared level model on every row, one per out-of-fold level model (2 folds), then the patient model
    assert len(calls) == 1 + 2 + 1
    assert all(w is not None and w.shape == y.shape for y, w in calls)
    (y_lev, w_lev), (y_pat, w_pat) = calls[0], calls[-1]
    # rows of the level fit are the features rows (study x level); those of the patient fit one per study
    uids = list(pd.unique(feats[STUDY_COL]))
    y_wide = labels.set_index(STUDY_COL).loc[uids]
    assert np.array_equal(y_lev.reshape(len(uids), 7), y_wide[list(LEVELS)].to_numpy())
    assert np.array_equal(y_pat, y_wide[PATIENT].to_numpy())
    # those weights are the metric's: a per-study weighted mean of per-row losses reproduces competition_loss
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.98, size=(len(uids), 8))
    y = np.column_stack([y_lev.reshape(len(uids), 7), y_pat]).astype(float)
    w = np.column_stack([w_lev.reshape(len(uids), 7), w_pat])
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    ours = float(((w * losses).sum(axis=1) / w.sum(axis=1)).mean())
    preds = pd.DataFrame(p, columns=list(TARGETS)).assign(**{STUDY_COL: uids})
    assert ours == pytest.approx(competition_loss(y_wide.reset_index(), preds), rel=1e-12)
    # the same weights, spelled out: levels 1 / 2, patient 7 / 14
    assert set(zip(y_lev.tolist(), w_lev.tolist(), strict=True)) == {(0, 1.0), (1, 2.0)}
    assert set(zip(y_pat.tolist(), w_pat.tolist(), strict=True)) == {(0, 7.0), (1, 14.0)}


def test_unweighted_option_passes_no_weights(data, monkeypatch):
    feats, labels, _ = data
    cfg = load_config("aggregation", overrides=[*FAST, "model.sample_weights=none", "model.level_mode=per_level"])
    calls = _record_fits(monkeypatch)
    StudyAggregator(cfg).fit(feats, labels, compare_candidates=False)
    assert len(calls) == 7 + 2 * 7 + 1 and all(w is None for _, w in calls)


@pytest.mark.parametrize("calibration", ["none", "sigmoid"])
def test_metric_weights_change_the_fit(data, calibration):
    """With features that carry nothing, the models predict the (weighted) base rates: weights must show."""
    feats, labels, _ = data
    blank = feats.copy()
    cols = [c for c in feats.columns if c not in (STUDY_COL, "level", "level_idx")]
    blank[cols] = 0.0
    preds = {}
    for weights in ("none", "metric"):
        cfg = load_config("aggregation", overrides=[*FAST, f"model.sample_weights={weights}",
                                                    f"model.calibration={calibration}", "model.patient_oof_folds=0"])
        preds[weights] = StudyAggregator(cfg).fit(blank, labels, compare_candidates=False).predict_proba(blank)
    uids = list(pd.unique(feats[STUDY_COL]))
    y = labels.set_index(STUDY_COL).loc[uids]
    rate = float(y[list(LEVELS)].to_numpy().mean())
    weighted = 2 * rate / (2 * rate + (1 - rate))
    p_none = preds["none"][list(LEVELS)].to_numpy()
    p_metric = preds["metric"][list(LEVELS)].to_numpy()
    assert p_metric.mean() == pytest.approx(weighted, abs=0.03)
    assert p_none.mean() == pytest.approx(rate, abs=0.03)
    assert p_metric.mean() > p_none.mean() + 0.05
    prate = float(y[PATIENT].mean())
    assert preds["metric"][PATIENT].mean() == pytest.approx(2 * prate / (2 * prate + 1 - prate), abs=0.03)
    assert preds["none"][PATIENT].mean() == pytest.approx(prate, abs=0.03)


def _vertebrae_for(labels: pd.DataFrame, seed: int, share: float = 1.0) -> pd.DataFrame:
    """A vertebrae table whose cls scores follow the level labels (for `share` of the studies)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, lab in labels.iterrows():
        if rng.random() > share:
            continue
        for lv in LEVELS:
            mx = float(np.clip(0.7 * lab[lv] + rng.uniform(0.0, 0.3), 0, 1))
            rows.append({STUDY_COL: lab[STUDY_COL], "level": lv, "first_slice": 0, "last_slice": 3, "n_slices": 4,
                         "source": "locator", "n_crops": 4, "cls_max": mx, "cls_topk": mx * 0.9, "cls_mean": mx / 2})
    return pd.DataFrame(rows)


def test_classifier_features_reach_the_model_and_nan_is_handled():
    boxes, slices, labels = simulate_detections(60, seed=5)
    cls_only = load_config("aggregation", overrides=[*FAST, 'features.groups=["classifier"]'])
    feats = build_features(boxes, slices, config=cls_only, vertebrae=_vertebrae_for(labels, 1))
    pred = StudyAggregator(cls_only).fit(feats, labels).predict_proba(feats).set_index(STUDY_COL)
    y = labels.set_index(STUDY_COL).loc[pred.index]
    assert roc_auc_score(y[list(LEVELS)].to_numpy().ravel(), pred[list(LEVELS)].to_numpy().ravel()) > 0.95
    # no vertebrae table at all (every cls_* NaN), or scores for some studies only: fits and predicts finite
    cfg = load_config("aggregation", overrides=FAST)
    for vertebrae in (None, _vertebrae_for(labels, 2, share=0.3)):
        f = build_features(boxes, slices, config=cfg, vertebrae=vertebrae)
        p = StudyAggregator(cfg).fit(f, labels).predict_proba(f)[list(TARGETS)].to_numpy()
        assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()


def test_saved_groups_decide_the_features(tmp_path):
    boxes, slices, labels = simulate_detections(60, seed=5)
    full_cfg = load_config("aggregation", overrides=FAST)
    full = build_features(boxes, slices, config=full_cfg, vertebrae=_vertebrae_for(labels, 1))
    det_cfg = load_config("aggregation", overrides=[*FAST, 'features.groups=["detector"]'])
    agg = StudyAggregator(det_cfg).fit(full, labels)            # the other groups' columns are ignored
    agg.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["config"]["features"]["groups"] == ["detector"]
    assert not any(c.startswith(("cls_", "profile_", "run_frac")) for c in meta["level_features"])
    loaded = StudyAggregator.load(tmp_path / "m")
    assert loaded.level_features == agg.level_features
    ref = agg.predict_proba(full)[list(TARGETS)].to_numpy()
    only_det = build_features(boxes, slices, config=det_cfg)
    assert np.array_equal(loaded.predict_proba(only_det)[list(TARGETS)].to_numpy(), ref)
    scrambled = full.assign(cls_max=0.99, run_frac=0.0, profile_bin_0=1.0)
    assert np.array_equal(loaded.predict_proba(scrambled)[list(TARGETS)].to_numpy(), ref)
    # unknown or missing columns are still mismatches; a classifier model needs its cls columns
    with pytest.raises(FeatureMismatchError, match="extra.*mystery"):
        loaded.predict_proba(full.assign(mystery=1.0))
    with pytest.raises(FeatureMismatchError, match="missing.*score_mass"):
        loaded.predict_proba(full.drop(columns=["score_mass"]))
    cls_agg = StudyAggregator(load_config("aggregation", overrides=[*FAST, 'features.groups=["classifier"]']))
    cls_agg.fit(full, labels).save(tmp_path / "c")
    with pytest.raises(FeatureMismatchError, match="missing.*cls_max"):
        StudyAggregator.load(tmp_path / "c").predict_proba(only_det)


def test_model_saved_before_groups_loads_as_detector_unweighted(tmp_path):
    boxes, slices, labels = simulate_detections(40, seed=7)
    cfg = load_config("aggregation", overrides=[*FAST, 'features.groups=["detector"]', "model.sample_weights=none"])
    feats = build_features(boxes, slices, config=cfg)
    agg = StudyAggregator(cfg).fit(feats, labels)
    agg.save(tmp_path / "old")
    meta_path = tmp_path / "old" / META_FILE
    meta = json.loads(meta_path.read_text())
    for key in ("groups", "profile_bins", "profile_top_k"):
        del meta["config"]["features"][key]
    del meta["config"]["model"]["sample_weights"]
    meta_path.write_text(json.dumps(meta))
    loaded = StudyAggregator.load(tmp_path / "old")
    assert loaded.config["features"]["groups"] == ["detector"] and loaded.config["model"]["sample_weights"] == "none"
    assert np.array_equal(loaded.predict_proba(feats)[list(TARGETS)].to_numpy(),
                          agg.predict_proba(feats)[list(TARGETS)].to_numpy())
