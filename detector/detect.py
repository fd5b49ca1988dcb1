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

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.dicom.study_inputs import Study, find_inputs, series_table
from data_prep.errors import InputError
from data_prep.runs.artifacts import write_csv_atomic, write_json_atomic
from data_prep.runs.locks import locks_output
from data_prep.runs.registry import STUDY_COL
from data_prep.runs.resume import StudyMarkers, plain, section, weights_id
from data_prep.runs.tables import read_table
from detector.detect_outputs import (
    BOX_COLUMNS,
    BOXES_CSV,
    BOXES_SUFFIX,
    DONE_DIR,
    ERRORS_CSV,
    ERRORS_DIR,
    LEVEL_BOXES_SUFFIX,
    PARTS_DIR,
    SERIES_SUFFIX,
    SLICE_COLUMNS,
    SLICES_CSV,
    SLICES_SUFFIX,
    SOP_UID_COL,
    VERTEBRAE_SUFFIX,
    detect_markers,
    error_record,
    overlay_dir,
    plan_studies,
    rebuild_outputs,
)
from detector.locate import (
    Locator,
    Predictor,
    add_relative_levels,
    assign_located_levels,
    body_centres,
    chunk_context,
    decode_located,
    flush_locator,
    load_locator,
    rois_from,
    vertebrae_rows,
)

log = logging.getLogger("detector")


HU_INT16_MIN, HU_INT16_MAX = -32768, 32767
"""A study held in memory for the ROI pass is stored as int16 HU (CT values are whole HU)."""
TIMING_KEYS: tuple[str, ...] = ("decode", "preprocess", "model", "postprocess", "locate", "classify",
                                 "classify_model", "render", "outputs")
