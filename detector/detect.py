"""Batch fracture detection over study folders: stream slices through the model, write boxes and slice tables.

Outputs in OUT (docs/contracts.md "Detection outputs"):
    boxes.csv, slices.csv, errors.csv (+ .meta.json sidecars), done/<uid>.json, overlays/<uid>/
Per study, results go to parts/<uid>.boxes.csv and parts/<uid>.slices.csv first, then done/<uid>.json is
written last (data_prep.runs.resume). The combined CSVs are rebuilt (atomically) only from studies with a done
marker, so an interrupted run never leaves a half study in them. A rerun with the same settings
(`detect_settings`: config and weights) skips finished studies; with other settings it refuses, unless
`overwrite`. The output folder is locked while a run writes into it (data_prep.runs.locks).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from data_prep.dicom.study_inputs import SERIES_COLUMNS, Study, find_inputs, series_table
from data_prep.errors import InputError
from data_prep.runs.artifacts import remove_stale_temps, write_csv_atomic, write_json_atomic, write_sidecar
from data_prep.runs.locks import locks_output
from data_prep.runs.registry import LEVELS, STUDY_COL
from data_prep.runs.resume import StudyMarkers, plain, section, study_file, study_keys, weights_id
from data_prep.runs.tables import read_table
from data_prep.safe_paths import inside, safe_name
from detector.roi import ROI_COLUMNS

log = logging.getLogger("detector")

BOXES_CSV = "boxes.csv"
SLICES_CSV = "slices.csv"
ERRORS_CSV = "errors.csv"
DONE_DIR = "done"
PARTS_DIR = "parts"
ERRORS_DIR = "errors"
OVERLAYS_DIR = "overlays"
STUDY_DIRS = (DONE_DIR, PARTS_DIR, ERRORS_DIR, OVERLAYS_DIR)
"""The folders of a detect output that hold per-study files."""
BOXES_SUFFIX = ".boxes.csv"
SLICES_SUFFIX = ".slices.csv"
LEVEL_BOXES_SUFFIX = ".level_boxes.csv"
LEVEL_BOXES_CSV = "level_boxes.csv"
VERTEBRAE_SUFFIX = ".vertebrae.csv"
VERTEBRAE_CSV = "vertebrae.csv"
SERIES_SUFFIX = ".series.csv"
SOP_UID_COL = "sop_instance_uid"
"""slices.csv: the SOPInstanceUID of each slice's file."""
SERIES_CSV = "series.csv"
DEFAULT_LOCATE_EVERY_K = 4
"""Locator stride when configs/locator.yaml has no `locate.every_k`."""
DEFAULT_LOCATE_IOU = 0.5
DEFAULT_LOCATE_MAX_DET = 2 * len(LEVELS)
"""Locator NMS settings used when configs/locator.yaml `locate:` does not give iou / max_det."""
DEFAULT_LOCATE_BATCH = 16
"""Slices per locator call in `locate_levels` (batching does not change the result)."""

BOX_COLUMNS: tuple[str, ...] = (STUDY_COL, "slice_number", "slice_index", "z_mm", "x", "y", "width", "height",
                                "score")
SLICE_COLUMNS: tuple[str, ...] = (STUDY_COL, "slice_number", "slice_index", "z_mm", "max_score", "n_boxes",
                                  *ROI_COLUMNS, SOP_UID_COL)
ERROR_COLUMNS: tuple[str, ...] = (STUDY_COL, "path", "stage", "error")
LEVEL_BOX_COLUMNS: tuple[str, ...] = ("level", *(f"w_{lv}" for lv in LEVELS))
LEVEL_SLICE_COLUMNS: tuple[str, ...] = tuple(f"p_{lv}" for lv in LEVELS)
HU_INT16_MIN, HU_INT16_MAX = -32768, 32767
"""A study held in memory for the ROI pass is stored as int16 HU (CT values are whole HU)."""
TIMING_KEYS: tuple[str, ...] = ("decode", "preprocess", "model", "postprocess", "locate", "classify",
                                 "classify_model", "outputs")
"""Per-study timers (s); `decode` is the wait for decoded slices, `classify` covers the vertebra crops and scores,
`classify_model` the network inside it, `outputs` the study's parts and overlays."""
DEFAULT_PRESENCE_THRESHOLD = 0.5
"""vertebrae.csv without a classifier: a slice belongs to level L when p_L > this (as configs/classifier.yaml)."""
MODEL_STAGES: tuple[str, ...] = ("preprocess", "model", "postprocess")
"""Stage timers a predictor may keep itself; reported per study as model_<stage> (inside `model`)."""
DETECT_RUN_ONLY: tuple[str, ...] = ("overlays", "rebuild_every", "prefetch", "batch", "inference_threads")
"""detect: keys that change how a run goes, not its boxes and slices (left out of the settings key)."""
ROI_PREPARE_ONLY: tuple[str, ...] = ("jitter_mm",)
"""roi: keys used only by prepare-detector (left out of detect's settings key)."""


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


