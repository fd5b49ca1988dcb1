"""Aggregator candidates (issue 22): monotone outputs, the out-of-fold table and choice, old folders, weak signal."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold
from test_aggregator import FAST, _vertebrae_for, simulate_detections

from aggregation.candidates import CANDIDATES, CANDIDATES_FILE, TABLE_COLUMNS
from aggregation.features import build_features
from aggregation.metric import competition_loss_arrays
from aggregation.model import META_FILE, MODEL_FILE, StudyAggregator, fit_binary
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL, TARGETS

TOLERANCE = 1e-12
"""Raising a score may leave an output unchanged, never lower it (beyond float rounding)."""


@pytest.fixture(scope="module")
def fitted():
    boxes, slices, labels = simulate_detections(60, seed=5)
    vertebrae = _vertebrae_for(labels, 1, share=0.8)
    cfg = load_config("aggregation", overrides=[*FAST, "model.max_iter=20"])
    feats = build_features(boxes, slices, config=cfg, vertebrae=vertebrae)
    return boxes, slices, vertebrae, labels, cfg, feats, StudyAggregator(cfg).fit(feats, labels)


def _all_outputs(agg, cfg, boxes, slices, vertebrae, uid) -> dict[str, np.ndarray]:
    """The eight outputs of every candidate for one study, from its detection tables (the whole path)."""
    f = build_features(boxes[boxes[STUDY_COL] == uid], slices[slices[STUDY_COL] == uid], config=cfg, studies=[uid],
                       vertebrae=vertebrae[vertebrae[STUDY_COL] == uid])
    return {c: p[list(TARGETS)].to_numpy()[0] for c, p in agg.predict_candidates(f).items()}


def test_raising_one_score_never_lowers_any_output(fitted):
    """boxes / slices / vertebrae -> features -> every candidate: a higher box or classifier score lowers nothing."""
    boxes, slices, vertebrae, _, cfg, _, agg = fitted
    assert set(agg.predict_candidates(fitted[5].head(7))) == set(CANDIDATES)
    rng = np.random.default_rng(0)
    raised = 0
    for trial in range(36):
        b, v = boxes, vertebrae
        if trial % 3:                                   # a box score
            i = int(rng.integers(len(boxes)))
            uid = boxes[STUDY_COL].iloc[i]
            b = boxes.copy()
            b.loc[i, "score"] = b.loc[i, "score"] + rng.uniform(0.05, 1.0) * (1.0 - b.loc[i, "score"])
        else:                                           # a classifier score (one column, or all three)
            j = int(rng.integers(len(vertebrae)))
            uid = vertebrae[STUDY_COL].iloc[j]
            v = vertebrae.copy()
            cols = [["cls_max"], ["cls_topk"], ["cls_mean"], ["cls_max", "cls_topk", "cls_mean"]][trial % 4]
            v.loc[j, cols] = np.minimum(1.0, v.loc[j, cols] + rng.uniform(0.05, 0.6))
        before = _all_outputs(agg, cfg, boxes, slices, vertebrae, uid)
        after = _all_outputs(agg, cfg, b, slices, v, uid)
        for c in CANDIDATES:
            assert (after[c] >= before[c] - TOLERANCE).all(), (trial, c, before[c], after[c])
        raised += int(any((after[c] > before[c] + 1e-9).any() for c in CANDIDATES))
    assert raised >= 10          # the scores reach the outputs: the property is not met by constants


def test_monotone_model_constrains_what_rises_and_leaves_out_what_moves_both_ways(fitted):
    *_, agg = fitted
    assert agg.monotone and "box_area_px" not in agg.level_features
    booster = agg.level_models_["shared"].calibrated_classifiers_[0].estimator
    cst = dict(zip(agg.level_features, booster.monotonic_cst, strict=True))
    assert cst["max_score"] == cst["cls_max"] == cst["above_max"] == cst["profile_bin_0"] == 1
    assert cst["level_idx"] == cst["level_slices"] == cst["study_n_boxes"] == 0
    patient = agg.patient_model_.calibrated_classifiers_[0].estimator
    pcst = dict(zip(agg.patient_features, patient.monotonic_cst, strict=True))
    assert all(pcst[f"pred_{lv}"] == 1 for lv in LEVELS) and pcst["pred_max"] == pcst["level_max"] == 1
    unconstrained = StudyAggregator(load_config("aggregation", overrides=[*FAST, "model.monotone=false"]))
    assert "box_area_px" in unconstrained.level_features


def test_inverted_platt_slope_is_clipped_to_a_constant():
    """Few rows, no signal: a constrained booster fits noise, and a Platt fold can map it upside down."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(60, 1))
    y = (rng.uniform(size=60) < 0.4).astype(int)
    grid = np.linspace(0, 1, 21)[:, None]
    booster = HistGradientBoostingClassifier(max_iter=20, min_samples_leaf=5, monotonic_cst=[1], random_state=0)
    raw = CalibratedClassifierCV(booster, method="sigmoid", cv=StratifiedKFold(3, shuffle=True, random_state=0))
    p_raw = raw.fit(x, y).predict_proba(grid)[:, 1]
    assert (np.diff(p_raw) < -1e-9).any()          # unguarded: a higher value gives a lower probability
    cfg = load_config("aggregation", overrides=["model.max_iter=20", "model.min_samples_leaf=5",
                                                "model.calibration_folds=3", "model.random_state=0"])
    guarded = fit_binary(x, y, categorical=None, config=cfg, monotonic=np.array([1]))
    slopes = [c.calibrators[0].a_ for c in guarded.calibrated_classifiers_]
    assert all(a <= 0 for a in slopes) and 0.0 in slopes   # an inverted fold was clipped, the others kept
    p = guarded.predict_proba(grid)[:, 1]
    assert (np.diff(p) >= -TOLERANCE).all()


