"""`spinefrac train` and `spinefrac predict`: every stage in order, into and out of one model folder.

Model folder (see docs/contracts.md "Model folder"):
    model.json        format version, library versions, stages done with their metrics and runtimes
    config.yaml       the resolved pipeline config; detector.yaml, locator.yaml, levels.yaml,
                      aggregation.yaml: the resolved config of each stage (what predict uses)
    splits.json       which labelled studies trained the detector and which the aggregator
    prior.json        the training prior of the eight targets (for failed studies)
    detector/         YOLO run folder: weights/best.pt, results.csv, args.yaml, train.meta.json
    locator/          the same for the vertebra locator (absent when trained without segmentations)
    aggregator/       aggregator.skops + aggregator.json
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep import registry
from data_prep.artifacts import (
    library_versions,
    read_sidecar,
    write_csv_atomic,
    write_json_atomic,
    write_sidecar,
)
from data_prep.config import Config, dump_config, load_config
from data_prep.errors import AllStudiesFailedError, InputError
from data_prep.locks import LOCK_FILES, clear_folder, locks_output
from data_prep.manifest import build_manifest, verify_manifest
from data_prep.resume import (
    SettingsChangedError,
    changed_settings,
    describe_changes,
    plain,
    section,
    settings_key,
    weights_id,
)
from data_prep.tables import read_table

log = logging.getLogger("spinefrac")

FORMAT_VERSION = 2
"""2: weights-only YOLO weights, a skops aggregator and a file manifest (1 held pickles: refused)."""
MODEL_JSON = "model.json"
MANIFEST_KEY = "files"
MANIFEST_EXCLUDE = (MODEL_JSON, "work/*", "*_openvino_model/*", "*_openvino_model.meta.json", "*.onnx",
                    "*.onnx.meta.json", "*/.*.export.*", *LOCK_FILES)
"""Never in the manifest: model.json itself, work files, and the export caches predict writes beside the weights
(detector/export.py checks those against the weights' and their own SHA-256), and the folder's lock files."""
STAGE_CONFIGS = ("detector", "locator", "levels", "aggregation")
TRAIN_CSV, BOXES_CSV, TRAIN_IMAGES, SEGMENTATIONS = (
    "train.csv", "train_bounding_boxes.csv", "train_images", "segmentations")
WEIGHTS = Path("weights") / "best.pt"
EVIDENCE_TOP = 3  # boxes listed per level in evidence.csv
MAX_NAMED = 5     # studies named in one log line
TRAIN_RUN_ONLY = ("plots", "workers")
"""train: keys that change how training reports or loads data, not the weights (left out of the stage key)."""


@dataclass(frozen=True)
class ModelFolder:
    """A trained model folder opened for prediction."""

    root: Path
    configs: dict[str, Config]
    detector_weights: Path
    locator_weights: Path | None
    prior: dict[str, float]
    meta: dict[str, Any]


# ---------------------------------------------------------------- configs
def stage_configs(config: Config) -> dict[str, Config]:
    """Resolve each stage's config from the pipeline config (defaults < <stage>.config < <stage>.set)."""
    return {stage: load_config(stage, config[stage]["config"], list(config[stage]["set"]))
            for stage in STAGE_CONFIGS}


# ---------------------------------------------------------------- train
@locks_output("out")
def train_all(data_root: str | os.PathLike, out: str | os.PathLike, *, config: Config, workers: int = 2,
              progress: bool = True, clean: bool = False) -> Path:
    """Run every training stage into one self-contained model folder; a rerun skips the stages already done.

    Each stage records the settings key of its inputs (its config sections and the keys or weight hashes of
    the upstream stages it consumed). A rerun redoes a stage whose key changed, or whose outputs are
    missing, and so every stage downstream of it; the log says which setting changed.
    """
    from aggregation.splits import (
        aggregator_train_studies,
        assert_no_leakage,
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
    meta = _read_meta(out)

    splits = load_or_create_splits(out / "splits.json", labels, set(boxes[registry.STUDY_COL]),
                                   config=cfgs["aggregation"])
    det_studies = detector_train_studies(splits)
    agg_studies = aggregator_train_studies(splits)
    assert_no_leakage(splits, detector_train=det_studies, aggregator_train=agg_studies)
    write_json_atomic(out / "prior.json", model_prior(labels))

    def stage(name: str, fn: Callable[[bool], dict[str, Any]], outputs: Sequence[Path],
              settings: Mapping[str, Any]) -> None:
        """Run stage `name` unless done with the same settings key; fn(redo) redoes its work folder if asked."""
        key = settings_key(settings)
        done = meta["stages"].get(name)
        missing = [p for p in outputs if not p.exists()]
        if done and not missing and done.get("key") == key:
            log.info("stage %s: done already (%s), skipped", name, ", ".join(str(p) for p in outputs))
            return
        changed = bool(done) and done.get("key") != key
        if changed:
            why = "redone: its settings changed (" + describe_changes(changed_settings(done.get("settings"), settings)) + ")"
        else:
            why = f"redone: {missing[0]} is missing" if done else "..."
        log.info("stage %s %s", name, why)
        meta["stages"].pop(name, None)      # not done until it finishes again
        _write_meta(out, meta)
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
        _write_meta(out, meta)

    def upstream(*names: str) -> dict[str, Any]:
        """The settings keys of the upstream stages a stage consumes."""
        return {n: meta["stages"][n]["key"] for n in names}

    work = out / "work"
    det_ds = work / "detector_dataset" / "data.yaml"
    loc_ds = work / "locator_dataset" / "data.yaml"
    agg_detect = work / "aggregator_detect"
    segmented = _segmented_studies(data_root)
    use_locator = bool(config.locator.enabled) and bool(segmented)
    if config.locator.enabled and not segmented:
        log.warning("%s: no segmentations; levels come from relative z position (no locator)",
                    data_root / SEGMENTATIONS)

    from detector.detect import detect_settings
    from detector.yolo_dataset import prepare_settings

    # the locator first: with roi.enabled the detector's training crops come from it, as they will at inference
    reuse = config.locator.get("reuse")
    data = {"data_root": str(data_root.resolve())}
    if use_locator and reuse:
        stage("copy-locator", lambda redo: _copy_locator(Path(reuse), out / "locator"), [out / "locator" / WEIGHTS],
              {"source": str(Path(reuse).resolve()), "weights_sha256": weights_id(Path(reuse) / WEIGHTS)})
    elif use_locator:
        stage("prepare-locator", lambda redo: _prepare(data_root, loc_ds.parent, cfgs["locator"], None, workers,
                                                       progress, kind="locator", overwrite=redo), [loc_ds],
              {**data, "locator": prepare_settings(cfgs["locator"], kind="locator")})
        stage("train-locator", lambda redo: _train(loc_ds, out / "locator", cfgs["locator"]),
              [out / "locator" / WEIGHTS], _train_settings(cfgs["locator"], upstream("prepare-locator")))
    locator_weights = out / "locator" / WEIGHTS if use_locator else None
    locator_stage = upstream("copy-locator" if reuse else "train-locator") if use_locator else {}
    stage("prepare-detector", lambda redo: _prepare(data_root, det_ds.parent, cfgs["detector"], det_studies, workers,
                                                    progress, kind="detector", locator=locator_weights, cfgs=cfgs,
                                                    overwrite=redo), [det_ds],
          {**data, "studies": sorted(det_studies),     # the locator's weights count when it centres the ROI
           "detector": prepare_settings(cfgs["detector"], kind="detector", locator=locator_weights,
                                        locator_config=cfgs["locator"], levels_config=cfgs["levels"])})
    stage("train-detector", lambda redo: _train(det_ds, out / "detector", cfgs["detector"]),
          [out / "detector" / WEIGHTS], _train_settings(cfgs["detector"], upstream("prepare-detector")))
    studies = [data_root / TRAIN_IMAGES / uid for uid in agg_studies]
    stage("detect-aggregator-studies",
          lambda redo: _detect(studies, out / "detector" / WEIGHTS, locator_weights, agg_detect, cfgs,
                               workers=workers, progress=progress, labels=None, overlays=False, overwrite=redo),
          [agg_detect / "boxes.csv", agg_detect / "slices.csv"],
          {**data, "studies": sorted(agg_studies), "upstream": {**upstream("train-detector"), **locator_stage},
           "detect": detect_settings(cfgs["detector"], weights=out / "detector" / WEIGHTS, locator=locator_weights,
                                     locator_config=cfgs["locator"], levels_config=cfgs["levels"])})
    stage("train-aggregator", lambda redo: _fit_aggregator(agg_detect, labels, agg_studies, out / "aggregator",
                                                           cfgs["aggregation"]),
          [out / "aggregator" / "aggregator.json"],
          {"studies": sorted(agg_studies), "aggregation": plain(cfgs["aggregation"]),
           "upstream": upstream("detect-aggregator-studies")})
    meta["locator"] = use_locator
    meta["runtime_s"] = round(time.perf_counter() - t0, 1)
    meta[MANIFEST_KEY] = build_manifest(out, MANIFEST_EXCLUDE)
    _write_meta(out, meta)
    log.info("model folder ready: %s (%.0f s)", out, meta["runtime_s"])
    return out


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
             overwrite: bool = False) -> dict[str, Any]:
    from detector.yolo_dataset import prepare_detector_dataset, prepare_locator_dataset

    if kind == "detector":
        data_yaml = prepare_detector_dataset(data_root, out, config=cfg, studies=studies, workers=workers,
                                             progress=progress, locator=locator,
                                             locator_config=cfgs["locator"] if cfgs else None,
                                             levels_config=cfgs["levels"] if cfgs else None,
                                             overwrite=overwrite)
    else:
        data_yaml = prepare_locator_dataset(data_root, out, config=cfg, studies=studies, workers=workers,
                                            progress=progress, overwrite=overwrite)
    counts = read_sidecar(Path(data_yaml).parent / "index.csv")["counts"]
    info = {"images": counts["images"], "studies": counts["studies"]}
    if "boxes_before_roi" in counts:      # the dataset's own sidecar already counts what the ROI crop cut
        info.update(boxes=counts["boxes_before_roi"], boxes_cut_by_roi=counts["boxes_cut_by_roi"],
                    roi_cut_share=counts["roi_cut_share"])
    return info


def _train(data_yaml: Path, out: Path, cfg: Config) -> dict[str, Any]:
    from detector.train import train_yolo

    run = train_yolo(data_yaml, out, config=cfg, overwrite=True)
    meta_path = run / "train.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"epochs": meta.get("counts", {}).get("epochs_run"),
            "metrics": meta.get("extra", {}).get("final_metrics", {})}


