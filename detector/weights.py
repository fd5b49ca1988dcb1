"""YOLO weights as data: a `.pt` that loads with `torch.load(weights_only=True)` and a network rebuilt from plain data.

An Ultralytics checkpoint pickles the whole `nn.Module`, so `torch.load(weights_only=False)` on it can run any
code the file carries. spinefrac's weights file (docs/contracts.md "Safe YOLO weights") is one `.pt` holding only
plain values and tensors, which `torch.load(weights_only=True)` reads without running code:

    format "spinefrac-yolo-weights", version 1
    architecture   the model's YAML dict (backbone, head, nc, scale, ...) as plain lists/dicts/strings/numbers
    names          {class id: class name}
    state_dict     {parameter or buffer name: tensor}
    source         where it came from (file name, SHA-256, Ultralytics version, imgsz it was trained at)

The network is rebuilt with `ultralytics.nn.tasks.DetectionModel(architecture)` (`ClassificationModel` for a
`Classify` head: the vertebra classifier) after checking that every layer
names an `nn.Module` class and that no string would be `eval`-ed (the activation spec is parsed, not evaluated),
then `load_state_dict(strict=True)`. Ultralytics checkpoints (e.g. `train_yolo`'s own, before it converts them)
are converted once with `convert_checkpoint(..., trust=True)` (`spinefrac convert-weights FILE --trust`).
"""

from __future__ import annotations

import ast
import copy
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_prep.errors import InputError
from data_prep.runs.artifacts import atomic_path
from data_prep.runs.manifest import file_sha256
from detector.offline import configure_ultralytics, set_ultralytics_verbosity

log = logging.getLogger("detector")

WEIGHTS_FORMAT = "spinefrac-yolo-weights"
WEIGHTS_VERSION = 1
YOLO_WRAPPER_YAML = "yolov8n.yaml"
CLASSIFY_WRAPPER_YAML = "yolov8n-cls.yaml"
"""Bundled architectures the `YOLO` wrapper object is first built from; its network is replaced at once."""
TASK_DETECT, TASK_CLASSIFY = "detect", "classify"
CLASSIFY_HEAD = "Classify"
"""The Ultralytics head module that makes an architecture a classifier (vertebra classifier, configs/classifier.yaml)."""
PLAIN_TYPES = (str, int, float, bool, type(None))
LAYER_FIELDS = 4  # from, repeats, module, args
ARCH_SECTIONS = ("backbone", "head")
TORCH_NN_PREFIX, TORCHVISION_OPS_PREFIX = "nn.", "torchvision.ops."
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
UNPICKLER_REASON = re.compile(r"WeightsUnpickler error: (Unsupported global: GLOBAL \S+|[^\n]*)")
REASON_CHARS = 200
CONVERT_HINT = "if you trust where it came from, convert it once with: spinefrac convert-weights {path} --trust"


class UnsafeWeightsError(InputError):
    """A weights file that cannot be loaded without running code it carries (or that is not spinefrac's format)."""


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Load a spinefrac weights file with `torch.load(weights_only=True)`; refuse anything else, naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...: torch's reason is in the message
        raise UnsafeWeightsError(path, f"does not load with torch.load(weights_only=True) ({_reason(exc)}), so "
                                       "loading it could run code it carries (an Ultralytics checkpoint does); "
                                       "it is refused: " + CONVERT_HINT.format(path=path)) from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise UnsafeWeightsError(path, f"loads weights-only but is not a {WEIGHTS_FORMAT} file (a bare state_dict "
                                       "has no architecture): " + CONVERT_HINT.format(path=path))
    if payload.get("version") != WEIGHTS_VERSION:
        raise InputError(path, f"{WEIGHTS_FORMAT} version {payload.get('version')} is not {WEIGHTS_VERSION}")
    _check_payload(payload, path)
    return payload


def _reason(exc: BaseException) -> str:
    """Return the telling line of a torch.load error (the blocked global, or the first line), without colours."""
    text = ANSI_ESCAPE.sub("", str(exc)).strip()
    found = UNPICKLER_REASON.search(text)
    line = found.group(1) if found else (text.splitlines()[0] if text else type(exc).__name__)
    return line.strip()[:REASON_CHARS]


