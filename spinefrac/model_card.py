"""MODEL_CARD.md: what a model folder was trained on, how, how well, and what it is for (Hugging Face convention).

`spinefrac train` writes it into the model folder from the folder's own records (model.json, splits.json, the
aggregator's operating point and out-of-fold table) and the training tables; `spinefrac predict` names it in its
log. The card is text for people; nothing reads it back (docs/contracts.md "Model folder").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep.runs import registry
from data_prep.runs.artifacts import write_text_atomic

log = logging.getLogger("spinefrac")

MODEL_CARD = "MODEL_CARD.md"
TEMPLATE = "MODEL_CARD.md.j2"
SYNTHETIC_MARKER = "truth"
"""A data folder written by `spinefrac synth` holds the truth it knows under truth/: the card says synthetic."""
CANDIDATES_FILE = Path("aggregator") / "candidates.csv"
"""The aggregator's out-of-fold comparison of candidates (aggregation/candidates.py), when the folder has one."""
CARD_SETTINGS: dict[str, tuple[str, ...]] = {
    "detector": ("render.imgsz", "render.recipe", "roi.enabled", "roi.size_mm", "train.model"),
    "locator": ("render.imgsz", "train.model", "locate.every_k"),
    "classifier": ("render.imgsz", "render.recipe", "crops.slices_per_level", "train.model"),
}
"""The few settings of each trained stage the card's table shows (the full configs sit beside it)."""


def write_model_card(model_dir: str | os.PathLike, *, data_root: str | os.PathLike, labels: pd.DataFrame,
                     boxes: pd.DataFrame, segmented: Sequence[str]) -> Path:
    """Write MODEL_CARD.md into a trained model folder from its records and the training tables; return its path."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    root = Path(model_dir)
    meta = json.loads((root / "model.json").read_text(encoding="utf-8"))
    splits = json.loads((root / "splits.json").read_text(encoding="utf-8"))
    env = Environment(loader=PackageLoader("spinefrac", "templates"), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    synthetic = (Path(data_root) / SYNTHETIC_MARKER).is_dir()
    text = env.get_template(TEMPLATE).render(
        name=root.resolve().name, trained=dt.date.today().isoformat(), versions=meta.get("versions", {}),
        locator=bool(meta.get("locator")), n_classifiers=len(meta.get("classifier") or []),
        dataset_tag="spinefrac-synthetic" if synthetic else "rsna-2022-cervical-spine-fracture-detection",
        data_kind=("synthetic studies made by `spinefrac synth` (no real patient)" if synthetic
                   else "the studies of its training folder"),
        data=training_data(labels, boxes, segmented, splits), stages=stage_rows(root, meta),
        budget=meta.get("budget"), candidates=candidate_rows(root / CANDIDATES_FILE),
        any_chosen=_any_chosen(root / CANDIDATES_FILE),
        in_sample=_in_sample(meta), operating=_operating(root))
    path = root / MODEL_CARD
    write_text_atomic(path, text)
    log.info("model card: %s", path)
    return path


def training_data(labels: pd.DataFrame, boxes: pd.DataFrame, segmented: Sequence[str],
                  splits: Mapping[str, Any]) -> dict[str, Any]:
    """The card's training-data counts: studies, positives (patient and per level), boxes, segmentations, split."""
    roles = pd.Series(splits.get("roles", {}), dtype=object)
    return {"studies": int(len(labels)), "positives": int(labels[registry.PATIENT].sum()),
            "level_positives": {lv: int(labels[lv].sum()) for lv in registry.LEVELS},
            "boxed_studies": int(boxes[registry.STUDY_COL].nunique()), "boxes": int(len(boxes)),
            "segmented": len(segmented), "detector_studies": int((roles == "detector").sum()),
            "aggregator_studies": int((roles == "aggregator").sum()), "scheme": splits.get("scheme", "?"),
            "n_folds": splits.get("n_folds", "?")}


def stage_rows(root: Path, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per training stage of model.json: its key settings, epochs run and runtime."""
    rows = []
    for name, record in meta.get("stages", {}).items():
        kind = next((k for k in CARD_SETTINGS if name.startswith(f"train-{k}")), None)
        settings = ""
        if kind is not None:
            settings = ", ".join(f"{key} {_get(root, kind, key)}" for key in CARD_SETTINGS[kind])
        rows.append({"name": name, "settings": settings, "epochs": record.get("epochs") or "",
                     "runtime": record.get("runtime_s", "")})
    return rows


def candidate_rows(path: Path) -> list[dict[str, Any]]:
    """The aggregator's out-of-fold candidates table, formatted (empty when the folder has none)."""
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    return [{"name": r["candidate"], "loss": _fmt(r.get("loss_per_study")), "global_loss": _fmt(r.get("loss_global")),
             "auc": _fmt(r.get("auc_patient")), "chosen": bool(r.get("chosen", False))} for _, r in table.iterrows()]


def _any_chosen(path: Path) -> bool:
    return path.is_file() and "chosen" in pd.read_csv(path, nrows=0).columns


def _get(root: Path, stage: str, dotted: str) -> Any:
    import yaml

    path = root / f"{stage}.yaml"
    if not path.is_file():
        return "?"
    node: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    for part in dotted.split("."):
        node = node.get(part, "?") if isinstance(node, dict) else "?"
    return node


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return ""


def _in_sample(meta: Mapping[str, Any]) -> dict[str, Any]:
    record = meta.get("stages", {}).get("train-aggregator", {})
    return {"studies": record.get("studies", "?"), "loss": record.get("in_sample_loss", "?")}


def _operating(root: Path) -> dict[str, Any]:
    path = root / "aggregator" / "operating_point.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"threshold": record.get("threshold"), "sensitivity": record.get("sensitivity"),
            "specificity": record.get("specificity"), "n_studies": record.get("n_studies"),
            "n_positive": record.get("n_positive"), "target_sensitivity": record.get("target_sensitivity"),
            "reason": record.get("reason")}
