"""The vertebra-classifier dataset (prepare-classifier): per-vertebra crops labelled with the study's level labels.

Layout (docs/contracts.md "Classifier dataset"):
    DIR/images/<uid>/<level>_<slice_index>.png     every crop, written once
    DIR/index.csv (+ .meta.json)                    one row per crop
    DIR/skipped.csv                                 studies left out (no level source, or failed) and why
    DIR/fold<k>/{train,val}/{0,1}/<uid>_<level>_<slice_index>.png   relative symlinks (Ultralytics classify layout)
    DIR/classifier_dataset.json                     folds with their train/val studies and image counts
    DIR/.done/<uid>.json                            per-study resume markers (data_prep.runs.resume)
A study's level boxes come from its segmentation (crops.source "auto" and a segmentations/<uid>.nii[.gz]), else
from the vertebra locator; without either it is skipped. Each study is one job in a process pool; its crops are
written atomically, then its marker last. A rerun with the same settings (`classifier_settings`) skips finished
studies; with other settings it refuses, unless `overwrite`. index.csv and the fold folders are rebuilt from the
markers on every run (the folds can change without redoing any crop).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.errors import InputError
from data_prep.runs.artifacts import remove_stale_temps, write_csv_atomic, write_json_atomic, write_sidecar
from data_prep.runs.config import ConfigError
from data_prep.runs.locks import locks_output
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from data_prep.runs.resume import StudyMarkers, plain, section, settings_key, weights_id
from data_prep.runs.tables import read_table
from data_prep.runs.workers import dies_with_parent
from data_prep.safe_paths import inside, safe_name
from detector.vertebra_crops import SOURCE_LOCATOR, SOURCE_SEGMENTATION

log = logging.getLogger("detector")

INDEX_CSV = "index.csv"
SKIPPED_CSV = "skipped.csv"
DATASET_JSON = "classifier_dataset.json"
DONE_DIR = ".done"
IMAGES_DIR = "images"
FOLD_PREFIX = "fold"
TRAIN, VAL = "train", "val"
IMAGE_EXT = ".png"
TRAIN_CSV = "train.csv"
BOXES_CSV = "train_bounding_boxes.csv"
TRAIN_IMAGES = "train_images"
SEGMENTATIONS = "segmentations"
SEG_EXTS: tuple[str, ...] = (".nii", ".nii.gz")
CLASS_NAMES: dict[int, str] = {0: "intact", 1: "fractured"}
"""Class folder (the level's label in train.csv) -> name."""
REASON_NO_SOURCE = "no_level_source"   # skipped.csv: no segmentation used and no locator
REASON_NO_LEVELS = "no_levels_found"   # skipped.csv: the level source found no vertebra
REASON_FAILED = "failed"               # skipped.csv: the study raised (unreadable DICOM, bad segmentation, ...)
MAX_NAMED = 5                # studies named in one log line
LOCATOR_BACKEND = "auto"     # the locator's backend in the workers (as detect's default)
MIN_STRATUM = 2              # a patient_overall class needs this many studies to be stratified on
DEFAULT_FOLD = 0             # folds=None: one model, fold 0, trained on every study
INDEX_COLUMNS: tuple[str, ...] = (STUDY_COL, "level", "slice_index", "label", "label_source", "image", "source",
                                  "crop_x", "crop_y", "crop_width", "crop_height", "first_slice", "last_slice",
                                  "n_slices")
SKIPPED_COLUMNS: tuple[str, ...] = (STUDY_COL, "reason", "detail")


@dataclass(frozen=True)
class ClassifierTask:
    """Everything one worker needs for one study (picklable)."""
    uid: str
    study_dir: Path
    out: Path
    labels: tuple[int, ...]                  # C1..C7 from train.csv
    crops: dict[str, Any]
    render: dict[str, Any]
    segmentation: Path | None = None         # used when set (crops.source "auto" and the study has one)
    locate: Any = None                       # detector.yolo_dataset.LocateSpec, else None
    fracture_boxes: tuple[tuple[float, ...], ...] | None = None   # (slice_number, x, y, w, h) per box; None: unboxed


@dataclass
class ClassifierOutcome:
    """What a worker did for one study: its index rows and files, or an error / the reason it has no crops."""
    uid: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None


# ---------------------------------------------------------------- public API
def classifier_settings(config: Mapping[str, Any], *, locator: str | os.PathLike | None = None,
                        locator_config: Mapping[str, Any] | None = None,
                        levels_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What shapes the crops, hashed into the done markers: `crops`, `render` and the locator (weights SHA-256, configs).

    `prepare` (seed, val_share) only shapes the fold folders, which are rebuilt on every run, so it is left out.
    """
    from data_prep.runs.config import load_config

    settings: dict[str, Any] = {"crops": section(config, "crops"), "render": section(config, "render"),
                                "locator": None}
    if locator is not None:
        lcfg = locator_config if locator_config is not None else load_config("locator")
        settings["locator"] = {"weights_sha256": weights_id(locator), "render": section(lcfg, "render"),
                               "locate": section(lcfg, "locate"),
                               "levels": plain(levels_config if levels_config is not None else load_config("levels"))}
    return settings


def classifier_markers(out: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> StudyMarkers:
    """The done markers of a classifier dataset folder (for `settings`, when checking or writing)."""
    return StudyMarkers(Path(out), dict(settings or {}), done_dir=DONE_DIR, what="prepare-classifier",
                        how="rerun with --overwrite to redo every study with the new settings, or choose a new "
                            "--out folder")


@locks_output("out")
def prepare_classifier_dataset(data_root: str | os.PathLike, out: str | os.PathLike, *, config: Mapping[str, Any],
                               studies: Iterable[str] | None = None, folds: Mapping[int, Sequence[str]] | None = None,
                               locator: str | os.PathLike | None = None,
                               locator_config: Mapping[str, Any] | None = None,
                               levels_config: Mapping[str, Any] | None = None, workers: int = 2,
                               progress: bool = True, overwrite: bool = False, follow_symlinks: bool = False) -> Path:
    """Build the per-vertebra crop dataset from train.csv (+ segmentations, or a locator); return the dataset folder.

    folds: fold k -> the studies fold model k trains on (None: one model, fold 0, on every study); each fold gets
    DIR/fold<k>/{train,val}/{0,1}/ for Ultralytics classify (`data=DIR/fold<k>`).
    """
    from detector.render import render_summary
    from detector.vertebra_crops import CROP_SOURCES
    from detector.yolo_dataset import _available_studies, _locate_spec, train_study_dir

    t0 = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    crops, render, prep = (_plain_section(config, s) for s in ("crops", "render", "prepare"))
    render_summary(render)                                   # refuses an unknown recipe before any work
    if crops["source"] not in CROP_SOURCES:
        raise ConfigError(f"crops.source must be one of {', '.join(CROP_SOURCES)}, found {crops['source']!r}")
    train = read_table(data_root / TRAIN_CSV, "train")
    train[STUDY_COL] = train[STUDY_COL].astype(str)
    uids = _available_studies(data_root / TRAIN_IMAGES, train[STUDY_COL], studies, follow_symlinks=follow_symlinks)
    if not uids:
        raise InputError(data_root / TRAIN_IMAGES, f"no labelled study of {TRAIN_CSV} has a folder here")
    labels = train.drop_duplicates(STUDY_COL).set_index(STUDY_COL)
    fracture_boxes = _fracture_boxes(data_root, crops)
    segs = _segmentations(data_root / SEGMENTATIONS) if crops["source"] == "auto" else {}
    locate = None
    if locator is not None:
        locate = _locate_spec(Path(locator), locator_config, levels_config, backend=LOCATOR_BACKEND)
    markers = classifier_markers(out, classifier_settings(config, locator=locator if locate else None,
                                                          locator_config=locator_config,
                                                          levels_config=levels_config))
    markers.plan(uids, overwrite=overwrite)      # refuses finished studies of other settings before any work
    remove_stale_temps(out, (IMAGES_DIR, DONE_DIR))     # a killed run's temporaries (we hold the lock)
    skipped: list[dict[str, str]] = []
    tasks = []
    for uid in uids:
        seg = segs.get(uid)
        if seg is None and locate is None:
            why = ("no segmentation and no --locator" if crops["source"] == "auto"
                   else "crops.source is 'locator' but no --locator was given")
            skipped.append({STUDY_COL: uid, "reason": REASON_NO_SOURCE, "detail": why})
            continue
        tasks.append(ClassifierTask(uid, train_study_dir(data_root, uid), out,
                                    tuple(int(labels.at[uid, lv]) for lv in LEVELS), crops, render,
                                    segmentation=seg, locate=None if seg is not None else locate,
                                    fracture_boxes=fracture_boxes.get(uid)))
    if skipped:
        log.warning("prepare-classifier: %d studies skipped: no segmentation and no locator (e.g. %s)", len(skipped),
                    ", ".join(s[STUDY_COL] for s in skipped[:MAX_NAMED]))
    if not tasks:
        raise InputError(data_root, "no study has a level source: give --locator (or segmentations with "
                                    "crops.source 'auto')")
    _remove_outside(markers, {t.uid for t in tasks}, overwrite=overwrite)
    done, failed = _run_tasks(tasks, markers, workers=workers, progress=progress, overwrite=overwrite)
    skipped += failed
    index, empty = _rebuild_index(markers, [t.uid for t in tasks])
    skipped += [{STUDY_COL: uid, "reason": REASON_NO_LEVELS, "detail": why} for uid, why in empty]
    write_csv_atomic(out / SKIPPED_CSV, pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)))
    with_crops = sorted(set(index[STUDY_COL]))
    layout = write_fold_layout(out, index, folds=folds, patient=labels[PATIENT].astype(int).to_dict(),
                               val_share=float(prep["val_share"]), seed=int(prep["seed"]))
    counts = {"studies": len(with_crops), "crops": len(index), "skipped": len(skipped),
              **{f"positives_{lv}": int(((index["level"] == lv) & (index["label"] == 1)).sum()) for lv in LEVELS},
              **{f"crops_{lv}": int((index["level"] == lv).sum()) for lv in LEVELS},
              **{f"source_{k}": int(v) for k, v in index.drop_duplicates(STUDY_COL)["source"].value_counts().items()}}
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    write_sidecar(out / INDEX_CSV, kind="classifier_dataset", config=cfg,
                  inputs={"data_root": str(data_root), "train_csv": str(data_root / TRAIN_CSV),
                          "locator": str(locator) if locate is not None else None},
                  counts=counts, runtime_s=time.perf_counter() - t0,
                  extra={"done_now": done, "settings_key": markers.key, "render": render_summary(render),
                         "folds": {str(k): {s: v[s] for s in ("train_studies", "val_studies")}
                                   for k, v in layout["folds"].items()}})
    log.info("classifier dataset in %s: %s", out, counts)
    return out


def write_fold_layout(out: str | os.PathLike, index: pd.DataFrame, *, folds: Mapping[int, Sequence[str]] | None,
                      patient: Mapping[str, int], val_share: float, seed: int) -> dict[str, Any]:
    """(Re)write DIR/fold<k>/{train,val}/{0,1}/ symlinks and DIR/classifier_dataset.json; return that record.

    Fold k's studies (those of `folds[k]` that have crops) are split by study: `val_share` of them (stratified by
    patient_overall where each class has MIN_STRATUM studies) go to val/, the rest to train/.
    """
    out = Path(out)
    have = sorted(set(index[STUDY_COL].astype(str)))
    plan = {DEFAULT_FOLD: have} if folds is None else {int(k): list(v) for k, v in folds.items()}
    for old in out.glob(f"{FOLD_PREFIX}*"):
        if old.is_dir() and old.name[len(FOLD_PREFIX):].isdigit() and int(old.name[len(FOLD_PREFIX):]) not in plan:
            shutil.rmtree(old)
    record: dict[str, Any] = {"names": {str(k): v for k, v in CLASS_NAMES.items()}, "val_share": val_share,
                              "seed": seed, "folds": {}}
    by_study = {u: g for u, g in index.groupby(STUDY_COL)}
    for k, members in sorted(plan.items()):
        wanted = {str(u) for u in members}
        fold_uids = sorted(wanted & set(have))
        if len(fold_uids) < len(wanted):
            log.info("fold %d: %d of its %d studies have no crops (skipped or failed)", k,
                     len(wanted) - len(fold_uids), len(wanted))
        val = split_validation(fold_uids, {u: int(patient.get(u, 0)) for u in fold_uids}, val_share=val_share,
                               seed=seed + k)
        folder = out / f"{FOLD_PREFIX}{k}"
        tmp = out / f".{FOLD_PREFIX}{k}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        n_images = {TRAIN: dict.fromkeys(CLASS_NAMES, 0), VAL: dict.fromkeys(CLASS_NAMES, 0)}
        for split in (TRAIN, VAL):
            for label in CLASS_NAMES:
                (tmp / split / str(label)).mkdir(parents=True)
        for uid in fold_uids:
            split = VAL if uid in val else TRAIN
            for row in by_study[uid].itertuples(index=False):
                label = int(row.label)
                link = tmp / split / str(label) / f"{safe_name(uid)}_{row.level}_{int(row.slice_index)}{IMAGE_EXT}"
                # relative to the final folder: the link lives at out/fold<k>/split/label/, two levels below fold<k>
                os.symlink(os.path.relpath(out / str(row.image), folder / split / str(label)), link)
                n_images[split][label] += 1
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        for split in (TRAIN, VAL):
            empty = [CLASS_NAMES[c] for c, n in n_images[split].items() if n == 0]
            if empty:
                log.warning("%s: %s/ has no %s crop; the classifier cannot train or validate on that class",
                            folder, split, " or ".join(empty))
        record["folds"][str(k)] = {"path": f"{FOLD_PREFIX}{k}", "train_studies": len(fold_uids) - len(val),
                                   "val_studies": len(val), "val": sorted(val),
                                   "images": {s: {str(c): n for c, n in v.items()} for s, v in n_images.items()}}
    write_json_atomic(out / DATASET_JSON, record)
    return record


def split_validation(uids: Sequence[str], patient: Mapping[str, int], *, val_share: float, seed: int) -> set[str]:
    """Choose round(val_share x n) (at least 1 when n >= 2) studies as validation, stratified by patient_overall."""
    from sklearn.model_selection import train_test_split

    uids = sorted(uids)
    if len(uids) < MIN_STRATUM or val_share <= 0:
        return set()
    n_val = min(max(1, int(round(val_share * len(uids)))), len(uids) - 1)
    strata = np.array([int(patient[u]) for u in uids])
    _, counts = np.unique(strata, return_counts=True)
    stratify = strata if len(counts) > 1 and counts.min() >= MIN_STRATUM and n_val >= len(counts) \
        and len(uids) - n_val >= len(counts) else None
    _, val = train_test_split(uids, test_size=n_val, random_state=seed, stratify=stratify)
    return set(val)


def fold_studies(fold_dir: str | os.PathLike) -> set[str]:
    """The studies whose crops are in a fold folder's train/ and val/ class folders (what fold model k saw)."""
    fold_dir = Path(fold_dir)
    if not fold_dir.is_dir():
        raise InputError(fold_dir, "no such fold folder (expected DIR/fold<k>/ of prepare-classifier)")
    names = {link.name.rsplit("_", 2)[0] for split in (TRAIN, VAL) for link in (fold_dir / split).glob(f"*/*{IMAGE_EXT}")}
    index = fold_dir.parent / INDEX_CSV      # file names hold safe_name(uid): the dataset's index maps them back
    keys = {safe_name(u): u for u in read_classifier_index(fold_dir.parent)[STUDY_COL]} if index.is_file() else {}
    return {keys.get(name, name) for name in names}


def read_classifier_index(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read DIR/index.csv of a classifier dataset (StudyInstanceUID as str)."""
    path = Path(dataset_dir) / INDEX_CSV
    if not path.is_file():
        raise InputError(path, "no index.csv: run prepare-classifier first")
    return pd.read_csv(path, dtype={STUDY_COL: str})


def dataset_summary(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read DIR/classifier_dataset.json (folds, their train/val studies and image counts)."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        raise InputError(path, "no classifier_dataset.json: run prepare-classifier first")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- per-study worker (runs in the pool)
def _classifier_study(task: ClassifierTask) -> ClassifierOutcome:
    """Find the study's level boxes, plan and render its crops, write them; return the index rows."""
    import cv2

    from data_prep.dicom.geometry import scan_study
    from detector.locate import LazySlices
    from detector.render import context_slices
    from detector.vertebra_crops import (
        boxed_level_slices,
        crop_labels,
        crop_plan,
        level_slice_boxes_from_locator,
        level_slice_boxes_from_segmentation,
        render_vertebra_crops,
    )

    outcome = ClassifierOutcome(task.uid)
    geometry = scan_study(task.study_dir)
    if task.segmentation is not None:
        from data_prep.dicom.segmentation import load_axial_mask, slice_level_table

        mask = load_axial_mask(task.segmentation, geometry)
        boxes = level_slice_boxes_from_segmentation(slice_level_table(mask, geometry))
        del mask
        source = SOURCE_SEGMENTATION
    else:
        from detector.locate import locate_levels
        from detector.yolo_dataset import _worker_locator

        _, slice_levels, level_boxes = locate_levels(task.study_dir, locator=_worker_locator(task.locate),
                                                     geometry=geometry)
        boxes = level_slice_boxes_from_locator(level_boxes, slice_levels, task.crops)
        source = SOURCE_LOCATOR
    level_labels = dict(zip(LEVELS, task.labels, strict=True))
    boxed = None
    if task.fracture_boxes is not None:
        numbers = {int(n): i for i, n in enumerate(geometry.instance_numbers)}
        frac = pd.DataFrame([(numbers[int(b[0])], *b[1:]) for b in task.fracture_boxes if int(b[0]) in numbers],
                            columns=["slice_index", "x", "y", "width", "height"])
        boxed = {lv: s for lv, s in boxed_level_slices(boxes, frac).items() if level_labels[lv]}
    plan = crop_plan(boxes, geometry, task.crops, extra_slices=boxed).sort_values(
        ["slice_index", "level"], kind="stable").reset_index(drop=True)
    crop_label, label_source = crop_labels(plan, level_labels, boxed,
                                           near_slices=int(task.crops["box_near_slices"]))
    if not len(plan):
        outcome.reason = f"{source} found no cervical vertebra"
        return outcome
    folder = study_images(task.out, task.uid)
    folder.mkdir(parents=True, exist_ok=True)
    reader = LazySlices(geometry)
    context = context_slices(geometry, task.render)
    config = {"crops": task.crops, "render": task.render}
    for k, row in enumerate(plan.itertuples(index=False)):
        reader.forget_below(int(row.slice_index) - context)
        image = render_vertebra_crops(reader, geometry, plan.iloc[k:k + 1], config)[0]
        name = f"{row.level}_{int(row.slice_index)}{IMAGE_EXT}"
        tmp = folder / f".{name}.{os.getpid()}.tmp{IMAGE_EXT}"     # cv2 picks the format from the suffix
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"{tmp}: OpenCV could not write the image")
        os.replace(tmp, folder / name)
        rel = f"{IMAGES_DIR}/{folder.name}/{name}"
        outcome.files.append(rel)
        outcome.rows.append({STUDY_COL: task.uid, "level": row.level, "slice_index": int(row.slice_index),
                             "label": int(crop_label[k]), "label_source": label_source[k], "image": rel,
                             "source": source,
                             "crop_x": int(row.crop_x), "crop_y": int(row.crop_y),
                             "crop_width": int(row.crop_width), "crop_height": int(row.crop_height),
                             "first_slice": int(row.first_slice), "last_slice": int(row.last_slice),
                             "n_slices": int(row.n_slices)})
    return outcome


def _fracture_boxes(data_root: Path, crops: Mapping[str, Any]) -> dict[str, tuple[tuple[float, ...], ...]]:
    """uid -> its train_bounding_boxes.csv boxes (slice_number, x, y, width, height), when crops.label uses them."""
    path = data_root / BOXES_CSV
    if crops["label"] != "boxes_where_known" or not path.is_file():
        return {}
    table = read_table(path, "boxes")
    return {str(uid): tuple(tuple(float(v) for v in row) for row in
                            g[["slice_number", "x", "y", "width", "height"]].itertuples(index=False))
            for uid, g in table.groupby(STUDY_COL)}


def _task_inputs_key(task: ClassifierTask) -> str:
    """Hash of a study's own inputs besides the settings: its labels, its boxes and its level source."""
    return settings_key({"labels": task.labels, "fracture_boxes": task.fracture_boxes,
                         "segmentation": task.segmentation.name if task.segmentation else None,
                         "locator": task.locate is not None})


def _run_one(task: ClassifierTask, markers: StudyMarkers) -> ClassifierOutcome:
    """Run the worker on one study, turning any failure into an outcome with the reason (the batch goes on)."""
    try:
        outcome = _classifier_study(task)
    except Exception as exc:   # noqa: BLE001 - one bad study must not stop the dataset
        return ClassifierOutcome(task.uid, error=f"{type(exc).__name__}: {exc}")
    markers.write(task.uid, {STUDY_COL: task.uid, "rows": outcome.rows, "reason": outcome.reason},
                  files=[*outcome.files, f"{IMAGES_DIR}/{safe_name(task.uid)}"], inputs_key=_task_inputs_key(task))
    return outcome


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)   # one process per core already


