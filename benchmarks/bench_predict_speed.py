"""Whole-study speed of `spinefrac predict` on full-size studies, beside its limit and the naive path, in one run.

    python -m benchmarks.bench_predict_speed (--model MODEL_DIR | --default-model) [--studies-dir DIR | --studies 20]
                                             [--naive-studies 3] [--rss-studies 20 100] [--work DIR]

--default-model measures a model folder of the default configuration (detector 288 px, locator 256 px, five fold
classifiers at 96 px), trained by the benchmark itself into WORK/default_model when it is not there yet: 48
synthetic studies (120 slices, every one segmented) and `spinefrac train` with the defaults but few epochs
(DEFAULT_TRAIN_SET: the locator 14 epochs, so that it finds the vertebrae and the classifier gets its crops; the
detector 3 and the classifiers 2, as speed does not depend on how well they learnt); about 35 min on 2 cores.

Every measurement runs in its own child process, one after the other (never two at once):
  predict      `spinefrac predict` over the studies (overlays and all outputs, as a user runs it). Steady state
               = the time between the first and the last study's done marker / (studies - 1): model loading and
               the first study's start-up are left out, everything between studies is in. Stage shares come from
               the done markers' timings_s (detect) and the sidecars (aggregation = predict - detect).
  decode       the project's reader alone (scan + decode every slice with the same decode workers), per study.
  models       the model forwards alone on in-memory batches of the same sizes and counts as predict ran for the
               same studies: the detector on every slice, the locator on every k-th, the classifier (every fold
               model) on the crops vertebrae.csv counted; each at its faster thread count (1 or every core).
               No NMS, no rendering, no reading.
  limit        decode + models: what a study costs if nothing else ran and nothing overlapped; predict / limit
               is the overhead ratio (below 1 when decoding and the models overlap on the 2 cores).
  naive        every slice decoded by pydicom's own plugins (GDCM for JPEG Lossless), rendered to PNG on disk,
               then Ultralytics `YOLO.predict` (PyTorch) on the files with the same detector weights, imgsz and
               recipe (benchmarks/bench_detect_speed.py's naive child), on the first --naive-studies studies;
               scaled to the mean study. The detector alone: no locator, no classifier, no aggregation.
  rss N        `spinefrac predict` over N study folders (links to the studies, cycled), peak RSS of the
               whole process tree (sampled every RSS_POLL_S) and of the main process.
Without --studies-dir, full-size synthetic studies are written first: 512 px, about 300 slices, every file
JPEG Lossless (1.2.840.10008.1.2.4.70). Timings jump when other jobs share the cores: quote them beside
`python -m benchmarks.bench_backends` run on the same machine, and read ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNTH_SIZE = 512
SYNTH_SLICES = 300
SYNTH_SEED = 21
RSS_POLL_S = 0.1
MB = 1024.0 * 1024.0
DEFAULT_TRAIN_STUDIES = 48
DEFAULT_TRAIN_SLICES = 120
DEFAULT_TRAIN_SEED = 6
DEFAULT_SYNTH_SET = ("labels.segmentation_fraction=1.0",)
DEFAULT_TRAIN_SET = ('locator.set=["train.epochs=14","train.patience=100"]', 'detector.set=["train.epochs=3"]',
                     'classifier.set=["train.epochs=2"]')
"""The default-config model folder's training (--default-model): the defaults, with fewer epochs."""
REFERENCE_IMGSZ, REFERENCE_BATCH, REFERENCE_REPEATS = 384, 16, 3
"""`python -m benchmarks.bench_backends --imgsz 384 --repeats 3`'s OpenVINO dynamic row, run by this benchmark too."""
REFERENCE_MS = 10.0
"""The issue's reference machine: OpenVINO runs yolov8n at 384 px in about this many ms per image."""
MODEL_THREADS = (1, 0)
"""Thread counts the models-alone measurement tries (0 = every core); each model's faster one counts."""
STAGES = ("decode", "preprocess", "locate", "model", "postprocess", "classify")
"""done-marker timers of the main thread, shown as shares of the steady time per study (`model` is the detector;
`locate` holds the locator's calls; `decode` and `preprocess` include waiting for the reader and the renderer)."""
BACKGROUND = ("render", "outputs")
"""done-marker timers of work in threads beside the main one (the detector's crops rendered ahead; the parts,
overlays and marker written while the next study is detected)."""


# ---------------------------------------------------------------- children
def _child_decode(args: argparse.Namespace) -> dict:
    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.volume import iter_chunks
    from detector.detect import find_studies

    per_study, slices = [], 0
    for study in find_studies(args.studies_dir):
        t = time.perf_counter()
        geometry = scan_study(study)
        for _chunk in iter_chunks(geometry, chunk_size=args.batch, workers=args.workers):
            pass
        per_study.append(time.perf_counter() - t)
        slices += len(geometry)
    return {"per_study_s": per_study, "slices": slices}


