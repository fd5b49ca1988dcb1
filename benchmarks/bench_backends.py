"""Inference speed of the detector backends on CPU: ms per image, split into preprocess, model and postprocess.

    python -m benchmarks.bench_backends [--imgsz 384 512] [--batch 16] [--repeats 7]

Builds an untrained 1-class yolov8n from its YAML (the speed does not depend on the weights), exports it to
ONNX and OpenVINO (dynamic shapes, as `spinefrac export` does by default; static batch too, for comparison),
and times `detector.backends.Predictor.predict` on in-memory uint8 batches. Prints the median over repeats
after one warm-up call; repeats go round-robin over the variants, and "x pt-1" is the speed-up over PyTorch
with the first thread count, which shared cores distort less than the absolute figures. Timings jump several-fold when other processes share the cores: the load average is
printed before and after; quote medians from a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Reference figures (shared/MEASURED.md, yolov8n, batches of 16 in memory): ms per image by imgsz.
MEASURED = {
    ("pytorch", "1 thread"): {384: 25.1, 512: 43.8, 640: 78.6},
    ("pytorch", "2 threads"): {384: 13.2, 512: 31.0, 640: 54.6},
    ("onnx", "dynamic"): {384: 12.3, 512: 21.5, 640: 37.5},
    ("openvino", "dynamic"): {384: 5.7, 512: 10.7, 640: 17.6},
}
SEED = 0
QUIET_CLS_BIAS = -10.0  # sigmoid(-10) = 5e-5, far below detect.conf
PIXEL_LEVELS = 256


def build_model(folder: Path) -> Path:
    """Save an untrained 1-class yolov8n (built from its YAML, nothing downloaded) as folder/best.pt.

    The class bias is lowered so that, like a trained detector on mostly fracture-free slices, almost no
    candidate passes the score threshold; an untrained head would send every anchor through NMS.
    """
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from detector.weights import convert_checkpoint

    yolo = YOLO("yolov8n.yaml")
    yolo.model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    yolo.model.names = {0: "fracture"}
    with torch.no_grad():
        for branch in yolo.model.model[-1].cv3:
            branch[-1].bias.fill_(QUIET_CLS_BIAS)
    path = folder / "best.pt"
    yolo.save(str(path))
    return convert_checkpoint(path, trust=True)  # made here, so trusted; load_predictor reads weights-only files


def variants(weights: Path, imgsz: int, batch: int, threads: list[int]) -> list[tuple[str, str, Path, dict]]:
    """Export what is needed and list (backend, variant, model path, load_predictor kwargs) to time."""
    import importlib.util

    from data_prep.runs.config import load_config
    from detector.export import export_weights

    options = load_config("detector").export.to_dict()
    out: list[tuple[str, str, Path, dict]] = [
        ("pytorch", f"{n} thread{'s' * (n > 1)}", weights, {"threads": n}) for n in threads]
    for fmt, module in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        if importlib.util.find_spec(module) is None:
            print(f"# {module} not installed: no {fmt} rows")
            continue
        for dynamic in (True, False):
            folder = weights.parent / f"{fmt}_{imgsz}_{'dyn' if dynamic else f'b{batch}'}"
            folder.mkdir(exist_ok=True)
            w = folder / weights.name
            w.write_bytes(weights.read_bytes())
            path = export_weights(w, fmt=fmt, imgsz=imgsz, options={**options, "dynamic": dynamic, "batch": batch})
            name = "dynamic" if dynamic else f"static b{batch}"
            out.append((fmt, name, path, {}))
            if fmt == "openvino" and dynamic:
                out.append((fmt, "dynamic f32", path, {"openvino_precision": "f32"}))
    return out


def time_variants(rows: list[tuple[str, str, Path, dict]], imgsz: int, batch: int,
                  repeats: int) -> list[dict[str, float]]:
    """Median ms per image of each stage (and their sum) per variant; repeats run round-robin over variants,
    so load from other processes hits every variant alike."""
    from data_prep.runs.config import load_config
    from detector.backends import load_predictor

    det = load_config("detector").detect
    images = np.random.default_rng(SEED).integers(0, PIXEL_LEVELS, (batch, imgsz, imgsz, 3), dtype=np.uint8)
    preds = []
    for backend, _variant, path, kwargs in rows:
        pred = load_predictor(path, imgsz=imgsz, backend=backend, conf=float(det.conf), iou=float(det.iou),
                              max_det=int(det.max_det), **kwargs)
        assert pred.backend == backend, f"asked for {backend}, got {pred.backend}"
        pred.predict(images)  # warm-up
        preds.append(pred)
    samples: list[dict[str, list[float]]] = [
        {"preprocess": [], "model": [], "postprocess": [], "total": []} for _ in rows]
    for _ in range(repeats):
        for pred, per_stage in zip(preds, samples, strict=True):
            pred.reset_timings()
            pred.predict(images)
            ms = pred.timings.ms_per_image()
            for stage, value in ms.items():
                per_stage[stage].append(value)
            per_stage["total"].append(sum(ms.values()))
    return [{stage: statistics.median(values) for stage, values in per_stage.items()} for per_stage in samples]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table row per backend variant and image size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imgsz", type=int, nargs="+", default=[384, 512])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="PyTorch thread counts to time")
    args = parser.parse_args(argv)

    from detector.offline import configure_ultralytics

    configure_ultralytics()
    import logging

    logging.getLogger("detector").setLevel(logging.WARNING)
    print(f"# cores {os.cpu_count()}, load average before {os.getloadavg()}, batch {args.batch}, "
          f"median of {args.repeats}")
    header = (f"{'backend':9} {'variant':13} {'imgsz':>5} {'pre':>6} {'model':>7} {'post':>6} {'total':>7} "
              f"{'x pt-1':>6} {'MEASURED':>8}   ms per image")
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench_backends.") as tmp:
        weights = build_model(Path(tmp))
        for imgsz in args.imgsz:
            rows = variants(weights, imgsz, args.batch, args.threads)
            start = time.perf_counter()
            results = time_variants(rows, imgsz, args.batch, args.repeats)
            base = results[0]["total"]  # the first PyTorch thread count
            for (backend, variant, _path, _kw), ms in zip(rows, results, strict=True):
                ref = MEASURED.get((backend, variant), {}).get(imgsz)
                ref_text = f"{ref:8.1f}" if ref is not None else f"{'-':>8}"
                print(f"{backend:9} {variant:13} {imgsz:5d} {ms['preprocess']:6.2f} {ms['model']:7.2f} "
                      f"{ms['postprocess']:6.2f} {ms['total']:7.2f} {base / ms['total']:6.2f} {ref_text}",
                      flush=True)
            print(f"# imgsz {imgsz}: {time.perf_counter() - start:.0f} s, load average {os.getloadavg()}")
    print(f"# load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