def test_chosen_candidate_has_the_lowest_out_of_fold_loss(fitted):
    *_, feats, agg = fitted
    table = agg.candidates_
    assert list(table.columns) == list(TABLE_COLUMNS) and list(table["candidate"]) == list(CANDIDATES)
    assert table.loc[table["chosen"], "candidate"].tolist() == [agg.chosen_]
    assert table.loc[table["chosen"], "loss_per_study"].iloc[0] == table["loss_per_study"].min()
    comp = agg.comparison_          # the table is the out-of-fold predictions' own score
    for row in table.to_dict("records"):
        oof = comp.oof[row["candidate"]]
        assert np.isfinite(oof).all() and ((oof > 0) & (oof < 1)).all()
        losses = [competition_loss_arrays(comp.y, oof[r]) for r in range(len(oof))]
        assert row["loss_per_study"] == pytest.approx(np.mean(losses))
    assert agg.predict_proba(feats).equals(agg.predict_candidate(feats, agg.chosen_))


def test_candidates_choose_forces_one(fitted):
    boxes, slices, vertebrae, labels, _, feats, _ = fitted
    cfg = load_config("aggregation", overrides=[*FAST, "model.max_iter=20", "candidates.choose=max_score_rule"])
    agg = StudyAggregator(cfg).fit(feats, labels)
    assert agg.chosen_ == "max_score_rule" and agg.candidates_ is None          # no comparison needed
    assert agg.predict_proba(feats).equals(agg.predict_candidate(feats, "max_score_rule"))
    blend = StudyAggregator(load_config("aggregation", overrides=[*FAST, "candidates.choose=blend"])).fit(feats, labels)
    assert blend.chosen_ == "blend" and blend.candidates_ is not None
    assert blend.candidates_.loc[blend.candidates_["chosen"], "candidate"].tolist() == ["blend"]


def test_every_candidate_keeps_patient_at_least_the_largest_level(fitted):
    *_, feats, agg = fitted
    for c, p in agg.predict_candidates(feats).items():
        assert (p[PATIENT].to_numpy() >= p[list(LEVELS)].max(axis=1).to_numpy() - TOLERANCE).all(), c
    for c, oof in agg.comparison_.oof.items():
        assert (oof[:, :, len(LEVELS)] >= oof[:, :, :len(LEVELS)].max(axis=2) - TOLERANCE).all(), c


