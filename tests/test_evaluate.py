"""`spinefrac evaluate` on a small constructed case: a perfect predictor, the two baselines, files and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from aggregation.evaluate import evaluate_predictions, max_score_baseline
from aggregation.submission import submission_from_predictions
from data_prep.errors import InputError
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL, TARGETS


@pytest.fixture(autouse=True)
def _mpl_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def _labels(n: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < 0.3).astype(int)
    y[0, :], y[1, :] = 1, 0                  # every level has both classes
    df = pd.DataFrame(y, columns=list(LEVELS))
    df.insert(0, STUDY_COL, [f"1.2.3.{i}" for i in range(n)])
    df.insert(1, PATIENT, y.max(axis=1))
    return df


def _perfect(labels: pd.DataFrame) -> pd.DataFrame:
    p = labels.copy()
    p[list(TARGETS)] = np.where(labels[list(TARGETS)] == 1, 0.95, 0.05)
    return p


def _write(tmp_path, labels, preds):
    labels.to_csv(tmp_path / "train.csv", index=False)
    preds.to_csv(tmp_path / "predictions.csv", index=False)
    return tmp_path / "predictions.csv", tmp_path / "train.csv"


def test_perfect_predictor_beats_the_prior(tmp_path):
    labels = _labels()
    pred_path, lab_path = _write(tmp_path, labels, _perfect(labels))
    report = evaluate_predictions(pred_path, labels=lab_path)
    model, prior = report.scores["model"], report.scores["prior"]
    assert all(model["auc"][t] == 1.0 for t in TARGETS)
    assert all(prior["auc"][t] == 0.5 for t in TARGETS)
    assert model["competition_loss"] < prior["competition_loss"]
    assert model["global_loss"] < prior["global_loss"]
    assert all(model["sensitivity"][t] == 1.0 and model["specificity"][t] == 1.0 for t in TARGETS)
    # the prior baseline's global loss, independently: sklearn's weighted log loss of the column means
    y = labels[list(TARGETS)].to_numpy()
    p = np.tile(y.mean(axis=0), (len(y), 1))
    w = np.where(y == 1, 2.0, 1.0)
    w[:, 7] *= 7
    assert prior["global_loss"] == pytest.approx(log_loss(y.ravel(), p.ravel(), sample_weight=w.ravel()), rel=1e-9)
    text = report.format()
    assert "loss (per study)" in text and "AUC patient_overall" in text and "prior" in text


def test_prior_baseline_can_use_the_training_prior(tmp_path):
    """With --prior, the constant baseline predicts the training rates, not the evaluated labels' own rates."""
    labels = _labels()
    pred_path, lab_path = _write(tmp_path, labels, _perfect(labels))
    train_rates = dict.fromkeys(TARGETS, 0.2)
    (tmp_path / "prior.json").write_text(json.dumps(train_rates))
    report = evaluate_predictions(pred_path, labels=lab_path, prior=tmp_path / "prior.json")
    y = labels[list(TARGETS)].to_numpy()
    w = np.where(y == 1, 2.0, 1.0)
    w[:, 7] *= 7
    expected = log_loss(y.ravel(), np.full(y.size, 0.2), sample_weight=w.ravel())
    assert report.scores["prior"]["global_loss"] == pytest.approx(expected, rel=1e-9)
    assert "prior.json" in report.format()
    (tmp_path / "bad.json").write_text(json.dumps({"C1": 0.1}))
    with pytest.raises(InputError, match="bad.json: prior lacks target"):
        evaluate_predictions(pred_path, labels=lab_path, prior=tmp_path / "bad.json")


def test_sensitivity_and_specificity_at_the_threshold(tmp_path):
    labels = _labels()
    preds = _perfect(labels)
    c1 = labels["C1"].to_numpy()
    preds["C1"] = np.where(c1 == 1, 0.6, 0.3)
    preds.loc[np.flatnonzero(c1 == 1)[0], "C1"] = 0.4      # one positive below 0.5
    preds.loc[np.flatnonzero(c1 == 0)[0], "C1"] = 0.7      # one negative above 0.5
    pred_path, lab_path = _write(tmp_path, labels, preds)
    report = evaluate_predictions(pred_path, labels=lab_path, threshold=0.5)
    m = report.scores["model"]
    assert m["sensitivity"]["C1"] == pytest.approx(1 - 1 / c1.sum())
    assert m["specificity"]["C1"] == pytest.approx(1 - 1 / (c1 == 0).sum())
    lower = evaluate_predictions(pred_path, labels=lab_path, threshold=0.35)
    assert lower.scores["model"]["sensitivity"]["C1"] == 1.0


