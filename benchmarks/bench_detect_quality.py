"""Detection quality on held-out synthetic studies: box AP50, slice sensitivity/specificity, CPU training time.

    python -m benchmarks.bench_detect_quality --train-studies 30 --test-studies 10 --epochs 30 --imgsz 384

Steps: `spinefrac synth` a training set (seed S) and a held-out test set (seed S+1, labels hidden under
truth/), prepare-detector, train-detector on the CPU (timed), detect on the held-out test_images/, then
score boxes.csv against truth/train_bounding_boxes.csv:
  box AP50     every predicted box (score >= detect.conf), best first, is a true positive when it overlaps
               a not-yet-matched truth box on the same slice with IoU >= 0.5; AP from the precision-recall
               curve with Ultralytics' `compute_ap` (the interpolation Ultralytics val uses).
  slices       a slice is positive when it holds a truth box; predicted positive when its max box score
               >= the threshold; sensitivity and specificity at --thresholds, and the slice-level ROC AUC.
Issue target: AP50 >= 0.7 after <= 45 min of CPU training on >= 30 training studies (quiet machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.runs.registry import STUDY_COL

IOU_MATCH = 0.5
DEFAULT_THRESHOLDS = (0.25, 0.5)   # 0.25 is Ultralytics' default predict confidence


def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (n, 4) and (m, 4) upper-left x, y, width, height boxes."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ap50(pred: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """AP at IoU 0.5 of predicted boxes against truth boxes matched per (study, slice_number)."""
    from ultralytics.utils.metrics import compute_ap

    pred = pred.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    tp = np.zeros(len(pred), dtype=bool)
    groups = {k: g[["x", "y", "width", "height"]].to_numpy(float)
              for k, g in truth.groupby([STUDY_COL, "slice_number"])}
    used = {k: np.zeros(len(v), dtype=bool) for k, v in groups.items()}
    for i, r in enumerate(pred.itertuples(index=False)):
        key = (r.StudyInstanceUID, int(r.slice_number))
        gt = groups.get(key)
        if gt is None:
            continue
        ious = iou_xywh(np.array([[r.x, r.y, r.width, r.height]]), gt)[0]
        ious[used[key]] = -1.0
        j = int(ious.argmax())
        if ious[j] >= IOU_MATCH:
            tp[i] = True
            used[key][j] = True
    n_gt = len(truth)
    if n_gt == 0:
        return {"ap50": float("nan"), "n_truth": 0, "n_pred": len(pred), "recall_max": float("nan")}
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(pred) + 1)
    ap, _, _ = compute_ap(recall, precision) if len(pred) else (0.0, None, None)
    return {"ap50": float(ap), "n_truth": n_gt, "n_pred": len(pred),
            "recall_max": float(recall[-1]) if len(pred) else 0.0}


def slice_metrics(slices: pd.DataFrame, truth: pd.DataFrame, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Slice-level sensitivity/specificity at each threshold, and ROC AUC, from slices.csv max scores."""
    from sklearn.metrics import roc_auc_score

    positive = set(zip(truth[STUDY_COL], truth["slice_number"].astype(int), strict=True))
    y = np.array([(u, int(n)) in positive for u, n in zip(slices[STUDY_COL], slices["slice_number"], strict=True)])
    s = slices["max_score"].to_numpy(float)
    out: dict[str, float] = {"slices": len(y), "positive_slices": int(y.sum())}
    if 0 < y.sum() < len(y):
        out["auc"] = float(roc_auc_score(y, s))
    for t in thresholds:
        pred = s >= t
        out[f"sens@{t}"] = float((pred & y).sum() / max(y.sum(), 1))
        out[f"spec@{t}"] = float((~pred & ~y).sum() / max((~y).sum(), 1))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-studies", type=int, default=30)
    p.add_argument("--test-studies", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=384)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=None, help="synthetic image rows=cols (synth image.size)")
    p.add_argument("--slices", type=int, default=None, help="synthetic slices per study (synth volume.slices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument("--work", type=Path, default=None, help="keep everything here (default: a temp folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="detector config override")
    p.add_argument("--synth-set", dest="synth_overrides", action="append", default=[],
                   help="synth config override, e.g. labels.box_fraction=1.0 (repeatable)")
    args = p.parse_args(argv)

    from data_prep.runs.config import load_config
    from data_prep.synthetic.synth import synthesize
    from detector.detect import detect_studies
    from detector.train import train_yolo
    from detector.yolo_dataset import prepare_detector_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_detect_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    synth_set = [f"image.size={args.size}"] if args.size else []
    synth_set += [f"volume.slices={args.slices}"] if args.slices else []
    synth_set += list(args.synth_overrides)
    times: dict[str, float] = {}

    t = time.perf_counter()
    train_root, test_root = work / "synth_train", work / "synth_test"
    if not (train_root / "train.csv").is_file():
        synthesize(train_root, n_studies=args.train_studies, seed=args.seed, split="train",
                   config=load_config("synth", None, synth_set), progress=False)
    if not (test_root / "truth").is_dir():
        synthesize(test_root, n_studies=args.test_studies, seed=args.seed + 1, split="test",
                   config=load_config("synth", None, synth_set), progress=False)
    times["synth_s"] = time.perf_counter() - t

    config = load_config("detector", None, [f"render.imgsz={args.imgsz}", f"train.epochs={args.epochs}",
                                            f"train.batch={args.batch}", "train.device=cpu", "detect.overlays=false",
                                            *args.overrides])
    t = time.perf_counter()
    data_yaml = prepare_detector_dataset(train_root, work / "dataset", config=config, workers=args.workers,
                                         progress=False)
    times["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run = train_yolo(data_yaml, work / "run", config=config)
    times["train_s"] = time.perf_counter() - t

    out = work / "detect"
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    result = detect_studies(test_root / "test_images", weights=run / "weights" / "best.pt", out=out,
                            config=config, workers=args.workers, progress=False)
    times["detect_s"] = time.perf_counter() - t

    truth = pd.read_csv(test_root / "truth" / "train_bounding_boxes.csv", dtype={STUDY_COL: str})
    boxes = pd.read_csv(out / "boxes.csv", dtype={STUDY_COL: str})
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    box = box_ap50(boxes, truth)
    sl = slice_metrics(slices, truth, tuple(args.thresholds))
    dataset = pd.read_csv(work / "dataset" / "index.csv")
    val = json.loads((run / "train.meta.json").read_text()).get("extra", {}).get("final_metrics", {}) \
        if (run / "train.meta.json").is_file() else {}

    rows = [
        ("training studies / test studies", f"{args.train_studies} / {args.test_studies}"),
        ("training images (train / val)", f"{(dataset['split'] == 'train').sum()} / {(dataset['split'] == 'val').sum()}"),
        ("imgsz / epochs / batch", f"{args.imgsz} / {args.epochs} / {args.batch}"),
        ("CPU training time", f"{times['train_s'] / 60:.1f} min"),
        ("Ultralytics val mAP50 (val fold)", f"{val.get('metrics/mAP50(B)', float('nan')):.3f}"),
        ("held-out box AP50", f"{box['ap50']:.3f}"),
        ("held-out truth boxes / predicted boxes", f"{box['n_truth']} / {box['n_pred']}"),
        ("max recall at detect.conf", f"{box['recall_max']:.3f}"),
        ("slice ROC AUC", f"{sl.get('auc', float('nan')):.3f}"),
        *[(f"slice sensitivity / specificity @ {t}", f"{sl[f'sens@{t}']:.3f} / {sl[f'spec@{t}']:.3f}")
          for t in args.thresholds],
        ("slices (positive)", f"{sl['slices']} ({sl['positive_slices']})"),
        ("detect: ms per slice", f"{1000 * times['detect_s'] / max(result.n_slices, 1):.1f}"),
        ("synth / prepare / detect time", f"{times['synth_s']:.0f} s / {times['prepare_s']:.0f} s / "
                                          f"{times['detect_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nDetection quality (work folder {work}; machine shared with other jobs, timings noisy)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    target = box["ap50"] >= 0.7 and times["train_s"] <= 45 * 60 and args.train_studies >= 30
    print(f"  {'issue target (AP50>=0.7, <=45 min, >=30 studies)':<{width}}  {'met' if target else 'not met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
