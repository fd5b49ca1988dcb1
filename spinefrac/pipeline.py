"""`spinefrac train` and `spinefrac predict`: every stage in order, into and out of one model folder.

Model folder (see docs/contracts.md "Model folder"):
    model.json        format version, library versions, stages done with their metrics and runtimes
    config.yaml       the resolved pipeline config; detector.yaml, locator.yaml, levels.yaml,
                      aggregation.yaml: the resolved config of each stage (what predict uses)
    splits.json       which labelled studies trained the detector and which the aggregator
    prior.json        the training prior of the eight targets (for failed studies)
    detector/         YOLO run folder: weights/best.pt, results.csv, args.yaml, train.meta.json
    locator/          the same for the vertebra locator (absent when trained without segmentations)
    aggregator/       aggregator.skops + aggregator.json, candidates.csv, operating_point.json
    MODEL_CARD.md     what the folder was trained on, how, how well (out of fold) and what it is for
    work/             intermediate datasets and detections (resumable; not needed to predict)
Copy the folder without work/ to another machine and `spinefrac predict` works there.
model.json lists the SHA-256 of every file (`files`, except work/, model.json and the export caches that
predict writes beside the weights); `open_model` refuses a changed or missing file, or an extra loadable one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from configs.durations import SECONDS_PER_HOUR
from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import (
    read_sidecar,
    write_csv_atomic,
    write_json_atomic,
)
from data_prep.runs.config import Config, dump_config, load_config, with_overrides
from data_prep.runs.locks import clear_folder, locks_output
from data_prep.runs.manifest import build_manifest
from data_prep.runs.resume import (
    SettingsChangedError,
    changed_settings,
    describe_changes,
    plain,
    section,
    settings_key,
    weights_id,
)
from data_prep.runs.tables import read_table
from spinefrac.budget import TrainingBudget
from spinefrac.model_card import MODEL_CARD, write_model_card
from spinefrac.model_folder import (
    MANIFEST_EXCLUDE,
    MANIFEST_KEY,
    STAGE_CONFIGS,
    WEIGHTS,
    open_model,
    read_meta,
    write_meta,
)
from spinefrac.results import aggregate_detections, read_detections

log = logging.getLogger("spinefrac")

CLASSIFIER_DIR = "classifier"
CLASSIFIER_DATASET = "classifier_dataset"
TRAIN_CSV, BOXES_CSV, TRAIN_IMAGES, SEGMENTATIONS = (
    "train.csv", "train_bounding_boxes.csv", "train_images", "segmentations")
MAX_NAMED = 5     # studies named in one log line
TRAIN_RUN_ONLY = ("plots", "workers")
"""train: keys that change how training reports or loads data, not the weights (left out of the stage key)."""




# ---------------------------------------------------------------- configs
def stage_configs(config: Config) -> dict[str, Config]:
    """Resolve each stage's config from the pipeline config (defaults < <stage>.config < <stage>.set)."""
    return {stage: load_config(stage, config[stage]["config"], list(config[stage]["set"]))
            for stage in STAGE_CONFIGS}