"""Per-study timers (s); `decode` is the wait for decoded slices, `preprocess` the main thread's own rendering and
its wait for the detector's crops, `classify` covers the vertebra crops and scores, `classify_model` the network
inside it. Two run in threads beside the models: `render`, the detector's crops rendered ahead, and `outputs`,
the study's parts and overlays (written while the next study is detected)."""
RENDER_AHEAD = 2
"""Batches of detector crops rendered ahead of the model (each batch: detect.batch x imgsz^2 x 3 bytes)."""
MODEL_STAGES: tuple[str, ...] = ("preprocess", "model", "postprocess")
"""Stage timers a predictor may keep itself; reported per study as model_<stage> (inside `model`)."""
DETECT_RUN_ONLY: tuple[str, ...] = ("overlays", "rebuild_every", "prefetch", "batch", "inference_threads")
"""detect: keys that change how a run goes, not its boxes and slices (left out of the settings key)."""
ROI_PREPARE_ONLY: tuple[str, ...] = ("jitter_mm",)
"""roi: keys used only by prepare-detector (left out of detect's settings key)."""


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
    from data_prep.dicom.geometry import as_study, scan_study
    from data_prep.dicom.volume import iter_chunks
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
                body += body_centres(chunk, [i for i in indices if i % body_every == 0], float(roi_cfg["body_hu"]))
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
                loc_slices, loc_dets = flush_locator(locator, loc_pending, loc_scale, shape, loc_slices, loc_dets)
            timings["locate"] += time.perf_counter() - t
    slice_levels = level_boxes = None
    if locator is not None:
        t = time.perf_counter()
        slice_levels, level_boxes = decode_located(loc_dets, loc_slices, locator, uid=uid, geometry=geometry)
        timings["locate"] += time.perf_counter() - t
    source = _VolumeSource(volume) if volume is not None else None
    if roi_cfg is not None:
        t = time.perf_counter()
        if want_body and locator is not None and (level_boxes is None or not len(level_boxes)):
            body = body_centres(source, range(0, n, body_every), float(roi_cfg["body_hu"]))
        rois = rois_from(geometry, roi_cfg, level_boxes, body)
        crops = rois.boxes()
        timings["preprocess"] += time.perf_counter() - t
        step = int(det["batch"])

        def rendered(source: _VolumeSource) -> Iterator[tuple[list[int], np.ndarray]]:
            """The detector's crops, a batch at a time (in a thread: the next batch renders while one is in
            the model; `render` times it, `preprocess` the main thread's wait for it)."""
            for start in range(0, n, step):
                indices = list(range(start, min(start + step, n)))
                t = time.perf_counter()
                images = render_crops(source, indices, geometry, crops[indices], render=render,
                                      pad_hu=float(roi_cfg["pad_hu"]))
                timings["render"] += time.perf_counter() - t
                yield indices, images

        for indices, images in _timed(prefetch(rendered(source), depth=RENDER_AHEAD), timings, "preprocess"):
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
        boxes, slices = assign_located_levels(boxes, slices, slice_levels, level_boxes, locator)
        timings["locate"] += time.perf_counter() - t
    elif levels_config is not None:
        boxes, slices = add_relative_levels(boxes, slices, levels_config)
    vertebrae = None
    if locator is not None or levels_config is not None:
        t = time.perf_counter()
        vertebrae = vertebrae_rows(uid, geometry, slices, slice_levels, level_boxes, source, classifier, timings,
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
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect-outputs")
    pending = None          # the previous study's parts, overlays and marker, written while this one is detected
    try:
        for k, study in enumerate(tqdm(todo, desc="detect", unit="study", disable=not progress), start=1):
            detected = runner.detect(study, stream=next(streams))
            if pending is not None:
                result.add(pending.result())     # one study in the writer at a time: memory stays bounded
            pending = writer.submit(runner.finish, study, detected)
            if k % rebuild_every == 0:
                rebuild_outputs(out, config=config)
        if pending is not None:
            result.add(pending.result())
    finally:
        writer.shutdown(wait=True)     # an interrupted run still finishes (or records) the study being written
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
        from data_prep.dicom.geometry import as_study

        study = as_study(study)
        return self.finish(study, self.detect(study, stream=stream))

    def detect(self, study: Study, stream: Any = None) -> Any:
        """The models' part of `run`: the study's detections for `finish`, or its failed StudyOutcome."""
        return _detect_one(study, self.predictor, markers=self.markers, config=self.config, locator=self.locator,
                           levels_config=self.levels_config, workers=self.workers, classifier=self.classifier,
                           stream=stream)

    def finish(self, study: Study, detected: Any) -> StudyOutcome:
        """The writing part of `run`: parts, overlays and done marker of what `detect` gave (may run in a thread)."""
        if isinstance(detected, StudyOutcome):
            return detected
        return _finish_one(study, detected, markers=self.markers, config=self.config, labels=self.labels)

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


# ---------------------------------------------------------------- internals
@dataclass
class _Detected:
    """A study's detections on their way to the writer: the tables, and when detecting it began."""

    found: StudyDetections
    t0: float


def _detect_one(study: Study, predictor: Predictor, *, markers: StudyMarkers, config: Mapping[str, Any],
                locator: Locator | None, levels_config: Mapping[str, Any] | None, workers: int,
                classifier: Any = None, stream: Any = None) -> _Detected | StudyOutcome:
    """The models' part of a study (nothing written but a failure record): its detections, or a failed outcome."""
    uid = study.name
    markers.remove(uid)        # overwrite: the study (and its old parts) is not finished until it is redone
    t0 = time.perf_counter()
    try:
        try:
            found = detect_study(study, predictor, config=config, locator=locator, levels_config=levels_config,
                                 workers=workers, classifier=classifier, stream=stream)
        finally:
            if stream is not None:
                stream.close()    # the reader moves on to the next study
    except Exception as exc:   # noqa: BLE001 - one failed study must not stop the batch
        return _failed(study, markers, "detect", exc)
    return _Detected(found, t0)


def _failed(study: Study, markers: StudyMarkers, stage: str, exc: BaseException) -> StudyOutcome:
    """Log a failed study, record it in errors/<uid>.json and return its outcome."""
    log.warning("study %s failed (%s): %s", study.name, stage, exc)
    log.debug("%s", traceback.format_exc())
    return _record_failure(study, markers, stage, exc)


def _record_failure(study: Study, markers: StudyMarkers, stage: str, exc: BaseException) -> StudyOutcome:
    """Write errors/<uid>.json (stage, error, settings key) and return the study's unfinished outcome."""
    uid = study.name
    write_json_atomic(error_record(markers.root, uid), {STUDY_COL: uid, "path": str(study), "stage": stage,
                                                        "error": f"{type(exc).__name__}: {exc}",
                                                        "settings_key": markers.key})
    return StudyOutcome(uid, finished=False)


def _finish_one(study: Study, detected: _Detected, *, markers: StudyMarkers, config: Mapping[str, Any],
                labels: pd.DataFrame | None) -> StudyOutcome:
    """Write a detected study's parts and overlays, then its done marker (safe to run beside the next study's
    detection: it touches only this study's files)."""
    uid = study.name
    out = markers.root
    found = detected.found
    t_out = time.perf_counter()
    try:
        parts = {BOXES_SUFFIX: found.boxes, SLICES_SUFFIX: found.slices, LEVEL_BOXES_SUFFIX: found.level_boxes,
                 VERTEBRAE_SUFFIX: found.vertebrae, SERIES_SUFFIX: series_table(study, found.geometry)}
        files = []
        for suffix, table in parts.items():
            if table is not None:
                write_csv_atomic(markers.part(uid, suffix), table)
                files.append(str(markers.part(uid, suffix).relative_to(out)))
    except Exception as exc:   # noqa: BLE001 - one failed study must not stop the batch
        return _failed(study, markers, "write", exc)
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
            return _record_failure(study, markers, "overlays", exc)
        except Exception as exc:   # noqa: BLE001 - a drawing problem, not the disk: the detections stand
            log.warning("study %s: overlays failed: %s", uid, exc)
    found.timings["outputs"] = time.perf_counter() - t_out
    error_record(out, uid).unlink(missing_ok=True)
    markers.write(uid, {STUDY_COL: uid, "path": str(study), "n_slices": found.n_slices,
                        "n_boxes": len(found.boxes), "seconds": round(time.perf_counter() - detected.t0, 3),
                        "timings_s": {k: round(v, 4) for k, v in found.timings.items()}}, files=files)
    return StudyOutcome(uid, finished=True, n_slices=found.n_slices, timings=dict(found.timings))


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


