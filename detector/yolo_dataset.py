"""YOLO datasets from the Kaggle layout: fracture boxes (prepare-detector) and vertebra levels (prepare-locator).

Layout (docs/contracts.md "YOLO datasets"):
    DIR/data.yaml, DIR/images/{train,val}/<uid>_<slice_number>.png, DIR/labels/{train,val}/<uid>_<n>.txt,
    DIR/index.csv, DIR/splits.json
Each study is one job in a process pool. A study is finished when its marker DIR/.done/<uid>.json exists
(data_prep.runs.resume: written last, it lists the study's index rows and files and the settings key of the
run). A rerun with the same settings (`prepare_settings`) skips finished studies unless `overwrite`; with
other settings it refuses, naming them. index.csv is rebuilt from the markers. Images and labels are
written atomically; DIR is locked while a run writes into it (data_prep.runs.locks).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from data_prep.errors import InputError
from data_prep.runs.artifacts import (
    config_hash,
    remove_stale_temps,
    write_csv_atomic,
    write_json_atomic,
    write_sidecar,
    write_text_atomic,
)
from data_prep.runs.config import ConfigError
from data_prep.runs.locks import locks_output
from data_prep.runs.registry import FRACTURE_NAMES, LEVELS, LOCATOR_NAMES, PATIENT, STUDY_COL
from data_prep.runs.resume import StudyMarkers, plain, section, settings_key, weights_id
from data_prep.runs.tables import read_table
from data_prep.runs.workers import dies_with_parent
from data_prep.safe_paths import (
    UnsafePathError,
    check_unique_names,
    describe_links,
    inside,
    leaving_links,
    safe_name,
)

log = logging.getLogger("detector")

DATA_YAML = "data.yaml"
INDEX_CSV = "index.csv"
SPLITS_JSON = "splits.json"
DONE_DIR = ".done"
IMAGES_DIR = "images"
LABELS_DIR = "labels"
TRAIN, VAL = "train", "val"
IMAGE_EXT = ".png"
LABEL_EXT = ".txt"
TRAIN_CSV = "train.csv"
BOXES_CSV = "train_bounding_boxes.csv"
TRAIN_IMAGES = "train_images"
SEGMENTATIONS = "segmentations"
SEG_EXT = ".nii"
NEGATIVE_STRATUM = "negative"
SEGMENTED_STRATUM = "segmented"
MIN_FOLDS = 2
MAX_NAMED = 5                # studies named in one log line
LABEL_DECIMALS = 6
"""Decimals of the normalised YOLO label values (1e-6 of a 512 px image is 0.0005 px)."""

# index.csv `kind` values
KIND_BOXED = "boxed"            # detector: a slice with at least one fracture box
KIND_NEGATIVE = "negative"      # detector: background slice of a negative study (patient_overall = 0)
KIND_FAR = "far"                # detector: background slice of a boxed study, beyond the margin of every run
KIND_LEVELS = "levels"          # locator: a sampled slice with at least one C1-C7 box
KIND_EMPTY = "empty"            # locator: a sampled slice without any cervical vertebra

NEGATIVE_SAMPLING = ("matched", "uniform")   # prepare.negative_sampling values
ROI_JITTER_STREAM = 1        # random stream of the ROI jitter (apart from the background sampling's)
WORKER_THREADS = 1           # torch threads of the locator in each prepare worker (one process per core)
PREPARE_SECTIONS = {"detector": ("render", "prepare"), "locator": ("render", "prepare")}
"""Config sections whose every key shapes a prepared dataset (plus `roi` and the locator for the detector)."""

INDEX_COLUMNS: tuple[str, ...] = ("image", "split", STUDY_COL, "slice_number", "slice_index", "n_boxes",
                                  "scale_x", "scale_y", "kind", "fold", "roi_x", "roi_y", "roi_width", "roi_height",
                                  "roi_source", "n_cut", "n_lost")


@dataclass(frozen=True)
class SliceLabel:
    """One slice to write: canonical index, its kind, and its boxes (class, x, y, width, height; original px)."""
    slice_index: int
    kind: str
    boxes: tuple[tuple[int, float, float, float, float], ...] = ()


@dataclass(frozen=True)
class LocateSpec:
    """How a worker loads the vertebra locator for the ROI pass (picklable: paths and plain configs)."""
    weights: Path
    config: dict[str, Any]
    levels_config: dict[str, Any]
    backend: str = "auto"


@dataclass(frozen=True)
class StudyTask:
    """Everything one worker needs for one study (picklable)."""
    uid: str
    study_dir: Path
    out: Path
    split: str
    fold: int
    render: dict[str, Any]
    prepare: dict[str, Any]
    boxes: tuple[tuple[float, float, float, float, int], ...] = ()   # x, y, width, height, slice_number
    n_background: int = 0
    negative: bool = False
    segmentation: Path | None = None
    background_density: tuple[float, ...] = ()   # negatives: histogram of the boxed slices' relative heights
    roi: dict[str, Any] | None = None            # detector: the roi: config section when cropping to the spine
    locate: LocateSpec | None = None             # detector with ROI: the locator that centres the crops
    batch: int = 16                              # detector with ROI: slices per locator call


@dataclass
class StudyOutcome:
    """What a worker did for one study: its index rows, files written, warnings to log, or an error."""
    uid: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    n_slices: int = 0


# ---------------------------------------------------------------- public API
def prepare_settings(config: Mapping[str, Any], *, kind: str, locator: str | os.PathLike | None = None,
                     locator_config: Mapping[str, Any] | None = None,
                     levels_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What shapes a prepared dataset, hashed into its done markers' settings key (docs/contracts.md).

    Both kinds: `render` and `prepare`. The detector also: `roi` (only `enabled` when off) and, when the
    ROI is on and a locator centres it, the locator's weights (SHA-256), its `render` and `locate`, and
    the levels config.
    """
    from data_prep.runs.config import load_config
    from detector.roi import roi_enabled

    settings: dict[str, Any] = {name: section(config, name) for name in PREPARE_SECTIONS[kind]}
    if kind == "detector":
        on = roi_enabled(config)
        settings["roi"] = section(config, "roi") if on else {"enabled": False}
        settings["locator"] = None
        if on and locator is not None:
            lcfg = locator_config if locator_config is not None else load_config("locator")
            settings["locator"] = {"weights_sha256": weights_id(locator), "render": section(lcfg, "render"),
                                   "locate": section(lcfg, "locate"),
                                   "levels": plain(levels_config if levels_config is not None
                                                   else load_config("levels"))}
    return settings


