"""Does the crack channel tell broken vertebrae from whole ones before any training, and what does it cost to render?

    python -m benchmarks.bench_crack_signal --studies 24 --work /tmp/bench_crack
    (or --data DIR: a synthetic test set with truth/, e.g. one written by `spinefrac synth --split test`)

Steps:
  1. `spinefrac synth --split test` --studies held-out studies with hairline fractures (--synth-set, default: gaps
     0.3-1.0 mm, step-off 0-1 mm, no minimum in pixels, vascular channels in 60% of vertebral bodies), unless --data.
  2. Every slice with a truth fracture box (truth/fracture_boxes.csv) is a "fractured" sample: the box, on the
     level(s) it names. For every such level, slices of negative studies (patient_overall = 0) where that level has
     a truth vertebra box (truth/level_boxes.csv) are "normal" samples: that box, up to --normals-per-fracture
     times as many, drawn evenly. Normal boxes enclose the whole vertebra and fracture boxes only the broken
     element(s), so a max over a box favours the normals: the comparison is conservative.
  3. Each sample's slice is filtered at its own pixels and spacing, and three statistics of the uint8 channel are
     taken inside the box: mean, 99th percentile, max. Filters:
       crack channel   detector.crack_filter (configs/detector.yaml render crack_* defaults, or --render-set)
       disc top-hat    control: a plain black top-hat with a disc of the same width, same bone mask and scale
                       (what the crack channel adds by following the bone surface)
  4. Cost: `render_crops` of --timing-slices slices as the detector's ROI crops (100 mm -> 288 px) and as whole
     slices (512 px -> 288), and as the classifier's crops (46 mm -> 96 px), with and without the crack channel;
     ms per image, one OpenCV thread (as in prepare workers), median of --repeats: wall time and this process's
     CPU time (the CPU time holds on a loaded machine, where wall time grows with the load).
Reported: per filter and statistic, the mean over fractured and over normal samples and the AUC of the statistic
(fractured vs normal; 0.5 = no signal); the render costs. Run it on a quiet machine for the costs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.runs.registry import PATIENT, STUDY_COL

SUBTLE_SET = ["fracture.gap_mm=[0.3, 1.0]", "fracture.shift_mm=[0.0, 1.0]", "fracture.min_gap_px=0",
              "fracture.min_shift_px=0", "anatomy.vascular_channel_prob=0.6"]
"""Hairline fractures beside vascular channels (issue 24's subtle world, approximately)."""
STATS: tuple[str, ...] = ("mean", "p99", "max")
PERCENTILE = 99.0
ROI_MM, ROI_PX, CLASSIFIER_MM, CLASSIFIER_PX = 100.0, 288, 46.0, 96
"""configs/detector.yaml roi.size_mm and render.imgsz; the classifier's typical crop (30 mm + 2 x 8 mm) and imgsz."""


def disc_tophat(hu: np.ndarray, spacing: tuple[float, float], render: dict) -> np.ndarray:
    """The control: black top-hat with a disc `crack_width_mm` wide, masked and scaled like the crack channel."""
    import cv2

    from detector.crack_filter import CLIP_HIGH_HU, CLIP_LOW_HU, line_length_px, to_uint8

    width = float(render["crack_width_mm"])
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (line_length_px(width, spacing[1]),
                                                         line_length_px(width, spacing[0])))
    image = np.clip(hu.astype(np.float32), CLIP_LOW_HU, CLIP_HIGH_HU)
    closed = cv2.morphologyEx(image, cv2.MORPH_CLOSE, disc)
    response = closed - image
    response[closed < float(render["crack_bone_hu"])] = 0.0
    return to_uint8(response, float(render["crack_full_hu"]))


def crack_full(hu: np.ndarray, spacing: tuple[float, float], render: dict) -> np.ndarray:
    """The crack channel of a whole slice at its own pixels (uint8)."""
    from detector.crack_filter import crack_response, to_uint8

    response = crack_response(hu, spacing, width_mm=float(render["crack_width_mm"]),
                              bone_hu=float(render["crack_bone_hu"]))
    return to_uint8(response, float(render["crack_full_hu"]))


FILTERS = {"crack channel": crack_full, "disc top-hat": disc_tophat}


