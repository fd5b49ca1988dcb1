"""Detection speed per backend, split into decode / preprocess / model / postprocess, against the naive path.

    python -m benchmarks.bench_detect_speed [--weights best.pt] [--studies 3 --size 512 --slices 96]
                                           [--imgsz 384] [--backends pytorch onnx openvino]

Each measurement runs in a fresh child process (so peak memory is its own), after a warm-up child that
also exports the .pt once for ONNX / OpenVINO (the export is cached beside the weights).
  spinefrac detect  `detect_studies` streaming slices in memory, per backend; stages per slice:
                    decode (waiting for the reader), preprocess (2.5D render + the predictor's tensor
                    conversion), model (forward pass), postprocess (NMS + mapping to original pixels + tables)
  naive             render every slice to PNG files on disk, then Ultralytics `YOLO.predict` on the files
                    (Ultralytics' own per-image preprocess / inference / postprocess speeds)
Without --weights, a detector is trained for 1 epoch on a few synthetic studies (speed does not depend
on how well it is trained). Peak memory is `ru_maxrss` of the child (plus its decode workers).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BYTES_PER_KB = 1024.0
DEFAULT_BACKENDS = ("pytorch", "onnx", "openvino")


def _child_detect(args: argparse.Namespace) -> dict:
    from data_prep.runs.config import load_config
    from detector.detect import detect_studies

    config = load_config("detector", None, [f"render.imgsz={args.imgsz}", f"detect.backend={args.backend}",
                                            "detect.overlays=false", "train.device=cpu",
                                            f"detect.prefetch={args.prefetch}"])
    out = Path(args.out)
    t = time.perf_counter()
    result = detect_studies(args.studies_dir, weights=Path(args.weights), out=out, config=config,
                            workers=args.workers, progress=False)
    wall = time.perf_counter() - t
    per_study = []
    for marker in sorted((out / "done").glob("*.json")):
        data = json.loads(marker.read_text())
        per_study.append(data["n_slices"] / max(data["seconds"], 1e-9))
    return {"n_slices": result.n_slices, "timings": result.timings, "wall_s": wall, "slices_per_s": per_study,
            "backend": json.loads((out / "boxes.csv.meta.json").read_text())["extra"]["backend"],
            **_peak()}


def _child_naive(args: argparse.Namespace) -> dict:
    import cv2

    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.volume import iter_chunks
    from data_prep.runs.config import load_config
    from detector.detect import find_studies
    from detector.offline import configure_ultralytics
    from detector.render import context_slices, render_slices

    configure_ultralytics()
    from detector.weights import yolo_from_weights

    if args.pydicom_decode:      # decoding as pydicom's own plugins do it (GDCM), not the project's fast path
        from data_prep.dicom import geometry, slice_file
        slice_file.FAST_JPEG_LOSSLESS = ()

    render = load_config("detector", None, [f"render.imgsz={args.imgsz}", *args.render_set]).render
    png_dir = Path(args.out) / "png"
    t_write = t_predict = 0.0
    speeds = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
    n = 0
    per_study = []
    model = yolo_from_weights(args.weights)  # spinefrac weights-only file, rebuilt without unpickling
    for study in find_studies(args.studies_dir, follow_symlinks=True):   # bench_predict_speed passes its own links
        t0 = time.perf_counter()
        folder = png_dir / study.name
        folder.mkdir(parents=True, exist_ok=True)
        geometry = scan_study(study)
        for chunk in iter_chunks(geometry, chunk_size=16, context=context_slices(geometry, render),
                                 workers=args.workers):
            indices = list(range(chunk.start, chunk.stop))
            images, _ = render_slices(chunk, indices, geometry, render=render)
            for i, image in zip(indices, images, strict=True):
                cv2.imwrite(str(folder / f"{geometry.instance_numbers[i]}.png"), image)
        t1 = time.perf_counter()
        count = 0
        for r in model.predict(source=str(folder), imgsz=args.imgsz, conf=0.01, device="cpu", stream=True,
                               verbose=False):
            count += 1
            for k in speeds:
                speeds[k] += r.speed.get(k, 0.0) / 1000.0
        t2 = time.perf_counter()
        t_write += t1 - t0
        t_predict += t2 - t1
        n += count
        per_study.append(count / (t2 - t0))
    timings = {"decode+render+write png": t_write, "predict (read png + all)": t_predict,
               "model_preprocess": speeds["preprocess"], "model_model": speeds["inference"],
               "model_postprocess": speeds["postprocess"]}
    return {"n_slices": n, "timings": timings, "wall_s": t_write + t_predict, "slices_per_s": per_study,
            "backend": "naive (PNG + YOLO.predict, pytorch)", **_peak()}


def _peak() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / BYTES_PER_KB
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / BYTES_PER_KB
    return {"peak_mb": own, "peak_children_mb": kids}


def _run_child(kind: str, backend: str, args: argparse.Namespace, studies_dir: Path, weights: Path,
               out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "benchmarks.bench_detect_speed", "--child", kind, "--backend", backend,
           "--weights", str(weights), "--studies-dir", str(studies_dir), "--out", str(out),
           "--imgsz", str(args.imgsz), "--workers", str(args.workers), "--prefetch", str(args.prefetch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}/{backend} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_tiny(work: Path, imgsz: int, size: int | None) -> Path:
    from data_prep.runs.config import load_config
    from data_prep.synthetic.synth import synthesize
    from detector.train import train_yolo
    from detector.yolo_dataset import prepare_detector_dataset

    root = work / "synth_train"
    synth_set = [f"image.size={size}"] if size else []
    synthesize(root, n_studies=6, seed=100, split="train", config=load_config("synth", None, synth_set),
               progress=False)
    config = load_config("detector", None, [f"render.imgsz={imgsz}", "train.epochs=1", "train.plots=false",
                                            "train.device=cpu", "prepare.n_folds=2"])
    data_yaml = prepare_detector_dataset(root, work / "dataset", config=config, progress=False)
    return train_yolo(data_yaml, work / "run", config=config) / "weights" / "best.pt"


def _row(name: str, res: dict) -> list[str]:
    n = max(res["n_slices"], 1)
    t = res["timings"]
    if name.startswith("naive"):
        decode = t["decode+render+write png"]
        pre, model, post = t["model_preprocess"], t["model_model"], t["model_postprocess"]
        stages = [f"{1000 * decode / n:.1f}*", f"{1000 * pre / n:.1f}", f"{1000 * model / n:.1f}",
                  f"{1000 * post / n:.1f}"]
    else:
        pre = t.get("preprocess", 0.0) + t.get("model_preprocess", 0.0)
        model = t.get("model_model", t.get("model", 0.0))
        post = t.get("postprocess", 0.0) + t.get("model_postprocess", 0.0)
        stages = [f"{1000 * t.get('decode', 0.0) / n:.1f}", f"{1000 * pre / n:.1f}", f"{1000 * model / n:.1f}",
                  f"{1000 * post / n:.1f}"]
    total = 1000 * res["wall_s"] / n
    sps = statistics.median(res["slices_per_s"]) if res["slices_per_s"] else float("nan")
    return [name, *stages, f"{total:.1f}", f"{sps:.1f}", f"{res['peak_mb']:.0f}", f"{res['peak_children_mb']:.0f}"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one child measurement) and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="detector .pt (default: train a tiny one)")
    p.add_argument("--studies-dir", type=Path, default=None, help="folder of study folders (default: synthetic)")
    p.add_argument("--studies", type=int, default=3, help="synthetic test studies when no --studies-dir")
    p.add_argument("--size", type=int, default=None, help="synthetic image rows=cols (synth default if omitted)")
    p.add_argument("--slices", type=int, default=None, help="synthetic slices per study")
    p.add_argument("--imgsz", type=int, default=384)
    p.add_argument("--workers", type=int, default=2, help="decode processes")
    p.add_argument("--prefetch", type=int, default=1, help="detect.prefetch (chunks decoded ahead)")
    p.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS))
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--child", choices=("detect", "naive"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pydicom-decode", action="store_true",
                   help="naive path: decode with pydicom's plugins (GDCM) instead of the project's JPEG Lossless path")
    p.add_argument("--render-set", action="append", default=[], metavar="KEY=VALUE",
                   help="detector config override for the naive path's rendering, e.g. render.recipe=windows")
    args = p.parse_args(argv)

    if args.child:
        result = _child_detect(args) if args.child == "detect" else _child_naive(args)
        print(json.dumps(result))
        return 0

    from data_prep.runs.config import load_config
    from detector.backends import installed_backends

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_detect_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    weights = args.weights or _train_tiny(work, args.imgsz, args.size)
    studies_dir = args.studies_dir
    if studies_dir is None:
        from data_prep.synthetic.synth import synthesize

        root = work / "synth_test"
        synth_set = [f"image.size={args.size}"] if args.size else []
        synth_set += [f"volume.slices={args.slices}"] if args.slices else []
        if not (root / "test_images").is_dir():
            synthesize(root, n_studies=args.studies, seed=200, split="test",
                       config=load_config("synth", None, synth_set), progress=False)
        studies_dir = root / "test_images"
    available = installed_backends()
    results = []
    for backend in args.backends:
        if backend not in available:
            print(f"skipping {backend}: not installed")
            continue
        _run_child("detect", backend, args, studies_dir, weights, work / f"warm_{backend}")   # export + warm-up
        results.append((f"detect {backend}", _run_child("detect", backend, args, studies_dir, weights,
                                                        work / f"det_{backend}")))
    if not args.no_naive:
        results.append(("naive PNG + predict", _run_child("naive", "pytorch", args, studies_dir, weights,
                                                          work / "naive")))
    header = ["path", "decode", "preprocess", "model", "postprocess", "total ms/slice", "slices/s/study",
              "peak MB", "workers MB"]
    rows = [header] + [_row(name, res) for name, res in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    n_slices = results[0][1]["n_slices"] if results else 0
    print(f"\nDetection speed, ms per slice ({n_slices} slices, imgsz {args.imgsz}, decode workers {args.workers}; "
          f"machine shared with other jobs)")
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print("  * naive decode column = decode + render + PNG write; its other stages are Ultralytics' own speeds")
    print("  total = wall time of the whole run / slices (stages overlap when the reader prefetches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
