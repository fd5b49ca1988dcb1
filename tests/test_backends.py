"""The predictor API: PyTorch, ONNX Runtime and OpenVINO give the same boxes; "auto" export cache; errors.

The weights are an untrained yolov8n (1 class) whose convolutions get He-scaled random weights and a
sharpened head, so scores and boxes depend on the image (a plain untrained model gives tied scores).
No training: the whole file runs in well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep.errors import InputError
from data_prep.runs.config import ConfigError, load_config

IMGSZ = 64
N_IMAGES = 6
CONF, IOU, MAX_DET = 0.05, 0.5, 5
CLS_GAIN, CLS_BIAS, BOX_GAIN = 20.0, -2.0, 50.0  # head sharpening (see module docstring)
EXACT_PX, EXACT_SCORE = 1e-3, 1e-4  # fp32 backends: same graph, same arithmetic up to summation order
BF16_PX, BF16_SCORE = 1.5, 0.01  # OpenVINO bf16 (default on CPUs that have it): ~1 px, MEASURED.md
TOP_K = 3

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def _ultralytics_twin(path: Path) -> Path:
    """Where `_random_weights` keeps the Ultralytics checkpoint (a pickle) that `path` was converted from."""
    return path.parent / "ultralytics" / path.name


def _random_weights(path: Path, seed: int) -> Path:
    """Save an untrained 1-class yolov8n with input-dependent outputs to `path` (spinefrac's weights-only format)."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from detector.weights import convert_checkpoint

    torch.manual_seed(seed)
    yolo = YOLO("yolov8n.yaml")
    yolo.model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    yolo.model.names = {0: "fracture"}
    head = yolo.model.model[-1]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in yolo.model.named_modules():
            if isinstance(module, torch.nn.Conv2d) and ".dfl" not in name:
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=gen)
        for branch in head.cv3:
            branch[-1].weight.mul_(CLS_GAIN)
            branch[-1].bias.fill_(CLS_BIAS)
        for branch in head.cv2:
            branch[-1].weight.mul_(BOX_GAIN)
    twin = _ultralytics_twin(path)
    twin.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(str(twin))
    return convert_checkpoint(twin, path, trust=True)


@pytest.fixture(scope="module")
def weights(yolo_home, tmp_path_factory) -> Path:
    return _random_weights(tmp_path_factory.mktemp("model") / "weights" / "best.pt", seed=0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Rectangles of random grey levels on noise, uint8 BGR (B, 64, 64, 3)."""
    rng = np.random.default_rng(1)
    out = rng.integers(0, 40, (N_IMAGES, IMGSZ, IMGSZ, 3), dtype=np.uint8)
    for img in out:
        x, y = rng.integers(0, IMGSZ // 2, 2)
        w, h = rng.integers(IMGSZ // 8, IMGSZ // 2, 2)
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), tuple(int(v) for v in rng.integers(128, 255, 3)),
                      -1)
    return out


def _load(weights: Path, backend: str, **kw):
    from detector.backends import load_predictor

    return load_predictor(weights, imgsz=IMGSZ, backend=backend, conf=CONF, iou=IOU, max_det=MAX_DET, **kw)


def _assert_same_boxes(ref: list[np.ndarray], other: list[np.ndarray], px: float, score: float, top_k: int | None):
    """Each of the first top_k reference boxes of every image has a box in `other` within px and score."""
    assert len(ref) == len(other)
    for a, b in zip(ref, other, strict=True):
        assert a.shape[1] == b.shape[1] == 6
        if top_k is None:
            assert len(a) == len(b)
        for box in a[:top_k]:
            assert len(b), "the other backend found no box"
            d_xy = np.abs(b[:, :4] - box[:4]).max(axis=1)
            d_s = np.abs(b[:, 4] - box[4])
            ok = (d_xy <= px) & (d_s <= score) & (b[:, 5] == box[5])
            assert ok.any(), f"no match for {box} within {px} px / {score}: closest {b[np.argmin(d_xy)]}"


def test_pytorch_predictor_matches_ultralytics_predict(weights, images):
    """Our in-memory path equals Ultralytics' own predict on the same BGR arrays (an independent pipeline)."""
    from ultralytics import YOLO

    pred = _load(weights, "pytorch")
    ours = pred.predict(images)
    results = YOLO(str(_ultralytics_twin(weights))).predict(list(images), imgsz=IMGSZ, conf=CONF, iou=IOU, max_det=MAX_DET,
                                          device="cpu", verbose=False)
    theirs = [r.boxes.data.cpu().numpy() for r in results]
    assert sum(len(o) for o in ours) > 0
    _assert_same_boxes(theirs, ours, EXACT_PX, EXACT_SCORE, top_k=None)
    assert pred.backend == "pytorch" and pred.names == {0: "fracture"}


def test_boxes_are_clipped_pixels_sorted_by_score(weights, images):
    out = _load(weights, "pytorch").predict(images)
    for boxes in out:
        assert boxes.dtype == np.float32 and len(boxes) <= MAX_DET
        assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= IMGSZ).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (boxes[:, 4] >= CONF).all() and (np.diff(boxes[:, 4]) <= 0).all()