def samples(root: Path, normals_per_fracture: float) -> pd.DataFrame:
    """Fractured and normal samples: study, slice_index, level, box (original px), fractured (0/1)."""
    truth = root / "truth"
    boxes = pd.read_csv(truth / "fracture_boxes.csv", dtype={STUDY_COL: str})
    levels = pd.read_csv(truth / "level_boxes.csv", dtype={STUDY_COL: str})
    labels = pd.read_csv(truth / "train.csv", dtype={STUDY_COL: str})
    negatives = set(labels.loc[labels[PATIENT] == 0, STUDY_COL])
    rows = []
    for r in boxes.itertuples(index=False):
        for level in str(r.levels).split("|"):
            rows.append({STUDY_COL: r.StudyInstanceUID, "slice_index": int(r.slice_index), "level": level,
                         "x": r.x, "y": r.y, "width": r.width, "height": r.height, "fractured": 1})
    fractured = pd.DataFrame(rows)
    normal_pool = levels[levels[STUDY_COL].isin(negatives)]
    normals = []
    for level, n in fractured["level"].value_counts().items():
        pool = normal_pool[normal_pool["level"] == level]
        take = min(len(pool), int(round(n * normals_per_fracture)))
        if take:
            picks = np.linspace(0, len(pool) - 1, take).round().astype(int)
            normals.append(pool.iloc[picks].assign(fractured=0))
    cols = [STUDY_COL, "slice_index", "level", "x", "y", "width", "height", "fractured"]
    return pd.concat([fractured, *normals], ignore_index=True)[cols]


def box_stats(channel: np.ndarray, box: tuple[float, float, float, float]) -> dict[str, float]:
    """Mean, 99th percentile and max of a uint8 channel inside an original-pixel (x, y, w, h) box."""
    x, y, w, h = box
    rows, cols = channel.shape
    x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
    x1, y1 = min(int(np.ceil(x + w)), cols), min(int(np.ceil(y + h)), rows)
    values = channel[y0:y1, x0:x1].astype(np.float64).ravel()
    if not values.size:
        return dict.fromkeys(STATS, float("nan"))
    return {"mean": float(values.mean()), "p99": float(np.percentile(values, PERCENTILE)), "max": float(values.max())}