@dataclass
class StudyDetections:
    """One study's detection: its box and slice tables (contract columns), timings (s) and slice count."""

    uid: str
    boxes: pd.DataFrame
    slices: pd.DataFrame
    n_slices: int
    timings: dict[str, float] = field(default_factory=dict)
    geometry: Any = None
    level_boxes: pd.DataFrame | None = None   # located vertebra boxes per slice (with a locator)
    vertebrae: pd.DataFrame | None = None     # per level: z-range and classifier scores (with levels)


@dataclass
class DetectResult:
    """What a `detect_studies` run did: output paths, finished/skipped/failed studies, summed timings (s)."""

    out: Path
    boxes_csv: Path
    slices_csv: Path
    errors_csv: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    n_slices: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, outcome: StudyOutcome) -> None:
        """Count one study's outcome in this run's totals."""
        if not outcome.finished:
            self.failed.append(outcome.uid)
            return
        self.finished.append(outcome.uid)
        self.n_slices += outcome.n_slices
        for k, v in outcome.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v


# ---------------------------------------------------------------- public API
def find_studies(paths: Sequence[str | os.PathLike | Study] | str | os.PathLike, *,
                 extract_to: str | os.PathLike | None = None, progress: bool = False,
                 follow_symlinks: bool = False) -> list[Study]:
    """Expand inputs into studies: Kaggle study folders (Paths) or found studies (data_prep.dicom.study_inputs).

    A folder holding .dcm files is a study, else each sub-folder holding them is one; a folder without files
    and without sub-folders is an empty study (it fails in detect, is listed in errors.csv and gets the prior).
    Anything else (a tree of any depth, files of any name, a DICOMDIR, a .zip) is read by the study finder.
    Symbolic links leading outside an input are not followed unless `follow_symlinks` (data_prep.dicom.study_inputs).
    """
    return find_inputs(paths, extract_to=extract_to, progress=progress, follow_symlinks=follow_symlinks)


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


