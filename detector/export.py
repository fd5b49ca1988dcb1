"""Export YOLO `.pt` weights to ONNX or OpenVINO beside the weights, atomically, with a sidecar naming the source."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_prep.artifacts import SIDECAR_SUFFIX, write_sidecar
from data_prep.config import Config, ConfigError, load_config
from data_prep.errors import InputError
from data_prep.manifest import file_sha256, tree_sha256
from detector.offline import configure_ultralytics, set_ultralytics_verbosity
from detector.weights import yolo_from_weights

__all__ = ["EXPORT_FORMATS", "OPENVINO_SUFFIX", "export_model", "export_weights", "exported_path", "file_sha256",
           "fresh_export"]

log = logging.getLogger("detector")

EXPORT_FORMATS = ("openvino", "onnx")
OPENVINO_SUFFIX = "_openvino_model"
EXPORT_HASH_KEY = "export_sha256"  # sidecar extra: SHA-256 of the exported file or folder


def export_model(weights: Path, *, fmt: str = "openvino", config: Config) -> Path:
    """Export `.pt` weights to `fmt` beside them at the config's `render.imgsz`; return the exported path."""
    return export_weights(weights, fmt=fmt, imgsz=int(config.render.imgsz), options=config.export)


def export_weights(weights: Path, *, fmt: str, imgsz: int, options: Mapping[str, Any] | None = None) -> Path:
    """Export `weights` (a .pt) to `fmt` beside it, via a temp folder and a rename; write a `.meta.json` sidecar."""
    weights = Path(weights)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if weights.suffix != ".pt" or not weights.is_file():
        raise InputError(weights, "expected an existing PyTorch .pt weights file to export")
    opts = dict(options if options is not None else load_config("detector").export)
    target = exported_path(weights, fmt)
    configure_ultralytics()
    set_ultralytics_verbosity(log.isEnabledFor(logging.DEBUG))
    weights_sha = file_sha256(weights)

    start = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{weights.stem}.export.", dir=weights.parent))
    try:
        tmp_weights = tmp_dir / weights.name
        shutil.copyfile(weights, tmp_weights)
        if file_sha256(tmp_weights) != weights_sha:
            raise InputError(weights, "changed while it was being exported; export again")
        yolo = yolo_from_weights(tmp_weights)  # rebuilt from plain data: nothing is unpickled
        with warnings.catch_warnings():  # torch.jit tracer deprecation and shape warnings: nothing to act on
            warnings.simplefilter("ignore")
            produced = yolo.export(
                format=fmt, imgsz=imgsz, dynamic=bool(opts["dynamic"]), batch=int(opts["batch"]),
                simplify=bool(opts["simplify"]), opset=opts["opset"], device="cpu", verbose=False)
        produced = Path(produced)
        if not produced.exists():
            raise InputError(weights, f"Ultralytics reported export to {produced}, but nothing was written")
        _replace(produced, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    runtime = time.perf_counter() - start
    write_sidecar(target, kind=f"export-{fmt}", inputs={"weights": str(weights.resolve()),
                                                        "weights_sha256": weights_sha},
                  extra={"format": fmt, "imgsz": imgsz, **opts, EXPORT_HASH_KEY: tree_sha256(target)},
                  runtime_s=runtime)
    log.info("exported %s to %s (%s, imgsz %d) in %.1f s", weights.name, target, fmt, imgsz, runtime)
    return target


def exported_path(weights: Path, fmt: str) -> Path:
    """Return where `fmt` export of `weights` lives: `best.onnx` or `best_openvino_model/` beside `best.pt`."""
    weights = Path(weights)
    if fmt == "onnx":
        return weights.with_suffix(".onnx")
    if fmt == "openvino":
        return weights.with_name(weights.stem + OPENVINO_SUFFIX)
    raise ConfigError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")


def fresh_export(weights: Path, fmt: str, imgsz: int) -> Path | None:
    """Return the sibling export of `weights` if its sidecar says it was made from these weights at a usable size."""
    target = exported_path(weights, fmt)
    sidecar = target.with_name(target.name + SIDECAR_SUFFIX)
    if not target.exists() or not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        made_from = meta["inputs"]["weights_sha256"]
        extra = meta["extra"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if made_from != file_sha256(weights):
        log.info("%s was exported from other weights than %s: re-exporting", target.name, weights.name)
        return None
    if EXPORT_HASH_KEY not in extra:
        log.info("%s has no %s in %s (an older export): re-exporting", target.name, EXPORT_HASH_KEY, sidecar.name)
        return None
    if extra[EXPORT_HASH_KEY] != tree_sha256(target):
        log.warning("%s differs from what was exported (SHA-256 in %s): not trusted, re-exporting", target,
                    sidecar.name)
        return None
    if not extra.get("dynamic") and int(extra.get("imgsz", -1)) != imgsz:
        log.info("%s has a fixed size %s, not %d: re-exporting", target.name, extra.get("imgsz"), imgsz)
        return None
    return target


def _replace(source: Path, target: Path) -> None:
    """Move `source` (file or folder) to `target` with renames only; an older `target` is removed afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
