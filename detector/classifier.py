"""The vertebra classifier: a YOLO classification model on per-vertebra crops (configs/classifier.yaml).

It is trained on every labelled study's per-level labels (weak: the label says a vertebra is fractured, not
where), one model per fold so that the aggregator only ever sees scores from a model that never trained on
that study (spinefrac/pipeline.py). At detect/predict the crops of every located level are scored by every
model given, the models' probabilities are averaged per crop, and per study x level the crops give
`cls_max`, `cls_topk` (mean of the score.top_k best) and `cls_mean` (vertebrae.csv, docs/contracts.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.errors import InputError
from data_prep.runs.config import Config
from data_prep.runs.registry import LEVELS, STUDY_COL

log = logging.getLogger("detector")

POSITIVE_CLASS = "1"
"""The class folder name of a fractured vertebra's crops (prepare-classifier writes train/0 and train/1)."""
SCORE_COLUMNS: tuple[str, ...] = ("n_crops", "cls_max", "cls_topk", "cls_mean")
VERTEBRA_COLUMNS: tuple[str, ...] = (STUDY_COL, "level", "first_slice", "last_slice", "n_slices", "source",
                                     "confidence", *SCORE_COLUMNS)
"""vertebrae.csv: one row per study x level (docs/contracts.md "Detection outputs")."""
DETECT_CPU_THREADS = 1
"""Torch threads for the classifier at detect on the CPU: a study's few small crops gain nothing from a second
thread, and while the decode workers keep both cores busy a 2-thread forward stalled (measured: 28 crops of
64 px, 2 models: 17-20 ms with 1 thread, 49-425 ms with 2)."""