def detect_study(study_dir: Study | str | os.PathLike, predictor: Predictor, *, config: Mapping[str, Any],
                 locator: Locator | None = None, levels_config: Mapping[str, Any] | None = None,
                 workers: int = 2, classifier: Any = None, stream: Any = None) -> StudyDetections:
    """Detect fracture boxes on every slice of one study; return its boxes and slices tables (contract columns).

    With `roi.enabled` the study is decoded once into memory; the locator runs on every k-th slice while it
    decodes, the spine ROI of every slice follows from the located vertebrae (detector/roi.py), and the
    detector then runs on the crops. Without it the detector runs on whole slices as they stream in.
    Levels come from `locator` when given; else, with `levels_config`, from relative z position alone
    (configs/levels.yaml `relative_z`); else the tables carry no level columns. With levels, `vertebrae`
    holds each level's z-range; with a `classifier` (detector.classifier.VertebraClassifier) and a locator,
    also its crops' scores, from the same decoded volume. `stream` (data_prep.dicom.readahead.StudyStream): the
    study as a read-ahead reader delivers it (geometry and chunks, read while the previous study was in the
    models); without it the study is scanned and decoded here.
    """
    from data_prep.dicom.reader import as_study, iter_chunks, scan_study
    from detector.render import image_xyxy_to_original, render_crops, render_slices
    from detector.roi import crop_xyxy_to_original, full_rois, roi_enabled

    study_dir = as_study(study_dir)
    uid = study_dir.name
    render = config["render"]
    det = config["detect"]
    conf = float(det["conf"])
    roi_cfg = config["roi"] if roi_enabled(config) else None
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    geometry = stream.geometry if stream is not None else scan_study(study_dir)
    n = len(geometry.paths)
    shape = (int(geometry.shape[0]), int(geometry.shape[1]))
    z = np.asarray(geometry.z_mm, dtype=float)
    numbers = np.asarray(geometry.instance_numbers)
    before = _stage_seconds(predictor)
    context = chunk_context(geometry, config, locator)
    body_every = locator.every_k if locator is not None else int(roi_cfg["every_k"]) if roi_cfg else 0
    want_body = roi_cfg is not None and roi_cfg["fallback"] == "body"
    keep_volume = roi_cfg is not None or (classifier is not None and locator is not None)
    volume = np.empty((n, *shape), dtype=np.int16) if keep_volume else None
    chunks = stream.chunks() if stream is not None else prefetch(
        iter_chunks(geometry, chunk_size=int(det["batch"]), context=context, workers=workers),
        depth=int(det["prefetch"]))
    box_parts: list[np.ndarray] = []      # rows: slice_index, x, y, w, h, score
    loc_slices: list[int] = []
    loc_dets: list[np.ndarray] = []       # rows: slice_index, x, y, w, h, conf, cls (original px)
    body: list[tuple[int, float, float]] = []
    loc_pending: list[tuple[list[int], np.ndarray]] = []   # rendered locator images, run `batch` at a time
    loc_scale = (1.0, 1.0)
    for chunk in _timed(chunks, timings, "decode"):
        indices = list(range(chunk.start, chunk.stop))
        t = time.perf_counter()
        if volume is not None:
            hu = chunk.hu[chunk.start - chunk.lo:chunk.stop - chunk.lo]
            _store_int16(volume[chunk.start:chunk.stop], hu)
            if want_body and locator is None:   # with a locator: only if it locates nothing (below)
                body += _body_centres(chunk, [i for i in indices if i % body_every == 0], float(roi_cfg["body_hu"]))
            timings["preprocess"] += time.perf_counter() - t
        if roi_cfg is None:
            t = time.perf_counter()
            images, scale = render_slices(chunk, indices, geometry, render=render)
            timings["preprocess"] += time.perf_counter() - t
            box_parts += _predict_boxes(predictor, images, indices, lambda p, k, scale=scale: image_xyxy_to_original(
                p[:, :4], scale, shape), conf, timings)
        if locator is not None:
            t = time.perf_counter()
            sampled = [i for i in indices if i % locator.every_k == 0]
            if sampled:
                images, loc_scale = render_slices(chunk, sampled, geometry, render=locator.config["render"])
                loc_pending.append((sampled, images))
            if sum(len(i) for i, _ in loc_pending) >= int(det["batch"]) or chunk.stop == n:
                loc_slices, loc_dets = _flush_locator(locator, loc_pending, loc_scale, shape, loc_slices, loc_dets)
            timings["locate"] += time.perf_counter() - t
    slice_levels = level_boxes = None
    if locator is not None:
        t = time.perf_counter()
        slice_levels, level_boxes = _locate(loc_dets, loc_slices, locator, uid=uid, geometry=geometry)
        timings["locate"] += time.perf_counter() - t
    source = _VolumeSource(volume) if volume is not None else None
    if roi_cfg is not None:
        t = time.perf_counter()
        if want_body and locator is not None and (level_boxes is None or not len(level_boxes)):
            body = _body_centres(source, range(0, n, body_every), float(roi_cfg["body_hu"]))
        rois = _rois_from(geometry, roi_cfg, level_boxes, body)
        crops = rois.boxes()
        timings["preprocess"] += time.perf_counter() - t
        step = int(det["batch"])
        for start in range(0, n, step):
            indices = list(range(start, min(start + step, n)))
            t = time.perf_counter()
            images = render_crops(source, indices, geometry, crops[indices], render=render,
                                  pad_hu=float(roi_cfg["pad_hu"]))
            timings["preprocess"] += time.perf_counter() - t
            box_parts += _predict_boxes(predictor, images, indices, lambda p, k, batch=crops[indices]:
                                        crop_xyxy_to_original(p[:, :4], batch[k], int(render["imgsz"]), shape),
                                        conf, timings)   # k counts within the batch
    else:
        rois = full_rois(n, shape)
    t = time.perf_counter()
    arr = np.concatenate(box_parts) if box_parts else np.zeros((0, 6))
    idx = arr[:, 0].astype(int)
    boxes = pd.DataFrame({STUDY_COL: uid, "slice_number": numbers[idx].astype(int), "slice_index": idx,
                          "z_mm": z[idx], "x": arr[:, 1], "y": arr[:, 2], "width": arr[:, 3], "height": arr[:, 4],
                          "score": arr[:, 5]}, columns=list(BOX_COLUMNS))
    boxes = boxes.sort_values(["slice_index", "score"], ascending=[True, False], kind="stable").reset_index(drop=True)
    max_score = np.zeros(n)
    n_boxes = np.zeros(n, dtype=int)
    if len(boxes):
        np.maximum.at(max_score, idx, arr[:, 5])
        np.add.at(n_boxes, idx, 1)
    sops = list(geometry.sop_uids) if len(geometry.sop_uids) == n else [""] * n
    slices = pd.concat([pd.DataFrame({STUDY_COL: uid, "slice_number": numbers.astype(int), "slice_index": np.arange(n),
                                      "z_mm": z, "max_score": max_score, "n_boxes": n_boxes}), rois.table(),
                        pd.DataFrame({SOP_UID_COL: sops})], axis=1)[list(SLICE_COLUMNS)]
    timings["postprocess"] += time.perf_counter() - t
    if locator is not None:
        t = time.perf_counter()
        boxes, slices = _assign_levels(boxes, slices, slice_levels, level_boxes, locator)
        timings["locate"] += time.perf_counter() - t
    elif levels_config is not None:
        boxes, slices = _add_relative_levels(boxes, slices, levels_config)
    vertebrae = None
    if locator is not None or levels_config is not None:
        t = time.perf_counter()
        vertebrae = _vertebrae(uid, geometry, slices, slice_levels, level_boxes, source, classifier, timings,
                               source_name="locator" if locator is not None else "relative")
        timings["classify"] += time.perf_counter() - t
    del volume, source
    after = _stage_seconds(predictor)
    timings.update({f"model_{k}": after[k] - before.get(k, 0.0) for k in after})
    return StudyDetections(uid, boxes, slices, n, timings, geometry, level_boxes, vertebrae)


def _store_int16(target: np.ndarray, hu: np.ndarray) -> None:
    """Write float HU into an int16 view, rounded and clipped (np.maximum/minimum: faster than np.clip here)."""
    tmp = np.maximum(hu, np.float32(HU_INT16_MIN), dtype=np.float32)
    np.minimum(tmp, np.float32(HU_INT16_MAX), out=tmp)
    np.rint(tmp, out=tmp)
    target[...] = tmp