def _child_models(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from data_prep.runs.config import with_overrides
    from detector.backends import to_model_input
    from detector.detect import StudyRunner
    from spinefrac.model_folder import open_model

    model = open_model(args.model)
    cfgs = model.configs
    counts = json.loads(args.counts)
    rng = np.random.default_rng(0)
    best: dict[str, float] = {}
    backend = None

    def forward(name: str, run, imgsz: int, n: int, batch: int, raw: bool = False) -> None:
        images = rng.integers(0, 255, (batch, imgsz, imgsz, 3), dtype=np.uint8)
        x = images if raw else torch.from_numpy(to_model_input(images))
        run(x[:1])                                           # warm-up
        run(x[:min(batch, n)])
        t = time.perf_counter()
        for start in range(0, n, batch):
            run(x[:min(batch, n - start)])
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)

    for threads in MODEL_THREADS:     # each model at its faster thread count: the limit is the best case
        config = with_overrides("detector", cfgs["detector"], [f"detect.inference_threads={threads}"])
        runner = StudyRunner(Path(args.out), weights=model.detector_weights, config=config,
                             locator=model.locator_weights, locator_config=cfgs["locator"],
                             levels_config=cfgs["levels"], classifier=model.classifier_weights or None,
                             classifier_config=cfgs["classifier"])
        backend = runner.predictor.backend
        batch = int(config["detect"]["batch"])
        forward("detector", runner.predictor._run, runner.predictor.imgsz, counts["detector"], batch)
        if runner.locator is not None:
            loc = runner.locator.predictor
            forward("locator", loc._run, loc.imgsz, counts["locator"], batch)
        if runner.classifier is not None and counts["classifier"]:
            clf = runner.classifier      # its own predict: one OpenVINO call for every fold, or the PyTorch loop
            forward("classifier", clf.predict, clf.imgsz, counts["classifier"],
                    int(cfgs["classifier"]["score"]["batch"]), raw=True)
            backend = f"{backend}, classifier {clf.backend} x{len(clf.weights)}"
    return {"seconds": best, "backend": backend}


def _child_reference(args: argparse.Namespace) -> dict:
    """The machine's speed as the issue and the README quote it: bench_backends' OpenVINO dynamic yolov8n row."""
    from benchmarks.bench_backends import build_model, time_variants
    from data_prep.runs.config import load_config
    from detector.export import export_weights
    from detector.offline import configure_ultralytics

    configure_ultralytics()
    with tempfile.TemporaryDirectory(prefix="bench_predict_speed_ref.") as tmp:
        weights = build_model(Path(tmp))
        options = {**load_config("detector").export.to_dict(), "dynamic": True}
        path = export_weights(weights, fmt="openvino", imgsz=REFERENCE_IMGSZ, options=options)
        result = time_variants([("openvino", "dynamic", path, {})], REFERENCE_IMGSZ, REFERENCE_BATCH,
                               REFERENCE_REPEATS)
    return {"ms_per_image": result[0]["total"]}


