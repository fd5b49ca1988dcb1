"""Small builders shared by the tests (imported as a module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import yaml

IMGSZ = 64
N_TRAIN, N_VAL = 8, 2
N_FOLDS = 3
TINY_SYNTH = ["image.size=96", "volume.slices=40", "labels.box_fraction=1.0", "labels.segmentation_fraction=0.5"]
"""synth overrides of the tiny studies the pipeline tests train and predict on."""


def make_yolo_dataset(root: Path, *, n_train: int = N_TRAIN, n_val: int = N_VAL, size: int = IMGSZ,
                      seed: int = 0) -> Path:
    """Write a tiny YOLO dataset (one filled rectangle per image), an index.csv with folds; return data.yaml."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
            w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), -1)
            name = f"{split}{i}"
            cv2.imwrite(str(root / "images" / split / f"{name}.png"), img)
            (root / "labels" / split / f"{name}.txt").write_text(
                f"0 {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}\n")
            fold = 0 if split == "val" else 1 + i % (N_FOLDS - 1)
            rows.append({"image": f"images/{split}/{name}.png", "split": split, "fold": fold})
    with open(root / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "split", "fold"])
        writer.writeheader()
        writer.writerows(rows)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": {0: "fracture"}, "spinefrac": {"fold": 0, "n_folds": N_FOLDS}}))
    return data


FIXED_BOX = (4.0, 4.0, 12.0, 12.0, 0.5, 0)
"""x1, y1, x2, y2, score, class of the box FixedBoxes finds on every image by default."""


class FixedBoxes:
    """Stands in for the YOLO predictor: the same boxes on every image (the inputs or the wiring are under test)."""

    backend = "fake"

    def __init__(self, boxes=(FIXED_BOX,)) -> None:
        self.boxes = np.array(boxes, dtype=np.float32).reshape(-1, 6)

    def predict(self, images):
        return [self.boxes.copy() for _ in images]


def use_fixed_boxes(monkeypatch, home: Path, boxes=(FIXED_BOX,)) -> None:
    """Make detector.backends.load_predictor return FixedBoxes(boxes); Ultralytics' settings go under `home`."""
    monkeypatch.setenv("SPINEFRAC_HOME", str(home))
    monkeypatch.setattr("detector.backends.load_predictor", lambda weights, **kw: FixedBoxes(boxes))


def use_stand_in_model(monkeypatch, root: Path, imgsz: int) -> dict[str, float]:
    """`spinefrac predict` with a stand-in model folder at root/model: the fixed-box detector weights root/w.pt,
    default stage configs (detector at `imgsz`, one small overlay), no locator, every probability 0.5. Returns
    the stand-in's training prior."""
    from types import SimpleNamespace

    import pandas as pd

    from data_prep.runs.config import load_config
    from data_prep.runs.registry import STUDY_COL, TARGETS

    prior = {t: 0.1 + 0.05 * i for i, t in enumerate(TARGETS)}
    configs = {"detector": load_config("detector", None, [f"render.imgsz={imgsz}", "overlays.display_size=64",
                                                          "overlays.top_n=1"]),
               "locator": load_config("locator"), "levels": load_config("levels"),
               "aggregation": load_config("aggregation"), "classifier": load_config("classifier")}
    model = SimpleNamespace(root=root / "model", configs=configs, detector_weights=root / "w.pt",
                            locator_weights=None, prior=prior, meta={}, classifier_weights=[])
    monkeypatch.setattr("spinefrac.pipeline.open_model", lambda model_dir: model)

    class HalfAggregator:
        def predict_proba(self, features):
            uids = sorted(set(features[STUDY_COL].astype(str)))
            return pd.DataFrame({STUDY_COL: uids, **{t: 0.5 for t in TARGETS}})

    monkeypatch.setattr("aggregation.model.StudyAggregator.load", classmethod(lambda cls, d: HalfAggregator()))
    return prior