def chunk_context(geometry: Any, config: Mapping[str, Any], locator: Locator | None) -> int:
    """Neighbour slices each chunk of this study needs: the detector's 2.5D context on whole slices, the locator's."""
    from detector.render import context_slices
    from detector.roi import roi_enabled

    context = context_slices(geometry, config["render"]) if not roi_enabled(config) else 0
    if locator is not None:
        context = max(context, context_slices(geometry, locator.config["render"]))
    return context


def _vertebrae(uid: str, geometry: Any, slices: pd.DataFrame, slice_levels: pd.DataFrame | None,
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
    from data_prep.dicom.reader import scan_study

    geometry = geometry if geometry is not None else scan_study(study_dir)
    roi_cfg = config["roi"]
    body_hu = float(roi_cfg["body_hu"]) if roi_cfg["fallback"] == "body" else None
    _, level_boxes, body = _sampled_pass(geometry, locator=locator, every=int(roi_cfg["every_k"]), body_hu=body_hu,
                                         batch=int(config["detect"]["batch"]))
    return _rois_from(geometry, roi_cfg, level_boxes, body)


def locate_levels(study_dir: str | os.PathLike, *, locator: Locator, geometry: Any = None,
                  batch: int = DEFAULT_LOCATE_BATCH) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
    """Run the locator on a study's sampled slices as `study_rois` does; return (geometry, slice_levels, level_boxes).

    slice_levels and level_boxes are detector.levels.locate_study's tables (p_C1..p_C7 per slice; per-slice level
    boxes in original px). Only the sampled slices and their 2.5D neighbours are decoded.
    """
    from data_prep.dicom.reader import scan_study

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
            body += _body_centres(reader, chunk, body_hu)
        if locator is not None:
            loc_dets += _locate_slices(locator, reader, chunk, geometry)
    if locator is None:
        return None, None, body
    slice_levels, level_boxes = _locate(loc_dets, sampled, locator, uid=geometry.study_uid, geometry=geometry)
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


def _flush_locator(locator: Locator, pending: list[tuple[list[int], np.ndarray]], scale: tuple[float, float],
                   shape: tuple[int, int], slices: list[int], dets: list[np.ndarray]
                   ) -> tuple[list[int], list[np.ndarray]]:
    """Run the locator once on every pending rendered slice (one batch, not one call per chunk); empty `pending`."""
    if not pending:
        return slices, dets
    indices = [i for idx, _ in pending for i in idx]
    images = np.concatenate([imgs for _, imgs in pending])
    pending.clear()
    return slices + indices, dets + _locator_rows(indices, locator.predictor.predict(images), scale, shape)


def _body_centres(source: Any, indices: Sequence[int], body_hu: float) -> list[tuple[int, float, float]]:
    """(slice_index, x, y) of the body outline's centre on each of `indices` where one is found."""
    from detector.roi import body_centre

    found = ((i, body_centre(source.get(i), body_hu)) for i in indices)
    return [(i, *c) for i, c in found if c is not None]


def _rois_from(geometry: Any, roi_cfg: Mapping[str, Any], level_boxes: pd.DataFrame | None,
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
        from data_prep.dicom.reader import read_slice_hu

        index = min(max(int(index), 0), len(self.paths) - 1)
        if index not in self.cache:
            self.cache[index] = read_slice_hu(self.paths[index])
        return self.cache[index]

    def forget_below(self, index: int) -> None:
        """Drop cached slices below `index` (slices are visited in increasing order)."""
        for i in [i for i in self.cache if i < index]:
            del self.cache[i]


class _VolumeSource:
    """A decoded study held in memory (int16 HU) as a SliceSource for the renderer."""

    def __init__(self, volume: np.ndarray) -> None:
        self.volume = volume

    def get(self, index: int) -> np.ndarray:
        """Return the float32 HU slice at canonical `index`, clamped to the study."""
        return self.volume[min(max(int(index), 0), len(self.volume) - 1)].astype(np.float32)


def _predict_boxes(predictor: Predictor, images: np.ndarray, indices: Sequence[int],
                   to_original: Any, conf: float, timings: dict[str, float]) -> list[np.ndarray]:
    """Run the detector on a batch; return rows (slice_index, x, y, w, h, score) in original px per image."""
    t = time.perf_counter()
    preds = predictor.predict(images)
    timings["model"] += time.perf_counter() - t
    t = time.perf_counter()
    parts = []
    for k, (index, p) in enumerate(zip(indices, preds, strict=True)):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 6)
        p = p[p[:, 4] >= conf]
        if len(p):
            xywh = to_original(p, k)
            keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)     # clipped to the image, a box may keep no area: no box
            if keep.any():
                parts.append(np.column_stack([np.full(int(keep.sum()), index), xywh[keep], p[keep, 4]]))
    timings["postprocess"] += time.perf_counter() - t
    return parts