def dataset_markers(out: str | os.PathLike, settings: Mapping[str, Any] | None = None, *,
                    kind: str = "detector") -> StudyMarkers:
    """The done markers of a prepared dataset folder (for `settings`, when checking or writing)."""
    return StudyMarkers(Path(out), dict(settings or {}), done_dir=DONE_DIR, what=f"prepare-{kind}",
                        how="rerun with --overwrite to redo every study with the new settings, or choose a new "
                            "--out folder")


@locks_output("out")
def prepare_detector_dataset(data_root: str | os.PathLike, out: str | os.PathLike, *, config: Mapping[str, Any],
                             studies: Iterable[str] | None = None, workers: int = 2, progress: bool = True,
                             overwrite: bool = False, locator: str | os.PathLike | None = None,
                             locator_config: Mapping[str, Any] | None = None,
                             levels_config: Mapping[str, Any] | None = None, follow_symlinks: bool = False) -> Path:
    """Build the YOLO fracture dataset from train.csv + train_bounding_boxes.csv; return the data.yaml path.

    With `roi.enabled` every slice is cut to the spine ROI that detect would use: from `locator` (weights
    with its configs, default configs/locator.yaml and levels.yaml) run on each study, else the fallback.
    A study folder that is, or holds, a symbolic link leaving `data_root` is left out unless `follow_symlinks`.
    """
    from detector.roi import check_roi_config, roi_enabled

    t0 = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    prep = _section(config, "prepare")
    render = _section(config, "render")
    train = read_table(data_root / TRAIN_CSV, "train")
    boxes = read_table(data_root / BOXES_CSV, "boxes")
    roi = _section(config, "roi") if roi_enabled(config) else None
    locate = None
    if roi is not None:
        check_roi_config(roi)
        if locator is not None:
            locate = _locate_spec(Path(locator), locator_config, levels_config,
                                  backend=str(_section(config, "detect")["backend"]))
        else:
            log.warning("prepare-detector: ROI without a locator: crops are centred by the roi.fallback (%s) "
                        "on every study; detect must then also run without one", roi["fallback"])
    elif locator is not None:
        log.info("prepare-detector: roi.enabled is false, so the locator is not used")
    batch = int(_section(config, "detect")["batch"])
    train[STUDY_COL] = train[STUDY_COL].astype(str)
    boxes[STUDY_COL] = boxes[STUDY_COL].astype(str)
    uids = _available_studies(data_root / TRAIN_IMAGES, train[STUDY_COL], studies, follow_symlinks=follow_symlinks)
    labels = train.set_index(STUDY_COL)
    boxed = set(boxes[STUDY_COL]) & set(uids)
    negatives = {u for u in uids if int(labels.at[u, PATIENT]) == 0}
    unboxed_positive = sorted(set(uids) - boxed - negatives)
    if unboxed_positive:
        log.info("%d fractured studies have no boxes in %s: left out (their slices are neither boxes nor "
                 "background)", len(unboxed_positive), BOXES_CSV)
    positive_without_label = sorted(boxed - {u for u in uids if int(labels.at[u, PATIENT]) == 1})
    for uid in positive_without_label:
        log.warning("%s: study %s has boxes but patient_overall = 0 in %s; its boxes are used",
                    data_root / BOXES_CSV, uid, TRAIN_CSV)
    selected = sorted(boxed | negatives)
    if not selected:
        raise InputError(data_root, "no study with boxes or patient_overall = 0 to build a detector dataset from")
    markers = dataset_markers(out, prepare_settings(config, kind="detector", locator=locator if locate else None,
                                                    locator_config=locator_config, levels_config=levels_config),
                              kind="detector")
    markers.plan(selected, overwrite=overwrite)       # refuses finished studies of other settings before any work
    remove_stale_temps(out, (IMAGES_DIR, LABELS_DIR, DONE_DIR))   # a killed run's temporaries (we hold the lock)
    _check_stale(out, selected, overwrite=overwrite)
    strata = {u: _level_stratum(labels.loc[u]) if u in boxed else NEGATIVE_STRATUM for u in selected}
    folds = _load_or_make_splits(out / SPLITS_JSON, strata, n_folds=int(prep["n_folds"]), seed=int(prep["seed"]),
                                 overwrite=overwrite)

    sel_boxes = boxes[boxes[STUDY_COL].isin(boxed)]
    every = int(prep["boxed_every"])
    if every < 1:
        raise ConfigError(f"prepare.boxed_every must be >= 1, not {every}")
    sampling = str(prep["negative_sampling"])
    if sampling not in NEGATIVE_SAMPLING:
        raise ConfigError(f"prepare.negative_sampling must be one of {NEGATIVE_SAMPLING}, not {sampling!r}")
    boxed_slices = -(-sel_boxes.groupby(STUDY_COL)["slice_number"].nunique() // every)   # boxed slices kept
    ratio, share = float(prep["background_ratio"]), float(prep["negative_share"])
    n_neg_total = int(round(ratio * share * int(boxed_slices.sum())))
    neg_counts = _spread(sorted(negatives, key=_uid_hash), n_neg_total)
    by_uid = {u: g for u, g in sel_boxes.groupby(STUDY_COL)}
    boxed_tasks, negative_tasks = [], []
    for uid in selected:
        fold = folds[uid]
        split = VAL if fold == int(prep["val_fold"]) else TRAIN
        if uid in boxed:
            g = by_uid[uid]
            rows = tuple((float(r.x), float(r.y), float(r.width), float(r.height), int(r.slice_number))
                         for r in g.itertuples(index=False))
            n_bg = int(round(ratio * (1.0 - share) * int(boxed_slices[uid])))
            boxed_tasks.append(StudyTask(uid, train_study_dir(data_root, uid), out, split, fold, render.copy(),
                                         prep.copy(), boxes=rows, n_background=n_bg, roi=roi, locate=locate,
                                         batch=batch))
        else:
            negative_tasks.append(StudyTask(uid, train_study_dir(data_root, uid), out, split, fold, render.copy(),
                                            prep.copy(), n_background=neg_counts.get(uid, 0), negative=True,
                                            roi=roi, locate=locate, batch=batch))
    # boxed studies first: where their boxes lie tells where the negatives' background is drawn ("matched")
    done = _run_tasks(boxed_tasks, _detector_study, markers, workers=workers, progress=progress,
                      overwrite=overwrite, desc="prepare-detector (boxed)")
    if sampling == "matched" and negative_tasks:
        density = boxed_height_histogram(out, [t.uid for t in boxed_tasks], bins=int(prep["matched_bins"]))
        if density is None:
            log.warning("%s: no boxed slice to match, so negatives' background is drawn uniformly", out)
        else:
            negative_tasks = [replace(t, background_density=density) for t in negative_tasks]
    done += _run_tasks(negative_tasks, _detector_study, markers, workers=workers, progress=progress,
                       overwrite=overwrite, desc="prepare-detector (negatives)")
    return _finish(out, kind="detector", names=FRACTURE_NAMES, config=config, selected=selected,
                   inputs={"data_root": str(data_root), "train_csv": str(data_root / TRAIN_CSV),
                           "boxes_csv": str(data_root / BOXES_CSV)},
                   extra={"done_now": done, "left_out_unboxed_positive": len(unboxed_positive),
                          "roi": roi, "locator": str(locator) if locate is not None else None,
                          "settings_key": markers.key},
                   overwrite=overwrite, t0=t0)


def _locate_spec(weights: Path, locator_config: Mapping[str, Any] | None, levels_config: Mapping[str, Any] | None,
                 *, backend: str) -> LocateSpec:
    """Check the locator loads (exporting it once for a fast backend here, not in every worker) and describe it."""
    from data_prep.runs.config import load_config
    from detector.locate import load_locator

    cfg = locator_config if locator_config is not None else load_config("locator")
    lcfg = levels_config if levels_config is not None else load_config("levels")
    loaded = load_locator(weights, config=cfg, levels_config=lcfg, device="cpu", backend=backend)
    plain = [c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in (cfg, lcfg)]
    return LocateSpec(Path(loaded.predictor.weights), plain[0], plain[1], backend=loaded.predictor.backend)


@locks_output("out")
def prepare_locator_dataset(data_root: str | os.PathLike, out: str | os.PathLike, *, config: Mapping[str, Any],
                            studies: Iterable[str] | None = None, workers: int = 2, progress: bool = True,
                            overwrite: bool = False, follow_symlinks: bool = False) -> Path:
    """Build the YOLO vertebra-locator dataset (classes C1..C7) from segmentations/*.nii; return data.yaml."""
    t0 = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    prep = _section(config, "prepare")
    render = _section(config, "render")
    seg_dir = data_root / SEGMENTATIONS
    if not seg_dir.is_dir():
        raise InputError(seg_dir, "no segmentations folder: the locator is trained on segmented studies")
    segs = {p.name[: -len(SEG_EXT)] if p.name.endswith(SEG_EXT) else p.name[: -len(SEG_EXT + ".gz")]: p
            for p in sorted(seg_dir.iterdir()) if p.name.endswith((SEG_EXT, SEG_EXT + ".gz"))}
    uids = _available_studies(data_root / TRAIN_IMAGES, pd.Series(sorted(segs)), studies,
                              follow_symlinks=follow_symlinks)
    if not uids:
        raise InputError(seg_dir, f"no segmentation has a study folder under {data_root / TRAIN_IMAGES}")
    markers = dataset_markers(out, prepare_settings(config, kind="locator"), kind="locator")
    markers.plan(uids, overwrite=overwrite)           # refuses finished studies of other settings before any work
    remove_stale_temps(out, (IMAGES_DIR, LABELS_DIR, DONE_DIR))   # a killed run's temporaries (we hold the lock)
    _check_stale(out, uids, overwrite=overwrite)
    folds = _load_or_make_splits(out / SPLITS_JSON, dict.fromkeys(uids, SEGMENTED_STRATUM),
                                 n_folds=int(prep["n_folds"]), seed=int(prep["seed"]), overwrite=overwrite)
    tasks = [StudyTask(uid, train_study_dir(data_root, uid), out,
                       VAL if folds[uid] == int(prep["val_fold"]) else TRAIN, folds[uid], render.copy(),
                       prep.copy(), segmentation=segs[uid]) for uid in uids]
    done = _run_tasks(tasks, _locator_study, markers, workers=workers, progress=progress, overwrite=overwrite,
                      desc="prepare-locator")
    return _finish(out, kind="locator", names=LOCATOR_NAMES, config=config, selected=uids,
                   inputs={"data_root": str(data_root), "segmentations": str(seg_dir)},
                   extra={"done_now": done, "settings_key": markers.key}, overwrite=overwrite, t0=t0)


def read_index(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read DIR/index.csv of a prepared dataset (StudyInstanceUID as str)."""
    path = Path(dataset_dir) / INDEX_CSV
    if not path.is_file():
        raise InputError(path, "no index.csv: run prepare-detector / prepare-locator first")
    return pd.read_csv(path, dtype={STUDY_COL: str})


def make_folds(strata: Mapping[str, str], *, n_folds: int, seed: int) -> dict[str, int]:
    """Assign each study one fold, stratified by its stratum label (scikit-learn StratifiedKFold)."""
    from sklearn.model_selection import StratifiedKFold

    uids = sorted(strata)
    if n_folds < MIN_FOLDS:
        raise ConfigError(f"prepare.n_folds must be at least {MIN_FOLDS} (one validation fold), found {n_folds}")
    if len(uids) < n_folds:
        raise InputError(None, f"{len(uids)} studies cannot fill {n_folds} folds; lower prepare.n_folds")
    labels = np.array([strata[u] for u in uids])
    values, counts = np.unique(labels, return_counts=True)
    rare = set(values[counts < n_folds])
    if rare:   # strata too small to spread over every fold are pooled
        labels = np.array(["rare" if lab in rare else lab for lab in labels])
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # a pooled stratum may still be smaller than n_folds
        for k, (_, test) in enumerate(skf.split(np.zeros(len(uids)), labels)):
            for i in test:
                folds[uids[i]] = k
    return folds


# ---------------------------------------------------------------- per-study workers (run in the pool)
def boxed_height_histogram(out: str | os.PathLike, uids: Iterable[str], *, bins: int) -> tuple[float, ...] | None:
    """Histogram over `bins` equal parts of the scan (0 = top slice) of where the finished studies' boxed slices lie."""
    hist = np.zeros(bins)
    for uid in uids:
        marker = _marker(Path(out), uid)
        if not marker.is_file():
            continue
        data = json.loads(marker.read_text(encoding="utf-8"))
        n = int(data.get("n_slices", 0))
        for row in data["rows"] if n else ():
            if row["kind"] == KIND_BOXED:
                hist[min(int(row["slice_index"] * bins / n), bins - 1)] += 1
    return tuple(float(v) for v in hist) if hist.sum() else None


def matched_weights(n_slices: int, density: Sequence[float], *, smooth_bins: int, floor: float) -> np.ndarray:
    """Sampling probabilities of a study's slices: `density` (by relative height) smoothed, mixed with `floor` uniform."""
    hist = np.asarray(density, dtype=np.float64)
    if smooth_bins > 0:
        hist = np.convolve(hist, np.ones(2 * smooth_bins + 1), mode="same")
    bins = hist.size
    per_slice = hist[np.minimum(((np.arange(n_slices) + 0.5) * bins / n_slices).astype(int), bins - 1)]
    per_slice = per_slice / per_slice.sum() if per_slice.sum() > 0 else np.full(n_slices, 1.0 / n_slices)
    return (1.0 - floor) * per_slice + floor / n_slices


def _detector_study(task: StudyTask) -> StudyOutcome:
    from data_prep.dicom.geometry import scan_study

    outcome = StudyOutcome(task.uid)
    geometry = scan_study(task.study_dir)
    rows, cols = int(geometry.shape[0]), int(geometry.shape[1])
    n = len(geometry.paths)
    per_slice: dict[int, list[tuple[int, float, float, float, float]]] = {}
    min_px = float(task.prepare["min_box_px"])
    for x, y, w, h, number in task.boxes:
        index = _index_of(geometry, number)
        if index is None:
            outcome.warnings.append(f"{task.uid}: box on slice_number {number} but the study has no slice with "
                                    f"that InstanceNumber (slices {min(geometry.instance_numbers)}-"
                                    f"{max(geometry.instance_numbers)}); box skipped")
            continue
        x1, y1 = min(max(x, 0.0), cols), min(max(y, 0.0), rows)
        x2, y2 = min(max(x + w, 0.0), cols), min(max(y + h, 0.0), rows)
        if x2 - x1 < min_px or y2 - y1 < min_px:
            outcome.warnings.append(f"{task.uid}: box ({x}, {y}, {w}, {h}) on slice_number {number} is smaller "
                                    f"than {min_px} px inside the {cols}x{rows} image; box skipped")
            continue
        per_slice.setdefault(index, []).append((0, x1, y1, x2 - x1, y2 - y1))
    if task.boxes and not per_slice:
        outcome.warnings.append(f"{task.uid}: none of its boxes could be placed; the study gives no background "
                                f"either (its fractured slices are unknown)")
        return outcome
    boxed = np.array(sorted(per_slice), dtype=int)
    outcome.n_slices = n
    weights = None
    if task.negative:
        candidates = np.arange(n)
        kind = KIND_NEGATIVE
        if task.background_density:
            weights = matched_weights(n, task.background_density, smooth_bins=int(task.prepare["matched_smooth_bins"]),
                                      floor=float(task.prepare["matched_floor"]))
    else:
        margin = int(task.prepare["margin_slices"])
        distance = np.abs(np.arange(n)[:, None] - boxed[None, :]).min(axis=1)
        candidates = np.flatnonzero(distance > margin)
        kind = KIND_FAR
    rng = np.random.default_rng([int(task.prepare["seed"]), _uid_hash(task.uid)])
    available = candidates.size if weights is None else int(np.count_nonzero(weights))
    n_bg = min(task.n_background, available)
    # hard negatives: draw hard_candidates times as many, keep the n_bg with the strongest crack response
    n_draw = min(n_bg * int(task.prepare["hard_candidates"]), available)
    background = sorted(rng.choice(candidates, size=n_draw, replace=False, p=weights).tolist()) if n_draw else []
    kept = boxed[::int(task.prepare["boxed_every"])]   # the skipped boxed slices are neither boxes nor background
    rois = None
    if task.roi is not None and (len(kept) or background):
        from detector.locate import study_rois
        from detector.roi import jitter_rois

        rois = study_rois(task.study_dir, config={"roi": task.roi, "detect": {"batch": task.batch}},
                          locator=_worker_locator(task.locate), geometry=geometry)
        rois = jitter_rois(rois, geometry.shape, geometry.pixel_spacing, float(task.roi["jitter_mm"]),
                           np.random.default_rng([int(task.prepare["seed"]), _uid_hash(task.uid), ROI_JITTER_STREAM]))
    if len(background) > n_bg:
        background = hardest_slices(geometry, background, n_bg, render=task.render, rois=rois,
                                    pad_hu=float(task.roi["pad_hu"]) if task.roi is not None else 0.0)
    jobs = [SliceLabel(int(i), KIND_BOXED, tuple(per_slice[int(i)])) for i in kept]
    jobs += [SliceLabel(int(i), kind) for i in background]
    _write_slices(task, geometry, jobs, outcome, rois=rois)
    return outcome


def hardest_slices(geometry: Any, candidates: Sequence[int], n: int, *, render: Mapping[str, Any], rois: Any = None,
                   pad_hu: float = 0.0) -> list[int]:
    """Return the `n` candidate slices (sorted) whose image (ROI crop, else whole slice) looks most like a crack.

    The score is detector.crack_filter.crack_score with the render section's crack keys (whether or not the crack
    channel is rendered): vascular channels, foramina and bony corners rank high, so the detector sees the
    look-alikes of a hairline fracture without a fracture. Ties keep the lower slice index. Real data has no truth
    for those confounders; this needs none.
    """
    from detector.crack_filter import crack_score
    from detector.locate import LazySlices
    from detector.roi import crop_padded

    order = sorted(int(i) for i in candidates)
    reader = LazySlices(geometry)
    scores = []
    for i in order:
        reader.forget_below(i)
        hu = reader.get(i)
        image = hu if rois is None else crop_padded(hu, rois.boxes([i])[0], pad_hu)
        scores.append(crack_score(image, geometry.pixel_spacing, render))
    best = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n]
    return sorted(order[j] for j in best)


_LOCATORS: dict[Path, Any] = {}


def _worker_locator(spec: LocateSpec | None) -> Any:
    """Load the locator once per worker process (None without one)."""
    if spec is None:
        return None
    if spec.weights not in _LOCATORS:
        from detector.locate import load_locator

        _LOCATORS[spec.weights] = load_locator(spec.weights, config=spec.config, levels_config=spec.levels_config,
                                               device="cpu", backend=spec.backend, threads=WORKER_THREADS)
    return _LOCATORS[spec.weights]


def _locator_study(task: StudyTask) -> StudyOutcome:
    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.segmentation import load_axial_mask, slice_level_table

    outcome = StudyOutcome(task.uid)
    geometry = scan_study(task.study_dir)
    mask = load_axial_mask(task.segmentation, geometry)
    table = slice_level_table(mask, geometry)
    del mask
    table = table[table["level"].isin(LEVELS) & (table["area_px"] >= int(task.prepare["min_area_px"]))]
    by_index = {int(i): g for i, g in table.groupby("slice_index")}
    jobs = []
    for i in range(0, len(geometry.paths), int(task.prepare["every_k"])):
        g = by_index.get(i)
        if g is None:
            if bool(task.prepare["keep_empty"]):
                jobs.append(SliceLabel(i, KIND_EMPTY))
            continue
        jobs.append(SliceLabel(i, KIND_LEVELS, tuple(
            (LEVELS.index(r.level), float(r.x), float(r.y), float(r.width), float(r.height))
            for r in g.itertuples(index=False))))
    _write_slices(task, geometry, jobs, outcome)
    return outcome


def _write_slices(task: StudyTask, geometry: Any, jobs: Sequence[SliceLabel], outcome: StudyOutcome, *,
                  rois: Any = None) -> None:
    """Render the chosen slices (decoding only them and their neighbours) and write image + label atomically.

    With `rois` (detector.roi.SpineRois) each slice is cut to its crop: labels are relative to the crop,
    clipped to it, and boxes the crop cuts are counted (index.csv `n_cut`).
    """
    import cv2

    from detector.locate import LazySlices
    from detector.render import context_slices, render_crops, render_slices, xywh_to_yolo
    from detector.roi import SOURCE_FULL, boxes_to_crop

    if not jobs:
        return
    shape = (int(geometry.shape[0]), int(geometry.shape[1]))
    image_dir = task.out / IMAGES_DIR / task.split
    label_dir = task.out / LABELS_DIR / task.split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    reader = LazySlices(geometry)
    context = context_slices(geometry, task.render)
    imgsz = int(task.render["imgsz"])
    min_px = float(task.prepare.get("min_box_px", 0.0))
    for job in sorted(jobs, key=lambda j: j.slice_index):
        index = job.slice_index
        reader.forget_below(index - context)
        boxes, n_cut, n_lost = job.boxes, 0, 0
        if rois is None:
            (image,), (sx, sy) = render_slices(reader, [index], geometry, render=task.render)
            crop, source, label_shape = (0, 0, shape[1], shape[0]), SOURCE_FULL, shape
        else:
            crop = tuple(int(v) for v in rois.boxes([index])[0])
            source = str(rois.source[index])
            image = render_crops(reader, [index], geometry, np.array([crop]), render=task.render,
                                 pad_hu=float(task.roi["pad_hu"]))[0]
            sx, sy = imgsz / crop[2], imgsz / crop[3]
            label_shape = (crop[3], crop[2])
            if boxes:
                inside, cut = boxes_to_crop(np.array([b[1:] for b in boxes], dtype=np.float64), crop)
                n_cut = int(cut.sum())
                keep = (inside[:, 2] >= min_px) & (inside[:, 3] >= min_px)
                n_lost = int((~keep).sum())
                boxes = tuple((b[0], *map(float, row)) for b, row, k in zip(boxes, inside, keep, strict=True) if k)
        number = int(geometry.instance_numbers[index])
        stem = f"{safe_name(task.uid)}_{number}"   # a name from train.csv never decides where a file goes
        image_path = image_dir / f"{stem}{IMAGE_EXT}"
        tmp = image_dir / f".{stem}.{os.getpid()}.tmp{IMAGE_EXT}"   # cv2 picks the format from the suffix
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"{tmp}: OpenCV could not write the image")
        os.replace(tmp, image_path)
        label_path = label_dir / f"{stem}{LABEL_EXT}"
        write_text_atomic(label_path, _label_text(boxes, label_shape, xywh_to_yolo))
        outcome.files += [str(image_path.relative_to(task.out)), str(label_path.relative_to(task.out))]
        outcome.rows.append({
            "image": str(image_path.relative_to(task.out)), "split": task.split, STUDY_COL: task.uid,
            "slice_number": number, "slice_index": index, "n_boxes": len(boxes),
            "scale_x": sx, "scale_y": sy, "kind": job.kind, "fold": task.fold, "roi_x": crop[0], "roi_y": crop[1],
            "roi_width": crop[2], "roi_height": crop[3], "roi_source": source, "n_cut": n_cut,
            "n_lost": n_lost})