def test_train_stage_stores_and_logs_the_table(fitted, tmp_path, caplog):
    from aggregation.operating_point import OPERATING_FILE
    from data_prep.runs.artifacts import read_sidecar
    from spinefrac.pipeline import _fit_aggregator

    boxes, slices, vertebrae, labels, cfg, _, _ = fitted
    detect = tmp_path / "detect"
    detect.mkdir()
    for name, df in (("boxes", boxes), ("slices", slices), ("vertebrae", vertebrae)):
        df.to_csv(detect / f"{name}.csv", index=False)
    caplog.set_level(logging.INFO, logger="spinefrac")
    info = _fit_aggregator([detect], labels, list(labels[STUDY_COL]), tmp_path / "aggregator", cfg,
                           features_csv=tmp_path / "features.csv")
    stored = pd.read_csv(tmp_path / "aggregator" / CANDIDATES_FILE)
    loaded = StudyAggregator.load(tmp_path / "aggregator")
    assert stored["candidate"].tolist() == list(CANDIDATES)
    assert stored.loc[stored["chosen"], "candidate"].tolist() == [loaded.chosen_] == [info["chosen"]]
    assert stored["loss_per_study"].round(4).tolist() == [info["oof_loss"][c] for c in CANDIDATES]
    meta = read_sidecar(tmp_path / "aggregator" / CANDIDATES_FILE)
    assert meta["kind"] == "aggregator-candidates" and meta["extra"]["chosen"] == loaded.chosen_
    assert meta["extra"]["repeats"] == 1 and meta["extra"]["folds"] == 3 and meta["extra"]["n_studies"] == 60
    assert "aggregator candidates, out of fold on 60 studies (1 x 3-fold)" in caplog.text
    for c in CANDIDATES:
        assert f"  {c}" in caplog.text
    assert f"{loaded.chosen_}".ljust(16) in caplog.text and "<- chosen" in caplog.text
    assert json.loads((tmp_path / "aggregator" / OPERATING_FILE).read_text())["heldout_repeats"] == 1


def test_aggregator_saved_before_candidates_still_loads_and_predicts(fitted, tmp_path):
    """An aggregator folder of the previous format: booster only, no monotone/candidates keys, no candidates.csv."""
    import skops.io as sio

    _, _, _, labels, _, feats, _ = fitted
    cfg = load_config("aggregation", overrides=[*FAST, "model.monotone=false", "candidates.choose=gbm"])
    old = StudyAggregator(cfg).fit(feats, labels)
    old.save(tmp_path / "old")
    bundle = {"level_models": old.level_models_, "patient_model": old.patient_model_}
    sio.dump(bundle, tmp_path / "old" / MODEL_FILE)
    meta_path = tmp_path / "old" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["config"]["candidates"], meta["config"]["model"]["monotone"], meta["chosen"], meta["comparison_note"]
    meta_path.write_text(json.dumps(meta))
    assert not (tmp_path / "old" / CANDIDATES_FILE).exists()
    loaded = StudyAggregator.load(tmp_path / "old")
    assert loaded.chosen_ == "gbm" and not loaded.monotone and loaded.candidates_ is None
    assert "box_area_px" in loaded.level_features
    assert np.array_equal(loaded.predict_proba(feats)[list(TARGETS)].to_numpy(),
                          old.predict_proba(feats)[list(TARGETS)].to_numpy())
    with pytest.raises(ValueError, match="before candidates existed"):
        loaded.predict_candidate(feats, "max_score_rule")


MEAN_TOLERANCE = 0.02
"""Mean held-out loss per study (over the seeds) the chosen aggregator may lose to the constant prior."""
SEED_TOLERANCE = 0.05
"""Loss one seed may lose to the prior: constants fitted on 40 studies differ on 200 held-out studies by up to 0.042
(world "none", seed 0: the max-score rule 0.657 against the prior's 0.615; benchmarks/bench_candidates). The
booster as it was (unconstrained, alone) loses 0.127 there and 0.050 on average over the three seeds."""


@pytest.mark.slow
@pytest.mark.parametrize("world", ["weak", "none"])
def test_weak_signal_does_not_lose_to_the_prior(world):
    """The user's case, simulated: 40 aggregator studies, weak or no signal; 200 held-out studies of the same world."""
    from benchmarks.bench_aggregation import WORLDS, simulate_world
    from benchmarks.bench_candidates import held_out_scores

    cfg = load_config("aggregation", overrides=["model.max_iter=30", "model.max_depth=2", "candidates.repeats=1"])
    chosen, prior = [], []
    for seed in (0, 1, 2):
        b, s, lab, v = simulate_world(40, seed, WORLDS[world])
        tb, ts, tlab, tv = simulate_world(200, seed + 1000, WORLDS[world])
        agg = StudyAggregator(cfg).fit(build_features(b, s, config=cfg, vertebrae=v), lab)
        scores = held_out_scores(agg, build_features(tb, ts, config=cfg, vertebrae=tv), tb, tlab)
        chosen.append(scores["chosen"]["loss"])
        prior.append(scores["prior"]["loss"])
        assert chosen[-1] <= prior[-1] + SEED_TOLERANCE, (seed, agg.chosen_, scores)
        if world == "weak":       # a real, weak signal: the chosen patient ranking is not inverted
            assert scores["chosen"]["auc_patient"] > 0.5, (seed, agg.chosen_, scores)
    assert np.mean(chosen) <= np.mean(prior) + MEAN_TOLERANCE, (chosen, prior)
