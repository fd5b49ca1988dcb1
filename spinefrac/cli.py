"""The `spinefrac` command: one subcommand per stage, each a thin shell over one library function.

Heavy libraries (torch, ultralytics) are imported inside the handlers, so `spinefrac -h` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from spinefrac import __version__

log = logging.getLogger("spinefrac")
NOISY_LOGGERS = ("matplotlib", "PIL")
CHATTY_LOGGERS = ("highdicom", "pynetdicom")
"""Libraries that log every step at INFO (highdicom: each copied module; pynetdicom: each association and C-STORE):
WARNING unless -v."""

EXAMPLES = """\
stages, in order:
  spinefrac synth data/synth --studies 40 --seed 0            # synthetic studies in the Kaggle layout
  spinefrac inspect data/synth/train_images/<uid>             # check a study before long work
  spinefrac prepare-detector data/rsna --out work/det_ds      # YOLO dataset from train_bounding_boxes.csv
  spinefrac train-detector work/det_ds/data.yaml --out runs/det
  spinefrac prepare-classifier data/rsna --out work/cls_ds    # per-vertebra crops labelled C1-C7 (classifier)
  spinefrac detect data/rsna/test_images --weights runs/det/weights/best.pt --out work/detect
  spinefrac train data/rsna --out models/m1                   # every stage, one model folder
  spinefrac predict data/rsna/test_images --model models/m1 --out work/pred
  spinefrac report work/pred                                  # worklist.csv + report/index.html (predict writes them too)
  spinefrac dicom-out work/pred --out work/dicom              # per study an SR (TID 1500) + SC overlays (spinefrac[dicom])
  spinefrac evaluate work/pred/predictions.csv --labels data/rsna/train.csv
  spinefrac demo                                              # all of it on synthetic studies, CPU
  spinefrac serve --config serve.yaml                         # a DICOM node: receive, predict, send SR/SC

exit status: 0 done; 2 bad input, config or model folder, or an OS error (one line naming the file);
3 predict: every study failed (predictions.csv and submission.csv hold the training prior); 130 interrupted
"""


STUDIES_HELP = ("study folders of .dcm files, folders of them (the Kaggle layout), or PACS exports: a folder tree of any "
                "depth and file names, a DICOMDIR or a .zip (one series per study is chosen by documented rules; "
                "series.csv records the series read and those left out)")
DEVICE_HELP = "cpu, 0 (first GPU), 0,1; default: the first GPU if there is one, else cpu (never train.device)"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_config_args(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"YAML merged over the defaults in configs/{stage}.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.epochs=5 (repeatable)")


def _overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn explicit convenience flags into config overrides (flags win over --set)."""
    out = list(args.overrides)
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


FOLLOW_SYMLINKS_HELP = ("read through symbolic links that lead outside the input folder (by default such a link is "
                        "not followed: its study fails, or is left out, with a message naming the link)")


def _add_follow_symlinks(p: argparse.ArgumentParser) -> None:
    """--follow-symlinks: the one switch that lets a link leave an input folder (data_prep.safe_paths)."""
    p.add_argument("--follow-symlinks", action="store_true", help=FOLLOW_SYMLINKS_HELP)


def _sub(subparsers: argparse._SubParsersAction, name: str, help_: str, example: str,
         handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                              formatter_class=_Formatter)
    p.set_defaults(handler=handler)
    return p


# ---------------------------------------------------------------- handlers
def _cmd_synth(args: argparse.Namespace) -> int:
    from data_prep.synthetic.synth import synth_config, synthesize

    if args.export:
        return _synth_export(args)
    cfg = synth_config(args.world, args.config, _overrides(args, {"size": "image.size", "slices": "volume.slices"}))
    synthesize(args.out, n_studies=args.studies, seed=args.seed, split=args.split, config=cfg,
               progress=not args.no_progress, overwrite=args.overwrite, workers=args.workers, world=args.world)
    return 0