# ---------------------------------------------------------------- train
@locks_output("out")
def train_all(data_root: str | os.PathLike, out: str | os.PathLike, *, config: Config, workers: int = 2,
              progress: bool = True, clean: bool = False, follow_symlinks: bool = False) -> Path:
    """Run every training stage into one self-contained model folder; a rerun skips the stages already done.

    Each stage records the settings key of its inputs (its config sections and the keys or weight hashes of
    the upstream stages it consumed). A rerun redoes a stage whose key changed, or whose outputs are
    missing, and so every stage downstream of it; the log says which setting changed. A study folder that is, or
    holds, a symbolic link leaving `data_root` is left out unless `follow_symlinks`.
    """
    from aggregation.splits import (
        aggregator_fold_studies,
        aggregator_train_studies,
        assert_no_leakage,
        classifier_train_studies,
        detector_train_studies,
        load_or_create_splits,
    )
    from aggregation.submission import model_prior

    t0 = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    cfgs = stage_configs(config)      # every stage's config is validated before any work
    labels = read_table(data_root / TRAIN_CSV, "train")
    boxes = read_table(data_root / BOXES_CSV, "boxes")
    out.mkdir(parents=True, exist_ok=True)
    if clean:
        log.info("--clean: removing everything in %s", out)
        clear_folder(out)        # not the lock this run holds
    _save_configs(out, config, cfgs)
    meta = read_meta(out)

    splits = load_or_create_splits(out / "splits.json", labels, set(boxes[registry.STUDY_COL]),
                                   config=cfgs["aggregation"])
    oof = splits["scheme"] == "oof"
    n_folds = int(splits["n_folds"])
    agg_studies = aggregator_train_studies(splits)
    det_studies = _final_detector_studies(splits) if oof else detector_train_studies(splits)
    fold_detector_studies = {k: detector_train_studies(splits, k) for k in range(n_folds)} if oof else None
    assert_no_leakage(splits, detector_train=fold_detector_studies if oof else det_studies,
                      aggregator_train=agg_studies)
    write_json_atomic(out / "prior.json", model_prior(labels))
    segmented = _segmented_studies(data_root)
    use_locator = bool(config.locator.enabled) and bool(segmented)
    use_classifier = bool(config.classifier.enabled) and use_locator
    cls_train = classifier_train_studies(splits) if use_classifier else {}
    reuse = config.locator.get("reuse")
    training = ([("train-locator", "locator")] if use_locator and not reuse else []) + [("train-detector", "detector")] \
        + ([(f"train-detector-fold{k}", "detector") for k in fold_detector_studies] if oof else []) \
        + [(f"train-classifier-fold{k}", "classifier") for k in cls_train]
    clock = _BudgetClock(t0, TrainingBudget.from_config(config.budget, training))

    def stage(name: str, fn: Callable[[bool], dict[str, Any]], outputs: Sequence[Path],
              settings: Mapping[str, Any]) -> None:
        """Run stage `name` unless done with the same settings key; fn(redo) redoes its work folder if asked."""
        key = settings_key(settings)
        done = meta["stages"].get(name)
        missing = [p for p in outputs if not p.exists()]
        if done and not missing and done.get("key") == key:
            log.info("stage %s: done already (%s), skipped", name, ", ".join(str(p) for p in outputs))
            clock.skipped(name, float(done.get("runtime_s") or 0.0))
            return
        changed = bool(done) and done.get("key") != key
        if changed:
            why = "redone: its settings changed (" + describe_changes(changed_settings(done.get("settings"), settings)) + ")"
        else:
            why = f"redone: {missing[0]} is missing" if done else "..."
        log.info("stage %s %s", name, why)
        meta["stages"].pop(name, None)      # not done until it finishes again
        write_meta(out, meta)
        s0 = time.perf_counter()
        try:
            info = fn(changed) or {}
        except SettingsChangedError as exc:   # its work folder holds an interrupted run of other settings
            if changed:
                raise
            log.warning("stage %s: %s; redoing it", name, exc.reason)
            info = fn(True) or {}
        meta["stages"][name] = {"runtime_s": round(time.perf_counter() - s0, 1), **info, "key": key,
                                "settings": plain(settings)}
        clock.ran(name, meta["stages"][name]["runtime_s"])
        write_meta(out, meta)

    def upstream(*names: str) -> dict[str, Any]:
        """The settings keys of the upstream stages a stage consumes."""
        return {n: meta["stages"][n]["key"] for n in names}

    work = out / "work"
    det_ds = work / "detector_dataset" / "data.yaml"
    loc_ds = work / "locator_dataset" / "data.yaml"
    cls_ds = work / CLASSIFIER_DATASET
    agg_detect = work / "aggregator_detect"
    if config.locator.enabled and not segmented:
        log.warning("%s: no segmentations; levels come from relative z position (no locator)",
                    data_root / SEGMENTATIONS)
    if config.classifier.enabled and not use_locator:
        log.warning("the vertebra classifier needs the locator (its crops follow the located vertebrae): "
                    "trained without it")

    from detector.detect import detect_settings
    from detector.yolo_dataset import prepare_settings, train_study_dir

    # the level decode's size prior, from the segmentations: every stage that decodes the locator's levels uses it
    cfgs["levels"] = _level_prior_stage(stage, data_root, out, segmented, cfgs["levels"], progress,
                                        locator=use_locator)
    _save_configs(out, config, cfgs)      # the model folder's levels.yaml is what predict decodes with

    # the locator first: with roi.enabled the detector's training crops come from it, as they will at inference
    data = {"data_root": str(data_root.resolve())}
    if use_locator and reuse:
        stage("copy-locator", lambda redo: _copy_locator(Path(reuse), out / "locator"), [out / "locator" / WEIGHTS],
              {"source": str(Path(reuse).resolve()), "weights_sha256": weights_id(Path(reuse) / WEIGHTS)})
    elif use_locator:
        stage("prepare-locator", lambda redo: _prepare(data_root, loc_ds.parent, cfgs["locator"], None, workers,
                                                       progress, kind="locator", overwrite=redo,
                                                       follow_symlinks=follow_symlinks), [loc_ds],
              {**data, "locator": prepare_settings(cfgs["locator"], kind="locator")})
        stage("train-locator", lambda redo: _train(loc_ds, out / "locator", *clock.timed("train-locator", cfgs, "locator")),
              [out / "locator" / WEIGHTS], _train_settings(cfgs["locator"], upstream("prepare-locator")) | clock.key())
    locator_weights = out / "locator" / WEIGHTS if use_locator else None
    locator_stage = upstream("copy-locator" if reuse else "train-locator") if use_locator else {}
    det_prepare = prepare_settings(cfgs["detector"], kind="detector", locator=locator_weights,
                                   locator_config=cfgs["locator"], levels_config=cfgs["levels"])

    def detector_stages(suffix: str, studies: Sequence[str], dataset: Path, run: Path) -> None:
        """prepare-detector and train-detector (+ suffix) for `studies` (the final detector, or one fold's)."""
        stage(f"prepare-detector{suffix}", lambda redo: _prepare(
            data_root, dataset.parent, cfgs["detector"], studies, workers, progress, kind="detector",
            locator=locator_weights, cfgs=cfgs, overwrite=redo, follow_symlinks=follow_symlinks), [dataset],
            {**data, "studies": sorted(studies), "detector": det_prepare})   # the locator's weights count
        stage(f"train-detector{suffix}", lambda redo: _train(
            dataset, run, *clock.timed(f"train-detector{suffix}", cfgs, "detector")), [run / WEIGHTS],
              _train_settings(cfgs["detector"], upstream(f"prepare-detector{suffix}")) | clock.key())

    detector_stages("", det_studies, det_ds, out / "detector")
    if oof:   # fold detectors only score the aggregator's studies of their fold: work files, not needed to predict
        for k, studies in fold_detector_studies.items():
            detector_stages(f"-fold{k}", studies, work / f"detector_dataset_fold{k}" / "data.yaml",
                            work / "fold_detectors" / f"fold{k}")

    classifier_runs: dict[int, Path] = {}
    if use_classifier:
        stage("prepare-classifier", lambda redo: _prepare_classifier(
            data_root, cls_ds, cfgs, cls_train, locator_weights, workers, progress, overwrite=redo,
            follow_symlinks=follow_symlinks),
              [cls_ds / "index.csv", *(cls_ds / f"fold{k}" / "train" for k in cls_train)],
              {**data, "folds": {str(k): sorted(v) for k, v in cls_train.items()},
               "crops": section(cfgs["classifier"], "crops"), "render": section(cfgs["classifier"], "render"),
               "prepare": section(cfgs["classifier"], "prepare"), "upstream": locator_stage,
               "levels": plain(cfgs["levels"])})
        for k in cls_train:
            run = out / CLASSIFIER_DIR / f"fold{k}"
            classifier_runs[k] = run
            stage(f"train-classifier-fold{k}", lambda redo, k=k, run=run: _train_classifier(
                cls_ds / f"fold{k}", run, *clock.timed(f"train-classifier-fold{k}", cfgs, "classifier")), [run / WEIGHTS],
                  _train_settings(cfgs["classifier"], upstream("prepare-classifier")) | {"fold": k} | clock.key())

    # the aggregator's studies: detected (and scored) by models that never trained on them
    by_fold = use_classifier or oof
    groups = aggregator_fold_studies(splits) if by_fold else {None: agg_studies}
    if use_classifier:       # the classifiers' actual datasets against the studies each one will score
        assert_no_leakage(splits, detector_train=fold_detector_studies if oof else det_studies,
                          aggregator_train=agg_studies,
                          classifier_train=_classifier_fold_studies(cls_ds, classifier_runs),
                          classifier_scored={k: v for k, v in groups.items() if v})
    folders = []
    for k, studies_k in groups.items():
        if not studies_k:
            continue
        suffix = f"-fold{k}" if k is not None else ""
        folder = agg_detect / f"fold{k}" if k is not None else agg_detect
        weights = work / "fold_detectors" / f"fold{k}" / WEIGHTS if oof else out / "detector" / WEIGHTS
        classifier = [classifier_runs[k] / WEIGHTS] if use_classifier else None
        ups = {**upstream(f"train-detector{suffix if oof else ''}"), **locator_stage,
               **(upstream(f"train-classifier-fold{k}") if use_classifier else {})}
        dirs = [train_study_dir(data_root, uid) for uid in studies_k]
        stage(f"detect-aggregator-studies{suffix}",
              lambda redo, dirs=dirs, weights=weights, folder=folder, classifier=classifier: _detect(
                  dirs, weights, locator_weights, folder, cfgs, workers=workers, progress=progress, labels=None,
                  overlays=False, overwrite=redo, classifier=classifier, follow_symlinks=follow_symlinks),
              [folder / "boxes.csv", folder / "slices.csv"],
              {**data, "studies": sorted(studies_k), "upstream": ups,
               "detect": detect_settings(cfgs["detector"], weights=weights, locator=locator_weights,
                                         locator_config=cfgs["locator"], levels_config=cfgs["levels"],
                                         classifier=classifier, classifier_config=cfgs["classifier"])})
        folders.append((suffix, folder))
    stage("train-aggregator", lambda redo: _fit_aggregator([f for _, f in folders], labels, agg_studies,
                                                           out / "aggregator", cfgs["aggregation"],
                                                           features_csv=agg_detect / "features.csv"),
          [out / "aggregator" / "aggregator.json", out / "aggregator" / "operating_point.json"],
          {"studies": sorted(agg_studies), "aggregation": plain(cfgs["aggregation"]),
           "upstream": upstream(*(f"detect-aggregator-studies{s}" for s, _ in folders))})
    meta["locator"] = use_locator
    meta["classifier"] = [str((classifier_runs[k] / WEIGHTS).relative_to(out)) for k in sorted(classifier_runs)]
    meta["runtime_s"] = round(time.perf_counter() - t0, 1)
    if clock.budget is not None:      # how the budget was spent (a run without one keeps no record)
        meta["budget"] = clock.budget.summary(clock.elapsed())
        clock.budget.log_summary(clock.elapsed())
    else:
        meta.pop("budget", None)
    write_meta(out, meta)
    write_model_card(out, data_root=data_root, labels=labels, boxes=boxes, segmented=segmented)
    meta[MANIFEST_KEY] = build_manifest(out, MANIFEST_EXCLUDE)
    write_meta(out, meta)
    log.info("model folder ready: %s (%.0f s)", out, meta["runtime_s"])
    return out


