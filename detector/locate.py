"""The vertebra locator at inference: its sampled pass over a study, the levels decoded from it, the spine ROI, the vertebrae table."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from data_prep.runs.registry import LEVELS
from detector.detect_outputs import LEVEL_SLICE_COLUMNS

log = logging.getLogger("detector")
DEFAULT_LOCATE_EVERY_K = 4
"""Locator stride when configs/locator.yaml has no `locate.every_k`."""
DEFAULT_LOCATE_IOU = 0.5
DEFAULT_LOCATE_MAX_DET = 2 * len(LEVELS)
"""Locator NMS settings used when configs/locator.yaml `locate:` does not give iou / max_det."""
DEFAULT_LOCATE_BATCH = 16
"""Slices per locator call in `locate_levels` (batching does not change the result)."""
DEFAULT_PRESENCE_THRESHOLD = 0.5
"""vertebrae.csv without a classifier: a slice belongs to level L when p_L > this (as configs/classifier.yaml)."""


class Predictor(Protocol):
    """What detector.backends.load_predictor returns: batched uint8 images in, (k, 6) boxes per image out."""

    backend: str

    def predict(self, images: np.ndarray) -> list[np.ndarray]: ...


@dataclass
class Locator:
    """The vertebra locator at inference: predictor, its config (locator.yaml) and the levels config (levels.yaml)."""

    predictor: Predictor
    config: Mapping[str, Any]
    levels_config: Mapping[str, Any]

    @property
    def every_k(self) -> int:
        """Run the locator on every k-th slice."""
        locate = self.config.get("locate") or {}
        return int(locate.get("every_k", DEFAULT_LOCATE_EVERY_K))


def load_locator(weights: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                 levels_config: Mapping[str, Any] | None = None, device: Any = None,
                 backend: str = "auto", threads: int | None = None) -> Locator:
    """Load the vertebra-locator weights with its configs (configs/locator.yaml, configs/levels.yaml by default)."""
    from data_prep.runs.config import load_config
    from detector.backends import load_predictor

    cfg = config if config is not None else load_config("locator")
    lcfg = levels_config if levels_config is not None else load_config("levels")
    locate = cfg.get("locate") or {}
    predictor = load_predictor(Path(weights), imgsz=int(cfg["render"]["imgsz"]), device=device, backend=backend,
                               conf=float(lcfg["locate"]["min_conf"]),
                               iou=float(locate.get("iou", DEFAULT_LOCATE_IOU)),
                               max_det=int(locate.get("max_det", DEFAULT_LOCATE_MAX_DET)), threads=threads)
    return Locator(predictor, cfg, lcfg)


def chunk_context(geometry: Any, config: Mapping[str, Any], locator: Locator | None) -> int:
    """Neighbour slices each chunk of this study needs: the detector's 2.5D context on whole slices, the locator's."""
    from detector.render import context_slices
    from detector.roi import roi_enabled

    context = context_slices(geometry, config["render"]) if not roi_enabled(config) else 0
    if locator is not None:
        context = max(context, context_slices(geometry, locator.config["render"]))
    return context


def vertebrae_rows(uid: str, geometry: Any, slices: pd.DataFrame, slice_levels: pd.DataFrame | None,
               level_boxes: pd.DataFrame | None, source: Any, classifier: Any, timings: dict[str, float], *,
               source_name: str) -> pd.DataFrame:
    """The study's vertebrae rows: each level's z-range, and with a classifier its crops' scores."""
    from detector.classifier import level_scores, vertebra_table
    from detector.vertebra_crops import crop_plan, level_slice_boxes_from_locator, render_vertebra_crops

    threshold = float(classifier.config["crops"]["presence_threshold"]) if classifier is not None \
        else DEFAULT_PRESENCE_THRESHOLD
    if slice_levels is not None:              # the locator's decoded levels: one z-range, source and confidence each
        from detector.levels import level_summary

        extents = level_summary(slice_levels, level_boxes)
    else:
        extents = _presence_extents(slices, threshold, source_name)
    if classifier is None or level_boxes is None or source is None:
        return vertebra_table(uid, extents, None)
    crops_cfg = classifier.config["crops"]
    plan = crop_plan(level_slice_boxes_from_locator(level_boxes, slice_levels, crops_cfg), geometry, crops_cfg)
    if len(plan) == 0:
        return vertebra_table(uid, extents, None)
    images = render_vertebra_crops(source, geometry, plan, classifier.config)
    t = time.perf_counter()
    probs = classifier.predict(images)
    timings["classify_model"] += time.perf_counter() - t
    scores = level_scores(probs, plan["level"].tolist(), top_k=int(classifier.config["score"]["top_k"]))
    return vertebra_table(uid, extents, scores)