def _detect(studies: Sequence[Path], weights: Path, locator: Path | None, out: Path, cfgs: Mapping[str, Config], *,
            workers: int, progress: bool, labels: Path | None, overlays: bool, overwrite: bool = False,
            device: str | None = None) -> dict[str, Any]:
    from detector.detect import detect_studies

    det_cfg = cfgs["detector"]
    if not overlays:
        det_cfg = load_config("detector", None, [*_flatten(det_cfg), "detect.overlays=false"])
    result = detect_studies(studies, weights=weights, out=out, config=det_cfg, labels=labels, locator=locator,
                            locator_config=cfgs["locator"], levels_config=cfgs["levels"], workers=workers,
                            progress=progress, overwrite=overwrite, device=device)
    return {"finished": len(result.finished) + len(result.skipped), "failed": len(result.failed),
            "slices": result.n_slices, "backend": _backend_name(out)}


def _fit_aggregator(detect_dir: Path, labels: pd.DataFrame, studies: Sequence[str], out: Path, cfg: Config
                    ) -> dict[str, Any]:
    from aggregation.features import build_features, load_detection_tables
    from aggregation.metric import competition_loss
    from aggregation.model import StudyAggregator

    boxes, slices = load_detection_tables(detect_dir / "boxes.csv", detect_dir / "slices.csv")
    done = set(slices[registry.STUDY_COL].astype(str))
    usable = [u for u in studies if u in done]
    if len(usable) < len(studies):
        log.warning("aggregator: %d of %d studies have no detections (failed, see %s) and are left out",
                    len(studies) - len(usable), len(studies), detect_dir / "errors.csv")
    features = build_features(boxes, slices, config=cfg, studies=usable)
    write_csv_atomic(detect_dir / "features.csv", features)
    model = StudyAggregator(cfg).fit(features, labels)
    model.save(out)
    fitted = model.predict_proba(features)
    in_sample = competition_loss(labels[labels[registry.STUDY_COL].isin(usable)], fitted)
    return {"studies": len(usable), "in_sample_loss": round(float(in_sample), 4)}