def _level_prior_stage(stage: Callable[..., None], data_root: Path, out: Path, segmented: Sequence[str],
                       levels: Config, progress: bool, *, locator: bool) -> Config:
    """Learn the level decode's size prior from the segmentations (stage learn-level-prior); return the levels
    config with it (the configured one when prior.learn is off, decode.model is not "sizes", there is no locator
    whose detections it would decode, or too few studies)."""
    from detector.level_prior import LEVEL_PRIOR_JSON, prior_overrides, read_level_prior

    path = out / LEVEL_PRIOR_JSON
    learn = bool(levels.prior.learn) and levels.decode.model == "sizes" and locator
    if not learn or len(segmented) < int(levels.prior.min_studies):
        if learn:
            log.warning("level prior: %d segmented studies (< prior.min_studies %d): configs/levels.yaml's prior "
                        "is used", len(segmented), int(levels.prior.min_studies))
        path.unlink(missing_ok=True)
        Path(f"{path}.meta.json").unlink(missing_ok=True)
        return levels
    seg_dir = data_root / SEGMENTATIONS
    files = sorted(p for p in seg_dir.iterdir() if ".nii" in p.name)
    stage("learn-level-prior", lambda redo: _learn_prior(data_root, segmented, out, levels, progress), [path],
          {"data_root": str(data_root.resolve()), "segmentations": {p.name: weights_id(p) for p in files},
           "prior": plain(section(levels, "prior")),
           "max_levels_per_slice": int(levels.decode.max_levels_per_slice)})
    if not path.is_file():       # too few usable segmentations: learn_from_segmentations wrote nothing
        return levels
    return with_overrides("levels", levels, prior_overrides(read_level_prior(path)))


