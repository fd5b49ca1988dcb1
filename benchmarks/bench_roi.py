"""Full-slice detector vs spine-ROI detector on the same held-out full-field synthetic studies, same CPU budget.

    python -m benchmarks.bench_roi --train-studies 120 --test-studies 40 --budget-min 6 --work /tmp/bench_roi
    (add --reuse-locator DIR to skip training the locator: a locator run folder, e.g. an earlier run's
    model_roi/locator)

Steps (everything through the library, as `spinefrac train` / `predict` / `evaluate` run it):
  1. `spinefrac synth` a training set (seed S) and a held-out test set (seed S+1) of full-field studies
     (512 px over 150-220 mm, the synth defaults) with the demo's label settings.
  2. Model "roi": `spinefrac train` with the ROI on (the locator is trained first and centres the crops).
  3. Model "full": `spinefrac train` with roi.enabled=false and whole slices at --full-imgsz, reusing model
     roi's locator (pipeline `locator.reuse`), so both differ only in the detector.
     Both detectors get the same wall-clock budget (`train.time`, Ultralytics fits the epochs to it).
  4. `spinefrac predict` on the test studies with each model, then `spinefrac evaluate` against the hidden labels.
Reported per model:
  box AP50            predicted boxes vs truth boxes (IoU >= 0.5, benchmarks.bench_detect_quality.box_ap50)
  hit@FP              share of truth boxed slices with a predicted box overlapping a truth box (IoU >= --hit-iou)
                      at the score threshold where far slices (negative studies, and slices more than
                      --far-slices from any boxed slice) carry --false-rate false boxes per slice
  loss / AUC          competition metric per study and global, patient AUC; beside the constant training prior
                      and the max-box-score rule on the same studies
  detect ms/slice     predict's detect stage wall time per slice, and the model's own share
  containment         share of truth boxes wholly inside their slice's ROI (1 for whole slices), and for other
                      ROI sizes around the same centres (how roi.size_mm was chosen)
Compare the models as ratios within one run: machines of this kind differ up to 4x in speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.bench_detect_quality import box_ap50, iou_xywh
from data_prep.runs.registry import STUDY_COL

DEMO_LABELS = ["labels.box_fraction=1.0", "labels.segmentation_fraction=0.3"]
DEMO_WORLD = "coarse"           # the demo's fractures (configs/worlds.yaml)
SIZES_MM = (60.0, 80.0, 100.0, 120.0, 140.0)
MINUTES_PER_HOUR = 60.0
DEFAULT_ROI_MM = 100.0       # configs/detector.yaml roi.size_mm


def false_rate_threshold(boxes: pd.DataFrame, far: pd.DataFrame, rate: float) -> float:
    """Smallest score threshold at which boxes on `far` slices number at most `rate` per far slice."""
    keys = set(zip(far[STUDY_COL], far["slice_index"], strict=True))
    on_far = np.sort(np.array([s for u, i, s in zip(boxes[STUDY_COL], boxes["slice_index"], boxes["score"],
                                                    strict=True) if (u, i) in keys]))[::-1]
    allowed = int(np.floor(rate * len(far)))
    if len(on_far) <= allowed:
        return 0.0
    return float(np.nextafter(on_far[allowed], np.inf))


def hit_rate(boxes: pd.DataFrame, truth: pd.DataFrame, threshold: float, min_iou: float) -> float:
    """Share of truth boxed slices where a box with score >= threshold overlaps a truth box with IoU >= min_iou."""
    kept = boxes[boxes["score"] >= threshold]
    pred = {k: g[["x", "y", "width", "height"]].to_numpy(float) for k, g in kept.groupby([STUDY_COL, "slice_number"])}
    hits = []
    for key, g in truth.groupby([STUDY_COL, "slice_number"]):
        p = pred.get(key)
        hits.append(p is not None and bool((iou_xywh(p, g[["x", "y", "width", "height"]].to_numpy(float))
                                            >= min_iou).any()))
    return float(np.mean(hits)) if hits else float("nan")


def far_slices(slices: pd.DataFrame, truth: pd.DataFrame, labels: pd.DataFrame, margin: int) -> pd.DataFrame:
    """Slices of negative studies, and of boxed studies more than `margin` slices from any boxed slice."""
    negatives = set(labels.loc[labels["patient_overall"] == 0, STUDY_COL].astype(str))
    boxed_index = {}
    for uid, g in slices.groupby(STUDY_COL):
        t = truth[truth[STUDY_COL] == uid]
        if len(t):
            numbers = g.set_index("slice_number")["slice_index"]
            boxed_index[uid] = numbers.reindex(t["slice_number"].unique()).dropna().to_numpy(int)
    keep = []
    for r in slices[[STUDY_COL, "slice_index"]].itertuples(index=False):
        uid = getattr(r, STUDY_COL)
        if uid in negatives:
            keep.append(True)
        elif uid in boxed_index and len(boxed_index[uid]):
            keep.append(bool(np.abs(boxed_index[uid] - r.slice_index).min() > margin))
        else:
            keep.append(False)
    return slices[np.array(keep, dtype=bool)]


def containment(slices: pd.DataFrame, truth: pd.DataFrame, size_mm: float,
                sizes_mm: tuple[float, ...] = SIZES_MM) -> dict[str, float]:
    """Share of truth boxes wholly inside their slice's ROI, as made and for other sizes around its centre."""
    s = slices.set_index([STUDY_COL, "slice_number"])
    t = truth.join(s[["roi_x", "roi_y", "roi_width", "roi_height", "roi_source"]], on=[STUDY_COL, "slice_number"])
    t = t.dropna(subset=["roi_x"])
    x1, y1 = t["x"].to_numpy(float), t["y"].to_numpy(float)
    x2, y2 = x1 + t["width"].to_numpy(float), y1 + t["height"].to_numpy(float)
    rx, ry = t["roi_x"].to_numpy(float), t["roi_y"].to_numpy(float)
    rw, rh = t["roi_width"].to_numpy(float), t["roi_height"].to_numpy(float)
    out = {"truth_boxes": len(t),
           "as_made": float(np.mean((x1 >= rx) & (y1 >= ry) & (x2 <= rx + rw) & (y2 <= ry + rh))) if len(t) else 0.0}
    cx, cy = rx + rw / 2, ry + rh / 2
    px_x, px_y = size_mm / rw, size_mm / rh        # mm per pixel of each study (the square is size_mm wide)
    for size in sizes_mm:
        hw, hh = size / px_x / 2, size / px_y / 2
        out[f"{size:.0f}mm"] = float(np.mean((x1 >= cx - hw) & (x2 <= cx + hw) & (y1 >= cy - hh) & (y2 <= cy + hh)))
    return out