def _label_text(boxes: Sequence[tuple[int, float, float, float, float]], shape: tuple[int, int],
                to_yolo: Callable[[np.ndarray, Sequence[int]], np.ndarray]) -> str:
    if not boxes:
        return ""
    classes = [b[0] for b in boxes]
    yolo = to_yolo(np.array([b[1:] for b in boxes], dtype=np.float64), shape)
    return "".join(f"{c} " + " ".join(f"{v:.{LABEL_DECIMALS}f}" for v in row) + "\n"
                   for c, row in zip(classes, yolo, strict=True))


def _run_one(worker: Callable[[StudyTask], StudyOutcome], task: StudyTask, markers: StudyMarkers) -> StudyOutcome:
    """Run a worker on one study, turning any failure into an outcome with the reason (the batch goes on)."""
    try:
        outcome = worker(task)
    except Exception as exc:   # noqa: BLE001 - one bad study must not stop the dataset
        return StudyOutcome(task.uid, error=f"{type(exc).__name__}: {exc}")
    markers.write(task.uid, {STUDY_COL: task.uid, "split": task.split, "fold": task.fold, "rows": outcome.rows,
                             "warnings": outcome.warnings, "n_slices": outcome.n_slices},
                  files=outcome.files, inputs_key=task_inputs_key(task))
    return outcome