def _learn_prior(data_root: Path, studies: Sequence[str], out: Path, levels: Config, progress: bool
                 ) -> dict[str, Any]:
    from detector.level_prior import learn_from_segmentations

    record = learn_from_segmentations(data_root, studies, out, config=levels, progress=progress)
    return {"studies": len(record["studies"]) if record else 0}

class _BudgetClock:
    """The run's elapsed time as the budget counts it (stages a rerun skips count with their recorded runtime)."""

    def __init__(self, started: float, budget: TrainingBudget | None) -> None:
        self.started = started
        self.budget = budget
        self.carried = 0.0

    def elapsed(self) -> float:
        """Seconds of the budget spent: this run's wall time plus the recorded time of the stages it skipped."""
        return time.perf_counter() - self.started + self.carried

    def skipped(self, name: str, runtime_s: float) -> None:
        """A stage done by an earlier run: its recorded runtime counts as spent."""
        self.carried += runtime_s
        self.ran(name, runtime_s)

    def ran(self, name: str, runtime_s: float) -> None:
        """Record a stage's wall time in the budget."""
        if self.budget is not None:
            self.budget.record(name, runtime_s)

    def key(self) -> dict[str, Any]:
        """A training stage's settings-key entry for the budget (none without one, so old keys stay)."""
        return {"budget": self.budget.settings()} if self.budget is not None else {}

    def timed(self, name: str, cfgs: Mapping[str, Config], stage: str) -> tuple[Config, dict[str, Any]]:
        """Stage `stage`'s config with train.time set to the seconds the budget gives training stage `name` now,
        and the stage record's `budget_s`; the config unchanged without a budget."""
        if self.budget is None:
            return cfgs[stage], {}
        seconds = self.budget.give(name, self.elapsed())
        cfg = with_overrides(stage, cfgs[stage], [f"train.time={seconds / SECONDS_PER_HOUR}"])
        return cfg, {"budget_s": round(seconds, 1)}