@dataclass
class VertebraClassifier:
    """One or more classification networks (fold models) whose fracture probabilities are averaged per crop."""

    weights: list[Path]
    config: Mapping[str, Any]
    models: list[Any] = field(repr=False)
    positive: list[int] = field(repr=False)
    threads: int | None = None
    device: Any = field(default=None, repr=False)
    ensemble: Any = field(default=None, repr=False)
    """The fold models as one compiled OpenVINO graph (detector/classifier_ensemble.py), or None: PyTorch."""

    @property
    def backend(self) -> str:
        """"openvino" (every fold in one call) or "pytorch" (one fold model after the other)."""
        return "pytorch" if self.ensemble is None else "openvino"

    @property
    def imgsz(self) -> int:
        """Square input size of the crops (configs/classifier.yaml render.imgsz)."""
        return int(self.config["render"]["imgsz"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Return the mean fracture probability of the models for a uint8 (B, imgsz, imgsz, 3) BGR batch."""
        import torch

        from detector.backends import to_model_input
        from detector.offline import restore_threads

        images = np.asarray(images)
        expected = (self.imgsz, self.imgsz, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"the classifier expects uint8 images of shape (B, {self.imgsz}, {self.imgsz}, 3), "
                             f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros(0)
        # BGR BHWC -> RGB BCHW in [0, 1]: what Ultralytics' classify dataset feeds the network from the PNGs
        batch = int(self.config["score"]["batch"])
        if self.ensemble is not None:
            from detector.classifier_ensemble import predict_ensemble

            return predict_ensemble(self.ensemble, to_model_input(images), batch)
        x = torch.from_numpy(to_model_input(images)).to(self.device)
        if self.device is None or getattr(self.device, "type", "cpu") == "cpu":
            restore_threads(self.threads)
        total = np.zeros(len(images))
        with torch.inference_mode():
            for model, pos in zip(self.models, self.positive, strict=True):
                for start in range(0, len(x), batch):
                    out = model(x[start:start + batch])
                    probs = out[0] if isinstance(out, (list, tuple)) else out   # eval: (softmax, logits)
                    total[start:start + batch] += probs[:, pos].float().cpu().numpy()
        return total / len(self.models)


def load_classifier(weights: Sequence[str | os.PathLike], *, config: Mapping[str, Any] | None = None,
                    device: Any = None, threads: int | None = None) -> VertebraClassifier:
    """Load fold classifiers (spinefrac weights files, read weights-only) with their configs/classifier.yaml.

    On the CPU, score.backend "auto" or "openvino" joins the fold models into one OpenVINO graph (converted once,
    cached beside the first fold's weights: detector/classifier_ensemble.py); "auto" falls back to PyTorch with a
    warning when that fails, "openvino" raises.
    """
    from data_prep.runs.config import load_config
    from detector.offline import configure_ultralytics
    from detector.weights import TASK_CLASSIFY, build_model

    cfg = config if config is not None else load_config("classifier")
    paths = [Path(w) for w in weights]
    if not paths:
        raise ValueError("load_classifier needs at least one weights file")
    configure_ultralytics()              # offline, before anything of Ultralytics is imported
    from ultralytics.utils.torch_utils import select_device

    dev = select_device("" if device in (None, "") else str(device), verbose=False)
    models, positive = [], []
    for path in paths:
        model = build_model(path)
        if model.task != TASK_CLASSIFY:
            raise InputError(path, f"holds a {model.task} network, not a classifier (train one with train-classifier)")
        names = {int(k): str(v) for k, v in model.names.items()}
        if POSITIVE_CLASS not in names.values():
            raise InputError(path, f"has no class {POSITIVE_CLASS!r} (its classes: {sorted(names.values())}); "
                                   "a vertebra classifier is trained on prepare-classifier's 0/1 folders")
        models.append(model.to(dev))
        positive.append(next(k for k, v in names.items() if v == POSITIVE_CLASS))
    backend = str(cfg["score"]["backend"])
    ensemble = None
    if backend != "pytorch" and dev.type == "cpu":
        from detector.classifier_ensemble import load_ensemble

        try:
            ensemble = load_ensemble(paths, models, positive, imgsz=int(cfg["render"]["imgsz"]), threads=threads)
        except (ImportError, OSError, RuntimeError) as exc:
            if backend == "openvino":
                raise
            log.warning("the %d fold classifiers run in PyTorch: no OpenVINO ensemble (%s: %s)", len(paths),
                        type(exc).__name__, exc)
    return VertebraClassifier(paths, cfg, models, positive, threads=threads, device=dev, ensemble=ensemble)


def level_scores(probs: np.ndarray, levels: Sequence[str], *, top_k: int) -> pd.DataFrame:
    """Per level: n_crops, cls_max, cls_topk (mean of the top_k best crops) and cls_mean of crop probabilities."""
    frame = pd.DataFrame({"level": list(levels), "p": np.asarray(probs, dtype=float)})
    rows = []
    for level in LEVELS:
        p = np.sort(frame.loc[frame["level"] == level, "p"].to_numpy())[::-1]
        if len(p) == 0:
            rows.append({"level": level, "n_crops": 0, "cls_max": np.nan, "cls_topk": np.nan, "cls_mean": np.nan})
            continue
        rows.append({"level": level, "n_crops": len(p), "cls_max": float(p[0]),
                     "cls_topk": float(p[:top_k].mean()), "cls_mean": float(p.mean())})
    return pd.DataFrame(rows, columns=["level", *SCORE_COLUMNS])


def vertebra_table(uid: str, extents: pd.DataFrame, scores: pd.DataFrame | None) -> pd.DataFrame:
    """Join a study's level extents (first/last slice, n_slices, source) and classifier scores into vertebrae rows."""
    base = pd.DataFrame({"level": list(LEVELS)})
    table = base.merge(extents, on="level", how="left")
    table["n_slices"] = table["n_slices"].fillna(0).astype(int)
    for col in ("first_slice", "last_slice"):
        table[col] = table[col].fillna(-1).astype(int)
    table["source"] = table["source"].fillna("none")
    table["confidence"] = (table["confidence"] if "confidence" in table.columns
                           else pd.Series(np.nan, index=table.index)).astype(float).fillna(0.0)
    if scores is not None:
        table = table.merge(scores, on="level", how="left")
    for col in SCORE_COLUMNS:
        if col not in table.columns:
            table[col] = np.nan
    table["n_crops"] = table["n_crops"].fillna(0).astype(int)
    table.insert(0, STUDY_COL, uid)
    return table[list(VERTEBRA_COLUMNS)]


def train_classifier(fold_dir: str | os.PathLike, out: str | os.PathLike, *, config: Config) -> Path:
    """Train one fold's classifier on a prepare-classifier fold folder (train/<0|1>/, val/<0|1>/); return its run."""
    from detector.train import train_yolo

    fold_dir = Path(fold_dir)
    for split in ("train", "val"):
        if not (fold_dir / split).is_dir():
            raise InputError(fold_dir, f"no {split}/ folder: not a prepare-classifier fold (fold<k>/{split}/<0|1>/)")
    return train_yolo(fold_dir, Path(out), config=config, overwrite=True)