# ---------------------------------------------------------------- predict
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
    configs = {stage: load_config(stage, root / f"{stage}.yaml") for stage in STAGE_CONFIGS}
    detector = root / "detector" / WEIGHTS
    locator = root / "locator" / WEIGHTS if meta.get("locator") else None
    for needed in (detector, locator, root / "aggregator" / "aggregator.json", root / "prior.json"):
        if needed is not None and not needed.exists():
            raise InputError(needed, "missing from the model folder: training did not finish (rerun spinefrac train)")
    for weights in (detector, locator):
        if weights is not None:
            read_weights(weights)  # refuse pickled weights before any study is read
    prior = load_prior(root / "prior.json")
    return ModelFolder(root, configs, detector, locator, prior, meta)


@locks_output("out")
def predict_all(studies: Sequence[str | os.PathLike], *, model_dir: str | os.PathLike, out: str | os.PathLike,
                test_csv: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
                workers: int = 2, progress: bool = True, overwrite: bool = False,
                device: str | None = None) -> Path:
    """Detect, locate and aggregate over study folders: boxes, slices, predictions, submission, evidence, overlays.

    The model folder (manifest, safe weights, prior, aggregator) and `test_csv` are checked before any
    detection. A failed study, or a test.csv study without a folder, gets the training prior. When every
    study fails, predictions.csv and submission.csv are still written (all prior) and AllStudiesFailedError
    is raised afterwards. device: "cpu", "0", ... (None: the first GPU if there is one, else the CPU; never
    the training config's).
    """
    from aggregation.features import build_features
    from aggregation.model import StudyAggregator
    from aggregation.submission import (
        complete_predictions,
        make_submission,
        read_test_csv,
        write_predictions,
        write_submission,
    )
    from detector.detect import find_studies

    t0 = time.perf_counter()
    out = Path(out)
    model = open_model(model_dir)
    test = read_test_csv(test_csv) if test_csv is not None else None     # checked before any detection
    aggregator = StudyAggregator.load(model.root / "aggregator")  # refuse a bad aggregator before any detection
    study_dirs = find_studies(studies)
    uids = [s.name for s in study_dirs]
    if test is not None:
        absent = [u for u in dict.fromkeys(test["_uid"]) if u not in set(uids)]
        if absent:
            log.warning("%s: %d studies have no folder among the inputs and get the training prior: %s%s",
                        test_csv, len(absent), ", ".join(absent[:MAX_NAMED]), " ..." if len(absent) > MAX_NAMED else "")
    info = _detect(study_dirs, model.detector_weights, model.locator_weights, out, model.configs, workers=workers,
                   progress=progress, labels=Path(labels) if labels else None, overlays=True, overwrite=overwrite,
                   device=device)
    errors = pd.read_csv(out / "errors.csv", dtype={registry.STUDY_COL: str})
    failed = set(errors[registry.STUDY_COL]) & set(uids)
    boxes, slices = _detections(out, failed=failed, uids=uids)
    finished = [u for u in uids if u not in failed and u in set(slices[registry.STUDY_COL].astype(str))]
    if finished:
        features = build_features(boxes, slices, config=model.configs["aggregation"], studies=finished)
        write_csv_atomic(out / "features.csv", features)
        probs = aggregator.predict_proba(features)
    else:
        probs = pd.DataFrame(columns=[registry.STUDY_COL, *registry.TARGETS])
    predictions = complete_predictions(probs, studies=uids, prior=model.prior, failed=failed)
    write_predictions(predictions, out / "predictions.csv")
    submission = make_submission(predictions, test_csv=test, prior=model.prior, failed=failed)
    write_submission(submission, out / "submission.csv")
    write_csv_atomic(out / "evidence.csv", evidence_table(boxes, predictions))
    runtime = time.perf_counter() - t0
    write_sidecar(out / "predictions.csv", kind="predictions", inputs={"model": str(model.root),
                                                                      "studies": len(uids)},
                  counts={"studies": len(uids), "failed": len(failed), "boxes": len(boxes)}, runtime_s=runtime,
                  extra={"detect": info})
    log.info("predicted %d studies (%d failed, given the prior) in %.0f s -> %s", len(uids), len(failed), runtime,
             out / "predictions.csv")
    if uids and not finished:
        first = errors[errors[registry.STUDY_COL].isin(failed)].head(1)
        example = f" (first: {first[registry.STUDY_COL].iloc[0]}: {first['error'].iloc[0]})" if len(first) else ""
        raise AllStudiesFailedError(
            f"every one of the {len(uids)} studies failed{example}; see {out / 'errors.csv'}. "
            f"{out / 'predictions.csv'} and {out / 'submission.csv'} hold the training prior for every row")
    return out