def detect_settings(config: Mapping[str, Any], *, weights: str | os.PathLike,
                    locator: str | os.PathLike | None = None, locator_config: Mapping[str, Any] | None = None,
                    levels_config: Mapping[str, Any] | None = None,
                    classifier: Sequence[str | os.PathLike] | None = None,
                    classifier_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What shapes detect's tables, hashed into the done markers' settings key (docs/contracts.md).

    The detector's weights (SHA-256), `render`, `roi` (only `enabled` when off; never the prepare-only
    `jitter_mm`) and `detect` without DETECT_RUN_ONLY; with a locator its weights, `render` and `locate`;
    and the levels config whenever levels are computed (locator or relative z); with classifiers their
    weights (in order) and the `crops`, `render` and `score` sections of their config.
    """
    from data_prep.runs.config import load_config
    from detector.roi import roi_enabled

    settings: dict[str, Any] = {
        "detector": {"weights_sha256": weights_id(weights), "render": section(config, "render"),
                     "roi": section(config, "roi", drop=ROI_PREPARE_ONLY) if roi_enabled(config)
                     else {"enabled": False},
                     "detect": section(config, "detect", drop=DETECT_RUN_ONLY)},
        "locator": None, "levels": None}
    if locator is not None:
        lcfg = locator_config if locator_config is not None else load_config("locator")
        settings["locator"] = {"weights_sha256": weights_id(locator), "render": section(lcfg, "render"),
                               "locate": section(lcfg, "locate")}
        levels_config = levels_config if levels_config is not None else load_config("levels")
    if levels_config is not None:
        settings["levels"] = plain(levels_config)
    if classifier:
        ccfg = classifier_config if classifier_config is not None else load_config("classifier")
        settings["classifier"] = {"weights_sha256": [weights_id(w) for w in classifier],
                                  **{name: section(ccfg, name) for name in ("crops", "render", "score")}}
    return settings


def plan_studies(study_dirs: Sequence[Study], markers: StudyMarkers, *, overwrite: bool
                 ) -> tuple[list[str], list[Study]]:
    """(finished studies skipped, studies to run) of a detect run into markers.root.

    Finished studies made with other settings raise SettingsChangedError here, before any work, unless
    `overwrite` (then every study is redone and failure records made with other settings are dropped).
    """
    plan = markers.plan([s.name for s in study_dirs], overwrite=overwrite)
    remove_stale_temps(markers.root, STUDY_DIRS)     # a killed run's temporaries (the caller holds the lock)
    if overwrite:
        _drop_other_errors(markers.root, markers.key)
    skipped = list(plan.skip)
    todo = [s for s in study_dirs if s.name not in set(skipped)]
    if skipped:
        log.info("detect: %d of %d studies already finished in %s (skipped; --overwrite redoes them)",
                 len(skipped), len(study_dirs), markers.root)
    return skipped, todo


def detected_studies(out: str | os.PathLike) -> list[str]:
    """Every study a detect folder holds: finished (done markers) or failed (errors/<uid>.json), sorted."""
    return sorted(set(detect_markers(out).done_uids()) | set(failed_studies(out)))


def failed_studies(out: str | os.PathLike) -> list[str]:
    """The studies of a detect folder with a failure record (errors/<safe_name(uid)>.json), by the key it records."""
    return study_keys(Path(out) / ERRORS_DIR)


def error_record(out: str | os.PathLike, uid: str) -> Path:
    """The failure record of a study in a detect folder: errors/<safe_name(uid)>.json (data_prep.safe_paths)."""
    return study_file(Path(out) / ERRORS_DIR, uid, ".json")


def overlay_dir(out: str | os.PathLike, uid: str) -> Path:
    """A study's overlay folder in a detect folder: overlays/<safe_name(uid)>/ (data_prep.safe_paths)."""
    return inside(Path(out) / OVERLAYS_DIR, safe_name(uid), source=f"study {uid!r}")