def _final_detector_studies(splits: Mapping[str, Any]) -> list[str]:
    """The "oof" scheme's detector for predict: trained on every detector study (the fold detectors score the rest)."""
    from aggregation.splits import DETECTOR

    return [u for u, r in splits["roles"].items() if r == DETECTOR]


def _prepare_classifier(data_root: Path, out: Path, cfgs: Mapping[str, Config], folds: Mapping[int, Sequence[str]],
                        locator: Path | None, workers: int, progress: bool, *, overwrite: bool,
                        follow_symlinks: bool = False) -> dict[str, Any]:
    from detector.classifier_dataset import prepare_classifier_dataset

    studies = sorted({u for v in folds.values() for u in v})
    prepare_classifier_dataset(data_root, out, config=cfgs["classifier"], studies=studies, folds=folds,
                               locator=locator, locator_config=cfgs["locator"], levels_config=cfgs["levels"],
                               workers=workers, progress=progress, overwrite=overwrite,
                               follow_symlinks=follow_symlinks)
    return {"counts": read_sidecar(out / "index.csv").get("counts", {})}


def _train_classifier(fold_dir: Path, run: Path, cfg: Config, extra: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    from detector.classifier import train_classifier

    train_classifier(fold_dir, run, config=cfg)
    meta_path = run / "train.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"epochs": meta.get("counts", {}).get("epochs_run"),
            "metrics": meta.get("extra", {}).get("final_metrics", {}), **(extra or {})}