def _detections(out: Path, *, failed: set[str], uids: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read boxes.csv and slices.csv; empty tables when no study finished (their files then lack level columns)."""
    from aggregation.features import BOX_REQUIRED, SLICE_REQUIRED, load_detection_tables

    if set(uids) <= failed:
        return pd.DataFrame(columns=list(BOX_REQUIRED)), pd.DataFrame(columns=list(SLICE_REQUIRED))
    return load_detection_tables(out / "boxes.csv", out / "slices.csv")


def evidence_table(boxes: pd.DataFrame, predictions: pd.DataFrame, top: int = EVIDENCE_TOP) -> pd.DataFrame:
    """Per study and level: the probability and the top boxes (slice_number:score) assigned to that level."""
    rows = []
    by_uid = {str(u): g for u, g in boxes.groupby(registry.STUDY_COL)} if len(boxes) else {}
    for rec in predictions.itertuples(index=False):
        uid = str(getattr(rec, registry.STUDY_COL))
        g = by_uid.get(uid)
        for level in registry.LEVELS:
            entry = {registry.STUDY_COL: uid, "level": level, "probability": float(getattr(rec, level)),
                     "n_boxes": 0, "max_score": 0.0, "top_boxes": ""}
            if g is not None and f"w_{level}" in g.columns:
                on = g[g[f"w_{level}"] > 0].assign(weighted=lambda d, lv=level: d["score"] * d[f"w_{lv}"])
                on = on.sort_values("weighted", ascending=False)
                if len(on):
                    entry.update(n_boxes=int(len(on)), max_score=float(on["score"].max()),
                                 top_boxes=";".join(f"slice {int(r.slice_number)}: {r.score:.2f} x w {r.weighted / max(r.score, 1e-9):.2f}"
                                                    for r in on.head(top).itertuples(index=False)))
            rows.append(entry)
    return pd.DataFrame(rows, columns=[registry.STUDY_COL, "level", "probability", "n_boxes", "max_score",
                                       "top_boxes"])


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


def _read_meta(out: Path) -> dict[str, Any]:
    path = out / MODEL_JSON
    if path.is_file():
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format_version") == FORMAT_VERSION:
            meta["versions"] = library_versions()
            return meta
    return {"format_version": FORMAT_VERSION, "versions": library_versions(), "stages": {}}


def _write_meta(out: Path, meta: Mapping[str, Any]) -> None:
    write_json_atomic(out / MODEL_JSON, meta)


def _flatten(cfg: Config, prefix: str = "") -> list[str]:
    """Return key=value overrides that reproduce a resolved config (to derive a variant of it)."""
    items = []
    for key, value in cfg.items():
        if isinstance(value, Config):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def _backend_name(detect_dir: Path) -> str | None:
    meta = detect_dir / "boxes.csv.meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("extra", {}).get("backend")
    return None
