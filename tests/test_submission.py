"""Submissions are complete: test.csv rows in order, prior for missing or failed studies, flagged and logged."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from aggregation.submission import (
    complete_predictions,
    make_submission,
    predictions_from_submission,
    submission_from_predictions,
    training_prior,
    write_predictions,
    write_submission,
)
from data_prep.errors import InputError
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL, TARGETS

PRIOR = {**{lv: 0.01 * (i + 1) for i, lv in enumerate(LEVELS)}, PATIENT: 0.5}


def _preds(uids: list[str], base: float) -> pd.DataFrame:
    return pd.DataFrame([{STUDY_COL: u, **{t: base + 0.01 * j + 0.1 * k for j, t in enumerate(TARGETS)}}
                         for k, u in enumerate(uids)])


def _test_csv(path, uids: list[str], shuffle_seed: int = 0):
    rows = [{"row_id": f"{u}_{t}", STUDY_COL: u, "prediction_type": t} for u in uids for t in TARGETS]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=shuffle_seed)
    df.to_csv(path, index=False)
    return df


def test_training_prior_is_the_positive_rate():
    labels = pd.DataFrame({STUDY_COL: ["a", "b", "c", "d"], PATIENT: [1, 1, 0, 0], **{lv: [0, 0, 0, 0] for lv in LEVELS}})
    labels["C2"] = [1, 0, 0, 0]
    labels["C7"] = [1, 1, 1, 0]
    prior = training_prior(labels)
    assert list(prior) == list(TARGETS)
    assert prior[PATIENT] == 0.5 and prior["C2"] == 0.25 and prior["C7"] == 0.75 and prior["C1"] == 0.0
    with pytest.raises(InputError, match="C3"):
        training_prior(labels.drop(columns=["C3"]))


def test_submission_follows_test_csv_order_with_prior_for_missing_and_failed(tmp_path, caplog):
    uids = ["1.2.826.0.1.3680043.10197", "1.2.826.0.1.3680043.10454", "1.2.826.0.1.3680043.10690"]
    test = _test_csv(tmp_path / "test.csv", uids)
    preds = _preds([uids[0], uids[1], "not.in.test"], base=0.2)     # uids[2] missing; uids[1] failed
    with caplog.at_level(logging.WARNING, logger="aggregation"):
        sub = make_submission(preds, test_csv=tmp_path / "test.csv", prior=PRIOR, failed={uids[1]})
    assert list(sub.columns) == ["row_id", "fractured"]
    assert list(sub["row_id"]) == list(test["row_id"])                  # exactly, in test.csv order
    got = dict(zip(sub["row_id"], sub["fractured"], strict=True))
    for j, t in enumerate(TARGETS):
        assert got[f"{uids[0]}_{t}"] == pytest.approx(0.2 + 0.01 * j)   # predicted
        assert got[f"{uids[1]}_{t}"] == pytest.approx(PRIOR[t])         # failed -> prior
        assert got[f"{uids[2]}_{t}"] == pytest.approx(PRIOR[t])         # missing -> prior
    assert uids[1] in caplog.text and uids[2] in caplog.text and "processing failed" in caplog.text


def test_submission_without_test_csv_has_eight_rows_per_study_including_failed():
    preds = _preds(["a", "b"], base=0.3)
    sub = make_submission(preds, test_csv=None, prior=PRIOR, failed={"b", "crashed"})
    assert len(sub) == 8 * 3
    assert list(sub["row_id"][:8]) == [f"a_{t}" for t in TARGETS]
    got = dict(zip(sub["row_id"], sub["fractured"], strict=True))
    assert got["crashed_patient_overall"] == 0.5 and got["b_C3"] == pytest.approx(PRIOR["C3"])
    assert got["a_C3"] == pytest.approx(0.32)


def test_complete_predictions_flags_failed_and_nan():
    preds = _preds(["a", "b", "c"], base=0.1)
    preds.loc[2, "C4"] = np.nan
    full = complete_predictions(preds, studies=["c", "a", "b", "z"], prior=PRIOR, failed={"b"})
    assert list(full[STUDY_COL]) == ["c", "a", "b", "z"]
    assert list(full["failed"]) == [1, 0, 1, 1]
    assert full.loc[0, "C4"] == pytest.approx(PRIOR["C4"]) and full.loc[3, PATIENT] == 0.5
    assert full.loc[1, "C1"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="patient_overall"):
        complete_predictions(preds, studies=["a"], prior={lv: 0.1 for lv in LEVELS}, failed=())


def test_round_trip_through_files(tmp_path):
    preds = _preds(["u.1", "u.2"], base=0.05)
    full = complete_predictions(preds, studies=["u.1", "u.2"], prior=PRIOR)
    write_predictions(full, tmp_path / "predictions.csv")
    back = pd.read_csv(tmp_path / "predictions.csv", dtype={STUDY_COL: str})
    assert list(back.columns) == [STUDY_COL, *TARGETS, "failed"]
    write_submission(submission_from_predictions(full), tmp_path / "submission.csv")
    wide = predictions_from_submission(pd.read_csv(tmp_path / "submission.csv"))
    assert np.allclose(wide[list(TARGETS)].to_numpy(), full[list(TARGETS)].to_numpy())
    with pytest.raises(InputError, match="incomplete"):
        predictions_from_submission(submission_from_predictions(full).iloc[:-1])


def test_bad_test_csv_is_named(tmp_path):
    (tmp_path / "test.csv").write_text("row_id,StudyInstanceUID\nabc_T1,abc\n")
    with pytest.raises(InputError, match="test.csv"):
        make_submission(_preds(["abc"], 0.1), test_csv=tmp_path / "test.csv", prior=PRIOR, failed=set())


def test_real_test_csv_gets_every_row(realdata):
    test = pd.read_csv(realdata("test.csv"))
    sample = pd.read_csv(realdata("sample_submission.csv"))
    sub = make_submission(_preds([], 0.1), test_csv=realdata("test.csv"), prior=PRIOR, failed=set())
    assert list(sub["row_id"]) == list(test["row_id"])
    assert set(sub["row_id"]) == set(sample["row_id"])
    assert sub["fractured"].between(0, 1).all()