def test_max_score_baseline_and_outputs(tmp_path):
    labels = _labels()
    uids = list(labels[STUDY_COL])
    boxes = pd.DataFrame({STUDY_COL: [uids[0], uids[0], uids[0], uids[2]], "slice_index": [3, 4, 9, 1],
                          "score": [0.7, 0.4, 0.9, 0.3], "level": ["C2", "C2", "C5", "C1"]})
    boxes.to_csv(tmp_path / "boxes.csv", index=False)
    base = max_score_baseline(boxes, uids).set_index(STUDY_COL)
    assert base.loc[uids[0], "C2"] == 0.7 and base.loc[uids[0], "C5"] == 0.9
    assert base.loc[uids[0], PATIENT] == 0.9 and base.loc[uids[2], PATIENT] == 0.3
    assert (base.loc[uids[1]] == 0).all()
    pred_path, lab_path = _write(tmp_path, labels, _perfect(labels))
    report = evaluate_predictions(pred_path, labels=lab_path, boxes=tmp_path / "boxes.csv", out=tmp_path / "ev")
    assert set(report.scores) == {"model", "prior", "max_score"}
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_studies"] == len(labels)
    assert metrics["scores"]["model"]["auc"]["C3"] == 1.0
    for name in ("roc.png", "calibration.png"):
        assert (tmp_path / "ev" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submission_csv_gives_the_same_scores(tmp_path):
    labels = _labels()
    preds = _perfect(labels)
    preds["C3"] = 0.2
    pred_path, lab_path = _write(tmp_path, labels, preds)
    submission_from_predictions(preds).to_csv(tmp_path / "submission.csv", index=False)
    a = evaluate_predictions(pred_path, labels=lab_path).scores["model"]
    b = evaluate_predictions(tmp_path / "submission.csv", labels=lab_path).scores["model"]
    assert a["competition_loss"] == pytest.approx(b["competition_loss"]) and a["auc"] == b["auc"]


def test_subset_of_labelled_studies_is_fine_but_unknown_studies_are_named(tmp_path):
    labels = _labels()
    pred_path, lab_path = _write(tmp_path, labels, _perfect(labels).iloc[:10])
    assert evaluate_predictions(pred_path, labels=lab_path).n_studies == 10
    stranger = _perfect(labels).iloc[:3].assign(**{STUDY_COL: ["x.1", "x.2", "1.2.3.0"]})
    stranger.to_csv(pred_path, index=False)
    with pytest.raises(InputError, match=r"predictions\.csv.*x\.1"):
        evaluate_predictions(pred_path, labels=lab_path)


def test_missing_columns_name_the_file(tmp_path):
    labels = _labels()
    pred_path, lab_path = _write(tmp_path, labels, _perfect(labels).drop(columns=["C4"]))
    with pytest.raises(InputError, match=r"predictions\.csv.*C4"):
        evaluate_predictions(pred_path, labels=lab_path)
    _write(tmp_path, labels.drop(columns=[PATIENT]), _perfect(labels))
    with pytest.raises(InputError, match=r"train\.csv.*patient_overall"):
        evaluate_predictions(pred_path, labels=lab_path)
    _write(tmp_path, labels, _perfect(labels))
    pd.DataFrame({STUDY_COL: ["a"], "score": [0.5]}).to_csv(tmp_path / "boxes.csv", index=False)
    with pytest.raises(InputError, match=r"boxes\.csv.*level"):
        evaluate_predictions(pred_path, labels=lab_path, boxes=tmp_path / "boxes.csv")
    with pytest.raises(InputError, match="not found"):
        evaluate_predictions(tmp_path / "nope.csv", labels=lab_path)


def test_cli_evaluate(tmp_path, capsys):
    from spinefrac.cli import main

    labels = _labels()
    pred_path, lab_path = _write(tmp_path, labels, _perfect(labels))
    assert main(["evaluate", str(pred_path), "--labels", str(lab_path), "--threshold", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "loss (global)" in out and "threshold 0.4" in out
    assert main(["evaluate", str(tmp_path / "missing.csv"), "--labels", str(lab_path)]) == 2


def test_max_score_baseline_without_any_box_is_zero():
    """A detector that found nothing writes boxes.csv with the base columns only: every level scores 0, no error."""
    empty = pd.DataFrame(columns=[STUDY_COL, "slice_number", "slice_index", "z_mm", "x", "y", "width", "height",
                                  "score"])
    out = max_score_baseline(empty, ["1.2.3", "1.2.4"])
    assert list(out[STUDY_COL]) == ["1.2.3", "1.2.4"]
    assert (out[list(TARGETS)].to_numpy() == 0.0).all()