@pytest.mark.skipif(not (HAS_ORT and HAS_OPENVINO), reason="onnxruntime and openvino are both needed")
def test_three_backends_give_matching_boxes(weights, images):
    ref = _load(weights, "pytorch")
    ort = _load(weights, "onnx")
    ov32 = _load(weights, "openvino", openvino_precision="f32")
    ov = _load(weights, "openvino")
    assert (ort.backend, ov32.backend, ov.backend) == ("onnx", "openvino", "openvino")
    assert ort.weights.suffix == ".onnx" and ov.weights.name.endswith("_openvino_model")
    boxes = ref.predict(images)
    assert sum(len(b) for b in boxes) > 0
    _assert_same_boxes(boxes, ort.predict(images), EXACT_PX, EXACT_SCORE, top_k=None)
    _assert_same_boxes(boxes, ov32.predict(images), EXACT_PX, EXACT_SCORE, top_k=None)
    _assert_same_boxes(boxes, ov.predict(images), BF16_PX, BF16_SCORE, top_k=TOP_K)
    raw_ref, raw_ov = ref.raw(images), ov.raw(images)
    assert raw_ref.shape == raw_ov.shape == (N_IMAGES, 4 + 1, raw_ref.shape[2])
    assert np.abs(raw_ref[:, 4:] - raw_ov[:, 4:]).max() <= BF16_SCORE
    assert np.allclose(raw_ref, ort.raw(images), atol=EXACT_PX, rtol=0)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_auto_exports_openvino_once_and_refreshes_when_weights_change(yolo_home, tmp_path, images):
    w = _random_weights(tmp_path / "w" / "best.pt", seed=2)
    first = _load(w, "auto")
    assert first.backend == "openvino"
    target = w.with_name("best_openvino_model")
    sidecar = w.with_name("best_openvino_model.meta.json")
    assert target.is_dir() and sidecar.is_file()
    assert not [p for p in w.parent.iterdir() if p.name.startswith(".")], "temporary export files left behind"
    stamp = (target / "best.xml").stat().st_mtime_ns
    second = _load(w, "auto")
    assert second.weights == target and (target / "best.xml").stat().st_mtime_ns == stamp  # reused, not redone
    _assert_same_boxes(first.predict(images), second.predict(images), EXACT_PX, EXACT_SCORE, top_k=None)

    old_hash = json.loads(sidecar.read_text())["inputs"]["weights_sha256"]
    _random_weights(w, seed=3)  # retrained weights: the cached export is stale
    third = _load(w, "auto")
    assert third.backend == "openvino"
    assert json.loads(sidecar.read_text())["inputs"]["weights_sha256"] != old_hash
    _assert_same_boxes(_load(w, "pytorch").predict(images), third.predict(images), BF16_PX, BF16_SCORE, TOP_K)


def test_auto_falls_back_in_preference_order(yolo_home, weights, monkeypatch):
    import detector.backends as backends

    monkeypatch.setattr(backends, "installed_backends", lambda: ["pytorch"])
    assert _load(weights, "auto").backend == "pytorch"
    if HAS_ORT:
        monkeypatch.setattr(backends, "installed_backends", lambda: ["onnx", "pytorch"])
        assert _load(weights, "auto").backend == "onnx"


def test_installed_backends_fastest_first():
    from detector.backends import installed_backends

    found = installed_backends()
    assert found[-1] == "pytorch"
    assert ("openvino" in found) == HAS_OPENVINO and ("onnx" in found) == HAS_ORT
    if HAS_OPENVINO and HAS_ORT:
        assert found.index("openvino") < found.index("onnx")


def test_exported_models_load_directly_and_keep_their_kind(weights, images):
    from detector.export import export_weights

    onnx = export_weights(weights, fmt="onnx", imgsz=IMGSZ)
    pred = _load(onnx, "auto")
    assert pred.backend == "onnx"
    with pytest.raises(InputError, match="onnx model"):
        _load(onnx, "openvino")


def test_static_export_refuses_another_image_size(weights, tmp_path):
    import shutil

    from detector.backends import load_predictor
    from detector.export import export_weights

    w = tmp_path / "best.pt"
    shutil.copyfile(weights, w)
    static = {**load_config("detector").export.to_dict(), "dynamic": False}
    onnx = export_weights(w, fmt="onnx", imgsz=IMGSZ, options=static)
    with pytest.raises(InputError, match="fixed 64x64"):
        load_predictor(onnx, imgsz=2 * IMGSZ, conf=CONF, iou=IOU, max_det=MAX_DET)


def test_timings_count_images_and_stages(weights, images):
    pred = _load(weights, "pytorch")
    pred.predict(images[:4])
    pred.predict(images[4:])
    t = pred.timings
    assert (t.images, t.batches) == (N_IMAGES, 2)
    assert all(v > 0 for v in t.ms_per_image().values())
    pred.reset_timings()
    assert pred.timings.images == 0