def detect_markers(out: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> StudyMarkers:
    """The done markers and parts of a detect output folder (for `settings`, when checking or writing)."""
    return StudyMarkers(Path(out), dict(settings or {}), done_dir=DONE_DIR, parts_dir=PARTS_DIR, what="detect",
                        how="rerun with --overwrite to redo every study with the new settings, or choose a new "
                            "--out folder")


@locks_output("out")
def detect_studies(studies: Sequence[str | os.PathLike] | str | os.PathLike, *, weights: str | os.PathLike,
                   out: str | os.PathLike, config: Mapping[str, Any], labels: str | os.PathLike | None = None,
                   locator: str | os.PathLike | None = None, locator_config: Mapping[str, Any] | None = None,
                   levels_config: Mapping[str, Any] | None = None, workers: int = 2, progress: bool = True,
                   overwrite: bool = False, device: str | int | None = None,
                   classifier: Sequence[str | os.PathLike] | None = None,
                   classifier_config: Mapping[str, Any] | None = None, follow_symlinks: bool = False) -> DetectResult:
    """Detect fractures on every slice of every study; write boxes.csv, slices.csv, errors.csv and overlays.

    With levels (a locator, or `levels_config`) vertebrae.csv gives each level's z-range; `classifier` (one or
    more vertebra-classifier weights, averaged; needs the locator) adds its per-level crop scores.

    `device` ("cpu", 0, "0,1", ...) runs the models there; None picks the first GPU if there is one, else the
    CPU. The training config's `train.device` is never used here: a GPU-trained model predicts on a CPU machine.

    `locator_config`/`levels_config` default to configs/locator.yaml and configs/levels.yaml; a model
    folder passes its own. Without a locator but with `levels_config`, levels come from relative z.
    Studies finished in `out` with the same settings are skipped; finished studies made with other
    settings raise SettingsChangedError before any work, unless `overwrite` (every study is then redone).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    study_dirs = find_studies(studies, progress=progress, follow_symlinks=follow_symlinks)
    runner = StudyRunner(out, weights=weights, config=config, labels=labels, locator=locator,
                         locator_config=locator_config, levels_config=levels_config, workers=workers, device=device,
                         classifier=classifier, classifier_config=classifier_config)
    det = config["detect"]
    result = DetectResult(out, out / BOXES_CSV, out / SLICES_CSV, out / ERRORS_CSV,
                          timings=dict.fromkeys(TIMING_KEYS, 0.0))
    rebuild_every = max(1, int(det["rebuild_every"]))
    result.skipped, todo = plan_studies(study_dirs, runner.markers, overwrite=overwrite)
    streams = runner.read_ahead(todo)
    try:
        for k, study in enumerate(tqdm(todo, desc="detect", unit="study", disable=not progress), start=1):
            result.add(runner.run(study, stream=next(streams)))
            if k % rebuild_every == 0:
                rebuild_outputs(out, config=config)
    finally:
        streams.close()     # stops the reader thread (an interrupted run leaves no reader behind)
        rebuild_outputs(out, config=config, runtime_s=time.perf_counter() - t0,
                        extra={**runner.describe(),
                               "this_run": {"finished": len(result.finished), "skipped": len(result.skipped),
                                            "failed": len(result.failed), "slices": result.n_slices,
                                            "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}})
    if result.failed:
        log.warning("detect: %d studies failed, see %s", len(result.failed), result.errors_csv)
    return result


@dataclass
class StudyOutcome:
    """What detecting one study gave: finished or failed, its slice count and timings (s)."""

    uid: str
    finished: bool
    n_slices: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class StudyRunner:
    """The loaded models and settings of a detect run: detects one study at a time into `out`.

    `detect_studies` runs one; a Ray actor (spinefrac/ray_runner.py) holds one per worker, so models load
    once per worker and every study's parts, done marker or failure record land in `out` as in a local run.
    """

    def __init__(self, out: str | os.PathLike, *, weights: str | os.PathLike, config: Mapping[str, Any],
                 labels: str | os.PathLike | None = None, locator: str | os.PathLike | None = None,
                 locator_config: Mapping[str, Any] | None = None, levels_config: Mapping[str, Any] | None = None,
                 workers: int = 2, device: str | int | None = None,
                 classifier: Sequence[str | os.PathLike] | None = None,
                 classifier_config: Mapping[str, Any] | None = None) -> None:
        from detector.backends import load_predictor

        if classifier and locator is None:
            raise InputError(None, "the vertebra classifier needs the locator (its crops follow the located "
                                   "vertebrae)")
        self.out = Path(out)
        self.config = config
        self.levels_config = levels_config
        self.workers = workers
        self.labels = read_table(labels, "boxes") if labels is not None else None
        self.weights, self.locator_weights = weights, locator
        self.classifier_weights = list(classifier) if classifier else None
        self.markers = detect_markers(self.out, detect_settings(
            config, weights=weights, locator=locator, locator_config=locator_config, levels_config=levels_config,
            classifier=classifier, classifier_config=classifier_config))
        det = config["detect"]
        threads = int(det["inference_threads"]) or None
        device = None if device in (None, "") else device  # None: Ultralytics' select_device picks GPU 0 or CPU
        self.predictor = load_predictor(Path(weights), imgsz=int(config["render"]["imgsz"]), device=device,
                                        backend=str(det["backend"]), conf=float(det["conf"]), iou=float(det["iou"]),
                                        max_det=int(det["max_det"]), threads=threads)
        self.locator = load_locator(locator, config=locator_config, levels_config=levels_config, device=device,
                                    backend=str(det["backend"]), threads=threads) if locator is not None else None
        self.classifier = None
        if classifier:
            from detector.classifier import DETECT_CPU_THREADS, load_classifier

            self.classifier = load_classifier(classifier, config=classifier_config, device=device,
                                              threads=DETECT_CPU_THREADS)
        for sub in (DONE_DIR, PARTS_DIR, ERRORS_DIR):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def run(self, study: Study | str | os.PathLike, stream: Any = None) -> StudyOutcome:
        """Detect one study: its parts and done marker, or errors/<uid>.json when it fails (never raises for it).

        stream: the study from `read_ahead` (data_prep.dicom.readahead), when a batch reads studies ahead.
        """
        from data_prep.dicom.reader import as_study

        return _run_study(as_study(study), self.predictor, markers=self.markers, config=self.config,
                          locator=self.locator, levels_config=self.levels_config, labels=self.labels,
                          workers=self.workers, classifier=self.classifier, stream=stream)

    def read_ahead(self, studies: Sequence[Study]) -> Iterator[Any]:
        """The studies' StudyStreams, read `detect.prefetch` chunks ahead across studies (None each when 0)."""
        det = self.config["detect"]
        depth = int(det["prefetch"])
        if depth <= 0:
            yield from (None for _ in studies)
            return
        from data_prep.dicom.readahead import read_ahead

        yield from read_ahead(studies, chunk_size=int(det["batch"]), workers=self.workers, depth=depth,
                              context=lambda geometry: chunk_context(geometry, self.config, self.locator))

    def describe(self) -> dict[str, Any]:
        """The run's provenance for the tables' sidecars: weights, backend, settings key, locator, classifiers."""
        return {"weights": str(self.weights), "backend": getattr(self.predictor, "backend", None),
                "settings_key": self.markers.key,
                "locator": str(self.locator_weights) if self.locator_weights else None,
                "classifier": [str(w) for w in self.classifier_weights] if self.classifier_weights else None}


def rebuild_outputs(out: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                    runtime_s: float | None = None, extra: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Rebuild boxes.csv, slices.csv and errors.csv from finished studies' parts; return (finished, failed)."""
    out = Path(out)
    markers = detect_markers(out)
    uids = markers.done_uids()
    boxes = markers.read_parts(BOXES_SUFFIX, uids, dtype={STUDY_COL: str})
    slices = markers.read_parts(SLICES_SUFFIX, uids, dtype={STUDY_COL: str})
    errors = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / ERRORS_DIR).glob("*.json"))] \
        if (out / ERRORS_DIR).is_dir() else []
    box_df = _concat(boxes, BOX_COLUMNS)
    slice_df = _concat(slices, SLICE_COLUMNS)
    err_df = pd.DataFrame(errors, columns=list(ERROR_COLUMNS))
    cfg = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config is not None else None)
    tables = [(out / BOXES_CSV, box_df, "detect_boxes"), (out / SLICES_CSV, slice_df, "detect_slices"),
              (out / ERRORS_CSV, err_df, "detect_errors")]
    frames = markers.read_parts(LEVEL_BOXES_SUFFIX, uids, dtype={STUDY_COL: str})
    if frames:
        tables.append((out / LEVEL_BOXES_CSV, pd.concat(frames, ignore_index=True), "detect_level_boxes"))
    frames = markers.read_parts(VERTEBRAE_SUFFIX, uids, dtype={STUDY_COL: str})
    if frames:
        tables.append((out / VERTEBRAE_CSV, pd.concat(frames, ignore_index=True), "detect_vertebrae"))
    frames = markers.read_parts(SERIES_SUFFIX, uids, dtype={STUDY_COL: str, "dicom_study_uid": str, "series_uid": str,
                                                           "series_number": "Int64", "n_files": "Int64"})
    if frames:
        tables.append((out / SERIES_CSV, pd.concat(frames, ignore_index=True)[list(SERIES_COLUMNS)], "detect_series"))
    for path, df, kind in tables:
        write_csv_atomic(path, df)
        write_sidecar(path, kind=kind, config=cfg, counts={"rows": len(df), "studies_finished": len(uids),
                                                           "studies_failed": len(err_df)},
                      runtime_s=runtime_s, extra=extra)
    return len(uids), len(err_df)


