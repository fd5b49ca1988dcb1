"""Detector/aggregator splits: the real-data default, the synthetic fallback, folds, reuse and the leakage guard."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from aggregation.splits import (
    AGGREGATOR,
    DETECTOR,
    LeakageError,
    aggregator_train_studies,
    assert_no_leakage,
    detector_train_studies,
    load_or_create_splits,
    split_studies,
)
from data_prep.errors import InputError
from data_prep.runs.config import load_config
from data_prep.runs.registry import PATIENT, STUDY_COL


def _labels(n_pos: int, n_neg: int) -> pd.DataFrame:
    rows = [{STUDY_COL: f"p{i}", PATIENT: 1} for i in range(n_pos)]
    rows += [{STUDY_COL: f"n{i}", PATIENT: 0} for i in range(n_neg)]
    return pd.DataFrame(rows)


def _cfg(*overrides: str):
    return load_config("aggregation", overrides=list(overrides))


def test_boxed_scheme_follows_the_real_data_layout():
    labels = _labels(60, 100)
    boxed = {f"p{i}" for i in range(20)}              # like the real data: a third of the positives have boxes
    s = split_studies(labels, boxed, config=_cfg("splits.scheme=boxed", "splits.negative_fraction=0.1"))
    roles = s["roles"]
    assert s["scheme"] == "boxed" and set(roles) == set(labels[STUDY_COL])
    assert all(roles[u] == DETECTOR for u in boxed)
    assert all(roles[f"p{i}"] == AGGREGATOR for i in range(20, 60))     # unboxed positives: aggregator
    det_neg = [u for u, r in roles.items() if r == DETECTOR and u.startswith("n")]
    assert len(det_neg) == 10                                            # 10 % of 100 negatives
    assert s["counts"] == {"detector_studies": 30, "aggregator_studies": 130,
                           "detector_positives": 20, "aggregator_positives": 40}
    det, agg = detector_train_studies(s), aggregator_train_studies(s)
    assert not set(det) & set(agg)
    assert_no_leakage(s, detector_train=det, aggregator_train=agg)


def test_auto_uses_boxed_on_real_labels(realdata):
    labels = pd.read_csv(realdata("train.csv"))
    boxed = set(pd.read_csv(realdata("train_bounding_boxes.csv"))[STUDY_COL])
    s = split_studies(labels, boxed, config=_cfg())
    assert s["scheme"] == "boxed"
    n_neg = int((labels[PATIENT] == 0).sum())
    assert s["counts"]["detector_studies"] == 235 + round(0.1 * n_neg)
    assert s["counts"]["aggregator_positives"] == 961 - 235


def test_auto_falls_back_to_holdout_when_every_positive_has_boxes():
    labels = _labels(30, 30)
    boxed = {f"p{i}" for i in range(30)}              # synthetic data: every positive is boxed
    s = split_studies(labels, boxed, config=_cfg("splits.aggregator_fraction=0.5"))
    assert s["scheme"] == "holdout"
    c = s["counts"]
    assert c["aggregator_studies"] == 30 and c["aggregator_positives"] == 15     # stratified half
    assert c["detector_positives"] == 15
    again = split_studies(labels, boxed, config=_cfg("splits.aggregator_fraction=0.5"))
    assert again["roles"] == s["roles"]                                          # same seed, same split
    other = split_studies(labels, boxed, config=_cfg("splits.aggregator_fraction=0.5", "splits.seed=1"))
    assert other["roles"] != s["roles"]


def test_leakage_guard_names_the_crossing_study():
    labels = _labels(10, 10)
    s = split_studies(labels, {f"p{i}" for i in range(5)}, config=_cfg("splits.scheme=boxed"))
    det, agg = detector_train_studies(s), aggregator_train_studies(s)
    with pytest.raises(LeakageError, match="p0"):
        assert_no_leakage(s, detector_train=det, aggregator_train=[*agg, "p0"])
    with pytest.raises(LeakageError, match="as detector: p7"):
        assert_no_leakage(s, detector_train=[*det, "p7"], aggregator_train=[])
    with pytest.raises(LeakageError, match="not in the split"):
        assert_no_leakage(s, detector_train=det, aggregator_train=["stranger"])


def test_out_of_fold_split_and_its_guard():
    labels = _labels(20, 20)
    boxed = {f"p{i}" for i in range(20)}
    s = split_studies(labels, boxed, config=_cfg("splits.scheme=oof", "splits.n_folds=4",
                                                 "splits.negative_fraction=0.5"))
    assert s["scheme"] == "oof" and s["n_folds"] == 4
    assert set(s["folds"]) == set(labels[STUDY_COL]) and set(s["folds"].values()) == {0, 1, 2, 3}
    per_fold = {f: detector_train_studies(s, fold=f) for f in range(4)}
    for f, uids in per_fold.items():
        assert uids and all(s["folds"][u] != f for u in uids)
    assert set(aggregator_train_studies(s)) == set(labels[STUDY_COL])
    assert_no_leakage(s, detector_train=per_fold, aggregator_train=aggregator_train_studies(s))
    victim = per_fold[1][0]                                   # a study the fold-1 detector trained on
    bad = dict(per_fold)
    bad[s["folds"][victim]] = [*bad[s["folds"][victim]], victim]
    with pytest.raises(LeakageError, match=victim):
        assert_no_leakage(s, detector_train=bad, aggregator_train=aggregator_train_studies(s))
    with pytest.raises(TypeError):
        assert_no_leakage(s, detector_train=per_fold[0], aggregator_train=[])


def test_splits_file_is_written_once_and_reused(tmp_path):
    labels = _labels(30, 30)
    boxed = {f"p{i}" for i in range(30)}
    path = tmp_path / "splits.json"
    first = load_or_create_splits(path, labels, boxed, config=_cfg())
    text = path.read_text()
    assert json.loads(text)["roles"] == first["roles"]
    second = load_or_create_splits(path, labels, boxed, config=_cfg("splits.seed=7"))   # other settings: reused
    assert second["roles"] == first["roles"] and path.read_text() == text
    more = pd.concat([labels, _labels(0, 1).assign(**{STUDY_COL: "late"})])
    with pytest.raises(InputError, match="splits.json.*late"):
        load_or_create_splits(path, more, boxed, config=_cfg())
    path.write_text("{not json")
    with pytest.raises(InputError, match="splits.json"):
        load_or_create_splits(path, labels, boxed, config=_cfg())


def test_every_scheme_has_stratified_folds_and_classifier_k_never_sees_the_fold_it_scores():
    from aggregation.splits import aggregator_fold_studies, classifier_train_studies

    labels = _labels(30, 50)
    boxed = {f"p{i}" for i in range(10)}
    for scheme in ("boxed", "holdout", "oof"):
        s = split_studies(labels, boxed, config=_cfg(f"splits.scheme={scheme}", "splits.n_folds=3"))
        assert s["n_folds"] == 3 and set(s["folds"]) == set(labels[STUDY_COL])
        pos_per_fold = [sum(1 for u, f in s["folds"].items() if f == k and u.startswith("p")) for k in range(3)]
        assert max(pos_per_fold) - min(pos_per_fold) <= 1                    # stratified by patient_overall
        train, scored = classifier_train_studies(s), aggregator_fold_studies(s)
        agg = set(aggregator_train_studies(s))
        assert set().union(*map(set, scored.values())) == agg                # every aggregator study scored once
        for k in range(3):
            assert not set(train[k]) & set(scored[k])
            # classifier k learns from every other labelled study: detector studies and other folds' studies
            assert set(train[k]) == set(labels[STUDY_COL]) - set(scored[k])


def test_classifier_leakage_guard_names_the_crossed_studies():
    from aggregation.splits import assert_no_classifier_leakage

    assert_no_classifier_leakage({0: {"a", "b"}, 1: {"c"}}, {0: ["c"], 1: ["a"]})
    with pytest.raises(LeakageError, match="1 aggregator studies were scored by a classifier that trained on them: b"):
        assert_no_classifier_leakage({0: {"a", "b"}, 1: {"c"}}, {0: ["b"], 1: ["a"]})
    with pytest.raises(LeakageError, match="more than one fold"):
        assert_no_classifier_leakage({0: set(), 1: set()}, {0: ["x"], 1: ["x"]})
    # the same guard through assert_no_leakage, beside the detector's
    labels = _labels(4, 6)
    s = split_studies(labels, {f"p{i}" for i in range(4)}, config=_cfg("splits.scheme=boxed"))
    det, agg = detector_train_studies(s), aggregator_train_studies(s)
    assert_no_leakage(s, detector_train=det, aggregator_train=agg, classifier_train={0: set(det)},
                      classifier_scored={0: agg})
    with pytest.raises(LeakageError, match="scored by a classifier that trained on them"):
        assert_no_leakage(s, detector_train=det, aggregator_train=agg, classifier_train={0: {agg[0]}},
                          classifier_scored={0: agg})


def test_a_splits_file_without_folds_gets_them_and_keeps_its_roles(tmp_path):
    labels = _labels(10, 20)
    path = tmp_path / "splits.json"
    s = load_or_create_splits(path, labels, set(), config=_cfg("splits.scheme=holdout"))
    old = {k: v for k, v in s.items() if k not in ("folds", "n_folds")}
    path.write_text(json.dumps(old))
    again = load_or_create_splits(path, labels, set(), config=_cfg("splits.scheme=holdout"))
    assert again["roles"] == s["roles"] and again["folds"] == s["folds"]
    assert "folds" in json.loads(path.read_text())