def task_inputs_key(task: StudyTask) -> str:
    """Hash of what one study's slices and labels come from besides the settings: its boxes, split, fold, sampling."""
    return settings_key({"split": task.split, "fold": task.fold, "boxes": task.boxes,
                         "n_background": task.n_background, "negative": task.negative,
                         "background_density": task.background_density,
                         "segmentation": task.segmentation.name if task.segmentation else None})


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)   # one process per core already


# ---------------------------------------------------------------- orchestration
def _run_tasks(tasks: Sequence[StudyTask], worker: Callable[[StudyTask], StudyOutcome], markers: StudyMarkers, *,
               workers: int, progress: bool, overwrite: bool, desc: str) -> int:
    """Run the studies not finished with these settings and inputs (all with overwrite); return how many succeeded."""
    from tqdm.auto import tqdm

    out = markers.root
    todo, changed = [], []
    for task in tasks:
        if not overwrite and markers.is_current(task.uid, task_inputs_key(task)):
            continue
        if markers.read(task.uid) is not None:
            changed.append(task.uid)
            markers.remove(task.uid)
        todo.append(task)
    skipped = len(tasks) - len(todo)
    if skipped:
        log.info("%s: %d of %d studies already finished in %s (skipped; --overwrite redoes them)",
                 desc, skipped, len(tasks), out)
    if changed and not overwrite:
        log.info("%s: %d finished studies are redone because their labels, fold or sampling changed: %s", desc,
                 len(changed), ", ".join(changed[:MAX_NAMED]))
    failed = []
    with tqdm(total=len(todo), desc=desc, unit="study", disable=not progress) as bar:
        if workers > 1 and len(todo) > 1:
            ctx = get_context("forkserver")       # like the reader's pools: no fork after threads started
            ctx.set_forkserver_preload(["detector.yolo_dataset", "detector.render"])
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                     **dies_with_parent(_init_worker)) as pool:
                futures = [pool.submit(_run_one, worker, t, markers) for t in todo]
                for fut in as_completed(futures):
                    failed += _report(fut.result())
                    bar.update()
        else:
            for task in todo:
                failed += _report(_run_one(worker, task, markers))
                bar.update()
    if failed:
        log.warning("%s: %d studies failed and were left out (a rerun retries them): %s", desc, len(failed),
                    "; ".join(failed))
    if todo and len(failed) == len(todo):
        raise InputError(out, f"every study failed; first: {failed[0]}")
    return len(todo) - len(failed)


