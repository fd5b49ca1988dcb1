"""`spinefrac train` then `spinefrac predict` through the CLI on a tiny synthetic dataset (`trained`: conftest.py)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from data_prep.runs.manifest import file_sha256
from data_prep.runs.registry import STUDY_COL, TARGETS
from spinefrac.cli import main


@pytest.mark.slow
def test_model_folder_is_self_describing(trained):
    model = trained / "model"
    meta = json.loads((model / "model.json").read_text())
    assert set(meta["stages"]) >= {"prepare-detector", "train-detector", "prepare-locator", "train-locator",
                                   "prepare-classifier", "train-classifier-fold0", "train-classifier-fold1",
                                   "detect-aggregator-studies-fold0", "detect-aggregator-studies-fold1",
                                   "train-aggregator"}
    assert meta["locator"] is True and "torch" in meta["versions"] and "ultralytics" in meta["versions"]
    for name in ("config.yaml", "detector.yaml", "locator.yaml", "levels.yaml", "aggregation.yaml", "splits.json",
                 "prior.json", "detector/weights/best.pt", "detector/results.csv", "locator/weights/best.pt",
                 "aggregator/aggregator.skops", "aggregator/aggregator.json"):
        assert (model / name).exists(), name
    # no study trains both the detector and the aggregator
    roles = json.loads((model / "splits.json").read_text())["roles"]
    det_index = pd.read_csv(model / "work" / "detector_dataset" / "index.csv", dtype={STUDY_COL: str})
    agg_features = pd.read_csv(model / "work" / "aggregator_detect" / "features.csv", dtype={STUDY_COL: str})
    assert (model / "classifier.yaml").is_file()
    assert set(det_index[STUDY_COL]).isdisjoint(agg_features[STUDY_COL])
    assert {roles[u] for u in det_index[STUDY_COL]} == {"detector"}
    assert {roles[u] for u in agg_features[STUDY_COL]} == {"aggregator"}


@pytest.mark.slow
def test_rerun_of_train_skips_finished_stages(trained, caplog):
    before = json.loads((trained / "model" / "model.json").read_text())["stages"]
    caplog.set_level("INFO")
    assert main(["train", str(trained / "data"), "--out", str(trained / "model"), "--config",
                 str(trained / "pipeline.yaml"), "--no-progress"]) == 0
    after = json.loads((trained / "model" / "model.json").read_text())["stages"]
    assert after == before
    assert caplog.text.count("done already") == len(before)


@pytest.mark.slow
def test_predict_complete_submission_errors_and_overlays(trained, tmp_path):
    test = tmp_path / "test"       # a copy: the session's shared test studies stay intact for other tests
    shutil.copytree(trained / "test", test)
    studies = sorted(p for p in (test / "test_images").iterdir())
    broken = studies[0]
    victim = sorted(broken.glob("*.dcm"))[len(list(broken.glob("*.dcm"))) // 2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])          # a truncated slice: the study cannot be read
    out = tmp_path / "pred"
    assert main(["predict", str(test / "test_images"), "--model", str(trained / "model"), "--out", str(out),
                 "--test-csv", str(test / "test.csv"), "--labels", str(test / "truth" / "train_bounding_boxes.csv"),
                 "--no-progress"]) == 0

    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert list(errors[STUDY_COL]) == [broken.name]
    assert victim.name in errors["error"].iloc[0]

    test_csv = pd.read_csv(test / "test.csv")
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission["row_id"]) == list(test_csv["row_id"])
    assert submission["fractured"].between(0, 1).all() and submission["fractured"].notna().all()

    predictions = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    assert len(predictions) == len(studies)
    prior = json.loads((trained / "model" / "prior.json").read_text())
    assert predictions.loc[broken.name, "failed"] == 1
    assert predictions.loc[broken.name, list(TARGETS)].tolist() == pytest.approx([prior[t] for t in TARGETS])
    assert (predictions.drop(index=broken.name)["failed"] == 0).all()

    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    assert set(slices[STUDY_COL]) == {s.name for s in studies[1:]}
    assert {f"p_{lv}" for lv in TARGETS[:7]} <= set(slices.columns)
    level_boxes = pd.read_csv(out / "level_boxes.csv", dtype={STUDY_COL: str})
    assert set(level_boxes[STUDY_COL]) <= {s.name for s in studies[1:]}
    assert set(level_boxes["level"]) <= set(TARGETS[:7])
    evidence = pd.read_csv(out / "evidence.csv", dtype={STUDY_COL: str})
    assert len(evidence) == 7 * len(studies)
    # the fold classifiers (averaged) scored the located levels of every finished study; the failed one has none
    vertebrae = pd.read_csv(out / "vertebrae.csv", dtype={STUDY_COL: str})
    assert set(vertebrae[STUDY_COL]) == {s.name for s in studies[1:]} and len(vertebrae) == 7 * (len(studies) - 1)
    scored = evidence.dropna(subset=["cls_max"])
    assert len(scored) and set(scored[STUDY_COL]) <= {s.name for s in studies[1:]}
    assert scored["cls_max"].between(0, 1).all() and (scored["cls_max"] >= scored["cls_mean"] - 1e-9).all()
    assert (scored["last_slice"] >= scored["first_slice"]).all()
    for study in studies[1:]:
        folder = out / "overlays" / study.name
        assert (folder / "score_profile.png").is_file() and (folder / "contact_sheet.png").is_file()

    # the metric is computed on the hidden labels, beside the baselines
    assert main(["evaluate", str(out / "predictions.csv"), "--labels", str(test / "truth" / "train.csv"),
                 "--out", str(tmp_path / "eval"), "--boxes", str(out / "boxes.csv")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    loss = metrics["scores"]["model"]["competition_loss"]
    assert 0 < loss < 5 and metrics["n_failed"] == 1


@pytest.mark.slow
def test_predict_rejects_a_folder_that_is_not_a_model(tmp_path, trained, caplog):
    rc = main(["predict", str(trained / "test" / "test_images"), "--model", str(tmp_path), "--out",
               str(tmp_path / "p"), "--no-progress"])
    assert rc == 2
    assert "not a spinefrac model folder" in caplog.text


@pytest.mark.slow
def test_each_aggregator_study_was_scored_by_a_classifier_that_never_saw_it(trained):
    """The no-leakage guard on a real run: the crops each fold classifier trained on vs the studies it scored."""
    from detector.classifier_dataset import fold_studies

    model = trained / "model"
    meta = json.loads((model / "model.json").read_text())
    splits = json.loads((model / "splits.json").read_text())
    assert meta["classifier"] == [f"classifier/fold{k}/weights/best.pt" for k in range(splits["n_folds"])]
    agg = {u for u, r in splits["roles"].items() if r == "aggregator"}
    scored_all = set()
    for k in range(splits["n_folds"]):
        seen = fold_studies(model / "work" / "classifier_dataset" / f"fold{k}")
        scored = {p.stem for p in (model / "work" / "aggregator_detect" / f"fold{k}" / "done").glob("*.json")}
        assert seen and scored
        assert not seen & scored                              # never scored by a model that trained on it
        assert {splits["folds"][u] for u in scored} == {k}
        assert seen & {u for u, r in splits["roles"].items() if r == "detector"}   # it learns from those too
        scored_all |= scored
        vertebrae = pd.read_csv(model / "work" / "aggregator_detect" / f"fold{k}" / "vertebrae.csv")
        assert vertebrae["cls_max"].notna().any()
    assert scored_all == agg
    features = pd.read_csv(model / "work" / "aggregator_detect" / "features.csv", dtype={STUDY_COL: str})
    assert set(features[STUDY_COL]) == agg


@pytest.mark.slow
def test_a_missing_fold_classifier_is_refused_before_any_study(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model, ignore=shutil.ignore_patterns("work"))
    (model / "classifier" / "fold1" / "weights" / "best.pt").unlink()
    rc = main(["predict", str(trained / "test" / "test_images"), "--model", str(model), "--out",
               str(tmp_path / "p"), "--no-progress"])
    assert rc == 2 and not (tmp_path / "p" / "boxes.csv").exists()


@pytest.mark.slow
def test_oof_scheme_trains_fold_detectors_and_the_aggregator_on_every_study(trained, tmp_path):
    """splits.scheme=oof end to end: detector k never saw the studies it detected for the aggregator."""
    from detector.classifier_dataset import fold_studies

    cfg = tmp_path / "pipeline.yaml"
    session = (trained / "pipeline.yaml").read_text()
    oof = session.replace('"splits.n_folds=2"]', '"splits.n_folds=2", "splits.scheme=oof"]')
    oof = oof.replace('"train.val=false"]', '"train.val=false", "prepare.n_folds=2"]', 1)   # 4-study fold datasets
    assert oof.count("oof") == 1 and "prepare.n_folds=2" in oof
    cfg.write_text(oof)
    model = tmp_path / "model"
    assert main(["train", str(trained / "data"), "--out", str(model), "--config", str(cfg), "--no-progress"]) == 0
    splits = json.loads((model / "splits.json").read_text())
    meta = json.loads((model / "model.json").read_text())
    assert splits["scheme"] == "oof"
    everyone = set(splits["roles"])
    features = pd.read_csv(model / "work" / "aggregator_detect" / "features.csv", dtype={STUDY_COL: str})
    assert set(features[STUDY_COL]) == everyone                   # the aggregator learns from every study
    for k in range(2):
        assert {f"prepare-detector-fold{k}", f"train-detector-fold{k}"} <= set(meta["stages"])
        trained_on = set(pd.read_csv(model / "work" / f"detector_dataset_fold{k}" / "index.csv",
                                     dtype={STUDY_COL: str})[STUDY_COL])
        detected = {p.stem for p in (model / "work" / "aggregator_detect" / f"fold{k}" / "done").glob("*.json")}
        assert detected and not trained_on & detected and {splits["folds"][u] for u in detected} == {k}
        assert not fold_studies(model / "work" / "classifier_dataset" / f"fold{k}") & detected
        used = meta["stages"][f"detect-aggregator-studies-fold{k}"]["settings"]["detect"]["detector"]
        assert used["weights_sha256"] == file_sha256(model / "work" / "fold_detectors" / f"fold{k}" / "weights"
                                                     / "best.pt")
    # the final detector (trained on every detector study) is what predict uses; fold detectors stay in work/
    assert not any(name.startswith("work/") for name in meta["files"])
    out = tmp_path / "pred"
    assert main(["predict", str(trained / "test" / "test_images"), "--model", str(model), "--out", str(out),
                 "--no-progress"]) == 0
    assert pd.read_csv(out / "predictions.csv")[list(TARGETS)].notna().all().all()


@pytest.mark.slow
def test_a_classifier_trained_with_the_crack_channel_predicts_with_it(trained, tmp_path):
    """The session pipeline's classifiers render the crack channel (conftest.py): crops, model folder, predict."""
    import cv2
    import numpy as np

    from data_prep.runs.config import load_config
    from detector.render import apply_window

    model = trained / "model"
    assert load_config("classifier", model / "classifier.yaml").render.crack_channel == 2
    dataset = model / "work" / "classifier_dataset"
    assert json.loads((dataset / "index.csv.meta.json").read_text())["extra"]["render"]["crack_channel"] == 2
    # channel 2 of the crops is the crack channel: black over soft tissue, where the 2.5D neighbour is grey
    soft = int(apply_window(np.array([45.0]), 400.0, 1800.0)[0])
    crops = np.stack([cv2.imread(str(p)) for p in sorted((dataset / "images").rglob("*.png"))[:20]])
    tissue = np.abs(crops[..., 1].astype(int) - soft) < 10
    assert tissue.sum() > 100 and np.median(crops[..., 2][tissue]) == 0
    # predict renders it too: every study's detect marker is keyed by settings that name it
    out = tmp_path / "pred"
    assert main(["predict", str(trained / "test" / "test_images"), "--model", str(model), "--out", str(out),
                 "--no-progress"]) == 0
    markers = sorted(out.rglob("done/*.json"))
    assert markers
    for marker in markers:
        assert json.loads(marker.read_text())["settings"]["classifier"]["render"]["crack_channel"] == 2
