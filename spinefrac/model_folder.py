"""A trained model folder: its model.json (format, manifest, stages), opened for prediction with every file checked."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.errors import InputError
from data_prep.runs.artifacts import (
    library_versions,
    write_json_atomic,
)
from data_prep.runs.config import Config, load_config
from data_prep.runs.locks import LOCK_FILES
from data_prep.runs.manifest import verify_manifest
from data_prep.safe_paths import inside

FORMAT_VERSION = 2
"""2: weights-only YOLO weights, a skops aggregator and a file manifest (1 held pickles: refused)."""
MODEL_JSON = "model.json"
MANIFEST_KEY = "files"
MANIFEST_EXCLUDE = (MODEL_JSON, "work/*", "*_openvino_model/*", "*_openvino_model.meta.json", "*.onnx",
                    "*.onnx.meta.json", "*/.*.export.*", *LOCK_FILES)
"""Never in the manifest: model.json itself, work files, and the export caches predict writes beside the weights
(detector/export.py checks those against the weights' and their own SHA-256), and the folder's lock files."""
STAGE_CONFIGS = ("detector", "locator", "levels", "aggregation", "classifier")
WEIGHTS = Path("weights") / "best.pt"


@dataclass(frozen=True)
class ModelFolder:
    """A trained model folder opened for prediction."""

    root: Path
    configs: dict[str, Config]
    detector_weights: Path
    locator_weights: Path | None
    prior: dict[str, float]
    meta: dict[str, Any]
    classifier_weights: list[Path] = field(default_factory=list)


def open_model(model_dir: str | os.PathLike) -> ModelFolder:
    """Open a model folder written by `train_all`: check its file manifest, that its weights load weights-only, and its prior."""
    from aggregation.submission import load_prior
    from detector.weights import read_weights

    root = Path(model_dir)
    meta_path = root / MODEL_JSON
    if not meta_path.is_file():
        raise InputError(root, f"not a spinefrac model folder (no {MODEL_JSON}; make one with `spinefrac train`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(meta_path, f"not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise InputError(meta_path, f"model format {version} is not {FORMAT_VERSION}: older model folders hold "
                                    "pickled files that could run code when loaded; retrain with spinefrac train")
    if MANIFEST_KEY not in meta:
        raise InputError(meta_path, "has no file manifest: training did not finish (rerun spinefrac train)")
    verify_manifest(root, meta[MANIFEST_KEY], MANIFEST_EXCLUDE)
    configs = {stage: load_config(stage, root / f"{stage}.yaml" if (root / f"{stage}.yaml").is_file() else None)
               for stage in STAGE_CONFIGS}   # a folder trained before a stage existed: its defaults (unused)
    for needed in (root / "detector" / WEIGHTS, root / "locator" / WEIGHTS if meta.get("locator") else None,
                   root / "aggregator" / "aggregator.json", root / "prior.json"):
        if needed is not None and not needed.exists():
            raise InputError(needed, "missing from the model folder: training did not finish (rerun spinefrac train)")
    files = meta[MANIFEST_KEY]
    detector = model_entry(root, (Path("detector") / WEIGHTS).as_posix(), files, entry="detector")
    locator = model_entry(root, (Path("locator") / WEIGHTS).as_posix(), files, entry="locator") \
        if meta.get("locator") else None
    listed = meta.get("classifier") or []
    if not isinstance(listed, list):
        raise InputError(meta_path, f"entry 'classifier' must be a list of paths inside the folder, found "
                                    f"{type(listed).__name__} {str(listed)[:80]!r}")
    classifiers = [model_entry(root, rel, files, entry=f"classifier[{k}]") for k, rel in enumerate(listed)]
    for weights in (detector, locator, *classifiers):
        if weights is not None:
            read_weights(weights)  # refuse pickled weights before any study is read
    prior = load_prior(root / "prior.json")
    return ModelFolder(root, configs, detector, locator, prior, meta, classifiers)


def model_entry(root: Path, rel: Any, manifest: Mapping[str, str], *, entry: str) -> Path:
    """A file model.json names: relative, inside the folder (symbolic links too) and covered by the manifest.

    Anything else refuses the folder (InputError naming model.json, the entry and the path): a model folder is
    closed, no name in it decides where spinefrac reads.
    """
    path = inside(root, rel, source=f"{MODEL_JSON} entry {entry}", resolve=True)
    key = path.relative_to(root).as_posix()
    if key not in manifest:
        raise InputError(root / MODEL_JSON, f"entry {entry} {rel!r} is not covered by the folder's manifest "
                                            f"({MANIFEST_KEY}): it is not loaded (retrain, or copy the folder whole)")
    if not path.is_file():
        raise InputError(path, f"named by {MODEL_JSON} entry {entry} but missing from the model folder: training "
                               "did not finish (rerun spinefrac train)")
    return path


def read_meta(out: Path) -> dict[str, Any]:
    path = out / MODEL_JSON
    if path.is_file():
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format_version") == FORMAT_VERSION:
            meta["versions"] = library_versions()
            return meta
    return {"format_version": FORMAT_VERSION, "versions": library_versions(), "stages": {}}


def write_meta(out: Path, meta: Mapping[str, Any]) -> None:
    write_json_atomic(out / MODEL_JSON, meta)