# ---------------------------------------------------------------- orchestration
def _run_tasks(tasks: Sequence[ClassifierTask], markers: StudyMarkers, *, workers: int, progress: bool,
               overwrite: bool) -> tuple[int, list[dict[str, str]]]:
    """Run the studies not finished with these settings; return (how many succeeded, skipped.csv rows of failures)."""
    from tqdm.auto import tqdm

    todo = []
    for task in tasks:
        if not overwrite and markers.is_current(task.uid, _task_inputs_key(task)):
            continue
        if markers.read(task.uid) is not None:
            markers.remove(task.uid)
        _clear_study(markers.root, task.uid)
        todo.append(task)
    if len(tasks) > len(todo):
        log.info("prepare-classifier: %d of %d studies already finished in %s (skipped; --overwrite redoes them)",
                 len(tasks) - len(todo), len(tasks), markers.root)
    failed: list[dict[str, str]] = []

    def report(outcome: ClassifierOutcome) -> None:
        if outcome.error:
            log.warning("study %s failed: %s", outcome.uid, outcome.error)
            failed.append({STUDY_COL: outcome.uid, "reason": REASON_FAILED, "detail": outcome.error})

    with tqdm(total=len(todo), desc="prepare-classifier", unit="study", disable=not progress) as bar:
        if workers > 1 and len(todo) > 1:
            ctx = get_context("forkserver")       # like the other pools: no fork after threads started
            ctx.set_forkserver_preload(["detector.classifier_dataset", "detector.render"])
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                     **dies_with_parent(_init_worker)) as pool:
                futures = [pool.submit(_run_one, t, markers) for t in todo]
                for fut in as_completed(futures):
                    report(fut.result())
                    bar.update()
        else:
            for task in todo:
                report(_run_one(task, markers))
                bar.update()
    if failed:
        log.warning("prepare-classifier: %d studies failed and were left out (a rerun retries them): %s", len(failed),
                    "; ".join(f"{f[STUDY_COL]} ({f['detail']})" for f in failed[:MAX_NAMED]))
    if tasks and len(failed) == len(tasks):     # a rerun where only the retried studies fail again goes on
        raise InputError(markers.root, f"every study failed; first: {failed[0][STUDY_COL]} ({failed[0]['detail']})")
    return len(todo) - len(failed), failed


