"""Realism of `spinefrac synth`: label and box statistics of a synthetic set next to the real RSNA files.

    python -m benchmarks.bench_realism [--studies 40 --size 512 --slices 300 --seed 0] [--data DIR]

The real column reads ../shared/realdata (train.csv, train_bounding_boxes.csv, vertebrae.csv) and is
left out when those files are absent. The real box CSV has no pixel spacing or slice thickness, so real
millimetres assume a nominal spacing and thickness (printed with the table). Synthetic millimetres use
each study's own PixelSpacing and SliceThickness. Label statistics are also given for 5000 planned
synthetic studies (labels only, nothing rendered), where sampling noise is small.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from data_prep.realdata import realdata_file
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from data_prep.synthetic.synth import plan_studies, synthesize

NOMINAL_SPACING_MM = 0.35
"""Assumed real pixel spacing (real studies: about 0.23-0.5 mm, mostly 0.3-0.4)."""
NOMINAL_THICKNESS_MM = 0.625
"""Assumed real slice spacing (real studies: about 0.5-1 mm)."""
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
PLANNED_STUDIES = 5000


def runs(numbers: pd.Series) -> int:
    """Number of contiguous runs of slice numbers."""
    s = np.sort(numbers.unique())
    return int(1 + (np.diff(s) > 1).sum()) if len(s) else 0


def quant(values: np.ndarray | pd.Series) -> str:
    """Quantiles 10/25/50/75/90 as one cell."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return "-"
    return " / ".join(f"{q:.0f}" if abs(q) >= 10 else f"{q:.1f}" for q in np.quantile(v, QUANTILES))


def label_stats(labels: pd.DataFrame) -> dict[str, str]:
    """Positive share, level frequencies among positives, levels per positive study."""
    pos = labels[labels[PATIENT] == 1]
    n_levels = pos[list(LEVELS)].sum(axis=1)
    freq = pos[list(LEVELS)].mean(axis=0)
    dist = n_levels.value_counts(normalize=True).sort_index()
    order = " > ".join(freq.sort_values(ascending=False, kind="stable").index)
    return {
        "studies": f"{len(labels)}",
        "positive share": f"{len(pos) / max(len(labels), 1):.3f}",
        "level share of positives C1..C7": " ".join(f"{freq[lv]:.2f}" for lv in LEVELS),
        "level order": order,
        "levels per positive 1/2/3/4+": " / ".join(
            f"{dist.get(k, 0.0):.2f}" for k in (1, 2, 3)) + f" / {dist[dist.index >= 4].sum():.2f}",
    }


def box_stats(boxes: pd.DataFrame, labels: pd.DataFrame, spacing: pd.Series | float,
              thickness: pd.Series | float) -> dict[str, str]:
    """Box sizes (px, mm), boxed slices and runs per boxed study, boxed share of positives."""
    sp = spacing if np.isscalar(spacing) else boxes[STUDY_COL].map(spacing)
    per = boxes.groupby(STUDY_COL)["slice_number"]
    n_slices = per.nunique()
    th = thickness if np.isscalar(thickness) else n_slices.index.map(thickness).to_numpy()
    run_counts = per.apply(runs)
    n_pos = int((labels[PATIENT] == 1).sum())
    return {
        "boxed studies / positive": f"{len(n_slices)} / {n_pos} = {len(n_slices) / max(n_pos, 1):.2f}",
        "boxes per slice (max)": f"{int(boxes.groupby([STUDY_COL, 'slice_number']).size().max())}",
        "box width px": quant(boxes["width"]),
        "box height px": quant(boxes["height"]),
        "box width mm": quant(boxes["width"] * sp),
        "box height mm": quant(boxes["height"] * sp),
        "boxed slices per boxed study": quant(n_slices),
        "boxed extent mm per study": quant(n_slices.to_numpy() * th),
        "runs per boxed study: mean": f"{run_counts.mean():.2f}",
        "runs per boxed study 1/2/3+": " / ".join(
            f"{(run_counts == k).mean():.2f}" for k in (1, 2)) + f" / {(run_counts >= 3).mean():.2f}",
    }