def _report(outcome: StudyOutcome) -> list[str]:
    for message in outcome.warnings:
        log.warning("%s", message)
    if outcome.error:
        log.warning("study %s failed: %s", outcome.uid, outcome.error)
        return [f"{outcome.uid} ({outcome.error})"]
    return []


def _finish(out: Path, *, kind: str, names: Mapping[int, str], config: Mapping[str, Any], selected: Sequence[str],
            inputs: Mapping[str, Any], extra: Mapping[str, Any], overwrite: bool, t0: float) -> Path:
    """Rebuild index.csv from the markers, write data.yaml and the sidecar; return data.yaml."""
    from detector.render import render_summary

    selected_set = set(selected)
    rows: list[dict[str, Any]] = []
    for marker in _markers(out):
        data = json.loads(marker.read_text(encoding="utf-8"))
        if str(data[STUDY_COL]) in selected_set:
            rows += data["rows"]
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).sort_values([STUDY_COL, "slice_index"])
    write_csv_atomic(out / INDEX_CSV, index)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    render = render_summary(_section(config, "render"))
    prep = _section(config, "prepare")
    val = index[index["split"] == VAL]
    if not len(val):
        log.warning("%s: the validation fold %d holds no image; Ultralytics needs one (more studies or "
                    "another prepare.val_fold)", out, prep["val_fold"])
    elif not (val["n_boxes"] > 0).any():
        log.warning("%s: the validation fold %d holds no box, so validation metrics (and best.pt) mean nothing; "
                    "use more studies, fewer prepare.n_folds or another prepare.val_fold", out, prep["val_fold"])
    data = {"path": str(out.resolve()), TRAIN: f"{IMAGES_DIR}/{TRAIN}", VAL: f"{IMAGES_DIR}/{VAL}",
            "names": dict(names),
            "spinefrac": {"kind": kind, **render, "fold": int(prep["val_fold"]), "n_folds": int(prep["n_folds"]),
                          "config_hash": config_hash(cfg)}}
    (out / IMAGES_DIR / TRAIN).mkdir(parents=True, exist_ok=True)
    (out / IMAGES_DIR / VAL).mkdir(parents=True, exist_ok=True)
    data_yaml = write_text_atomic(out / DATA_YAML, yaml.safe_dump(data, sort_keys=False))
    n_cut = int(pd.to_numeric(index["n_cut"], errors="coerce").fillna(0).sum())
    n_lost = int(pd.to_numeric(index["n_lost"], errors="coerce").fillna(0).sum())
    n_before = int(index["n_boxes"].sum()) + n_lost
    counts = {"studies": int(index[STUDY_COL].nunique()), "images": len(index),
              **{f"images_{s}": int((index["split"] == s).sum()) for s in (TRAIN, VAL)},
              **{f"kind_{k}": int(v) for k, v in index["kind"].value_counts().items()},
              "boxes": int(index["n_boxes"].sum()), "boxes_before_roi": n_before, "boxes_cut_by_roi": n_cut,
              "boxes_lost_to_roi": n_lost, "roi_cut_share": round(n_cut / n_before, 5) if n_before else 0.0,
              **{f"roi_source_{k}": int(v) for k, v in index["roi_source"].value_counts().items()}}
    if n_cut:
        log.info("%s: the ROI crop cut %d of %d boxes (%.2f%%; %d lost entirely); see index.csv n_cut / n_lost",
                 out, n_cut, n_before, 100.0 * n_cut / max(n_before, 1), n_lost)
    write_sidecar(out / INDEX_CSV, kind=f"yolo_dataset_{kind}", config=cfg, inputs=inputs, counts=counts,
                  runtime_s=time.perf_counter() - t0, extra=dict(extra))
    log.info("%s dataset in %s: %s", kind, out, counts)
    return data_yaml