# ---------------------------------------------------------------- internals
def _run_study(study: Study, predictor: Predictor, *, markers: StudyMarkers, config: Mapping[str, Any],
               locator: Locator | None, levels_config: Mapping[str, Any] | None, labels: pd.DataFrame | None,
               workers: int, classifier: Any = None, stream: Any = None) -> StudyOutcome:
    """Detect one study and write its parts and done marker; a failure goes to errors/<uid>.json instead."""
    uid = study.name
    out = markers.root
    markers.remove(uid)        # overwrite: the study (and its old parts) is not finished until it is redone
    error_file = error_record(out, uid)
    stage = "detect"
    t0 = time.perf_counter()
    try:
        try:
            found = detect_study(study, predictor, config=config, locator=locator, levels_config=levels_config,
                                 workers=workers, classifier=classifier, stream=stream)
        finally:
            if stream is not None:
                stream.close()    # the reader moves on to the next study
        stage = "write"
        t_out = time.perf_counter()
        parts = {BOXES_SUFFIX: found.boxes, SLICES_SUFFIX: found.slices, LEVEL_BOXES_SUFFIX: found.level_boxes,
                 VERTEBRAE_SUFFIX: found.vertebrae, SERIES_SUFFIX: series_table(study, found.geometry)}
        files = []
        for suffix, table in parts.items():
            if table is not None:
                write_csv_atomic(markers.part(uid, suffix), table)
                files.append(str(markers.part(uid, suffix).relative_to(out)))
    except Exception as exc:   # noqa: BLE001 - one failed study must not stop the batch
        log.warning("study %s failed (%s): %s", uid, stage, exc)
        log.debug("%s", traceback.format_exc())
        write_json_atomic(error_file, {STUDY_COL: uid, "path": str(study), "stage": stage,
                                       "error": f"{type(exc).__name__}: {exc}", "settings_key": markers.key})
        return StudyOutcome(uid, finished=False)
    if bool(config["detect"]["overlays"]):
        folder = overlay_dir(out, uid)
        try:
            from detector.overlays import write_overlays

            study_labels = labels[labels[STUDY_COL] == uid] if labels is not None else None
            write_overlays(found.geometry, found.boxes, folder, labels=study_labels,
                           config=config["overlays"], slices=found.slices, vertebrae=found.vertebrae)
            files.append(folder.relative_to(out).as_posix())
        except OSError as exc:     # disk full, permissions: the study is not done, so a rerun draws them
            log.warning("study %s: overlays could not be written (%s); the study is not marked done and a rerun "
                        "redoes it", uid, exc)
            write_json_atomic(error_file, {STUDY_COL: uid, "path": str(study), "stage": "overlays",
                                           "error": f"{type(exc).__name__}: {exc}", "settings_key": markers.key})
            return StudyOutcome(uid, finished=False)
        except Exception as exc:   # noqa: BLE001 - a drawing problem, not the disk: the detections stand
            log.warning("study %s: overlays failed: %s", uid, exc)
    found.timings["outputs"] = time.perf_counter() - t_out
    error_file.unlink(missing_ok=True)
    markers.write(uid, {STUDY_COL: uid, "path": str(study), "n_slices": found.n_slices,
                        "n_boxes": len(found.boxes), "seconds": round(time.perf_counter() - t0, 3),
                        "timings_s": {k: round(v, 4) for k, v in found.timings.items()}}, files=files)
    return StudyOutcome(uid, finished=True, n_slices=found.n_slices, timings=dict(found.timings))