def test_bad_inputs_raise_clear_errors(weights, tmp_path):
    from detector.backends import load_predictor, weights_kind

    with pytest.raises(InputError, match="not found"):
        load_predictor(tmp_path / "nope.pt", imgsz=IMGSZ, conf=CONF, iou=IOU, max_det=MAX_DET)
    with pytest.raises(ConfigError, match="tensorrt"):
        load_predictor(weights, imgsz=IMGSZ, backend="tensorrt", conf=CONF, iou=IOU, max_det=MAX_DET)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="not a model"):
        weights_kind(tmp_path / "model.bin")
    pred = _load(weights, "pytorch")
    with pytest.raises(ValueError, match="uint8"):
        pred.predict(np.zeros((2, IMGSZ, IMGSZ, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        pred.predict(np.zeros((2, IMGSZ + 1, IMGSZ, 3), np.uint8))
    assert pred.predict(np.zeros((0, IMGSZ, IMGSZ, 3), np.uint8)) == []


def test_predict_keeps_configured_threads(weights, images):
    import torch
    from ultralytics.utils.torch_utils import select_device

    pred = _load(weights, "pytorch", threads=2)
    select_device("cpu", verbose=False)  # Ultralytics lowers torch threads to cpu_count - 1 here
    seen = []
    model = pred.model

    def spy(x):
        seen.append(torch.get_num_threads())
        return model(x)

    pred.model = spy
    pred.predict(images)
    assert seen == [2]


def test_threads_default_to_every_core():
    from detector.offline import resolve_threads

    assert resolve_threads(None) == resolve_threads(0) == (os.cpu_count() or 1)
    assert resolve_threads(3) == 3


def test_cli_export_writes_beside_the_weights_with_config_imgsz(weights, tmp_path, capsys):
    import shutil

    from spinefrac.cli import main

    w = tmp_path / "best.pt"
    shutil.copyfile(weights, w)
    assert main(["export", "-q", "--weights", str(w), "--format", "onnx", "--imgsz", str(IMGSZ)]) == 0
    onnx = tmp_path / "best.onnx"
    assert capsys.readouterr().out.strip() == str(onnx)
    meta = json.loads((tmp_path / "best.onnx.meta.json").read_text())
    assert meta["extra"]["imgsz"] == IMGSZ and meta["extra"]["format"] == "onnx"
    import onnxruntime

    shape = onnxruntime.InferenceSession(str(onnx)).get_inputs()[0].shape
    assert shape[1] == 3 and all(isinstance(d, str) for d in (shape[0], shape[2], shape[3]))  # dynamic


def test_failed_export_leaves_the_previous_export_and_no_temp_files(weights, tmp_path, monkeypatch):
    import shutil

    from ultralytics.engine.model import Model

    from detector.export import export_weights

    w = tmp_path / "best.pt"
    shutil.copyfile(weights, w)
    good = export_weights(w, fmt="onnx", imgsz=IMGSZ)
    before = good.read_bytes()

    def broken(self, **kwargs):
        Path(str(self.ckpt_path).replace(".pt", ".onnx")).write_bytes(b"half-written")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(Model, "export", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        export_weights(w, fmt="onnx", imgsz=IMGSZ)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.onnx", "best.onnx.meta.json", "best.pt"]


@pytest.mark.parametrize("n_classes", [1, 7])
def test_batch_nms_gives_ultralytics_nms_boxes(n_classes):
    """The batched NMS keeps exactly Ultralytics' boxes: best class, class-aware suppression, max_det, clipping."""
    import torch
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import clip_boxes

    from detector.backends import batch_nms

    rng = np.random.default_rng(n_classes)
    n_images, n_anchors, size = 5, 400, 96
    raw = np.zeros((n_images, 4 + n_classes, n_anchors), np.float32)
    centres = rng.uniform(0, size, (n_images, 2, 1))          # clustered boxes overlap: suppression matters
    raw[:, :2] = centres + rng.normal(0, 6, (n_images, 2, n_anchors))
    raw[:, 2:4] = rng.uniform(4, 40, (n_images, 2, n_anchors))
    raw[:, 4:] = rng.uniform(0, 1, (n_images, n_classes, n_anchors)) ** 4   # most anchors under conf
    raw[2, 4:] = 0.0                                                         # an image with no candidate
    ours = batch_nms(torch.from_numpy(raw), conf=CONF, iou=IOU, max_det=MAX_DET, imgsz=size)
    ref = non_max_suppression(torch.from_numpy(raw), conf_thres=CONF, iou_thres=IOU, max_det=MAX_DET)
    assert len(ours) == n_images
    assert len(ours[2]) == 0
    for mine, theirs in zip(ours, ref, strict=True):
        theirs = theirs[:, :6].clone()
        clip_boxes(theirs[:, :4], (size, size))
        theirs = theirs.numpy()
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=1e-4)
    assert sum(len(m) for m in ours) > n_images       # several boxes survived: the comparison had substance
