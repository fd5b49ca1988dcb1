"""Train a YOLO model (fracture detector or vertebra locator) with Ultralytics, offline, into a run folder.

The run folder holds what Ultralytics writes (`weights/best.pt`, `weights/last.pt`, `results.csv`,
`results.png`, `args.yaml`, plots) plus the resolved spinefrac config (`config.yaml`) and `train.meta.json`.
Once training has finished, `best.pt` and `last.pt` are converted in place from Ultralytics' pickled checkpoints
to spinefrac's weights-only format (detector/weights.py), so loading them can never run code.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from configs.durations import SECONDS_PER_HOUR
from data_prep.errors import InputError
from data_prep.runs.artifacts import next_run_dir, write_sidecar, write_text_atomic
from data_prep.runs.config import Config, ConfigError, dump_config
from data_prep.safe_paths import inside
from detector.offline import configure_ultralytics, restore_threads, set_ultralytics_verbosity
from detector.weights import convert_checkpoint, read_weights, yolo_from_weights

log = logging.getLogger("detector")

# Keys of the `train:` section that spinefrac interprets; every other key is an Ultralytics train argument.
OWN_KEYS = frozenset({"model", "fold", "threads", "device", "cache", "omp_wait"})
CACHE_CHOICES = {"none": False, "ram": "ram", "disk": "disk"}
MODEL_YAML_SUFFIXES = (".yaml", ".yml")
WEIGHTS_SUFFIX = ".pt"
LAST_NAME = "last.pt"
CONFIG_NAME = "config.yaml"
META_NAME = "train"  # train.meta.json (the sidecar of the run as a whole)
INDEX_CSV = "index.csv"
SPLIT_TRAIN, SPLIT_VAL = "train", "val"
THREAD_EVENTS = ("on_pretrain_routine_start", "on_train_start", "on_val_start")  # after each select_device()
# train.omp_wait -> OMP_WAIT_POLICY. torch's OpenMP (libgomp) by default spins idle threads at every barrier;
# beside other busy processes a spinning thread holds a core its partner needs. libgomp reads the variable once,
# when torch loads; a value already in the environment is kept. Measured in docs/train_cost.md.
OMP_WAIT_VAR = "OMP_WAIT_POLICY"
OMP_WAIT_CHOICES = {"passive": "PASSIVE", "default": None}


def train_yolo(data_yaml: Path, out: Path, *, config: Config, model: str | Path | None = None,
               overwrite: bool = False, callbacks: Mapping[str, Callable[[Any], None]] | None = None) -> Path:
    """Train YOLO on `data_yaml` with `config.train` at `config.render.imgsz`; return the run folder.

    `data_yaml` is a detection dataset's YAML, or for a classification model (configs/classifier.yaml) the
    folder holding train/<class>/ and val/<class>/ (Ultralytics' classify layout).

    `callbacks` (Ultralytics event name -> function of the trainer or validator) run after spinefrac's own.
    """
    start = time.perf_counter()
    data_yaml = Path(data_yaml)
    if not (data_yaml.is_file() or (data_yaml / SPLIT_TRAIN).is_dir()):
        raise InputError(data_yaml, "dataset not found: neither a dataset YAML (prepare-detector / prepare-locator) "
                                    f"nor a classify folder with {SPLIT_TRAIN}/ (prepare-classifier)")
    train_cfg = config.train
    model_spec = str(model if model is not None else train_cfg.model)
    from_scratch = _check_model_spec(model_spec)
    args = _ultralytics_args(train_cfg)

    set_omp_wait(str(train_cfg["omp_wait"]))
    configure_ultralytics()
    verbose = log.isEnabledFor(logging.DEBUG)
    set_ultralytics_verbosity(verbose)
    from ultralytics import YOLO

    try:
        # A .pt to fine-tune is rebuilt from plain data (detector/weights.py), never unpickled.
        yolo = yolo_from_weights(model_spec) if not from_scratch else YOLO(model_spec)
    except FileNotFoundError as exc:  # an architecture YAML that neither exists here nor ships with Ultralytics
        raise InputError(model_spec, f"model not found ({exc}); use e.g. yolov8n.yaml or a local .pt") from None

    out = Path(out)
    run_dir = out if overwrite or not out.exists() else next_run_dir(out.parent, out.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_used = _fold_data_yaml(data_yaml, train_cfg.fold, run_dir) if data_yaml.is_file() else data_yaml.resolve()
    dump_config(config, run_dir / CONFIG_NAME)
    threads = train_cfg.threads
    for event in THREAD_EVENTS:
        yolo.add_callback(event, lambda _owner: restore_threads(threads))
    yolo.add_callback("on_fit_epoch_end", _log_epoch)
    for event, func in (callbacks or {}).items():
        yolo.add_callback(event, func)
    length = (f"{args['time'] * SECONDS_PER_HOUR:.0f} s (train.time: Ultralytics fits the epochs to it)"
              if args.get("time") else f"{args['epochs']} epochs")
    log.info("training %s on %s: %s at imgsz %d, device %s -> %s", model_spec, data_used, length,
             config.render.imgsz, train_cfg.device if train_cfg.device is not None else "auto", run_dir)
    yolo.train(data=str(data_used), imgsz=int(config.render.imgsz), device=train_cfg.device,
               project=str(run_dir.parent.resolve()), name=run_dir.name, exist_ok=True,
               pretrained=not from_scratch, verbose=verbose, **args)

    trainer = yolo.trainer
    best = run_dir / "weights" / "best.pt"
    if Path(trainer.save_dir).resolve() != run_dir.resolve() or not best.is_file():
        raise InputError(run_dir, f"Ultralytics finished without {best} (it wrote to {trainer.save_dir})")
    for checkpoint in (best, run_dir / "weights" / LAST_NAME):
        if checkpoint.is_file():  # Ultralytics' own pickles, written by this process: trusted, made weights-only
            convert_checkpoint(checkpoint, trust=True)
    final = {k: float(v) for k, v in (trainer.metrics or {}).items() if _is_number(v)}
    epochs_run = _epochs_in(run_dir / "results.csv")
    runtime = time.perf_counter() - start
    write_sidecar(run_dir / META_NAME, kind="yolo_train", config=config.to_dict(),
                  inputs={"data_yaml": str(data_yaml.resolve()), "data_used": str(Path(data_used).resolve()),
                          "model": model_spec},
                  counts={"epochs_run": epochs_run, "epochs_planned": int(args["epochs"])},
                  runtime_s=runtime,
                  extra={"final_metrics": final, "best_fitness": _as_float(trainer.best_fitness),
                         "from_scratch": from_scratch, "imgsz": int(config.render.imgsz),
                         "device": str(trainer.device), "weights": str(best)})
    summary = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in final.items() if k.startswith("metrics/"))
    log.info("trained %d epochs in %.0f s: %s; best weights %s", epochs_run, runtime, summary or "no metrics",
             best)
    return run_dir


def set_omp_wait(policy: str) -> bool:
    """Set OpenMP's wait policy for this process if torch is not loaded yet; return True if it was set."""
    if policy not in OMP_WAIT_CHOICES:
        raise ConfigError(f"train.omp_wait must be one of {', '.join(OMP_WAIT_CHOICES)}, found {policy!r}")
    value = OMP_WAIT_CHOICES[policy]
    if value is None:
        return False
    if "torch" in sys.modules or OMP_WAIT_VAR in os.environ:
        log.debug("%s stays %s in this process (torch loaded already, or set by the user)", OMP_WAIT_VAR,
                  os.environ.get(OMP_WAIT_VAR, "unset"))
        return False
    os.environ[OMP_WAIT_VAR] = value
    return True


def _log_epoch(trainer: Any) -> None:
    """One INFO line per epoch, and one for the final validation of best.pt (Ultralytics is quiet unless -v)."""
    metrics = {k.split("/")[-1].replace("(B)", ""): float(v) for k, v in (trainer.metrics or {}).items()
               if k.startswith("metrics/") and _is_number(v)}
    text = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "no validation"
    if trainer.epoch + 1 > trainer.epochs:  # final_eval() reports with epoch + 1
        log.info("best.pt: %s", text)
        return
    losses = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
    loss_text = ", ".join(f"{k.split('/')[-1]} {float(v):.3f}" for k, v in losses.items())
    log.info("epoch %d/%d: %s; %s", trainer.epoch + 1, trainer.epochs, loss_text, text)


def _check_model_spec(spec: str) -> bool:
    """Return True when `spec` is an architecture YAML (built from scratch); check a .pt exists locally."""
    if spec.endswith(MODEL_YAML_SUFFIXES):
        return True
    if spec.endswith(WEIGHTS_SUFFIX):
        if not Path(spec).is_file():
            raise InputError(spec, "model weights not found; spinefrac never downloads weights: pass a local .pt, "
                                   "or an architecture YAML such as yolov8n.yaml to train from scratch")
        read_weights(Path(spec))  # refuse a pickle checkpoint before any work
        return False
    raise ConfigError(f"model {spec!r} must be an architecture YAML (e.g. yolov8n.yaml) or a local .pt file")


def _ultralytics_args(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Turn the `train:` section into Ultralytics keyword arguments (our own keys handled separately)."""
    args = {k: v for k, v in train_cfg.items() if k not in OWN_KEYS}
    cache = str(train_cfg["cache"])
    if cache not in CACHE_CHOICES:
        raise ConfigError(f"train.cache must be one of {', '.join(CACHE_CHOICES)}, found {cache!r}")
    args["cache"] = CACHE_CHOICES[cache]
    return args


def _fold_data_yaml(data_yaml: Path, fold: int | None, run_dir: Path) -> Path:
    """Return the dataset YAML for validation fold `fold`: data.yaml itself, or a fold view in the run folder."""
    if fold is None:
        return data_yaml
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
    if int((data.get("spinefrac") or {}).get("fold", -1)) == int(fold):
        return data_yaml
    root = Path(data.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    index_csv = root / INDEX_CSV
    if not index_csv.is_file():
        raise InputError(data_yaml, f"fold {fold} requested, but the dataset was split with fold "
                                    f"{(data.get('spinefrac') or {}).get('fold')} and has no {INDEX_CSV} to re-split")
    with open(index_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "fold" not in rows[0] or "image" not in rows[0]:
        raise InputError(index_csv, "needs the columns image and fold to choose a validation fold")
    lists = {SPLIT_TRAIN: [], SPLIT_VAL: []}
    for k, row in enumerate(rows, start=1):
        split = SPLIT_VAL if int(row["fold"]) == int(fold) else SPLIT_TRAIN
        image = inside(root, row["image"], source=f"{index_csv} row {k}, column image")   # never outside the dataset
        lists[split].append(str(image.resolve()))
    if not lists[SPLIT_VAL] or not lists[SPLIT_TRAIN]:
        raise InputError(index_csv, f"fold {fold} leaves {'no validation' if not lists[SPLIT_VAL] else 'no training'}"
                                    " images")
    view = {**data, "path": str(root)}
    for split, files in lists.items():
        view[split] = str(write_text_atomic(run_dir / f"{split}_fold{fold}.txt", "\n".join(files) + "\n"))
    view.setdefault("spinefrac", {})
    view["spinefrac"] = {**view["spinefrac"], "fold": int(fold)}
    log.info("fold %d: %d training and %d validation images", fold, len(lists[SPLIT_TRAIN]), len(lists[SPLIT_VAL]))
    return write_text_atomic(run_dir / f"data_fold{fold}.yaml", yaml.safe_dump(view, sort_keys=False))


def _epochs_in(results_csv: Path) -> int:
    """Return how many epoch rows Ultralytics wrote to results.csv (0 when absent)."""
    if not results_csv.is_file():
        return 0
    with open(results_csv, newline="", encoding="utf-8") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _as_float(value: Any) -> float | None:
    return float(value) if _is_number(value) else None