def _presence_extents(slices: pd.DataFrame, threshold: float, source_name: str) -> pd.DataFrame:
    """Per level: first and last slice_index where p_L > threshold, and the count of such slices."""
    rows = []
    for level in LEVELS:
        col = f"p_{level}"
        p = slices[col].to_numpy(dtype=float) if col in slices.columns else np.zeros(0)
        on = np.flatnonzero(p > threshold)
        if len(on):
            rows.append({"level": level, "first_slice": int(on[0]), "last_slice": int(on[-1]),
                         "n_slices": int(len(on)), "source": source_name, "confidence": float(p[on].mean())})
    return pd.DataFrame(rows, columns=["level", "first_slice", "last_slice", "n_slices", "source", "confidence"])


def study_rois(study_dir: str | os.PathLike, *, config: Mapping[str, Any], locator: Locator | None,
               geometry: Any = None) -> Any:
    """Return the spine ROI (detector.roi.SpineRois) of every slice as `detect_study` computes it.

    Decodes only the sampled slices (and the locator's 2.5D neighbours): what prepare-detector needs to crop
    its training slices exactly as inference will.
    """
    from data_prep.dicom.geometry import scan_study

    geometry = geometry if geometry is not None else scan_study(study_dir)
    roi_cfg = config["roi"]
    body_hu = float(roi_cfg["body_hu"]) if roi_cfg["fallback"] == "body" else None
    _, level_boxes, body = _sampled_pass(geometry, locator=locator, every=int(roi_cfg["every_k"]), body_hu=body_hu,
                                         batch=int(config["detect"]["batch"]))
    return rois_from(geometry, roi_cfg, level_boxes, body)


def locate_levels(study_dir: str | os.PathLike, *, locator: Locator, geometry: Any = None,
                  batch: int = DEFAULT_LOCATE_BATCH) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
    """Run the locator on a study's sampled slices as `study_rois` does; return (geometry, slice_levels, level_boxes).

    slice_levels and level_boxes are detector.levels.locate_study's tables (p_C1..p_C7 per slice; per-slice level
    boxes in original px). Only the sampled slices and their 2.5D neighbours are decoded.
    """
    from data_prep.dicom.geometry import scan_study

    geometry = geometry if geometry is not None else scan_study(study_dir)
    slice_levels, level_boxes, _ = _sampled_pass(geometry, locator=locator, every=locator.every_k, body_hu=None,
                                                 batch=batch)
    return geometry, slice_levels, level_boxes


def locator_detections(geometry: Any, *, locator: Locator, batch: int = DEFAULT_LOCATE_BATCH
                       ) -> tuple[pd.DataFrame, np.ndarray]:
    """The locator's raw detections on a study's sampled slices (before any level decoding), and those slices.

    Columns slice_index, x, y, width, height (original px), conf, cls; what `locate_levels` decodes (the level
    benchmark decodes the same detections with two decoders).
    """
    from detector.render import context_slices

    n = len(geometry.paths)
    sampled = list(range(0, n, locator.every_k))
    ctx = context_slices(geometry, locator.config["render"])
    reader = LazySlices(geometry)
    rows: list[np.ndarray] = []
    for start in range(0, len(sampled), batch):
        chunk = sampled[start:start + batch]
        reader.forget_below(chunk[0] - ctx)
        rows += _locate_slices(locator, reader, chunk, geometry)
    return _detections_frame(rows), np.asarray(sampled)


