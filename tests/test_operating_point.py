"""The worklist's operating point: the chosen candidate's out-of-fold patient predictions, the threshold, what it achieves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_aggregator import FAST, simulate_detections

from aggregation.features import build_features
from aggregation.model import StudyAggregator
from aggregation.operating_point import (
    HELDOUT_FILE,
    OPERATING_FILE,
    achieved,
    choose_threshold,
    read_operating_point,
    write_operating_point,
)
from data_prep.errors import InputError
from data_prep.runs.config import ConfigError, load_config
from data_prep.runs.registry import PATIENT, STUDY_COL


@pytest.fixture(scope="module")
def data():
    boxes, slices, labels = simulate_detections(40, seed=9)
    cfg = load_config("aggregation", overrides=[*FAST, "operating.heldout_folds=3", "candidates.repeats=2"])
    return build_features(boxes, slices, config=cfg), labels, cfg


def _heldout(features, labels, cfg):
    return StudyAggregator(cfg).fit(features, labels).heldout_patient()


def test_threshold_is_the_largest_reaching_the_target():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1])
    three = choose_threshold(labels, probs, 0.75)
    assert three == {"threshold": 0.6, "sensitivity": 0.75, "specificity": 0.8}    # 0.7 is flagged too
    every = choose_threshold(labels, probs, 0.95)                                  # all four: down to 0.3
    assert every["threshold"] == 0.3 and every["sensitivity"] == 1.0 and every["specificity"] == 0.4
    assert achieved(labels, probs, 0.3) == {"sensitivity": 1.0, "specificity": 0.4}


def test_stored_sensitivity_is_reproduced_from_the_stored_heldout_predictions(data, tmp_path):
    features, labels, cfg = data
    heldout, reason = _heldout(features, labels, cfg)
    assert reason is None
    record = write_operating_point(tmp_path, heldout, reason, cfg)
    stored = json.loads((tmp_path / OPERATING_FILE).read_text())
    assert stored == record and stored["heldout_folds"] == 3 and stored["heldout_repeats"] == 2
    heldout = pd.read_csv(tmp_path / HELDOUT_FILE, dtype={STUDY_COL: str})
    for _, part in heldout.groupby("repeat"):                          # every study once per repeat
        assert sorted(part[STUDY_COL]) == sorted(features[STUDY_COL].unique())
    assert stored["n_studies"] == features[STUDY_COL].nunique()
    truth = labels.set_index(STUDY_COL).loc[heldout[STUDY_COL], PATIENT].to_numpy()
    assert (heldout["label"].to_numpy() == truth).all()
    flagged = heldout["probability"] >= stored["threshold"]
    pos = heldout["label"] == 1
    assert flagged[pos].mean() == pytest.approx(stored["sensitivity"])
    assert (~flagged[~pos]).mean() == pytest.approx(stored["specificity"])
    assert stored["sensitivity"] >= stored["target_sensitivity"] and stored["specificity"] > 0
    # the largest such threshold: the next higher held-out probability misses the target
    higher = heldout["probability"][heldout["probability"] > stored["threshold"]]
    if len(higher):
        assert (heldout["probability"][pos] >= higher.min()).mean() < stored["target_sensitivity"]
    assert read_operating_point(tmp_path)[0] == stored


def test_heldout_predictions_come_from_models_that_never_saw_the_study(data, monkeypatch):
    """Each fold's candidates are fitted without that fold's studies (recorded at fit time)."""
    features, labels, cfg = data
    seen: list[set[str]] = []
    fit = StudyAggregator._fit_members

    def recording_fit(self, feats, y_wide):
        seen.append(set(feats[STUDY_COL].astype(str)))
        return fit(self, feats, y_wide)

    monkeypatch.setattr(StudyAggregator, "_fit_members", recording_fit)
    agg = StudyAggregator(cfg).fit(features, labels)
    heldout, reason = agg.heldout_patient()
    assert reason is None and len(seen) == 1 + 2 * 3            # every study, then 2 repeats x 3 folds
    assert seen[0] == set(features[STUDY_COL])
    for i, trained_on in enumerate(seen[1:]):
        repeat, fold = divmod(i, 3)
        scored = set(heldout.loc[(heldout["repeat"] == repeat) & (heldout["fold"] == fold), STUDY_COL])
        assert scored and scored.isdisjoint(trained_on) and scored | trained_on == seen[0]


def test_too_few_positives_writes_no_threshold_and_says_why(data, tmp_path):
    features, labels, cfg = data
    negatives = labels[labels[PATIENT] == 0][STUDY_COL]
    one_positive = labels[labels[PATIENT] == 1][STUDY_COL].iloc[:1]
    keep = set(negatives) | set(one_positive)
    heldout, reason = _heldout(features[features[STUDY_COL].isin(keep)], labels, cfg)
    record = write_operating_point(tmp_path, heldout, reason, cfg)
    assert record["threshold"] is None and "1 positive" in record["reason"] and not record["unreachable"]
    point, why = read_operating_point(tmp_path)
    assert point is None and "no threshold" in why and "1 positive" in why


def test_unreachable_target_is_stored_not_a_flag_on_everything(tmp_path):
    """A constant patient probability (the prior) reaches 0.95 sensitivity only by flagging every study."""
    cfg = load_config("aggregation")
    n = 20
    heldout = pd.DataFrame({STUDY_COL: [f"s{i}" for i in range(n)], "repeat": 0, "fold": np.arange(n) % 4,
                            "label": np.arange(n) % 2, "probability": 0.3})
    record = write_operating_point(tmp_path, heldout, None, cfg)
    assert record["threshold"] is None and record["unreachable"] and record["specificity"] == 0.0
    assert record["unreachable_threshold"] == pytest.approx(0.3)
    assert "cannot reach sensitivity 0.95 on its training studies" in record["reason"]
    point, why = read_operating_point(tmp_path)
    assert point is None and why == record["reason"]
    # one negative below every positive: reachable with specificity > 0, so a threshold is set
    heldout.loc[0, "probability"] = 0.1
    assert write_operating_point(tmp_path, heldout, None, cfg)["threshold"] == pytest.approx(0.3)


def test_missing_or_bad_file(tmp_path):
    point, why = read_operating_point(tmp_path)
    assert point is None and "trained before operating points existed" in why
    (tmp_path / OPERATING_FILE).write_text("{not json")
    with pytest.raises(InputError, match="operating_point.json.*not valid JSON"):
        read_operating_point(tmp_path)
    (tmp_path / OPERATING_FILE).write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(InputError, match="lacks key"):
        read_operating_point(tmp_path)
    good = {"format_version": 1, "target_sensitivity": 0.95, "threshold": 1.5, "sensitivity": 1.0,
            "specificity": 0.0, "n_studies": 3, "n_positive": 1, "n_negative": 2, "heldout_file": HELDOUT_FILE}
    (tmp_path / OPERATING_FILE).write_text(json.dumps(good))
    with pytest.raises(InputError, match=r"threshold must be a number in \[0, 1\]; found 1.5"):
        read_operating_point(tmp_path)


@pytest.mark.parametrize("override", ["operating.target_sensitivity=0", "operating.target_sensitivity=1.2",
                                      "operating.heldout_folds=1"])
def test_config_range_is_checked(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("aggregation", overrides=[override])