# ---------------------------------------------------------------- driver
def _run(cmd: list[str], *, poll: bool = False) -> dict:
    """Run a command; return wall seconds, exit code, stderr tail and (poll) peak RSS of its process tree."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_tree = peak_main = 0
    if poll:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                rss = [p.memory_info().rss for p in procs]
                peak_tree, peak_main = max(peak_tree, sum(rss)), max(peak_main, rss[0])
            except psutil.Error:
                pass
            time.sleep(RSS_POLL_S)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "stdout": out, "peak_tree_mb": peak_tree / MB, "peak_main_mb": peak_main / MB}


def _child(kind: str, args: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_predict_speed", "--child", kind, "--model", str(args.model),
           "--studies-dir", str(args.studies_dir), "--workers", str(args.workers)]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    return json.loads(_run(cmd)["stdout"].strip().splitlines()[-1])


def _predict(studies: Path, model: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "spinefrac", "predict", "-q", str(studies), "--model", str(model), "--out", str(out),
           "--no-progress", "--workers", str(workers), "--overwrite", "--follow-symlinks"]   # the links are ours
    return _run(cmd, poll=True)


def _predict_figures(out: Path, run: dict) -> dict:
    markers = [json.loads(p.read_text()) | {"mtime": p.stat().st_mtime} for p in sorted((out / "done").glob("*.json"))]
    markers.sort(key=lambda m: m["mtime"])
    n = len(markers)
    steady = (markers[-1]["mtime"] - markers[0]["mtime"]) / (n - 1) if n > 1 else float("nan")
    stages = {k: sum(m["timings_s"].get(k, 0.0) for m in markers) / n for k in STAGES}
    stages["other"] = steady - sum(stages.values())
    background = {k: sum(m["timings_s"].get(k, 0.0) for m in markers) / n for k in BACKGROUND}
    detect_s = json.loads((out / "boxes.csv.meta.json").read_text()).get("runtime_s") or float("nan")
    predict_meta = json.loads((out / "predictions.csv.meta.json").read_text())
    aggregate_s = (predict_meta.get("runtime_s") or float("nan")) - detect_s
    return {"studies": n, "slices_mean": sum(m["n_slices"] for m in markers) / n, "steady_s": steady,
            "study_median_s": statistics.median(m["seconds"] for m in markers), "stages_s": stages,
            "background_s": background,
            "aggregate_s_per_study": aggregate_s / n, "wall_s": run["wall_s"], "peak_tree_mb": run["peak_tree_mb"],
            "peak_main_mb": run["peak_main_mb"]}


def _link_farm(studies: list[Path], n: int, root: Path) -> Path:
    """A folder of n study folders: symlinks to `studies`, cycled, each with its own name."""
    folder = root / f"links_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        src = studies[k % len(studies)]
        link = folder / f"{src.name}.{k // len(studies)}"
        if not link.exists():
            link.symlink_to(src.resolve(), target_is_directory=True)
    return folder


def _default_model(work: Path) -> Path:
    """The default-config model folder in WORK/default_model, trained here when missing (DEFAULT_TRAIN_SET)."""
    model = work / "default_model"
    if (model / "model.json").is_file():
        return model
    data = work / "default_train"
    if not (data / "train.csv").is_file():
        cmd = [sys.executable, "-m", "spinefrac", "synth", str(data), "--studies", str(DEFAULT_TRAIN_STUDIES),
               "--seed", str(DEFAULT_TRAIN_SEED), "--slices", str(DEFAULT_TRAIN_SLICES), "--no-progress",
               "--overwrite"]
        for item in DEFAULT_SYNTH_SET:
            cmd += ["--set", item]
        _run(cmd)
    cmd = [sys.executable, "-m", "spinefrac", "train", str(data), "--out", str(model), "--no-progress"]
    for item in DEFAULT_TRAIN_SET:
        cmd += ["--set", item]
    print(f"training a default-config model folder into {model} (about 35 min on 2 cores)", flush=True)
    _run(cmd)
    return model


def _synthesize(work: Path, n: int) -> Path:
    from data_prep.runs.config import load_config
    from data_prep.synthetic.synth import synthesize

    root = work / "studies"
    if not (root / "test_images").is_dir():
        config = load_config("synth", None, [f"image.size={SYNTH_SIZE}", f"volume.slices={SYNTH_SLICES}",
                                             "files.jpeg_lossless_fraction=1.0", "files.rle_fraction=0.0"])
        synthesize(root, n_studies=n, seed=SYNTH_SEED, split="test", config=config, progress=False)
    return root / "test_images"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one child measurement) and print its table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="a model folder (spinefrac train / demo)")
    which.add_argument("--default-model", action="store_true",
                       help="a default-config model folder, trained into WORK/default_model when missing")
    p.add_argument("--studies-dir", type=Path, default=None, help="folder of study folders (default: synthetic)")
    p.add_argument("--studies", type=int, default=20, help="synthetic studies when no --studies-dir")
    p.add_argument("--naive-studies", type=int, default=3, help="studies the naive path runs on (0: skip it)")
    p.add_argument("--rss-studies", type=int, nargs="*", default=[20, 100], help="study counts for peak RSS")
    p.add_argument("--workers", type=int, default=2, help="decode workers (as predict --workers)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--child", choices=("decode", "models", "reference"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--counts", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child = {"decode": _child_decode, "models": _child_models, "reference": _child_reference}[args.child]
        print(json.dumps(child(args)))
        return 0

    import pandas as pd

    from detector.detect import find_studies
    from spinefrac.model_folder import open_model

    os.environ.setdefault("CI", "true")    # no telemetry from OpenVINO in the children
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_predict_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.default_model:
        args.model = _default_model(work)
    args.studies_dir = args.studies_dir or _synthesize(work, args.studies)
    studies = find_studies(args.studies_dir)
    model = open_model(args.model)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    reference_ms = _child("reference", args)["ms_per_image"]
    _predict(_link_farm(studies, 1, work), args.model, work / "warm", args.workers)   # exports, caches, imports
    pred = _predict_figures(work / "predict", _predict(args.studies_dir, args.model, work / "predict", args.workers))
    n_slices = pred["slices_mean"]
    vertebrae = pd.read_csv(work / "predict" / "vertebrae.csv") if (work / "predict" / "vertebrae.csv").is_file() \
        else None
    every_k = int(model.configs["locator"]["locate"]["every_k"])
    counts = {"detector": round(n_slices), "locator": math.ceil(n_slices / every_k),
              "classifier": round(vertebrae["n_crops"].sum() / pred["studies"]) if vertebrae is not None
              and "n_crops" in vertebrae else 0}
    decode = _child("decode", args, batch=str(model.configs["detector"]["detect"]["batch"]))
    decode_s = statistics.mean(decode["per_study_s"])
    models = _child("models", args, counts=json.dumps(counts), out=str(work / "models_out"))
    models_s = sum(models["seconds"].values())
    limit = decode_s + models_s
    naive = None
    if args.naive_studies:
        det = model.configs["detector"]
        folder = _link_farm(studies[:args.naive_studies], args.naive_studies, work / "naive_in")
        cmd = [sys.executable, "-m", "benchmarks.bench_detect_speed", "--child", "naive", "--backend", "pytorch",
               "--weights", str(model.detector_weights), "--studies-dir", str(folder), "--out", str(work / "naive"),
               "--imgsz", str(det["render"]["imgsz"]), "--workers", str(args.workers), "--pydicom-decode"]
        for key in ("recipe", "window_level", "window_width", "neighbour_mm", "windows", "crack_channel",
                    "crack_width_mm", "crack_bone_hu", "crack_full_hu"):
            if key in det["render"]:
                value = det["render"][key]
                cmd += ["--render-set", f"render.{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        res = json.loads(_run(cmd)["stdout"].strip().splitlines()[-1])
        naive = res["wall_s"] / res["n_slices"] * n_slices
    rss = {}
    for n in args.rss_studies:
        run = _predict(_link_farm(studies, n, work), args.model, work / f"rss_{n}", args.workers)
        rss[n] = {"tree_mb": run["peak_tree_mb"], "main_mb": run["peak_main_mb"], "wall_s": run["wall_s"]}
    results = {"studies": pred["studies"], "slices_mean": n_slices, "predict": pred, "decode_s": decode_s,
               "models_s": models["seconds"], "backend": models["backend"], "limit_s": limit, "naive_s": naive,
               "rss": rss, "counts": counts, "reference_ms": reference_ms, "load_before": load, "load_after": os.getloadavg()[0],
               "bench_s": time.perf_counter() - t0}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    _print(results)
    print(f"\n(results: {work / 'results.json'})")
    return 0


def _print(r: dict) -> None:
    pred = r["predict"]
    steady = pred["steady_s"]
    print(f"\nspinefrac predict, {r['studies']} studies, {r['slices_mean']:.0f} slices each on average "
          f"(backend {r['backend']}; load average {r['load_before']:.1f} before, {r['load_after']:.1f} after)")
    scale = REFERENCE_MS / r["reference_ms"]
    rows = [(f"reference: OpenVINO dynamic yolov8n {REFERENCE_IMGSZ} px (ms/image)", f"{r['reference_ms']:.1f}"),
            ("predict, steady state (s/study)", f"{steady:.2f}"),
            (f"  scaled to a {REFERENCE_MS:.0f} ms machine, per 300 slices (x {scale:.2f} x 300 / slices)",
             f"{steady * scale * SYNTH_SLICES / r['slices_mean']:.2f}"),
            ("  end to end: the whole command's wall time / studies (loading, report included)",
             f"{pred['wall_s'] / pred['studies']:.2f}"),
            ("decode alone (s/study)", f"{r['decode_s']:.2f}"),
            ("models alone (s/study): " + ", ".join(f"{k} {v:.2f}" for k, v in r["models_s"].items()),
             f"{sum(r['models_s'].values()):.2f}"),
            ("limit = decode + models (s/study)", f"{r['limit_s']:.2f}"),
            ("predict / limit", f"{steady / r['limit_s']:.2f}")]
    if r["naive_s"] is not None:
        rows += [("naive PNG + YOLO.predict, PyTorch (s/study)", f"{r['naive_s']:.2f}"),
                 ("naive / predict", f"{r['naive_s'] / steady:.1f}x")]
    for n, v in r["rss"].items():
        rows.append((f"peak RSS, {n} studies: process tree / main (MB)", f"{v['tree_mb']:.0f} / {v['main_mb']:.0f}"))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a.ljust(width)}  {b}")
    stages = pred["stages_s"]
    print(f"\n  where the steady {steady:.2f} s per study go on the main thread (done-marker timers):")
    for k, v in stages.items():
        print(f"    {k:<20} {v:6.3f} s  {100 * v / steady:5.1f} %")
    print("  in threads beside it (overlapping the above):")
    for k, v in pred.get("background_s", {}).items():
        print(f"    {k:<20} {v:6.3f} s")
    print(f"  once per run, after the studies: aggregation, tables, report {pred['aggregate_s_per_study']:.3f} s per "
          "study")


if __name__ == "__main__":
    raise SystemExit(main())