def _detections_frame(loc_dets: list[np.ndarray]) -> pd.DataFrame:
    """Locator rows (slice_index, x, y, w, h, conf, cls) as a detections table."""
    arr = np.concatenate(loc_dets) if loc_dets else np.zeros((0, 7))
    return pd.DataFrame({"slice_index": arr[:, 0].astype(int), "x": arr[:, 1], "y": arr[:, 2], "width": arr[:, 3],
                         "height": arr[:, 4], "conf": arr[:, 5], "cls": arr[:, 6].astype(int)})


def _sampled_pass(geometry: Any, *, locator: Locator | None, every: int, body_hu: float | None, batch: int
                  ) -> tuple[pd.DataFrame | None, pd.DataFrame | None, list[tuple[int, float, float]]]:
    """Decode every k-th slice once: locate levels on it (with a locator) and find the body centre (with body_hu).

    k is the locator's `every_k` when there is a locator, else `every`. Returns (slice_levels, level_boxes, body);
    the level tables are None without a locator.
    """
    from detector.render import context_slices

    n = len(geometry.paths)
    every = locator.every_k if locator is not None else every
    sampled = list(range(0, n, every))
    ctx = context_slices(geometry, locator.config["render"]) if locator is not None else 0
    reader = LazySlices(geometry)
    body: list[tuple[int, float, float]] = []
    loc_dets: list[np.ndarray] = []
    for start in range(0, len(sampled), batch):
        chunk = sampled[start:start + batch]
        reader.forget_below(chunk[0] - ctx)
        if body_hu is not None:
            body += body_centres(reader, chunk, body_hu)
        if locator is not None:
            loc_dets += _locate_slices(locator, reader, chunk, geometry)
    if locator is None:
        return None, None, body
    slice_levels, level_boxes = decode_located(loc_dets, sampled, locator, uid=geometry.study_uid, geometry=geometry)
    return slice_levels, level_boxes, body


def _locate_slices(locator: Locator, source: Any, indices: Sequence[int], geometry: Any) -> list[np.ndarray]:
    """Run the locator on whole slices `indices`; rows (slice_index, x, y, w, h, conf, cls) in original px."""
    from detector.render import render_slices

    if not indices:
        return []
    shape = (int(geometry.shape[0]), int(geometry.shape[1]))
    images, scale = render_slices(source, indices, geometry, render=locator.config["render"])
    return _locator_rows(indices, locator.predictor.predict(images), scale, shape)


def _locator_rows(indices: Sequence[int], preds: Sequence[np.ndarray], scale: tuple[float, float],
                  shape: tuple[int, int]) -> list[np.ndarray]:
    """Locator boxes of slices `indices` as rows (slice_index, x, y, w, h, conf, cls) in original px."""
    from detector.render import image_xyxy_to_original

    out = []
    for index, p in zip(indices, preds, strict=True):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 6)
        out.append(np.column_stack([np.full(len(p), index), image_xyxy_to_original(p[:, :4], scale, shape), p[:, 4:]]))
    return out


def flush_locator(locator: Locator, pending: list[tuple[list[int], np.ndarray]], scale: tuple[float, float],
                   shape: tuple[int, int], slices: list[int], dets: list[np.ndarray]
                   ) -> tuple[list[int], list[np.ndarray]]:
    """Run the locator once on every pending rendered slice (one batch, not one call per chunk); empty `pending`."""
    if not pending:
        return slices, dets
    indices = [i for idx, _ in pending for i in idx]
    images = np.concatenate([imgs for _, imgs in pending])
    pending.clear()
    return slices + indices, dets + _locator_rows(indices, locator.predictor.predict(images), scale, shape)