def measure_signal(root: Path, render: dict, normals_per_fracture: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Filter every sample's slice; return (per-sample statistics, summary per filter and statistic)."""
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.slice_file import read_slice_hu

    table = samples(root, normals_per_fracture)
    images = root / "test_images" if (root / "test_images").is_dir() else root / "train_images"
    out = []
    for uid, group in tqdm(table.groupby(STUDY_COL), desc="crack signal", unit="study"):
        geometry = scan_study(images / uid)
        spacing = (float(geometry.pixel_spacing[0]), float(geometry.pixel_spacing[1]))
        for index, rows in group.groupby("slice_index"):
            hu = read_slice_hu(geometry.paths[int(index)])
            channels = {name: fn(hu, spacing, render) for name, fn in FILTERS.items()}
            for r in rows.itertuples(index=False):
                for name, channel in channels.items():
                    stats = box_stats(channel, (r.x, r.y, r.width, r.height))
                    out.append({STUDY_COL: uid, "slice_index": int(index), "level": r.level,
                                "fractured": int(r.fractured), "filter": name, **stats})
    per_sample = pd.DataFrame(out)
    summary = []
    for name, g in per_sample.groupby("filter", sort=False):
        for stat in STATS:
            ok = g.dropna(subset=[stat])
            summary.append({"filter": name, "statistic": stat,
                            "fractured_mean": float(ok.loc[ok["fractured"] == 1, stat].mean()),
                            "normal_mean": float(ok.loc[ok["fractured"] == 0, stat].mean()),
                            "auc": float(roc_auc_score(ok["fractured"], ok[stat]))
                            if ok["fractured"].nunique() == 2 else float("nan"),
                            "n_fractured": int((ok["fractured"] == 1).sum()),
                            "n_normal": int((ok["fractured"] == 0).sum())})
    return per_sample, pd.DataFrame(summary)


def measure_cost(root: Path, render: dict, n_slices: int, repeats: int) -> pd.DataFrame:
    """ms per rendered image with and without the crack channel: ROI crops, whole slices, classifier crops."""
    import cv2

    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.slice_file import read_slice_hu
    from detector.render import render_crops

    images = root / "test_images" if (root / "test_images").is_dir() else root / "train_images"
    geometry = scan_study(sorted(p for p in images.iterdir() if p.is_dir())[0])
    middle = len(geometry.paths) // 2
    indices = list(range(max(middle - n_slices // 2, 0), min(middle - n_slices // 2 + n_slices, len(geometry.paths))))
    cache = {i: read_slice_hu(geometry.paths[i]) for i in indices}

    class Source:
        def get(self, index: int) -> np.ndarray:
            i = min(max(int(index), indices[0]), indices[-1])
            return cache[i]

    rows, cols = geometry.shape
    spacing = float(geometry.pixel_spacing[0])
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    out = []
    try:
        for what, side_mm, imgsz in (("ROI crop", ROI_MM, ROI_PX), ("whole slice", None, ROI_PX),
                                     ("classifier crop", CLASSIFIER_MM, CLASSIFIER_PX)):
            side = int(round(side_mm / spacing)) if side_mm else None
            box = [cols // 2 - side // 2, rows // 2 - side // 2, side, side] if side else [0, 0, cols, rows]
            crops = np.array([box] * len(indices))
            wall, cpu = {}, {}
            for label, channel in (("2.5d", None), ("crack", 2)):
                cfg = {**render, "imgsz": imgsz, "recipe": "2.5d", "crack_channel": channel}
                render_crops(Source(), indices, geometry, crops, render=cfg, pad_hu=-1000.0)   # warm-up
                runs, cpu_runs = [], []
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    render_crops(Source(), indices, geometry, crops, render=cfg, pad_hu=-1000.0)
                    runs.append((time.perf_counter() - t0) * 1000.0 / len(indices))
                    cpu_runs.append((time.process_time() - c0) * 1000.0 / len(indices))
                wall[label], cpu[label] = float(np.median(runs)), float(np.median(cpu_runs))
            out.append({"image": what, "native_px": f"{box[2]}x{box[3]}", "imgsz": imgsz,
                        "ms_2.5d": round(wall["2.5d"], 2), "ms_crack": round(wall["crack"], 2),
                        "ms_added": round(wall["crack"] - wall["2.5d"], 2),
                        "cpu_ms_2.5d": round(cpu["2.5d"], 2), "cpu_ms_crack": round(cpu["crack"], 2),
                        "cpu_ms_added": round(cpu["crack"] - cpu["2.5d"], 2)})
    finally:
        cv2.setNumThreads(previous)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and write them into --work."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="an existing synthetic test set with truth/")
    p.add_argument("--work", type=Path, default=None, help="folder for the synthesised set and the tables")
    p.add_argument("--studies", type=int, default=24, help="studies to synthesise (without --data)")
    p.add_argument("--seed", type=int, default=5, help="synth seed")
    p.add_argument("--slices", type=int, default=100, help="approximate slices per synthesised study")
    p.add_argument("--synth-set", nargs="*", default=SUBTLE_SET, help="synth config overrides")
    p.add_argument("--render-set", nargs="*", default=[], help="detector config overrides, e.g. render.crack_width_mm=1.5")
    p.add_argument("--normals-per-fracture", type=float, default=2.0, help="normal samples per fractured sample")
    p.add_argument("--timing-slices", type=int, default=16, help="slices rendered per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings repeated (median)")
    p.add_argument("--workers", type=int, default=2, help="synth processes")
    args = p.parse_args(argv)

    from data_prep.runs.config import load_config
    from data_prep.synthetic.synth import synthesize

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_crack_"))
    work.mkdir(parents=True, exist_ok=True)
    root = args.data
    if root is None:
        root = work / "test"
        if not (root / "truth" / "fracture_boxes.csv").is_file():
            cfg = load_config("synth", None, [*args.synth_set, f"volume.slices={args.slices}"])
            synthesize(root, n_studies=args.studies, seed=args.seed, split="test", config=cfg, overwrite=True,
                       workers=args.workers)
    render = load_config("detector", None, args.render_set).render.to_dict()
    t0 = time.perf_counter()
    per_sample, summary = measure_signal(root, render, args.normals_per_fracture)
    signal_s = time.perf_counter() - t0
    cost = measure_cost(root, render, args.timing_slices, args.repeats)
    per_sample.to_csv(work / "crack_signal_samples.csv", index=False)
    (work / "crack_signal.json").write_text(json.dumps(
        {"data": str(root), "render": render, "synth_set": args.synth_set if args.data is None else None,
         "signal": summary.to_dict("records"), "cost": cost.to_dict("records"),
         "signal_seconds": round(signal_s, 1)}, indent=2), encoding="utf-8")
    pd.set_option("display.width", 200)
    print(f"crack signal on {root} ({summary['n_fractured'].iloc[0]} fractured, {summary['n_normal'].iloc[0]} "
          f"normal samples; {signal_s:.0f} s)")
    print(summary.drop(columns=["n_fractured", "n_normal"]).round(3).to_string(index=False))
    print("\nrender cost per image (ms, one OpenCV thread; wall and CPU time)")
    print(cost.to_string(index=False))
    print(f"\ntables in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