def _classifier_fold_studies(dataset: Path, runs: Mapping[int, Path]) -> dict[int, set[str]]:
    """Fold k -> the studies whose crops are in classifier k's training and validation folders (what it saw)."""
    from detector.classifier_dataset import fold_studies

    return {k: fold_studies(dataset / f"fold{k}") for k in runs}


def _train_settings(cfg: Config, upstream: Mapping[str, Any]) -> dict[str, Any]:
    """A training stage's key inputs: the image size, the train section (bar TRAIN_RUN_ONLY), its dataset stage."""
    return {"render": section(cfg, "render"), "train": section(cfg, "train", drop=TRAIN_RUN_ONLY),
            "upstream": dict(upstream)}


def _copy_locator(source: Path, target: Path) -> dict[str, Any]:
    """Copy a trained locator run folder (weights/best.pt and its records, not exports) into the model folder."""
    if not (source / WEIGHTS).is_file():
        raise InputError(source, f"locator.reuse: no {WEIGHTS} in this folder (expected a locator run folder)")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*_openvino_model", "*_openvino_model.meta.json", "*.onnx", "*.onnx.meta.json"))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return {"copied_from": str(source.resolve())}


def _prepare(data_root: Path, out: Path, cfg: Config, studies: Sequence[str] | None, workers: int, progress: bool,
             *, kind: str, locator: Path | None = None, cfgs: Mapping[str, Config] | None = None,
             overwrite: bool = False, follow_symlinks: bool = False) -> dict[str, Any]:
    from detector.yolo_dataset import prepare_detector_dataset, prepare_locator_dataset

    if kind == "detector":
        data_yaml = prepare_detector_dataset(data_root, out, config=cfg, studies=studies, workers=workers,
                                             progress=progress, locator=locator,
                                             locator_config=cfgs["locator"] if cfgs else None,
                                             levels_config=cfgs["levels"] if cfgs else None,
                                             overwrite=overwrite, follow_symlinks=follow_symlinks)
    else:
        data_yaml = prepare_locator_dataset(data_root, out, config=cfg, studies=studies, workers=workers,
                                            progress=progress, overwrite=overwrite, follow_symlinks=follow_symlinks)
    counts = read_sidecar(Path(data_yaml).parent / "index.csv")["counts"]
    info = {"images": counts["images"], "studies": counts["studies"]}
    if "boxes_before_roi" in counts:      # the dataset's own sidecar already counts what the ROI crop cut
        info.update(boxes=counts["boxes_before_roi"], boxes_cut_by_roi=counts["boxes_cut_by_roi"],
                    roi_cut_share=counts["roi_cut_share"])
    return info