def _synth_export(args: argparse.Namespace) -> int:
    """`synth --export VARIANT`: studies as a PACS exports them (data_prep/synthetic/export.py), for issue 16's reader."""
    from data_prep.errors import InputError
    from data_prep.synthetic.export import DEFAULT_SIZE, DEFAULT_SLICES, write_export

    try:
        write_export(args.out, n_studies=args.studies, seed=args.seed, variant=args.export,
                     size=args.size or DEFAULT_SIZE, slices=args.slices or DEFAULT_SLICES)
    except FileExistsError as exc:
        raise InputError(args.out, "exists and is not empty; choose a new path") from exc
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from data_prep.dicom.inspect import inspect_path

    report = inspect_path(args.path, workers=args.workers, progress=not args.no_progress,
                          follow_symlinks=args.follow_symlinks)
    print(report.format())
    return 1 if report.has_errors and args.strict else 0


def _cmd_prepare_detector(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from detector.yolo_dataset import prepare_detector_dataset

    cfg = load_config("detector", args.config, _overrides(args, {"imgsz": "render.imgsz"}))
    prepare_detector_dataset(args.data_root, args.out, config=cfg, workers=args.workers,
                             progress=not args.no_progress, overwrite=args.overwrite, locator=args.locator,
                             follow_symlinks=args.follow_symlinks)
    return 0


def _cmd_prepare_classifier(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from detector.classifier_dataset import prepare_classifier_dataset

    cfg = load_config("classifier", args.config, args.overrides)
    prepare_classifier_dataset(args.data_root, args.out, config=cfg, workers=args.workers,
                               progress=not args.no_progress, overwrite=args.overwrite, locator=args.locator,
                               follow_symlinks=args.follow_symlinks)
    return 0


def _cmd_train_detector(args: argparse.Namespace, stage: str = "detector") -> int:
    from data_prep.runs.config import load_config
    from detector.train import train_yolo

    cfg = load_config(stage, args.config, _overrides(args, {
        "epochs": "train.epochs", "imgsz": "render.imgsz", "batch": "train.batch", "device": "train.device",
        "fold": "train.fold"}))
    train_yolo(args.data_yaml, args.out, config=cfg, model=args.model, overwrite=args.overwrite)
    return 0


def _cmd_train_locator(args: argparse.Namespace) -> int:
    return _cmd_train_detector(args, stage="locator")


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    return _cmd_train_detector(args, stage="classifier")


def _cmd_detect(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from detector.detect import detect_studies

    cfg = load_config("detector", args.config, _overrides(args, {"conf": "detect.conf"}))
    classifier_cfg = load_config("classifier", args.classifier_config) if args.classifier else None
    detect_studies(args.studies, weights=args.weights, out=args.out, config=cfg, labels=args.labels,
                   locator=args.locator, workers=args.workers, progress=not args.no_progress,
                   overwrite=args.overwrite, device=args.device, classifier=args.classifier,
                   classifier_config=classifier_cfg, follow_symlinks=args.follow_symlinks)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from detector.export import export_model

    cfg = load_config("detector", args.config, _overrides(args, {"imgsz": "render.imgsz"}))
    path = export_model(args.weights, fmt=args.format, config=cfg)
    print(path)
    return 0


def _cmd_prepare_locator(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from detector.yolo_dataset import prepare_locator_dataset

    cfg = load_config("locator", args.config, _overrides(args, {"imgsz": "render.imgsz"}))
    prepare_locator_dataset(args.data_root, args.out, config=cfg, workers=args.workers,
                            progress=not args.no_progress, overwrite=args.overwrite,
                            follow_symlinks=args.follow_symlinks)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from spinefrac.pipeline import train_all

    budget = [f"budget.total={json.dumps(args.budget)}"] if args.budget is not None else []
    cfg = load_config("pipeline", args.config, [*args.overrides, *budget])
    train_all(args.data_root, args.out, config=cfg, workers=args.workers, progress=not args.no_progress,
              clean=args.clean, follow_symlinks=args.follow_symlinks)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from spinefrac.pipeline import predict_all

    if args.dicom_out is not None:
        from spinefrac.dicom_out.writer import require_dicom_extra

        require_dicom_extra()      # a missing extra is named before any study is read
    predict_all(args.studies, model_dir=args.model, out=args.out, test_csv=args.test_csv, labels=args.labels,
                workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite, device=args.device,
                shard=args.shard, ray=args.ray, ray_actors=args.ray_actors, follow_symlinks=args.follow_symlinks)
    if args.dicom_out is not None:
        _write_dicom(args.out, args.dicom_out, studies=None, model=args.model, progress=not args.no_progress)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from spinefrac.shards import merge_predictions

    merge_predictions(args.shards, model_dir=args.model, out=args.out, test_csv=args.test_csv,
                      overwrite=args.overwrite)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from spinefrac.report import write_report

    print(write_report(args.pred_dir, model_dir=args.model))
    return 0


def _cmd_dicom_out(args: argparse.Namespace) -> int:
    _write_dicom(args.pred_dir, args.out, studies=args.study, model=args.model, progress=not args.no_progress)
    return 0


def _write_dicom(pred_dir: Path, out: Path, *, studies: list[str] | None, model: Path | None, progress: bool) -> None:
    """Write a prediction folder's results as DICOM (spinefrac/dicom_out) and print what was written."""
    from spinefrac.dicom_out import write_dicom_results

    results = write_dicom_results(pred_dir, out, studies=studies, model_dir=model, progress=progress)
    written = {key: files for key, files in results.items() if files}
    print(f"{sum(map(len, written.values()))} DICOM files for {len(written)} studies in {out} "
          f"({len(results) - len(written)} failed, without files)")


def _shard_arg(text: str) -> tuple[int, int]:
    from spinefrac.shards import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ray_arg(text: str) -> str:
    from spinefrac.ray_runner import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_arg(text: str) -> str:
    from configs.durations import parse_duration

    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1; found {text!r}")
    return value


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from detector.weights import convert_checkpoint

    print(convert_checkpoint(args.weights, args.out, trust=args.trust))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from aggregation.evaluate import evaluate_predictions

    report = evaluate_predictions(args.predictions, labels=args.labels, out=args.out, boxes=args.boxes,
                                  threshold=args.threshold, prior=args.prior)
    print(report.format())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from data_prep.runs.config import load_config
    from spinefrac.serve import serve

    serve(load_config("serve", args.config, args.overrides))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spinefrac.demo import run_demo

    run_demo(args.out, config_path=args.config, overrides=args.overrides, progress=not args.no_progress,
             clean=args.clean)
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """Build the `spinefrac` argument parser with one subcommand per stage."""
    parser = argparse.ArgumentParser(
        prog="spinefrac", description="Cervical-spine fracture detection on CT (RSNA 2022 Kaggle layout).",
        epilog=EXAMPLES, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"spinefrac {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    common.add_argument("--no-progress", action="store_true", help="no progress bars (for cluster logs)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=lambda **kw: argparse.ArgumentParser(parents=[common], **kw))

    p = _sub(sub, "synth", "write synthetic CT studies in the RSNA Kaggle layout",
             "spinefrac synth data/synth --studies 40 --seed 0 --size 256 --world subtle", _cmd_synth)
    p.add_argument("out", type=Path, help="dataset root to create")
    p.add_argument("--studies", type=int, default=20, help="number of studies")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="train: train_images/ + labels; test: test_images/ + test.csv + truth/")
    p.add_argument("--export", choices=("tree", "dicomdir", "zip"), default=None,
                   help="write the studies as a PACS exports them instead (nested PATIENT/STUDY/SERIES tree without "
                        "extensions, with a scout, a soft-tissue kernel, derived reformats and an SR; as a tree, a "
                        "DICOMDIR set or a .zip at OUT): input for `data_prep.dicom.study_finder`")
    p.add_argument("--size", type=int, default=None, help="image rows=cols (config image.size)")
    p.add_argument("--slices", type=int, default=None, help="approximate slices per study (config volume.slices)")
    p.add_argument("--world", default=None, metavar="NAME",
                   help="a named world of configs/worlds.yaml (coarse, default, subtle: the fractures and their "
                        "look-alikes, docs/ladder.md); its overrides apply after --config and before --set")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset root")
    p.add_argument("--workers", type=int, default=2, help="studies built in parallel processes")
    _add_config_args(p, "synth")

    p = _sub(sub, "inspect", "summarise a study folder, every study under a dataset root, or a PACS export (the series "
                              "read and each left out, with why) and list problems",
             "spinefrac inspect data/synth/train_images/1.2.826.0.1.3680043.90001", _cmd_inspect)
    p.add_argument("path", type=Path, help=STUDIES_HELP)
    p.add_argument("--workers", type=int, default=2, help="parallel decoding processes")
    p.add_argument("--strict", action="store_true", help="exit 1 when any problem is an error")
    _add_follow_symlinks(p)

    p = _sub(sub, "prepare-detector", "build the YOLO fracture dataset from train_bounding_boxes.csv",
             "spinefrac prepare-detector data/synth --out work/det_ds --locator runs/loc/weights/best.pt",
             _cmd_prepare_detector)
    p.add_argument("data_root", type=Path, help="dataset root in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="YOLO dataset folder to write")
    p.add_argument("--locator", type=Path, default=None,
                   help="vertebra-locator weights that centre the spine ROI crops (config roi:), as detect will; "
                        "without it the crops use roi.fallback")
    p.add_argument("--imgsz", type=int, default=None, help="rendered image size (config render.imgsz)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo studies already written")
    _add_follow_symlinks(p)
    _add_config_args(p, "detector")

    p = _sub(sub, "prepare-classifier", "build the per-vertebra crop dataset (Ultralytics classify folders per fold) "
             "labelled with train.csv's C1-C7",
             "spinefrac prepare-classifier data/synth --out work/cls_ds --locator runs/loc/weights/best.pt",
             _cmd_prepare_classifier)
    p.add_argument("data_root", type=Path, help="dataset root in the Kaggle layout (train.csv, train_images/, "
                                                "segmentations/)")
    p.add_argument("--out", type=Path, required=True,
                   help="dataset folder to write (images/, index.csv, fold0/{train,val}/{0,1}/)")
    p.add_argument("--locator", type=Path, default=None,
                   help="vertebra-locator weights that find each level's slices and box in studies without a "
                        "segmentation (all studies with crops.source=locator); without it those studies are skipped")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo studies already written (also after a settings "
                                                            "change)")
    _add_follow_symlinks(p)
    _add_config_args(p, "classifier")

    handlers = {"detector": _cmd_train_detector, "locator": _cmd_train_locator, "classifier": _cmd_train_classifier}
    for name, stage, help_, data_help, data_example in (
            ("train-detector", "detector", "train the YOLO fracture detector (offline, CPU or GPU)",
             "data.yaml written by prepare-detector", "work/detector_ds/data.yaml"),
            ("train-locator", "locator", "train the YOLO vertebra locator (seven classes C1-C7)",
             "data.yaml written by prepare-locator", "work/locator_ds/data.yaml"),
            ("train-classifier", "classifier", "train the YOLO vertebra classifier on per-vertebra crops "
                                               "(fracture yes/no per level; offline, CPU or GPU)",
             "a fold folder (fold<k>/ with train/ and val/) written by prepare-classifier",
             "work/classifier_ds/fold0")):
        p = _sub(sub, name, help_, f"spinefrac {name} {data_example} --out runs/{stage} --epochs 30",
                 handlers[stage])
        p.add_argument("data_yaml", type=Path, metavar="DATA", help=data_help)
        p.add_argument("--out", type=Path, required=True, help="run folder (a new numbered one if it exists)")
        p.add_argument("--model", default=None,
                       help="model YAML name (e.g. yolov8n.yaml, built from scratch) or a local .pt to fine-tune")
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--imgsz", type=int, default=None)
        p.add_argument("--batch", type=int, default=None)
        p.add_argument("--device", default=None, help="cpu, 0, or 0,1 for several GPUs")
        p.add_argument("--fold", type=int, default=None, help="validation fold")
        p.add_argument("--overwrite", action="store_true", help="write into --out even if it exists")
        _add_config_args(p, stage)

    p = _sub(sub, "detect", "find fracture boxes on every slice of every study in a folder",
             "spinefrac detect data/synth/test_images --weights runs/det/weights/best.pt --out work/detect",
             _cmd_detect)
    p.add_argument("studies", type=Path, nargs="+", help=STUDIES_HELP)
    p.add_argument("--weights", type=Path, required=True, help=".pt, or an exported ONNX/OpenVINO model")
    p.add_argument("--out", type=Path, required=True, help="output folder (boxes.csv, slices.csv, overlays/)")
    p.add_argument("--labels", type=Path, default=None, help="train_bounding_boxes.csv: draw ground truth too")
    p.add_argument("--locator", type=Path, default=None,
                   help="locator weights: add vertebra levels and centre the spine ROI crops (config roi:); "
                        "without it the crops use roi.fallback")
    p.add_argument("--classifier", type=Path, nargs="+", default=None, metavar="WEIGHTS",
                   help="vertebra-classifier weights (one per fold: averaged), scored per level into vertebrae.csv; "
                        "needs --locator")
    p.add_argument("--classifier-config", type=Path, default=None,
                   help="YAML merged over configs/classifier.yaml (the classifier's crops, render and score)")
    p.add_argument("--conf", type=float, default=None, help="box score threshold (config detect.conf)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--workers", type=int, default=2, help="parallel decoding processes")
    p.add_argument("--overwrite", action="store_true", help="redo studies already finished")
    _add_follow_symlinks(p)
    _add_config_args(p, "detector")

    p = _sub(sub, "export", "export detector weights for fast CPU inference",
             "spinefrac export --weights runs/det/weights/best.pt --format openvino", _cmd_export)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--format", choices=("openvino", "onnx"), default="openvino")
    p.add_argument("--imgsz", type=int, default=None)
    _add_config_args(p, "detector")

    p = _sub(sub, "prepare-locator", "build the YOLO vertebra-locator dataset from segmentations/",
             "spinefrac prepare-locator data/synth --out work/loc_ds", _cmd_prepare_locator)
    p.add_argument("data_root", type=Path)
    p.add_argument("--out", type=Path, required=True, help="YOLO dataset folder to write")
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    _add_follow_symlinks(p)
    _add_config_args(p, "locator")

    p = _sub(sub, "train", "run every training stage into one self-contained model folder",
             "spinefrac train data/rsna --out models/m1 --budget 60m", _cmd_train)
    p.add_argument("data_root", type=Path)
    p.add_argument("--out", type=Path, required=True, help="model folder")
    p.add_argument("--budget", type=_duration_arg, default=None, metavar="TIME",
                   help="wall-clock budget for the whole run, e.g. 90s, 12m, 1h, 1h30m (config budget.total): split "
                        "over the locator, detector and classifier trainings by Ultralytics' time; prepare, detect and "
                        "the aggregator count too (configs/pipeline.yaml budget:, docs/ladder.md)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clean", action="store_true", help="recompute stages that are already done")
    _add_follow_symlinks(p)
    _add_config_args(p, "pipeline")

    p = _sub(sub, "predict", "study-level C1-C7 and patient_overall probabilities for DICOM study folders",
             "spinefrac predict data/rsna/test_images --model models/m1 --out work/pred --test-csv data/rsna/test.csv",
             _cmd_predict)
    p.add_argument("studies", type=Path, nargs="+", help=STUDIES_HELP)
    p.add_argument("--model", type=Path, required=True, help="model folder written by `spinefrac train`")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (predictions.csv, submission.csv, boxes.csv, worklist.csv, report/, overlays/)")
    p.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                   help="also write each study's results as DICOM into DIR/<study>/: a Comprehensive 3D SR (TID 1500) "
                        "and a Secondary Capture series of the overlays (needs spinefrac[dicom]; as `spinefrac "
                        "dicom-out OUT --out DIR`)")
    p.add_argument("--test-csv", type=Path, default=None, help="Kaggle test.csv: submission rows to produce")
    p.add_argument("--labels", type=Path, default=None, help="train_bounding_boxes.csv: ground truth on overlays")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="I/N",
                   help="only shard I of N (1-based; a study's shard follows from its folder name alone), for a "
                        "batch scheduler's array jobs; combine the N output folders with `spinefrac merge`")
    p.add_argument("--ray", nargs="?", const="local", default=None, type=_ray_arg, metavar="ADDRESS",
                   help="detect on Ray actors (needs spinefrac[ray]): alone, a local instance; 'auto', HOST:6379 "
                        "or ray://HOST:10001, an existing cluster (STUDIES, --model and --out on a shared filesystem)")
    p.add_argument("--ray-actors", type=_positive_int, default=None, metavar="N",
                   help="number of Ray actors, each loading the models once; unset: the cluster's CPUs / 2, or its GPUs "
                        "with a GPU --device")
    _add_follow_symlinks(p)

    p = _sub(sub, "merge", "combine the output folders of `predict --shard I/N` jobs into one prediction folder",
             "spinefrac merge work/pred_1 work/pred_2 --model models/m1 --out work/pred --test-csv data/rsna/test.csv",
             _cmd_merge)
    p.add_argument("shards", type=Path, nargs="+", help="the shard jobs' --out folders")
    p.add_argument("--model", type=Path, required=True, help="the model folder the shards predicted with")
    p.add_argument("--out", type=Path, required=True, help="the combined prediction folder")
    p.add_argument("--test-csv", type=Path, default=None, help="Kaggle test.csv: submission rows to produce")
    p.add_argument("--overwrite", action="store_true", help="merge into a folder that holds finished studies")

    p = _sub(sub, "report", "write worklist.csv and the offline HTML review (report/index.html) of a prediction folder",
             "spinefrac report work/pred --model models/m1", _cmd_report)
    p.add_argument("pred_dir", type=Path, help="a folder written by `spinefrac predict` or `spinefrac merge`")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder whose operating point flags studies (default: the one predictions.csv names)")

    p = _sub(sub, "dicom-out", "write a prediction folder's results as DICOM: per study a Comprehensive 3D SR "
             "(TID 1500) and a Secondary Capture series of the overlays (needs spinefrac[dicom])",
             "spinefrac dicom-out work/pred --out work/dicom --model models/m1", _cmd_dicom_out)
    p.add_argument("pred_dir", type=Path, help="a folder written by `spinefrac predict` (with series.csv)")
    p.add_argument("--out", type=Path, required=True, help="folder for OUT/<study>/SR.dcm, SC_01.dcm, ...")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (name and operating point; default: the one predictions.csv names)")
    p.add_argument("--study", action="append", default=None, metavar="KEY",
                   help="only this study key (repeatable; default: every study of predictions.csv)")

    p = _sub(sub, "convert-weights", "convert an Ultralytics .pt you trust into spinefrac's weights-only format",
             "spinefrac convert-weights yolov8n_colleague.pt --out start.pt --trust", _cmd_convert_weights)
    p.add_argument("weights", type=Path, help="Ultralytics checkpoint (a pickle: loading it can run code)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: replace WEIGHTS)")
    p.add_argument("--trust", action="store_true",
                   help="required: you trust the file's origin (converting unpickles it once)")

    p = _sub(sub, "evaluate", "score predictions with the competition metric, AUCs and baselines",
             "spinefrac evaluate work/pred/predictions.csv --labels data/synth_test/truth/train.csv", _cmd_evaluate)
    p.add_argument("predictions", type=Path, help="predictions.csv (one row per study) or submission.csv")
    p.add_argument("--labels", type=Path, required=True, help="train.csv-style labels")
    p.add_argument("--out", type=Path, default=None, help="folder for metrics.json, ROC and calibration PNGs")
    p.add_argument("--boxes", type=Path, default=None,
                   help="boxes.csv with levels: adds the max-box-score baseline")
    p.add_argument("--threshold", type=float, default=0.5, help="threshold for sensitivity/specificity")
    p.add_argument("--prior", type=Path, default=None,
                   help="MODEL_DIR/prior.json: the constant-prior baseline uses the training positive rates "
                        "(default: the labels' own rates, which flatters the baseline)")

    p = _sub(sub, "serve", "run a DICOM node: receive studies (C-STORE), predict each complete one, send SR/SC back",
             "spinefrac serve --config serve.yaml --set paths.model=models/m1 --set node.port=11112", _cmd_serve)
    _add_config_args(p, "serve")

    p = _sub(sub, "demo", "synthesise, train, predict and evaluate end to end on the CPU",
             "spinefrac demo --out demo_out", _cmd_demo)
    p.add_argument("--out", type=Path, default=Path("demo_out"),
                   help="folder for the demo's studies, model, predictions and evaluation")
    p.add_argument("--clean", action="store_true", help="start from scratch")
    _add_config_args(p, "pipeline")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in NOISY_LOGGERS:  # their DEBUG output (font scans, plugin lists) would drown ours under -v
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(level if verbose else max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spinefrac` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from data_prep.errors import EXIT_ERROR, SpinefracError, os_error_message

    try:
        return int(args.handler(args) or 0)
    except SpinefracError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return exc.exit_code
    except OSError as exc:               # a read-only or full disk, a missing permission: one line with the path
        log.error("%s", os_error_message(exc), exc_info=args.verbose)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted; finished studies are kept and a rerun resumes")
        return 130


if __name__ == "__main__":
    sys.exit(main())
