"""The predictor API: batches of rendered slices in memory -> boxes after NMS, on PyTorch, ONNX Runtime or OpenVINO.

All three run through Ultralytics' `AutoBackend` (loading, metadata, static-batch padding). Boxes follow
Ultralytics' `non_max_suppression` (best class per anchor, class-aware NMS, at most max_det per image), so a
batch gives the same boxes as `YOLO.predict` on the same arrays, without files; but the candidate filter runs
in NumPy over the whole batch and the NMS is one `torchvision.ops.batched_nms` call per batch (Ultralytics
loops over images with small torch ops, which on 2 busy cores cost more than the model: see `batch_nms`).
Images follow Ultralytics' convention for NumPy input: uint8 (B, H, W, 3) in OpenCV (BGR) channel order,
i.e. the arrays one would pass to `cv2.imwrite` to write the training PNGs; they are flipped to RGB here,
exactly as the Ultralytics dataloader and predictor do.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import InputError
from data_prep.runs.config import ConfigError, load_config
from detector.export import OPENVINO_SUFFIX, export_weights, fresh_export, metadata_problem
from detector.offline import configure_ultralytics, restore_threads, set_ultralytics_verbosity
from detector.weights import build_model, read_weights

log = logging.getLogger("detector")

BACKENDS = ("pytorch", "onnx", "openvino")
BACKEND_CHOICES = ("auto", *BACKENDS)
# Fastest first on CPU (shared/MEASURED.md: OpenVINO ~2x ONNX Runtime ~1.5-2x PyTorch), with the module it needs.
CPU_PREFERENCE = (("openvino", "openvino"), ("onnx", "onnxruntime"))
PIXEL_MAX = 255.0
BOX_COLUMNS = ("x1", "y1", "x2", "y2", "score", "class")
OV_LATENCY_HINT = ("PERFORMANCE_HINT", "LATENCY")  # what Ultralytics compiles OpenVINO models with
MAX_NMS = 30000      # at most this many candidates per image enter NMS (Ultralytics' max_nms)
MAX_WH = 7680        # class offset in class-aware NMS (Ultralytics' max_wh); only the grouping matters here


@dataclass
class StageTimings:
    """Wall-clock seconds spent per stage since the last reset, and how many images and batches they covered."""

    preprocess: float = 0.0
    model: float = 0.0
    postprocess: float = 0.0
    images: int = 0
    batches: int = 0

    def ms_per_image(self) -> dict[str, float]:
        """Return milliseconds per image for each stage (NaN before any image)."""
        n = self.images or float("nan")
        return {stage: 1000.0 * getattr(self, stage) / n for stage in ("preprocess", "model", "postprocess")}


@dataclass
class Predictor:
    """A loaded detector: `predict(images)` returns one (k, 6) array per image: x1, y1, x2, y2, score, class."""

    backend: str
    names: dict[int, str]
    weights: Path
    imgsz: int
    conf: float
    iou: float
    max_det: int
    threads: int | None
    model: Any = field(repr=False)
    device: Any = field(repr=False)
    timings: StageTimings = field(default_factory=StageTimings)

    def predict(self, images: np.ndarray) -> list[np.ndarray]:
        """Detect boxes on a uint8 (B, imgsz, imgsz, 3) BGR batch; pixel coordinates of the imgsz image."""
        t0 = time.perf_counter()
        x = self._to_tensor(images)
        if x is None:
            return []
        t1 = time.perf_counter()
        raw = self._run(x)
        t2 = time.perf_counter()
        out = batch_nms(raw, conf=self.conf, iou=self.iou, max_det=self.max_det, imgsz=self.imgsz)
        t3 = time.perf_counter()
        self.timings.preprocess += t1 - t0
        self.timings.model += t2 - t1
        self.timings.postprocess += t3 - t2
        self.timings.images += len(x)
        self.timings.batches += 1
        return out

    def raw(self, images: np.ndarray) -> np.ndarray:
        """Return the model's raw output before NMS: float32 (B, 4 + classes, anchors), boxes as cx, cy, w, h."""
        x = self._to_tensor(images)
        if x is None:
            return np.zeros((0, 4 + len(self.names), 0), np.float32)
        y = self._run(x)
        return (y[0] if isinstance(y, (list, tuple)) else y).float().cpu().numpy()

    def _to_tensor(self, images: np.ndarray) -> Any:
        """Check a uint8 BGR (B, H, W, 3) batch and turn it into a float RGB (B, 3, H, W) tensor in [0, 1]."""
        import torch

        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        expected = (self.imgsz, self.imgsz, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"predict expects uint8 images of shape (B, {self.imgsz}, {self.imgsz}, 3), "
                             f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            return None
        return torch.from_numpy(to_model_input(images)).to(self.device)

    def _run(self, x: Any) -> Any:
        """Run the backend on a prepared tensor, with torch's CPU threads at the configured count."""
        import torch

        if self.device.type == "cpu":
            restore_threads(self.threads)
        with torch.inference_mode():
            return self.model(x)

    def reset_timings(self) -> None:
        """Zero the per-stage timers."""
        self.timings = StageTimings()


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 BGR (B, H, W, 3) -> float32 RGB (B, 3, H, W) in [0, 1], in NumPy (no torch threads on the hot path)."""
    x = np.empty((images.shape[0], images.shape[3], images.shape[1], images.shape[2]), dtype=np.float32)
    np.multiply(images[..., ::-1].transpose(0, 3, 1, 2), np.float32(1.0 / PIXEL_MAX), out=x, dtype=np.float32)
    return x


def batch_nms(raw: Any, *, conf: float, iou: float, max_det: int, imgsz: int) -> list[np.ndarray]:
    """Ultralytics' NMS for a batch of raw YOLO outputs (B, 4 + classes, anchors): (k, 6) xyxy-score-class per image.

    As `ultralytics.utils.nms.non_max_suppression` with its defaults (best class per anchor, score > conf,
    class-aware NMS at `iou`, at most max_det boxes per image by score, boxes clipped to the image), but the
    score filter runs in NumPy over the whole batch, and every image's NMS is one torchvision call: few
    anchors pass `conf`, and per-image small torch ops each start the thread pool, which stalls when the
    decode workers keep both cores busy.
    """
    import torch
    from torchvision.ops import batched_nms

    pred = raw[0] if isinstance(raw, (list, tuple)) else raw
    p = pred.float().cpu().numpy() if hasattr(pred, "cpu") else np.asarray(pred, dtype=np.float32)
    n_images, n_classes = p.shape[0], p.shape[1] - 4
    cls_scores = p[:, 4:, :]
    scores = cls_scores.max(axis=1)                       # (B, anchors)
    image, anchor = np.nonzero(scores > conf)
    out = [np.zeros((0, len(BOX_COLUMNS)), np.float32) for _ in range(n_images)]
    if not len(image):
        return out
    s = scores[image, anchor]
    counts = np.bincount(image, minlength=n_images)
    if counts.max() > MAX_NMS:                            # keep each image's MAX_NMS best, as Ultralytics does
        order = np.lexsort((-s, image))
        rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = order[rank < MAX_NMS]
        image, anchor, s = image[keep], anchor[keep], s[keep]
    cls = cls_scores[image, :, anchor].argmax(axis=1)
    cx, cy, w, h = (p[image, k, anchor] for k in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    groups = image.astype(np.int64) * n_classes + cls
    kept = batched_nms(torch.from_numpy(boxes), torch.from_numpy(s), torch.from_numpy(groups), iou).numpy()
    kept = kept[np.lexsort((np.arange(len(kept)), image[kept]))]   # by image, score order kept within each
    img_k = image[kept]
    first = np.searchsorted(img_k, np.arange(n_images))
    rank = np.arange(len(kept)) - first[img_k]
    kept, img_k = kept[rank < max_det], img_k[rank < max_det]
    rows = np.column_stack([np.clip(boxes[kept], 0, imgsz), s[kept], cls[kept]]).astype(np.float32)
    for i in np.unique(img_k):
        out[i] = rows[img_k == i]
    return out


def load_predictor(weights: Path, *, imgsz: int, device: str | int | None = "cpu", backend: str = "auto",
                   conf: float, iou: float, max_det: int, threads: int | None = None,
                   export_options: Mapping[str, Any] | None = None,
                   openvino_precision: str | None = None) -> Predictor:
    """Load `.pt`, `.onnx` or `*_openvino_model/` weights; "auto" picks the fastest installed backend for a .pt.

    threads: CPU threads of the model, torch or OpenVINO (None/0 = every core). export_options: the `export:`
    config section used when a .pt has to be exported once (default: configs/detector.yaml). openvino_precision: None keeps OpenVINO's
    default (bf16 on CPUs that have it, boxes within ~1 px of PyTorch), "f32" matches PyTorch at about 2x the cost.
    """
    weights = Path(weights)
    if backend not in BACKEND_CHOICES:
        raise ConfigError(f"detector backend {backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if not weights.exists():
        raise InputError(weights, "weights not found (.pt, .onnx or an *_openvino_model folder)")
    configure_ultralytics()
    set_ultralytics_verbosity(log.isEnabledFor(logging.DEBUG))
    import torch
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.utils.torch_utils import select_device

    try:
        torch_device = select_device("" if device is None else str(device), verbose=False)
    except ValueError as exc:  # e.g. --device 0 on a machine without CUDA
        raise ConfigError(f"device {device!r} is not available here: {str(exc).strip().splitlines()[0]} "
                          "(use --device cpu)") from None
    kind = weights_kind(weights)
    chosen, path = _resolve_backend(weights, kind, backend, torch_device.type, imgsz, export_options)
    if torch_device.type == "cpu":
        restore_threads(threads)
    start = time.perf_counter()
    # A .pt is rebuilt from plain data (detector/weights.py): nothing in it is unpickled as code.
    source = build_model(path) if chosen == "pytorch" else str(path)
    try:
        model = AutoBackend(source, device=torch_device, fp16=False, fuse=True, verbose=False)
    except (ValueError, SyntaxError) as exc:     # e.g. metadata Ultralytics cannot parse: name the file, no traceback
        if chosen == "pytorch":
            raise
        raise InputError(path, f"Ultralytics cannot load this {chosen} export ({type(exc).__name__}: {exc}); export "
                               "it again from its .pt with spinefrac export") from None
    model.eval()
    if chosen != "pytorch":
        torch_device = torch.device("cpu")
        static = not model.metadata.get("dynamic")
        model_size = tuple(int(s) for s in model.metadata.get("imgsz", (imgsz, imgsz)))
        if static and model_size != (imgsz, imgsz):
            raise InputError(path, f"exported for a fixed {model_size[0]}x{model_size[1]} input, but imgsz is "
                                   f"{imgsz}: export again with that size, or with export.dynamic=true")
    if chosen == "openvino" and (openvino_precision is not None or threads):
        _recompile_openvino(model, path, precision=openvino_precision, threads=threads)
    if torch_device.type == "cpu":
        restore_threads(threads)
    log.info("detector backend: %s (%s, loaded in %.1f s)", chosen, path.name, time.perf_counter() - start)
    return Predictor(backend=chosen, names=dict(model.names), weights=path, imgsz=imgsz, conf=conf, iou=iou,
                     max_det=max_det, threads=threads, model=model, device=torch_device)


def weights_kind(weights: Path) -> str:
    """Return "pytorch", "onnx" or "openvino" for a weights path, or raise InputError."""
    weights = Path(weights)
    if weights.suffix == ".pt":
        return "pytorch"
    if weights.suffix == ".onnx":
        return "onnx"
    if weights.suffix == ".xml" or (weights.is_dir() and (weights.name.endswith(OPENVINO_SUFFIX)
                                                          or any(weights.glob("*.xml")))):
        return "openvino"
    raise InputError(weights, "not a model: expected a .pt, a .onnx, or an *_openvino_model folder")


def installed_backends() -> list[str]:
    """Return the backends whose runtime is importable here, fastest first on CPU."""
    fast = [name for name, module in CPU_PREFERENCE if importlib.util.find_spec(module) is not None]
    return [*fast, "pytorch"]


def _resolve_backend(weights: Path, kind: str, backend: str, device_type: str, imgsz: int,
                     export_options: Mapping[str, Any] | None) -> tuple[str, Path]:
    """Choose the backend and the model path it loads (exporting a .pt once when needed)."""
    if kind != "pytorch":
        if backend not in ("auto", kind):
            raise InputError(weights, f"is a {kind} model; backend {backend!r} needs a .pt to export from")
        problem = metadata_problem(weights)
        if problem is not None:
            raise InputError(weights, f"{problem}: this export is not loaded (export it again from its .pt with "
                                      "spinefrac export)")
        return kind, weights
    read_weights(weights)  # refuse an unsafe .pt before it is used or exported
    if backend == "pytorch" or (backend == "auto" and device_type != "cpu"):
        return "pytorch", weights
    candidates = [backend] if backend != "auto" else [b for b in installed_backends() if b != "pytorch"]
    options = export_options if export_options is not None else load_config("detector").export
    for fmt in candidates:
        found = fresh_export(weights, fmt, imgsz, options)
        if found is not None:
            return fmt, found
        try:
            log.info("exporting %s to %s once (cached beside the weights)", weights.name, fmt)
            return fmt, export_weights(weights, fmt=fmt, imgsz=imgsz, options=options)
        except (OSError, ImportError, RuntimeError) as exc:
            if backend != "auto":
                raise
            log.warning("could not export %s to %s (%s); trying the next backend", weights.name, fmt, exc)
    return "pytorch", weights


def _recompile_openvino(model: Any, path: Path, *, precision: str | None, threads: int | None) -> None:
    """Recompile an AutoBackend OpenVINO model with INFERENCE_PRECISION_HINT and/or INFERENCE_NUM_THREADS."""
    import openvino as ov

    backend = model.backend
    xml = path if path.suffix == ".xml" else next(path.glob("*.xml"))
    config = {OV_LATENCY_HINT[0]: OV_LATENCY_HINT[1]}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    backend.ov_compiled_model = backend.compile_model(ov.Core().read_model(str(xml)), config=config)