def _train(data_yaml: Path, out: Path, cfg: Config, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from detector.train import train_yolo

    run = train_yolo(data_yaml, out, config=cfg, overwrite=True)
    meta_path = run / "train.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"epochs": meta.get("counts", {}).get("epochs_run"),
            "metrics": meta.get("extra", {}).get("final_metrics", {}), **(extra or {})}


def _detect(studies: Sequence[Path], weights: Path, locator: Path | None, out: Path, cfgs: Mapping[str, Config], *,
            workers: int, progress: bool, labels: Path | None, overlays: bool, overwrite: bool = False,
            device: str | None = None, classifier: Sequence[Path] | None = None,
            follow_symlinks: bool = False) -> dict[str, Any]:
    from detector.detect import detect_studies

    det_cfg = cfgs["detector"]
    if not overlays:
        det_cfg = with_overrides("detector", det_cfg, ["detect.overlays=false"])
    result = detect_studies(studies, weights=weights, out=out, config=det_cfg, labels=labels, locator=locator,
                            locator_config=cfgs["locator"], levels_config=cfgs["levels"], workers=workers,
                            progress=progress, overwrite=overwrite, device=device, classifier=classifier,
                            classifier_config=cfgs["classifier"], follow_symlinks=follow_symlinks)
    return {"finished": len(result.finished) + len(result.skipped), "failed": len(result.failed),
            "slices": result.n_slices, "backend": _backend_name(out)}


def _fit_aggregator(detect_dirs: Sequence[Path], labels: pd.DataFrame, studies: Sequence[str], out: Path,
                    cfg: Config, *, features_csv: Path) -> dict[str, Any]:
    from aggregation.candidates import format_table
    from aggregation.features import build_features
    from aggregation.metric import competition_loss
    from aggregation.model import StudyAggregator
    from aggregation.operating_point import write_operating_point

    boxes, slices, vertebrae = read_detections(detect_dirs)
    done = set(slices[registry.STUDY_COL].astype(str))
    usable = [u for u in studies if u in done]
    if len(usable) < len(studies):
        log.warning("aggregator: %d of %d studies have no detections (failed, see errors.csv in %s) and are left "
                    "out", len(studies) - len(usable), len(studies), ", ".join(str(d) for d in detect_dirs))
    features = build_features(boxes, slices, config=cfg, studies=usable, vertebrae=vertebrae)
    write_csv_atomic(features_csv, features)
    model = StudyAggregator(cfg).fit(features, labels)
    model.save(out)
    heldout, reason = model.heldout_patient()
    operating = write_operating_point(out, heldout, reason, cfg)   # the worklist's flag threshold (out of fold)
    if model.candidates_ is not None:
        comp = model.comparison_
        log.info("%s", format_table(model.candidates_, n_studies=len(usable), folds=int(comp.folds.max()) + 1,
                                    repeats=int(comp.folds.shape[0])))
    else:
        log.info("aggregator candidates: not compared (%s); predicting with %s",
                 model.comparison_note_ or "candidates.choose names one", model.chosen_)
    fitted = model.predict_proba(features)
    in_sample = competition_loss(labels[labels[registry.STUDY_COL].isin(usable)], fitted)
    table = model.candidates_
    return {"studies": len(usable), "in_sample_loss": round(float(in_sample), 4), "chosen": model.chosen_,
            "oof_loss": None if table is None else
            {r["candidate"]: round(float(r["loss_per_study"]), 4) for r in table.to_dict("records")},
            "operating_threshold": operating["threshold"]}




# ---------------------------------------------------------------- predict




