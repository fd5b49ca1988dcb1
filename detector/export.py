"""Export YOLO `.pt` weights to ONNX or OpenVINO beside the weights, atomically, with a sidecar naming the source."""

from __future__ import annotations

import ast
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

import yaml

from data_prep.errors import InputError
from data_prep.runs.artifacts import SIDECAR_SUFFIX, write_sidecar
from data_prep.runs.config import Config, ConfigError, load_config
from data_prep.runs.manifest import file_sha256, tree_sha256
from detector.offline import configure_ultralytics, set_ultralytics_verbosity
from detector.weights import yolo_from_weights

__all__ = ["EXPORT_FORMATS", "OPENVINO_SUFFIX", "export_model", "export_weights", "exported_path", "file_sha256",
           "fresh_export", "metadata_problem", "replace_path", "verified_cache", "EXPORT_HASH_KEY"]

log = logging.getLogger("detector")

EXPORT_FORMATS = ("openvino", "onnx")
OPENVINO_SUFFIX = "_openvino_model"
EXPORT_HASH_KEY = "export_sha256"  # sidecar extra: SHA-256 of the exported file or folder
METADATA_YAML = "metadata.yaml"     # Ultralytics' metadata of an OpenVINO export (in its folder)
INT_FIELDS = ("stride", "batch", "channels")
"""Metadata fields Ultralytics turns into int."""
LITERAL_FIELDS = ("imgsz", "names", "kpt_shape", "kpt_names", "args", "end2end")
"""Metadata fields Ultralytics parses with ast.literal_eval when they are text (a malformed one: a traceback)."""


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
        replace_path(produced, target)
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


def fresh_export(weights: Path, fmt: str, imgsz: int, options: Mapping[str, Any] | None = None) -> Path | None:
    """Return the sibling export of `weights` if its sidecar says it was made from these weights at a usable size
    (and, with `options`, the export config's shape: `dynamic`, and `batch` when static)."""
    target = exported_path(weights, fmt)
    extra = verified_cache(target, file_sha256(weights), again="re-exporting")
    if extra is None:
        return None
    if not extra.get("dynamic") and int(extra.get("imgsz", -1)) != imgsz:
        log.info("%s has a fixed size %s, not %d: re-exporting", target.name, extra.get("imgsz"), imgsz)
        return None
    if options is not None and (bool(extra.get("dynamic")) != bool(options["dynamic"]) or not options["dynamic"]
                                and int(extra.get("batch", -1)) != int(options["batch"])):
        log.info("%s was exported with dynamic=%s batch=%s, the export config asks for dynamic=%s batch=%s: "
                 "re-exporting", target.name, extra.get("dynamic"), extra.get("batch"), options["dynamic"],
                 options["batch"])
        return None
    problem = metadata_problem(target)
    if problem is not None:      # a cache is data: a malformed or poisoned one is rebuilt, never handed to Ultralytics
        log.warning("%s: %s; not used, re-exporting from %s", target, problem, weights.name)
        return None
    return target


def verified_cache(target: Path, made_from: Any, *, again: str) -> dict[str, Any] | None:
    """The sidecar `extra` of a cache at `target` (an export folder or file) when its sidecar says it was made from
    `made_from` (the `inputs.weights_sha256` written with it) and the cache is unchanged since (its `export_sha256`);
    None otherwise, logged with `again` (what the caller does instead, e.g. "re-exporting")."""
    sidecar = target.with_name(target.name + SIDECAR_SUFFIX)
    if not target.exists() or not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        recorded = meta["inputs"]["weights_sha256"]
        extra = dict(meta["extra"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != made_from:
        log.info("%s was made from other weights: %s", target.name, again)
        return None
    if EXPORT_HASH_KEY not in extra:
        log.info("%s has no %s in %s (an older export): %s", target.name, EXPORT_HASH_KEY, sidecar.name, again)
        return None
    if extra[EXPORT_HASH_KEY] != tree_sha256(target):
        log.warning("%s differs from what was exported (SHA-256 in %s): not trusted, %s", target, sidecar.name, again)
        return None
    return extra


def metadata_problem(export: Path) -> str | None:
    """Why Ultralytics could not use an export's metadata (None when it can), found without loading the model.

    The metadata (an OpenVINO folder's metadata.yaml, an ONNX file's metadata_props) is read as data and each field
    Ultralytics converts is checked the way it converts it: `stride`, `batch`, `channels` as whole numbers; `imgsz`,
    `names`, `args`, ... parsed as Python literals when they are text (ast.literal_eval, which runs nothing), then
    `names` a {class id: name} mapping or a list of names, `imgsz` whole numbers, `args` a mapping.
    """
    export = Path(export)
    try:
        meta = _read_metadata(export)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        return f"its metadata cannot be read: {type(exc).__name__}: {exc}"
    if meta is None:
        return None          # no metadata (a third-party export): Ultralytics uses its defaults
    if not isinstance(meta, Mapping):
        return f"its metadata is a {type(meta).__name__}, not a mapping"
    for key in INT_FIELDS:
        if key in meta:
            try:
                int(meta[key])
            except (TypeError, ValueError):
                return f"metadata {key} is {str(meta[key])[:80]!r}, not a whole number"
    values = {}
    for key in LITERAL_FIELDS:
        value = meta.get(key)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
                return f"metadata {key} is {value[:80]!r}, not a literal ({type(exc).__name__})"
        values[key] = value
    names = values.get("names")
    if names is not None and not (isinstance(names, Mapping) and all(isinstance(v, str) for v in names.values())
                                  or isinstance(names, (list, tuple)) and all(isinstance(v, str) for v in names)):
        return f"metadata names is {str(names)[:80]!r}, not a list or mapping of class names"
    imgsz = values.get("imgsz")
    if imgsz is not None and not (isinstance(imgsz, int) or isinstance(imgsz, (list, tuple))
                                  and all(isinstance(v, int) for v in imgsz)):
        return f"metadata imgsz is {str(imgsz)[:80]!r}, not whole numbers"
    if values.get("args") is not None and not isinstance(values["args"], Mapping):
        return f"metadata args is {str(values['args'])[:80]!r}, not a mapping"
    return None


def _read_metadata(export: Path) -> Any:
    """An export's metadata as plain data (None when it has none); never evaluated."""
    if export.suffix == ".onnx":
        try:
            from ultralytics.nn.backends.base import BaseBackend
        except ImportError:
            return None     # an Ultralytics without this reader: AutoBackend itself reports a bad file
        return BaseBackend.read_metadata(export) or None
    sidecar = (export if export.is_dir() else export.parent) / METADATA_YAML
    if not sidecar.is_file():
        return None
    return yaml.safe_load(sidecar.read_text(encoding="utf-8"))


def replace_path(source: Path, target: Path) -> None:
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