def _check_payload(payload: Mapping[str, Any], path: Path) -> None:
    """Check that every value is plain data (tensors only in state_dict) and the architecture is buildable."""
    import torch

    for key in ("architecture", "names", "state_dict", "source"):
        if not isinstance(payload.get(key), dict):
            raise InputError(path, f"{WEIGHTS_FORMAT}: {key!r} is missing or not a mapping")
    for key in ("architecture", "names", "source"):
        _check_plain(payload[key], path, key)
    for name, value in payload["state_dict"].items():
        if not isinstance(name, str) or type(value) is not torch.Tensor:
            raise InputError(path, f"{WEIGHTS_FORMAT}: state_dict entry {name!r} is not a plain tensor")
    check_architecture(payload["architecture"], path)


def _check_plain(obj: Any, path: Path, where: str) -> None:
    """Raise unless `obj` is built only from dicts, lists and str/int/float/bool/None (exact types)."""
    if type(obj) in PLAIN_TYPES:
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            _check_plain(item, path, f"{where}[{i}]")
        return
    if type(obj) is dict:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise InputError(path, f"{WEIGHTS_FORMAT}: {where} has a key of type {type(key).__name__}")
            _check_plain(value, path, f"{where}.{key}")
        return
    raise InputError(path, f"{WEIGHTS_FORMAT}: {where} holds a {type(obj).__name__}, not plain data")


def check_architecture(arch: Mapping[str, Any], path: str | os.PathLike | None) -> None:
    """Refuse an architecture dict whose layers are not nn.Module classes or whose strings would be eval-ed."""
    import torch
    import torchvision

    configure_ultralytics()     # before the first import of ultralytics: offline, settings under the project home
    from ultralytics.nn import tasks

    for section in ARCH_SECTIONS:
        layers = arch.get(section)
        if not isinstance(layers, list) or not layers:
            raise InputError(path, f"architecture: {section!r} is missing or not a list of layers")
        for i, layer in enumerate(layers):
            if not isinstance(layer, (list, tuple)) or len(layer) != LAYER_FIELDS:
                raise InputError(path, f"architecture: {section}[{i}] is not [from, repeats, module, args]")
            module, args = layer[2], layer[3]
            if isinstance(module, str) and module.startswith(TORCH_NN_PREFIX):
                obj = getattr(torch.nn, module[len(TORCH_NN_PREFIX):], None)
            elif isinstance(module, str) and module.startswith(TORCHVISION_OPS_PREFIX):
                obj = getattr(torchvision.ops, module[len(TORCHVISION_OPS_PREFIX):], None)
            else:
                obj = vars(tasks).get(module) if isinstance(module, str) else None
            if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
                raise InputError(path, f"architecture: {section}[{i}] names {module!r}, not a network layer class")
            if not isinstance(args, list):
                raise InputError(path, f"architecture: {section}[{i}] arguments are not a list")
            for arg in args:
                if isinstance(arg, str) and not arg.isidentifier():
                    try:
                        ast.literal_eval(arg)
                    except (ValueError, SyntaxError):
                        raise InputError(path, f"architecture: {section}[{i}] argument {arg!r} is neither a name "
                                               "nor a literal") from None
    act = arch.get("activation")
    if act is not None and not _is_torch_nn_call(act):
        raise InputError(path, f"architecture: activation {act!r} is not a call of a torch.nn class with literal "
                               "arguments")