def _check_stale(out: Path, selected: Sequence[str], *, overwrite: bool) -> None:
    """Refuse (or, with overwrite, remove) finished studies in `out` that are not in the current selection."""
    selected_set = set(selected)
    stale = sorted(u for u in dataset_markers(out).done_uids() if u not in selected_set)
    if not stale:
        return
    if not overwrite:
        raise InputError(out, f"{len(stale)} finished studies in this folder are not in the current selection "
                              f"(e.g. {stale[0]}); use a new folder, or --overwrite to remove them")
    for uid in stale:
        _remove_study(out, uid)
    log.warning("removed %d studies outside the current selection from %s", len(stale), out)


def _markers(out: Path) -> list[Path]:
    return sorted((out / DONE_DIR).glob("*.json")) if (out / DONE_DIR).is_dir() else []


def _load_or_make_splits(path: Path, strata: Mapping[str, str], *, n_folds: int, seed: int,
                         overwrite: bool) -> dict[str, int]:
    """Reuse splits.json when it covers every study with the same fold count; else make it (once)."""
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        folds = {str(k): int(v) for k, v in data.get("folds", {}).items()}
        missing = sorted(set(strata) - set(folds))
        if int(data.get("n_folds", -1)) == n_folds and not missing:
            return folds
        reason = (f"n_folds {data.get('n_folds')} != {n_folds}" if int(data.get("n_folds", -1)) != n_folds
                  else f"{len(missing)} studies are not in it (e.g. {missing[0]})")
        if not overwrite:
            raise InputError(path, f"existing folds do not fit this run: {reason}; use a new folder or --overwrite")
        log.warning("%s: remaking the folds (%s)", path, reason)
    folds = make_folds(strata, n_folds=n_folds, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"n_folds": n_folds, "seed": seed, "folds": folds})
    return folds


