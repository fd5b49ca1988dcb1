"""The vertebra classifier: weights-only classify networks, fold averaging, per-level scores, vertebrae rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep.errors import InputError
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.classifier import VERTEBRA_COLUMNS, level_scores, load_classifier, vertebra_table

IMGSZ = 32


def _classify_weights(path, seed: int, names=None, bias: float | None = None):
    """Save a randomly initialised yolov8n-cls network (2 classes "0", "1") as a spinefrac weights file.

    bias: the head's second logit is raised by this much (a random network's probabilities are all near 0.5).
    """
    import torch

    from detector.offline import configure_ultralytics
    from detector.weights import save_weights

    configure_ultralytics()
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(seed)
    model = ClassificationModel("yolov8n-cls.yaml", ch=3, nc=2, verbose=False)
    model.names = names or {0: "0", 1: "1"}
    if bias is not None:
        with torch.no_grad():
            model.model[-1].linear.bias[1] += bias
    return save_weights(model.eval(), path, source={"file": "test", "imgsz": IMGSZ})


def _config(backend: str = "pytorch"):
    return load_config("classifier", None, [f"render.imgsz={IMGSZ}", "score.batch=3", f"score.backend={backend}"])


def test_classify_weights_round_trip_and_fold_models_are_averaged(tmp_path, yolo_home):
    from detector.weights import build_model, weights_task

    paths = [_classify_weights(tmp_path / f"fold{k}.pt", seed=k) for k in range(2)]
    assert weights_task(paths[0]) == "classify"
    assert type(build_model(paths[0])).__name__ == "ClassificationModel"
    images = np.random.default_rng(0).integers(0, 256, (5, IMGSZ, IMGSZ, 3), dtype=np.uint8)
    single = [load_classifier([p], config=_config(), device="cpu").predict(images) for p in paths]
    both = load_classifier(paths, config=_config(), device="cpu").predict(images)
    assert single[0].shape == (5,) and np.all((single[0] >= 0) & (single[0] <= 1))
    assert not np.allclose(single[0], single[1])            # two different networks
    np.testing.assert_allclose(both, (single[0] + single[1]) / 2, rtol=1e-5)


OV_TOLERANCE = 0.02
"""OpenVINO may run bf16 on CPUs that have it (as the detector does): probabilities within ~0.01 of PyTorch."""


def test_the_fold_models_run_as_one_openvino_graph_cached_and_checked(tmp_path, yolo_home, monkeypatch):
    from detector import classifier_ensemble

    paths = [_classify_weights(tmp_path / "fold0.pt", seed=0, bias=1.5),                    # p ~ 0.82
             _classify_weights(tmp_path / "fold1.pt", seed=1, bias=0.5, names={0: "1", 1: "0"})]  # positive: 0, ~0.38
    images = np.random.default_rng(2).integers(0, 256, (7, IMGSZ, IMGSZ, 3), dtype=np.uint8)
    torch_p = load_classifier(paths, config=_config("pytorch"), device="cpu").predict(images)
    assert torch_p == pytest.approx(np.full(7, 0.6), abs=0.03)            # the folds' mean, by hand
    clf = load_classifier(paths, config=_config("openvino"), device="cpu")
    assert clf.backend == "openvino"
    np.testing.assert_allclose(clf.predict(images), torch_p, atol=OV_TOLERANCE)   # 7 crops, score.batch 3
    cache = tmp_path / "ensemble2_openvino_model"
    assert (cache / "ensemble.xml").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:        # the same weights: the cache is used as it is
        m.setattr(classifier_ensemble, "_convert", no_conversion)
        np.testing.assert_allclose(load_classifier(paths, config=_config("auto"), device="cpu").predict(images),
                                   torch_p, atol=OV_TOLERANCE)
    blob = next(cache.glob("*.bin"))
    blob.write_bytes(b"\0" * blob.stat().st_size)               # tampered with: converted again, not used
    np.testing.assert_allclose(load_classifier(paths, config=_config("openvino"), device="cpu").predict(images),
                               torch_p, atol=OV_TOLERANCE)
    other = [paths[0], _classify_weights(tmp_path / "other.pt", seed=5, bias=-2.0)]   # other folds: not this cache
    expected = load_classifier(other, config=_config("pytorch"), device="cpu").predict(images)
    np.testing.assert_allclose(load_classifier(other, config=_config("openvino"), device="cpu").predict(images),
                               expected, atol=OV_TOLERANCE)
    assert expected == pytest.approx(np.full(7, 0.47), abs=0.03)          # (0.82 + 0.12) / 2


def test_auto_falls_back_to_pytorch_when_the_ensemble_cannot_be_written(tmp_path, yolo_home, monkeypatch):
    from detector import classifier_ensemble

    path = _classify_weights(tmp_path / "fold0.pt", seed=0)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(classifier_ensemble, "_convert", read_only)
    assert load_classifier([path], config=_config("auto"), device="cpu").backend == "pytorch"
    with pytest.raises(PermissionError):
        load_classifier([path], config=_config("openvino"), device="cpu")


def test_the_positive_class_is_found_by_name_not_position(tmp_path, yolo_home):
    normal = _classify_weights(tmp_path / "a.pt", seed=3)
    swapped = _classify_weights(tmp_path / "b.pt", seed=3, names={0: "1", 1: "0"})   # same network, classes swapped
    images = np.random.default_rng(1).integers(0, 256, (4, IMGSZ, IMGSZ, 3), dtype=np.uint8)
    p = load_classifier([normal], config=_config(), device="cpu").predict(images)
    q = load_classifier([swapped], config=_config(), device="cpu").predict(images)
    np.testing.assert_allclose(p, 1 - q, rtol=1e-5)


def test_a_detector_or_a_class_less_network_is_refused(tmp_path, yolo_home):
    odd = _classify_weights(tmp_path / "odd.pt", seed=0, names={0: "normal", 1: "broken"})
    with pytest.raises(InputError, match="no class '1'"):
        load_classifier([odd], config=_config(), device="cpu")
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from detector.weights import save_weights

    torch.manual_seed(0)
    det = DetectionModel("yolov8n.yaml", ch=3, nc=1, verbose=False)
    det.names = {0: "fracture"}
    path = save_weights(det.eval(), tmp_path / "det.pt", source={"file": "test", "imgsz": 64})
    with pytest.raises(InputError, match="not a classifier"):
        load_classifier([path], config=_config(), device="cpu")


def test_wrong_image_shapes_are_refused(tmp_path, yolo_home):
    clf = load_classifier([_classify_weights(tmp_path / "a.pt", seed=0)], config=_config(), device="cpu")
    with pytest.raises(ValueError, match="uint8 images of shape"):
        clf.predict(np.zeros((2, IMGSZ + 1, IMGSZ, 3), np.uint8))
    assert clf.predict(np.zeros((0, IMGSZ, IMGSZ, 3), np.uint8)).shape == (0,)


def test_level_scores_by_hand():
    levels = ["C2", "C2", "C2", "C5"]
    probs = [0.1, 0.9, 0.5, 0.3]
    table = level_scores(np.array(probs), levels, top_k=2).set_index("level")
    assert list(table.index) == list(LEVELS)
    assert table.loc["C2", "n_crops"] == 3
    assert table.loc["C2", "cls_max"] == pytest.approx(0.9)
    assert table.loc["C2", "cls_topk"] == pytest.approx(0.7)          # mean of 0.9 and 0.5
    assert table.loc["C2", "cls_mean"] == pytest.approx(0.5)
    assert table.loc["C5", "cls_topk"] == pytest.approx(0.3)          # fewer crops than top_k: their mean
    assert table.loc["C1", "n_crops"] == 0 and np.isnan(table.loc["C1", "cls_max"])


def test_vertebra_table_fills_levels_not_found():
    extents = pd.DataFrame({"level": ["C3"], "first_slice": [10], "last_slice": [19], "n_slices": [10],
                            "source": ["locator"]})
    rows = vertebra_table("1.2.3", extents, level_scores(np.array([0.8]), ["C3"], top_k=2)).set_index("level")
    assert list(vertebra_table("1.2.3", extents, None).columns) == list(VERTEBRA_COLUMNS)
    assert (rows[STUDY_COL] == "1.2.3").all()
    assert rows.loc["C3", ["first_slice", "last_slice", "n_slices", "n_crops"]].tolist() == [10, 19, 10, 1]
    assert rows.loc["C1", ["first_slice", "last_slice", "n_slices", "source"]].tolist() == [-1, -1, 0, "none"]
    assert np.isnan(rows.loc["C1", "cls_max"]) and rows.loc["C3", "cls_max"] == pytest.approx(0.8)
    no_scores = vertebra_table("1.2.3", extents, None)
    assert no_scores["cls_max"].isna().all() and (no_scores["n_crops"] == 0).all()