def _rebuild_index(markers: StudyMarkers, uids: Sequence[str]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """index.csv from the markers of `uids` (finished studies only), written atomically; return it and the
    finished studies without crops (uid, why)."""
    rows: list[dict[str, Any]] = []
    empty: list[tuple[str, str]] = []
    for uid in uids:
        data = markers.read(uid)
        if data is not None and data.get("settings_key") == markers.key:
            rows += data["rows"]
            if not data["rows"]:
                empty.append((uid, str(data.get("reason") or "no crops")))
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    index[STUDY_COL] = index[STUDY_COL].astype(str)
    index = index.sort_values([STUDY_COL, "slice_index", "level"], kind="stable").reset_index(drop=True)
    write_csv_atomic(markers.root / INDEX_CSV, index)
    return index, empty


def _remove_outside(markers: StudyMarkers, keep: set[str], *, overwrite: bool) -> None:
    """Refuse (or, with overwrite, remove) finished studies in the folder that are not part of this run."""
    stale = [u for u in markers.done_uids() if u not in keep]
    if not stale:
        return
    if not overwrite:
        raise InputError(markers.root, f"{len(stale)} finished studies in this folder are not in the current "
                                       f"selection (e.g. {stale[0]}); use a new folder, or --overwrite to remove them")
    for uid in stale:
        markers.remove(uid)
    log.warning("removed %d studies outside the current selection from %s", len(stale), markers.root)


def _clear_study(out: Path, uid: str) -> None:
    """Remove a study's crop folder left by an unfinished run (its marker was never written)."""
    shutil.rmtree(study_images(out, uid), ignore_errors=True)


def study_images(out: str | os.PathLike, uid: str) -> Path:
    """A study's crop folder: DIR/images/<safe_name(uid)>/ (data_prep.safe_paths)."""
    return inside(Path(out) / IMAGES_DIR, safe_name(uid), source=f"study {uid!r}")


def _segmentations(seg_dir: Path) -> dict[str, Path]:
    """StudyInstanceUID -> its segmentations/<uid>.nii[.gz] (empty when the folder is missing)."""
    if not seg_dir.is_dir():
        return {}
    out = {}
    for p in sorted(seg_dir.iterdir()):
        for ext in sorted(SEG_EXTS, key=len, reverse=True):
            if p.name.endswith(ext):
                out[p.name[: -len(ext)]] = p
                break
    return out


def _plain_section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = plain(config[name])
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    return value