def _remove_study(out: Path, uid: str) -> None:
    dataset_markers(out).remove(uid)


def _marker(out: Path, uid: str) -> Path:
    return dataset_markers(out).marker(uid)


def _index_of(geometry: Any, instance_number: int) -> int | None:
    try:
        index = geometry.index_of_instance(int(instance_number))
    except (KeyError, ValueError, IndexError):
        return None
    return None if index is None else int(index)


def train_study_dir(data_root: str | os.PathLike, uid: str) -> Path:
    """The folder of a labelled study: DATA/train_images/<uid>, refused (UnsafePathError) if the name would leave it."""
    return inside(Path(data_root) / TRAIN_IMAGES, uid, source=f"StudyInstanceUID {uid!r} of {TRAIN_CSV}")


def _available_studies(images_root: Path, uids: pd.Series, studies: Iterable[str] | None, *,
                       follow_symlinks: bool = False) -> list[str]:
    """Studies listed in the labels that have a folder, restricted to `studies` when given.

    A study folder that is, or holds, a symbolic link leaving the dataset folder is left out with a warning unless
    `follow_symlinks`.
    """
    if not images_root.is_dir():
        raise InputError(images_root, "no study folders (expected the Kaggle train_images/ layout)")
    listed = [str(u) for u in uids.astype(str).unique()]
    present = []
    for uid in listed:
        try:
            folder = train_study_dir(images_root.parent, uid)
        except UnsafePathError as exc:
            log.warning("%s; study left out", exc)
            continue
        if not folder.is_dir():
            continue
        links = [] if follow_symlinks else leaving_links(folder, images_root.parent)
        if links:
            log.warning("study %s left out: %s", uid, describe_links(links, images_root.parent))
            continue
        present.append(uid)
    if len(present) < len(listed):
        log.warning("%s: %d labelled studies have no usable folder and are left out", images_root,
                    len(listed) - len(present))
    check_unique_names(present, images_root)
    if studies is not None:
        wanted = {str(s) for s in studies}
        unknown = wanted - set(listed)
        if unknown:
            log.warning("%d requested studies are not in the labels (e.g. %s)", len(unknown), sorted(unknown)[0])
        present = [u for u in present if u in wanted]
    return sorted(present)


def _level_stratum(row: pd.Series) -> str:
    """Stratum of a fractured study: its most cranial fractured level (C1..C7), else 'positive'."""
    for level in LEVELS:
        if int(row[level]) == 1:
            return level
    return "positive"


def _spread(uids: Sequence[str], total: int) -> dict[str, int]:
    """Split `total` background slices as evenly as possible over `uids` (earlier ones get the remainder)."""
    if not uids:
        return {}
    base, extra = divmod(max(total, 0), len(uids))
    return {u: base + (1 if i < extra else 0) for i, u in enumerate(uids)}


def _uid_hash(uid: str) -> int:
    return zlib.crc32(uid.encode("utf-8"))


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    section = config[name]
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)