def _drop_other_errors(out: Path, key: str) -> None:
    """Remove failure records made with other settings (with overwrite: errors.csv then speaks of this run only)."""
    for path in sorted((out / ERRORS_DIR).glob("*.json")) if (out / ERRORS_DIR).is_dir() else []:
        try:
            made_with = json.loads(path.read_text(encoding="utf-8")).get("settings_key")
        except (OSError, ValueError):
            made_with = None
        if made_with != key:
            path.unlink(missing_ok=True)


def _locate(loc_dets: list[np.ndarray], loc_slices: list[int], locator: Locator, *, uid: str,
            geometry: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode levels from the locator's sampled detections: (slice_levels, level_boxes) of this study."""
    from detector.levels import locate_study
    from detector.render import slice_spacing

    return locate_study(_detections_frame(loc_dets), len(geometry.paths), np.asarray(loc_slices), config=locator.levels_config,
                        study_uid=uid, slice_numbers=np.asarray(geometry.instance_numbers),
                        spacing_mm=slice_spacing(geometry))


def _assign_levels(boxes: pd.DataFrame, slices: pd.DataFrame, slice_levels: pd.DataFrame,
                   level_boxes: pd.DataFrame, locator: Locator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add p_C* to slices and level, w_C* to boxes from the decoded levels."""
    from detector.levels import assign_boxes

    slices = slices.copy()
    for col in LEVEL_SLICE_COLUMNS:
        slices[col] = slice_levels[col].to_numpy(dtype=float)
    return assign_boxes(boxes, level_boxes, slice_levels, config=locator.levels_config), slices


def _add_relative_levels(boxes: pd.DataFrame, slices: pd.DataFrame, levels_config: Mapping[str, Any]
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Levels without a locator: presence from mean fractional level extents, boxes by their slice's levels."""
    from detector.levels import assign_boxes, relative_z_levels

    presence = relative_z_levels(len(slices), config=levels_config).astype(float)
    slices = slices.copy()
    for j, col in enumerate(LEVEL_SLICE_COLUMNS):
        slices[col] = presence[:, j]
    boxes = assign_boxes(boxes, pd.DataFrame(columns=["level"]), slices, config=levels_config)
    return boxes, slices


def _stage_seconds(predictor: Predictor) -> dict[str, float]:
    """The predictor's own cumulative stage timers (preprocess, model, postprocess), when it keeps them."""
    timers = getattr(predictor, "timings", None)
    if timers is None:
        return {}
    get = timers.get if isinstance(timers, Mapping) else (lambda k, d=None: getattr(timers, k, d))
    out = {}
    for stage in MODEL_STAGES:
        value = get(stage, None)
        if isinstance(value, (int, float)):
            out[stage] = float(value)
    return out


def _timed(iterable: Iterable[Any], timings: dict[str, float], key: str) -> Iterator[Any]:
    """Yield from `iterable`, adding the time spent waiting for each item to timings[key]."""
    it = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            timings[key] += time.perf_counter() - t
            return
        timings[key] += time.perf_counter() - t
        yield item


def prefetch(iterable: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Produce items of `iterable` in a background thread, `depth` ahead (decode overlaps the model)."""
    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as exc:   # noqa: BLE001 - re-raised in the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()


def _concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(columns))
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values([STUDY_COL, "slice_index"], kind="stable").reset_index(drop=True)