def detect_timing(pred_dir: Path) -> dict[str, float]:
    """ms per slice of detect in predict (whole study incl. overlays, and per stage) from its done markers."""
    seconds, slices, stages = 0.0, 0, {}
    for marker in sorted((pred_dir / "done").glob("*.json")):
        m = json.loads(marker.read_text(encoding="utf-8"))
        seconds += float(m.get("seconds", 0.0))
        slices += int(m.get("n_slices", 0))
        for k, v in (m.get("timings_s") or {}).items():
            stages[k] = stages.get(k, 0.0) + float(v)
    n = max(slices, 1)
    return {"slices": slices, "ms_per_slice": 1000.0 * seconds / n,
            **{f"{k}_ms": 1000.0 * v / n for k, v in stages.items() if not k.startswith("model_")}}


def run_variant(name: str, data: Path, test: Path, work: Path, detector_set: list[str], locator_set: list[str],
                reuse: Path | None, workers: int) -> dict:
    """Train one model folder, predict the test studies, evaluate; return the figures."""
    from aggregation.evaluate import evaluate_predictions
    from data_prep.runs.config import load_config
    from spinefrac.demo import demo_config
    from spinefrac.pipeline import predict_all, train_all

    sets = [f"detector.set={json.dumps(detector_set)}", f"locator.set={json.dumps(locator_set)}"]
    if reuse is not None:
        sets.append(f"locator.reuse={reuse}")
    base = demo_config(None, [])
    cfg = load_config("pipeline", None, [*sets, f"aggregation.set={json.dumps(list(base.demo.aggregation_set))}"])
    model = work / f"model_{name}"
    t0 = time.perf_counter()
    train_all(data, model, config=cfg, workers=workers, progress=False)
    train_s = time.perf_counter() - t0
    pred = work / f"pred_{name}"
    t0 = time.perf_counter()
    predict_all([test / "test_images"], model_dir=model, out=pred, test_csv=test / "test.csv",
                labels=test / "truth" / "train_bounding_boxes.csv", workers=workers, progress=False)
    predict_s = time.perf_counter() - t0
    report = evaluate_predictions(pred / "predictions.csv", labels=test / "truth" / "train.csv",
                                  boxes=pred / "boxes.csv", prior=model / "prior.json").to_dict()
    meta = json.loads((model / "model.json").read_text(encoding="utf-8"))
    stages = meta.get("stages", {})
    return {"model": str(model), "pred": str(pred), "train_s": round(train_s, 1), "predict_s": round(predict_s, 1),
            "detector_epochs": stages.get("train-detector", {}).get("epochs"),
            "detector_train_s": stages.get("train-detector", {}).get("runtime_s"),
            "val_map50": stages.get("train-detector", {}).get("metrics", {}).get("metrics/mAP50(B)"),
            "roi_cut_share": stages.get("prepare-detector", {}).get("roi_cut_share"),
            "stages": stages, "scores": report["scores"]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-studies", type=int, default=120)
    p.add_argument("--test-studies", type=int, default=40)
    p.add_argument("--slices", type=int, default=100, help="slices per synthetic study (synth volume.slices)")
    p.add_argument("--budget-min", type=float, default=6.0, help="detector training wall time per model (minutes)")
    p.add_argument("--locator-epochs", type=int, default=10)
    p.add_argument("--reuse-locator", type=Path, default=None,
                   help="a trained locator run folder (e.g. an earlier run's model_roi/locator) used by both models")
    p.add_argument("--roi-set", nargs="*", default=["render.imgsz=160", "roi.size_mm=100.0"],
                   help="detector overrides of the ROI model")
    p.add_argument("--full-imgsz", type=int, default=384, help="image size of the whole-slice model (the former default)")
    p.add_argument("--common-set", nargs="*", default=["render.recipe=windows", "prepare.boxed_every=2",
                                                         "train.mosaic=0.0", "train.patience=1000",
                                                         "train.plots=false"],
                   help="detector overrides of both models")
    p.add_argument("--false-rate", type=float, default=0.05, help="false boxes per far slice for hit@FP")
    p.add_argument("--hit-iou", type=float, default=0.3)
    p.add_argument("--far-slices", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keep everything here (default: a new temp folder)")
    args = p.parse_args(argv)

    from data_prep.runs.tables import read_table
    from data_prep.synthetic.synth import synth_config, synthesize

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_roi_"))
    work.mkdir(parents=True, exist_ok=True)
    synth_cfg = synth_config(DEMO_WORLD, None, [f"volume.slices={args.slices}", *DEMO_LABELS])
    data, test = work / "data", work / "test"
    if not (data / "train.csv").is_file():
        synthesize(data, n_studies=args.train_studies, seed=args.seed, split="train", config=synth_cfg,
                   progress=False, overwrite=True)
    if not (test / "test.csv").is_file():
        synthesize(test, n_studies=args.test_studies, seed=args.seed + 1, split="test", config=synth_cfg,
                   progress=False, overwrite=True)
    budget = [f"train.time={args.budget_min / MINUTES_PER_HOUR}"]
    locator_set = ["render.imgsz=128", f"train.epochs={args.locator_epochs}", "train.plots=false"]
    results = {"roi": run_variant("roi", data, test, work, [*args.common_set, *budget, "roi.enabled=true",
                                                             *args.roi_set], locator_set, args.reuse_locator,
                                                             args.workers)}
    results["full"] = run_variant("full", data, test, work,
                                  [*args.common_set, *budget, "roi.enabled=false", f"render.imgsz={args.full_imgsz}"],
                                  locator_set, args.reuse_locator or Path(results["roi"]["model"]) / "locator",
                                  args.workers)

    truth = read_table(test / "truth" / "train_bounding_boxes.csv", "boxes")
    labels = read_table(test / "truth" / "train.csv", "train")
    truth[STUDY_COL] = truth[STUDY_COL].astype(str)
    labels[STUDY_COL] = labels[STUDY_COL].astype(str)
    roi_size = float(next(s.split("=")[1] for s in args.roi_set if s.startswith("roi.size_mm="))) \
        if any(s.startswith("roi.size_mm=") for s in args.roi_set) else DEFAULT_ROI_MM
    for name, res in results.items():
        pred = Path(res["pred"])
        boxes = pd.read_csv(pred / "boxes.csv", dtype={STUDY_COL: str})
        slices = pd.read_csv(pred / "slices.csv", dtype={STUDY_COL: str})
        far = far_slices(slices, truth, labels, args.far_slices)
        thr = false_rate_threshold(boxes, far, args.false_rate)
        res["ap50"] = box_ap50(boxes, truth)["ap50"]
        res["threshold_at_false_rate"] = thr
        res["hit_at_false_rate"] = hit_rate(boxes, truth, thr, args.hit_iou)
        res["detect"] = detect_timing(pred)
        res["containment"] = containment(slices, truth, roi_size if name == "roi" else float("nan"))
    (work / "bench_roi.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(format_table(results, args))
    return 0


def format_table(results: dict, args: argparse.Namespace) -> str:
    """Markdown table of both models side by side."""
    def sc(res: dict, model: str, key: str) -> str:
        scores = res["scores"][model]
        v = scores["auc"].get("patient_overall") if key == "auc_patient_overall" else scores.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    rows = [("box AP50", lambda r: f"{r['ap50']:.3f}"),
            (f"boxed slices hit at {args.false_rate} false boxes / far slice",
             lambda r: f"{r['hit_at_false_rate']:.3f} (score >= {r['threshold_at_false_rate']:.3f})"),
            ("loss per study: model / prior / max score",
             lambda r: " / ".join(sc(r, m, "competition_loss") for m in ("model", "prior", "max_score"))),
            ("loss global: model / prior / max score",
             lambda r: " / ".join(sc(r, m, "global_loss") for m in ("model", "prior", "max_score"))),
            ("patient AUC: model / max score",
             lambda r: " / ".join(sc(r, m, "auc_patient_overall") for m in ("model", "max_score"))),
            ("detect ms per slice (decode / preprocess / model / locate)",
             lambda r: f"{r['detect']['ms_per_slice']:.1f} ({r['detect'].get('decode_ms', 0):.1f} / "
                       f"{r['detect'].get('preprocess_ms', 0):.1f} / {r['detect'].get('model_ms', 0):.1f} / "
                       f"{r['detect'].get('locate_ms', 0):.1f})"),
            ("truth boxes inside the ROI", lambda r: f"{r['containment']['as_made']:.4f}"),
            ("detector training: s / epochs / validation mAP50",
             lambda r: f"{r['detector_train_s']} / {r['detector_epochs']} / {r['val_map50'] or 0:.3f}"),
            ("training boxes cut by the crop", lambda r: f"{r['roi_cut_share'] or 0:.4f}")]
    out = ["| | spine ROI | whole slice |", "|---|---|---|"]
    for label, fn in rows:
        out.append(f"| {label} | {fn(results['roi'])} | {fn(results['full'])} |")
    c = results["roi"]["containment"]
    out.append("\nROI containment by size (same centres): " + ", ".join(
        f"{k} {v:.4f}" for k, v in c.items() if k.endswith("mm")))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
