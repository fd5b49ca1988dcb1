"""The competition metric against hand-computed cases, scikit-learn's weighted log loss and the real labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from aggregation.metric import competition_loss, global_loss
from data_prep.errors import InputError
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL, TARGETS


def _table(rows: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{STUDY_COL: uid, **dict(zip(TARGETS, vals, strict=True))} for uid, vals in rows.items()])


def test_hand_computed_two_studies():
    # Study a: all negative, levels predicted 0.1, patient 0.2. Weights 1 x 7 levels, 7 patient.
    # Study b: C2 and patient positive, everything predicted 0.5. Weights 6 x 1 + 2 (C2) + 14 = 22.
    labels = _table({"a": [0] * 8, "b": [0, 1, 0, 0, 0, 0, 0, 1]})
    preds = _table({"a": [0.1] * 7 + [0.2], "b": [0.5] * 8})
    a = (7 * -math.log(0.9) + 7 * -math.log(0.8)) / 14
    b = math.log(2)
    assert competition_loss(labels, preds) == pytest.approx((a + b) / 2, rel=1e-12)
    glob = (7 * -math.log(0.9) + 7 * -math.log(0.8) + 22 * math.log(2)) / (14 + 22)
    assert global_loss(labels, preds) == pytest.approx(glob, rel=1e-12)
    assert competition_loss(labels, preds) != pytest.approx(global_loss(labels, preds))


def test_positive_patient_weighs_double():
    # One positive patient row with loss L and everything else perfect (up to clipping): L * 14 / (7 + 14).
    labels = _table({"s": [1, 0, 0, 0, 0, 0, 0, 1]})
    preds = _table({"s": [1.0, 0, 0, 0, 0, 0, 0, 0.25]})
    expected = (14 * -math.log(0.25) + 2 * -math.log(1 - 1e-15) + 6 * -math.log(1 - 1e-15)) / (2 + 6 + 14)
    assert competition_loss(labels, preds) == pytest.approx(expected, rel=1e-9)


def test_clipping_bounds_the_loss_of_a_certain_mistake():
    labels = _table({"s": [1, 0, 0, 0, 0, 0, 0, 1]})
    preds = _table({"s": [0.0, 1.0, 0, 0, 0, 0, 0, 1.0]})
    worst_pos = -math.log(1e-15)                 # positive predicted 0 -> clipped to 1e-15
    worst_neg = -math.log(1.0 - (1.0 - 1e-15))   # negative predicted 1 -> clipped to 1 - 1e-15 (in floats)
    # C1 (w 2) and C2 (w 1) are certain mistakes; the others are right (losses ~1e-15).
    expected = (2 * worst_pos + 1 * worst_neg) / (2 + 1 + 5 + 14)
    assert competition_loss(labels, preds) == pytest.approx(expected, rel=1e-9)
    assert 30 < competition_loss(labels, preds) * 22 / 3 < 35
    assert math.isfinite(global_loss(labels, preds))


def test_global_variant_equals_sklearn_weighted_log_loss():
    rng = np.random.default_rng(3)
    n = 50
    y = (rng.random((n, 8)) < 0.3).astype(int)
    y[:, 7] = y[:, :7].max(axis=1)
    p = rng.uniform(0.02, 0.98, size=(n, 8))
    uids = [f"u{i}" for i in range(n)]
    labels = pd.DataFrame(y, columns=list(TARGETS)).assign(**{STUDY_COL: uids})
    preds = pd.DataFrame(p, columns=list(TARGETS)).assign(**{STUDY_COL: uids})
    w = np.where(y == 1, 2.0, 1.0)
    w[:, 7] *= 7.0
    ref = log_loss(y.ravel(), p.ravel(), sample_weight=w.ravel(), labels=[0, 1])
    assert global_loss(labels, preds) == pytest.approx(ref, rel=1e-10)
    # Per-study variant = mean over studies of sklearn's weighted loss on each study's 8 rows.
    per = [log_loss(y[i], p[i], sample_weight=w[i], labels=[0, 1]) for i in range(n)]
    assert competition_loss(labels, preds) == pytest.approx(np.mean(per), rel=1e-10)
    # Row order of the predictions does not matter: they are matched by study.
    assert competition_loss(labels, preds.sample(frac=1.0, random_state=0)) == pytest.approx(np.mean(per), rel=1e-10)


def test_missing_study_or_column_is_an_error():
    labels = _table({"a": [0] * 8, "b": [0] * 8})
    with pytest.raises(InputError, match="no prediction"):
        competition_loss(labels, _table({"a": [0.5] * 8}))
    with pytest.raises(InputError, match="patient_overall"):
        global_loss(labels, _table({"a": [0.5] * 8, "b": [0.5] * 8}).drop(columns=[PATIENT]))


def test_constant_prior_on_real_labels(realdata):
    labels = pd.read_csv(realdata("train.csv"))
    prior = labels[list(TARGETS)].mean()
    preds = labels[[STUDY_COL]].assign(**{t: prior[t] for t in TARGETS})
    assert len(labels) == 2019 and set(LEVELS) <= set(labels.columns)
    assert competition_loss(labels, preds) == pytest.approx(0.564, abs=1e-3)
    assert global_loss(labels, preds) == pytest.approx(0.613, abs=1e-3)