def two_level_share(presence: pd.DataFrame) -> dict[str, str]:
    """Share of slices holding two or more cervical vertebrae (of slices with any, and of all slices)."""
    n = presence[list(LEVELS)].sum(axis=1)
    per_study = presence.assign(n=n).groupby(STUDY_COL)["n"]
    cerv = per_study.apply(lambda s: (s >= 1).sum())
    return {
        "slices with >=2 vertebrae / cervical slices": f"{(n >= 2).sum() / max((n >= 1).sum(), 1):.2f}",
        "slices with >=2 vertebrae / all slices": f"{(n >= 2).mean():.2f}",
        "cervical slices per study": quant(cerv),
        "cervical share of the study's slices": f"{(n >= 1).mean():.2f}",
    }


def real_column() -> dict[str, str] | None:
    """Statistics of the real files, or None when they are absent."""
    train, bb, vert = (realdata_file(n) for n in ("train.csv", "train_bounding_boxes.csv", "vertebrae.csv"))
    if train is None or bb is None:
        return None
    labels = pd.read_csv(train)
    out = label_stats(labels)
    out.update(box_stats(pd.read_csv(bb), labels, NOMINAL_SPACING_MM, NOMINAL_THICKNESS_MM))
    if vert is not None:
        out.update(two_level_share(pd.read_csv(vert)))
    return out


def synthetic_column(root: Path) -> dict[str, str]:
    """Statistics of a synthetic dataset root (train split)."""
    labels = pd.read_csv(root / "train.csv")
    boxes = pd.read_csv(root / "train_bounding_boxes.csv")
    spacing, thickness = {}, {}
    for uid in labels[STUDY_COL]:
        first = next((root / "train_images" / uid).glob("*.dcm"))
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        spacing[uid], thickness[uid] = float(ds.PixelSpacing[0]), float(ds.SliceThickness)
    out = label_stats(labels)
    out.update(box_stats(boxes, labels, pd.Series(spacing), pd.Series(thickness)))
    out.update(two_level_share(pd.read_csv(root / "truth" / "slice_levels.csv")))
    return out


def planned_column(seed: int, cfg) -> dict[str, str]:
    """Label statistics of many planned (not rendered) synthetic studies."""
    plans = plan_studies(PLANNED_STUDIES, seed=seed, split="train", config=cfg)
    rows = [{STUDY_COL: p.uid, PATIENT: int(bool(p.levels)), **{lv: int(lv in p.levels) for lv in LEVELS}}
            for p in plans]
    return label_stats(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> int:
    """Generate (or read) a synthetic set and print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="analyse this existing synthetic root instead")
    args = ap.parse_args(argv)
    cfg = load_config("synth", None, [f"image.size={args.size}", f"volume.slices={args.slices}"])
    with tempfile.TemporaryDirectory(prefix="bench_realism_") as tmp:
        root = args.data
        gen_s = None
        if root is None:
            root = Path(tmp) / "synth"
            t0 = time.perf_counter()
            synthesize(root, n_studies=args.studies, seed=args.seed, config=cfg, progress=True)
            gen_s = time.perf_counter() - t0
        synth = synthetic_column(root)
    planned = planned_column(args.seed, cfg)
    real = real_column()
    keys = list(dict.fromkeys([*(real or {}), *synth]))
    cols = ["statistic", "real" if real else "real (absent)", f"synthetic ({synth['studies']} studies)",
            f"synthetic labels ({PLANNED_STUDIES} planned)"]
    rows = [[k, (real or {}).get(k, "-"), synth.get(k, "-"), planned.get(k, "")] for k in keys]
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"\nquantiles are 10/25/50/75/90 %. Real mm assume {NOMINAL_SPACING_MM} mm pixels and "
          f"{NOMINAL_THICKNESS_MM} mm slices (the real CSVs carry neither). Synthetic set: size {args.size}, "
          f"~{args.slices} slices, seed {args.seed}"
          + (f", generated in {gen_s:.0f} s ({gen_s / args.studies:.1f} s/study)" if gen_s else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
