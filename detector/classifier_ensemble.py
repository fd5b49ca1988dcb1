"""The fold classifiers as one network: one OpenVINO call scores a batch of crops with every fold model.

predict averages the fracture probability of the n fold classifiers (detector/classifier.py). Run one by one
in PyTorch that is n forwards per batch; here the n networks and the average are one graph
(`FoldEnsemble`), converted once to OpenVINO IR and cached beside the first fold's weights as
`ensemble<n>_openvino_model/` (n folds) with a sidecar naming every fold's SHA-256 (docs/contracts.md "Classifier
ensemble export"). A cache whose sidecar does not match the weights, or whose files changed since, is
converted again, never used. The IR is data (an XML graph and a weights blob): loading it runs no code.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.runs.artifacts import write_sidecar
from data_prep.runs.manifest import file_sha256, tree_sha256
from detector.export import EXPORT_HASH_KEY, replace_path, verified_cache

log = logging.getLogger("detector")

ENSEMBLE_DIR = "ensemble{folds}_openvino_model"
"""The cache folder beside the first fold's weights file, by fold count (train scores with one fold, predict all)."""
ENSEMBLE_XML = "ensemble.xml"
ENSEMBLE_KIND = "export-classifier-ensemble"
CHANNELS = 3
OV_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}
"""Compiled as the detector's OpenVINO models are: synchronous latency mode (no request queue)."""


class FoldEnsemble(torch.nn.Module):
    """Every fold network on the same batch; returns the mean fracture probability per crop, shape (B,)."""

    def __init__(self, models: Sequence[torch.nn.Module], positive: Sequence[int]) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(models)
        self.positive = [int(k) for k in positive]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the folds of each network's probability of its positive class."""
        total = None
        for net, pos in zip(self.nets, self.positive, strict=True):
            out = net(x)
            probs = (out[0] if isinstance(out, (list, tuple)) else out)[:, pos]   # eval: (softmax, logits)
            total = probs if total is None else total + probs
        return total / len(self.nets)


def ensemble_path(weights: Sequence[Path]) -> Path:
    """Where the ensemble of `weights` is cached: `ensemble<n>_openvino_model/` beside the first fold's weights."""
    return Path(weights[0]).parent / ENSEMBLE_DIR.format(folds=len(weights))


def load_ensemble(weights: Sequence[Path], models: Sequence[torch.nn.Module], positive: Sequence[int], *,
                  imgsz: int, threads: int | None) -> Any:
    """Return a compiled OpenVINO model of the fold ensemble (input NCHW float RGB in [0, 1], output (B,))."""
    import openvino as ov

    target = ensemble_path(weights)
    hashes = [file_sha256(Path(w)) for w in weights]
    if not _fresh(target, hashes, positive, imgsz):
        _convert(target, weights, hashes, models, positive, imgsz)
    config = dict(OV_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(str(target / ENSEMBLE_XML), "CPU", config)


def predict_ensemble(compiled: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """Mean fracture probability per crop of a prepared float32 (B, 3, imgsz, imgsz) batch, `batch` at a time."""
    out = np.empty(len(x))
    for start in range(0, len(x), batch):
        out[start:start + batch] = next(iter(compiled(x[start:start + batch]).values())).reshape(-1)
    return out


def _fresh(target: Path, hashes: list[str], positive: Sequence[int], imgsz: int) -> bool:
    """True when the cache at `target` was made from these weights and classes and is unchanged since."""
    extra = verified_cache(target, hashes, again="converting again")
    if extra is None or not (target / ENSEMBLE_XML).is_file():
        return False
    if extra.get("positive") != [int(k) for k in positive] or extra.get("imgsz") != imgsz:
        log.info("%s was made for other classes or another size: converting again", target)
        return False
    return True


def _convert(target: Path, weights: Sequence[Path], hashes: list[str], models: Sequence[torch.nn.Module],
             positive: Sequence[int], imgsz: int) -> None:
    """Convert the fold networks into one OpenVINO IR at `target` (via a temp folder and a rename) + sidecar."""
    import openvino as ov

    start = time.perf_counter()
    ensemble = FoldEnsemble([m.cpu().eval() for m in models], positive).eval()
    example = torch.zeros(1, CHANNELS, imgsz, imgsz)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.export.", dir=target.parent))   # MANIFEST_EXCLUDE
    try:
        with torch.inference_mode():
            graph = ov.convert_model(ensemble, example_input=example,
                                     input=[ov.PartialShape([-1, CHANNELS, imgsz, imgsz])])
        ov.save_model(graph, str(tmp / ENSEMBLE_XML), compress_to_fp16=False)
        replace_path(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runtime = time.perf_counter() - start
    write_sidecar(target, kind=ENSEMBLE_KIND,
                  inputs={"weights": [str(Path(w).resolve()) for w in weights], "weights_sha256": hashes},
                  extra={"imgsz": imgsz, "positive": [int(k) for k in positive], "folds": len(weights),
                         EXPORT_HASH_KEY: tree_sha256(target)}, runtime_s=runtime)
    log.info("converted %d fold classifiers into one OpenVINO model at %s in %.1f s", len(weights), target, runtime)