def body_centres(source: Any, indices: Sequence[int], body_hu: float) -> list[tuple[int, float, float]]:
    """(slice_index, x, y) of the body outline's centre on each of `indices` where one is found."""
    from detector.roi import body_centre

    found = ((i, body_centre(source.get(i), body_hu)) for i in indices)
    return [(i, *c) for i, c in found if c is not None]


def rois_from(geometry: Any, roi_cfg: Mapping[str, Any], level_boxes: pd.DataFrame | None,
               body: Sequence[tuple[int, float, float]]) -> Any:
    """Build the study's SpineRois from located level boxes (None without a locator) and body centres."""
    from detector.levels import SOURCE_EXTRAPOLATED
    from detector.render import slice_spacing
    from detector.roi import located_centres, spine_rois

    if level_boxes is not None and len(level_boxes):   # held boxes of levels never detected add no position
        level_boxes = level_boxes[level_boxes["source"] != SOURCE_EXTRAPOLATED]
    located = located_centres(level_boxes) if level_boxes is not None else None
    arr = np.array(body, dtype=float).reshape(-1, 3)
    return spine_rois(len(geometry.paths), geometry.shape, geometry.pixel_spacing, slice_spacing(geometry),
                      roi=roi_cfg, located=located, body=(arr[:, 0].astype(int), arr[:, 1], arr[:, 2]))


class LazySlices:
    """Decode single slices on demand, keeping each once (for the sampled-slice ROI pass)."""

    def __init__(self, geometry: Any) -> None:
        self.paths = geometry.paths
        self.cache: dict[int, np.ndarray] = {}

    def get(self, index: int) -> np.ndarray:
        """Return the HU slice at canonical `index` (clamped), decoding it on first use."""
        from data_prep.dicom.slice_file import read_slice_hu

        index = min(max(int(index), 0), len(self.paths) - 1)
        if index not in self.cache:
            self.cache[index] = read_slice_hu(self.paths[index])
        return self.cache[index]

    def forget_below(self, index: int) -> None:
        """Drop cached slices below `index` (slices are visited in increasing order)."""
        for i in [i for i in self.cache if i < index]:
            del self.cache[i]


def decode_located(loc_dets: list[np.ndarray], loc_slices: list[int], locator: Locator, *, uid: str,
            geometry: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode levels from the locator's sampled detections: (slice_levels, level_boxes) of this study."""
    from detector.levels import locate_study
    from detector.render import slice_spacing

    return locate_study(_detections_frame(loc_dets), len(geometry.paths), np.asarray(loc_slices), config=locator.levels_config,
                        study_uid=uid, slice_numbers=np.asarray(geometry.instance_numbers),
                        spacing_mm=slice_spacing(geometry))


def assign_located_levels(boxes: pd.DataFrame, slices: pd.DataFrame, slice_levels: pd.DataFrame,
                   level_boxes: pd.DataFrame, locator: Locator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add p_C* to slices and level, w_C* to boxes from the decoded levels."""
    from detector.levels import assign_boxes

    slices = slices.copy()
    for col in LEVEL_SLICE_COLUMNS:
        slices[col] = slice_levels[col].to_numpy(dtype=float)
    return assign_boxes(boxes, level_boxes, slice_levels, config=locator.levels_config), slices


def add_relative_levels(boxes: pd.DataFrame, slices: pd.DataFrame, levels_config: Mapping[str, Any]
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Levels without a locator: presence from mean fractional level extents, boxes by their slice's levels."""
    from detector.levels import assign_boxes, relative_z_levels

    presence = relative_z_levels(len(slices), config=levels_config).astype(float)
    slices = slices.copy()
    for j, col in enumerate(LEVEL_SLICE_COLUMNS):
        slices[col] = presence[:, j]
    boxes = assign_boxes(boxes, pd.DataFrame(columns=["level"]), slices, config=levels_config)
    return boxes, slices