def _is_torch_nn_call(spec: Any) -> bool:
    """Return True for e.g. "nn.SiLU()" or "torch.nn.LeakyReLU(0.1)": a torch.nn class called with literals."""
    import torch

    if not isinstance(spec, str):
        return False
    try:
        call = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        return False
    if not isinstance(call, ast.Call):
        return False
    names, node = [], call.func
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return False
    names.append(node.id)
    if names[1:] not in (["nn"], ["nn", "torch"]):
        return False
    cls = getattr(torch.nn, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return False
    try:
        for value in [*call.args, *(kw.value for kw in call.keywords)]:
            ast.literal_eval(value)
    except ValueError:
        return False
    return all(kw.arg is not None for kw in call.keywords)


def architecture_task(arch: Mapping[str, Any]) -> str:
    """Return "classify" when the architecture's last layer is a Classify head, else "detect"."""
    head = arch.get("head") or []
    last = head[-1] if head and isinstance(head[-1], (list, tuple)) and len(head[-1]) == LAYER_FIELDS else None
    return TASK_CLASSIFY if last is not None and last[2] == CLASSIFY_HEAD else TASK_DETECT


def weights_task(path: str | os.PathLike) -> str:
    """Return the task ("detect" or "classify") of a spinefrac weights file."""
    return architecture_task(read_weights(path)["architecture"])


def build_model(path: str | os.PathLike) -> Any:
    """Rebuild the detection or classification network of a spinefrac weights file (eval, float32, CPU)."""
    path = Path(path)
    payload = read_weights(path)
    configure_ultralytics()
    set_ultralytics_verbosity(log.isEnabledFor(logging.DEBUG))
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    names = {int(k): str(v) for k, v in payload["names"].items()}
    arch = copy.deepcopy(payload["architecture"])
    task = architecture_task(arch)
    network = ClassificationModel if task == TASK_CLASSIFY else DetectionModel
    try:
        model = network(arch, ch=int(arch.get("channels", 3)), nc=len(names), verbose=False)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise InputError(path, f"the weights do not fit their architecture ({_reason(exc)})") from None
    model.names = names
    model.task = task
    model.pt_path = str(path)
    model.args = {"task": task, "imgsz": payload["source"].get("imgsz"), "data": None}
    return model.float().eval()


def yolo_from_weights(path: str | os.PathLike) -> Any:
    """Return an Ultralytics `YOLO` object around the network rebuilt from `path` (for export and fine-tuning)."""
    model = build_model(path)
    from ultralytics import YOLO

    task = model.task
    yolo = YOLO(CLASSIFY_WRAPPER_YAML if task == TASK_CLASSIFY else YOLO_WRAPPER_YAML, task=task)
    yolo.model = model
    yolo.ckpt = {"spinefrac_weights": str(path)}  # non-empty: YOLO.train starts from these weights
    yolo.ckpt_path = str(path)
    yolo.overrides = {"task": task, "model": str(path)}
    return yolo


def save_weights(model: Any, path: str | os.PathLike, *, source: Mapping[str, Any]) -> Path:
    """Write a detection network as a spinefrac weights file (atomically) and check it reads back weights-only."""
    import torch

    path = Path(path)
    arch = _plain_copy(getattr(model, "yaml", None))
    names = getattr(model, "names", None) or {}
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "architecture": arch,
        "names": {int(k): str(v) for k, v in dict(names).items()},
        "state_dict": {k: _compact(v) for k, v in model.state_dict().items()},
        "source": _plain_copy(dict(source)),
    }
    _check_payload(payload, path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    read_weights(path)
    return path


def _compact(tensor: Any) -> Any:
    """Return a CPU copy of a tensor, as float16 when that loses nothing (Ultralytics keeps checkpoints in fp16)."""
    import torch

    t = tensor.detach().cpu().contiguous().clone()
    if t.dtype == torch.float32 and torch.equal(t.half().float(), t):
        return t.half()
    return t


def _plain_copy(obj: Any) -> Any:
    """Return a copy of YAML-like data with tuples as lists and paths as strings."""
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_copy(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and not isinstance(obj, PLAIN_TYPES):  # numpy / torch scalars
        return obj.item()
    return obj


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, trust: bool = False
                       ) -> Path:
    """Convert an Ultralytics checkpoint (a pickle) into a spinefrac weights file; only with trust=True.

    Loading `src` unpickles it, which runs any code it carries: do it only for files you trust. `dst` defaults
    to `src` itself (replaced atomically). Already-converted files are rewritten unchanged.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    if not src.is_file():
        raise InputError(src, "weights not found")
    try:
        payload = read_weights(src)
    except UnsafeWeightsError:
        payload = None
    if payload is not None:
        if dst != src:
            save_weights(build_model(src), dst, source=payload["source"])
        return dst
    if not trust:
        raise UnsafeWeightsError(src, "converting loads it with pickle, which runs any code the file carries; "
                                      "pass --trust (trust=True) only for a file whose origin you trust")
    configure_ultralytics()
    set_ultralytics_verbosity(log.isEnabledFor(logging.DEBUG))
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, load_checkpoint

    sha = file_sha256(src)
    try:
        model, ckpt = load_checkpoint(str(src))
    except (TypeError, ModuleNotFoundError, RuntimeError) as exc:
        raise InputError(src, f"not an Ultralytics checkpoint ({exc})") from None
    if not isinstance(model, (DetectionModel, ClassificationModel)):
        raise InputError(src, f"holds a {type(model).__name__}; only YOLO detection and classification models "
                              "are supported")
    train_args = ckpt.get("train_args") or {}
    source = {"file": src.name, "sha256": sha, "converted_from": "ultralytics-checkpoint",
              "ultralytics_version": ckpt.get("version"), "imgsz": train_args.get("imgsz")}
    log.info("converted %s (Ultralytics checkpoint) to %s (%s)", src, dst, WEIGHTS_FORMAT)
    return save_weights(model, dst, source=source)