@locks_output("out")
def predict_all(studies: Sequence[str | os.PathLike], *, model_dir: str | os.PathLike, out: str | os.PathLike,
                test_csv: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
                workers: int = 2, progress: bool = True, overwrite: bool = False,
                device: str | None = None, shard: tuple[int, int] | None = None, ray: str | None = None,
                ray_actors: int | None = None, follow_symlinks: bool = False) -> Path:
    """Detect, locate and aggregate over study folders: boxes, slices, predictions, submission, evidence, overlays.

    The model folder (manifest, safe weights, prior, aggregator) and `test_csv` are checked before any
    detection. A failed study, or a test.csv study without a folder, gets the training prior. When every
    study fails, predictions.csv and submission.csv are still written (all prior) and AllStudiesFailedError
    is raised afterwards. device: "cpu", "0", ... (None: the first GPU if there is one, else the CPU; never
    the training config's). shard (i, n): only the studies of shard i of n (spinefrac/shards.py), with the
    test.csv rows of those studies; `spinefrac merge` combines the shards' folders. ray: detect on the
    actors of a Ray cluster at this address ("local": a private instance; spinefrac/ray_runner.py), with
    `ray_actors` actors (None: by the cluster's CPUs); the outputs are the same files. Symbolic links leading
    outside an input are not followed (the study fails naming the link) unless `follow_symlinks`.
    """
    from aggregation.model import StudyAggregator
    from aggregation.submission import read_test_csv
    from detector.detect import find_studies

    t0 = time.perf_counter()
    out = Path(out)
    if ray is not None:
        from spinefrac.ray_runner import require_ray

        require_ray()         # a missing extra is named before any work
    model = open_model(model_dir)
    if (model.root / MODEL_CARD).is_file():
        log.info("model: %s (what it was trained on and its limits: %s)", model.root, model.root / MODEL_CARD)
    test = read_test_csv(test_csv) if test_csv is not None else None     # checked before any detection
    aggregator = StudyAggregator.load(model.root / "aggregator")  # refuse a bad aggregator before any detection
    study_dirs = find_studies(studies, follow_symlinks=follow_symlinks)
    if shard is not None:
        from spinefrac.shards import select_shard

        study_dirs = select_shard(study_dirs, *shard)
        if test is not None:
            test = test[test["_uid"].isin({s.name for s in study_dirs})].reset_index(drop=True)
    uids = [s.name for s in study_dirs]
    if test is not None:
        absent = [u for u in dict.fromkeys(test["_uid"]) if u not in set(uids)]
        if absent:
            log.warning("%s: %d studies have no folder among the inputs and get the training prior: %s%s",
                        test_csv, len(absent), ", ".join(absent[:MAX_NAMED]), " ..." if len(absent) > MAX_NAMED else "")
    if ray is not None:
        from spinefrac.ray_runner import detect_on_ray

        info = detect_on_ray(study_dirs, model=model, out=out, address=ray, actors=ray_actors, workers=workers,
                             labels=Path(labels) if labels else None, progress=progress, overwrite=overwrite,
                             device=device)
    else:
        info = _detect(study_dirs, model.detector_weights, model.locator_weights, out, model.configs,
                       workers=workers, progress=progress, labels=Path(labels) if labels else None, overlays=True,
                       overwrite=overwrite, device=device, classifier=model.classifier_weights or None,
                       follow_symlinks=True)     # found above, their links checked against the inputs given
    return aggregate_detections(out, model=model, aggregator=aggregator, uids=uids, test=test, started=t0,
                                extra={"detect": info})










# ---------------------------------------------------------------- helpers
def _segmented_studies(data_root: Path) -> list[str]:
    seg = data_root / SEGMENTATIONS
    if not seg.is_dir():
        return []
    return sorted(p.name.split(".nii")[0] for p in seg.iterdir() if ".nii" in p.name)


def _save_configs(out: Path, config: Config, cfgs: Mapping[str, Config]) -> None:
    dump_config(config, out / "config.yaml")
    for stage, cfg in cfgs.items():
        dump_config(cfg, out / f"{stage}.yaml")






def _backend_name(detect_dir: Path) -> str | None:
    meta = detect_dir / "boxes.csv.meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("extra", {}).get("backend")
    return None
