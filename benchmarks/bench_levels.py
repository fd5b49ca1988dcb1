"""Level decoding benchmarks: real anatomy under corruption, synthetic oracle evidence, and locator predictions.

    python -m benchmarks.bench_levels                     # real per-slice table + synthetic oracle run
    python -m benchmarks.bench_levels --truth-dir data/synth_test \\
        --pred-slices work/pred/slices.csv --pred-level-boxes work/pred/level_boxes.csv
                                                          # score a trained locator on held-out synthetic studies
                                                          # (box_acc: the truth fracture boxes given the predicted levels)

Sections:
1. Real anatomy (../shared/realdata/vertebrae.csv, 87 segmented studies; read in place, skipped if absent):
   how many levels share a slice; then corrupt each study's level sequence (flip presence bits with
   probability p, drop whole sampled slices, zero one level's whole run, sample every k-th slice),
   decode, and compare with the truth: slice accuracy, boundary error, against raw thresholding and a
   relative-z baseline (leave-one-study-out mean fractional extents).
2. Synthetic oracle: truth level boxes of synthetic studies as locator detections, with noise; decoded
   with `locate_study`; fracture boxes assigned with `assign_boxes` and checked against fractures.csv.
3. Locator predictions (with --pred-*): the same scores for a real locator run on held-out studies.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.realdata import realdata_file
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.level_prior import CLEAN_GAP, clean_levels
from detector.levels import assign_boxes, decode_sampled, locate_study, relative_z_levels

PRESENT_SCORE = 0.8
"""Presence score given to a (corrupted) bit 1 of the real table; bit 0 gets 1 - PRESENT_SCORE."""
SEED = 0
SYNTH_SLICES = 150
"""Slices per synthetic study of the oracle run (about 1.3 mm thick, real studies 0.5-1.25 mm)."""
REAL_SPAN_MM = 144.4
"""The real table has no slice spacing: each study's is taken as this C1-top..C7-bottom length (the synthetic
phantom's mean, as configs/levels.yaml's default prior) over its span in slices (decode.model "sizes")."""


@dataclass(frozen=True)
class Corruption:
    """One corruption setting of a level sequence."""

    name: str
    noise: float = 0.0     # probability of flipping each presence bit on a sampled slice
    drop: float = 0.0      # share of sampled slices on which the locator found nothing
    zero_run: bool = False  # one random level has no evidence at all
    k: int = 1             # locator runs on every k-th slice


SCENARIOS: tuple[Corruption, ...] = (
    Corruption("clean k=1"),
    Corruption("noise 0.1", noise=0.1),
    Corruption("noise 0.2", noise=0.2),
    Corruption("noise 0.3", noise=0.3),
    Corruption("drop 0.3", drop=0.3),
    Corruption("zero one run", zero_run=True),
    Corruption("k=4", k=4),
    Corruption("k=4 noise 0.2 drop 0.2", noise=0.2, drop=0.2, k=4),
    Corruption("k=8 noise 0.2", noise=0.2, k=8),
    Corruption("k=4 noise 0.2 zero run", noise=0.2, zero_run=True, k=4),
)


# ---------------------------------------------------------------- truth and metrics
def spans(bits: np.ndarray) -> list[tuple[int, int] | None]:
    """First and last slice of each level (None when absent)."""
    out: list[tuple[int, int] | None] = []
    for j in range(bits.shape[1]):
        idx = np.nonzero(bits[:, j])[0]
        out.append((int(idx[0]), int(idx[-1])) if len(idx) else None)
    return out


def compare(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | list[float]]:
    """Cell accuracy, exact-slice accuracy, boundary errors (slices) and missing levels of one study."""
    errs: list[float] = []
    missing = 0
    for p, t in zip(spans(pred), spans(truth), strict=True):
        if t is None:
            continue
        if p is None:
            missing += 1
            continue
        errs += [abs(p[0] - t[0]), abs(p[1] - t[1])]
    return {"cells": float((pred == truth).mean()), "slices": float((pred == truth).all(axis=1).mean()),
            "n": len(truth), "errs": errs, "missing": missing, "levels": sum(t is not None for t in spans(truth))}


def summarise(rows: Iterable[dict]) -> dict[str, float]:
    """Pool per-study comparisons: slice-weighted accuracies and boundary error statistics."""
    rows = list(rows)
    n = np.array([r["n"] for r in rows], dtype=float)
    errs = np.concatenate([np.asarray(r["errs"], dtype=float) for r in rows]) if rows else np.array([])
    return {
        "cell_acc": float(np.average([r["cells"] for r in rows], weights=n)),
        "slice_acc": float(np.average([r["slices"] for r in rows], weights=n)),
        "bound_mean": float(errs.mean()) if len(errs) else float("nan"),
        "bound_median": float(np.median(errs)) if len(errs) else float("nan"),
        "bound_p95": float(np.percentile(errs, 95)) if len(errs) else float("nan"),
        "missing_levels": int(sum(r["missing"] for r in rows)),
        "levels": int(sum(r["levels"] for r in rows)),
    }


def fractions(bits: np.ndarray) -> np.ndarray:
    """(7, 2) start / end (last + 1) of each level as a fraction of the scan."""
    n = len(bits)
    return np.array([[s[0] / n, (s[1] + 1) / n] if s else [np.nan, np.nan] for s in spans(bits)])


def relz_config(frac: np.ndarray):
    """The default levels config with relative_z fractions replaced (for leave-one-out baselines)."""
    return load_config("levels", overrides=[f"relative_z.start={list(map(float, frac[:, 0]))}",
                                            f"relative_z.end={list(map(float, frac[:, 1]))}"])


# ---------------------------------------------------------------- 1. real anatomy
def corrupt(truth: np.ndarray, c: Corruption, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (sampled slice indices, evidence scores on them) for one corruption setting."""
    n = len(truth)
    start = int(rng.integers(c.k)) if c.k > 1 else 0
    sampled = np.arange(start, n, c.k)
    bits = truth[sampled].copy()
    if c.noise:
        bits ^= rng.random(bits.shape) < c.noise
    if c.drop:
        bits[rng.random(len(sampled)) < c.drop] = False
    if c.zero_run:
        present = [j for j in range(bits.shape[1]) if truth[:, j].any()]
        bits[:, int(rng.choice(present))] = False
    return sampled, np.where(bits, PRESENT_SCORE, 1.0 - PRESENT_SCORE)


def raw_threshold(sampled: np.ndarray, evidence: np.ndarray, n: int) -> np.ndarray:
    """No prior: each slice takes the thresholded evidence of the nearest sampled slice."""
    nearest = np.abs(np.arange(n)[:, None] - sampled[None, :]).argmin(axis=1)
    return evidence[nearest] > 0.5


def real_sequences(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per study: (raw bits, cleaned bits), slices in SliceNumber (head-to-feet) order."""
    df = pd.read_csv(path)
    out = {}
    for uid, g in df.groupby(STUDY_COL, sort=True):
        raw = g.sort_values("SliceNumber")[list(LEVELS)].to_numpy().astype(bool)
        out[str(uid)] = (raw, clean_levels(raw))
    return out


def real_stats(seqs: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Share of slices by number of levels present (raw and cleaned) and the largest per slice."""
    rows = []
    for kind, i in (("raw", 0), ("cleaned", 1)):
        counts = np.concatenate([s[i].sum(axis=1) for s in seqs.values()])
        with_level = counts[counts > 0]
        rows.append({"table": kind, "slices": len(counts), "0 levels": (counts == 0).mean(),
                     "1": (counts == 1).mean(), "2": (counts == 2).mean(), "3": (counts == 3).mean(),
                     "4+": (counts >= 4).mean(), ">=2 among slices with a level": (with_level >= 2).mean(),
                     "max": int(counts.max())})
    return pd.DataFrame(rows)


def bench_real(seqs: dict[str, tuple[np.ndarray, np.ndarray]], cfg, scenarios=SCENARIOS) -> pd.DataFrame:
    """Decoded vs raw vs relative-z on corrupted real sequences, against the cleaned truth."""
    uids = sorted(seqs)
    fr = np.stack([fractions(seqs[u][1]) for u in uids])
    total = np.nansum(fr, axis=0)
    counts = np.sum(~np.isnan(fr), axis=0)
    relz = {}
    for i, u in enumerate(uids):
        loo = (total - np.nan_to_num(fr[i])) / (counts - (~np.isnan(fr[i])))
        relz[u] = relative_z_levels(len(seqs[u][1]), config=relz_config(loo))
    rows = []
    rel_rows = [compare(relz[u], seqs[u][1]) for u in uids]
    rows.append({"scenario": "(any)", "method": "relative z (LOO)", **summarise(rel_rows), "ms_per_study": 0.0})
    for c in scenarios:
        rng = np.random.default_rng([SEED, int(c.noise * 100), int(c.drop * 100), int(c.zero_run), c.k])
        dec_rows, raw_rows, times = [], [], []
        for u in uids:
            truth = seqs[u][1]
            sampled, ev = corrupt(truth, c, rng)
            t0 = time.perf_counter()
            rows_on = np.nonzero(truth.any(axis=1))[0]
            spacing = REAL_SPAN_MM / max(int(rows_on[-1] - rows_on[0] + 1), 1) if len(rows_on) else 1.0
            present, _ = decode_sampled(ev, sampled, len(truth), config=cfg, spacing_mm=spacing)
            times.append((time.perf_counter() - t0) * 1e3)
            dec_rows.append(compare(present, truth))
            raw_rows.append(compare(raw_threshold(sampled, ev, len(truth)), truth))
        rows.append({"scenario": c.name, "method": "decoded", **summarise(dec_rows),
                     "ms_per_study": float(np.median(times))})
        rows.append({"scenario": c.name, "method": "raw threshold", **summarise(raw_rows), "ms_per_study": 0.0})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 2./3. synthetic truth folders
def read_truth(truth_root: Path) -> dict[str, pd.DataFrame]:
    """Read ROOT/truth/{slice_levels,level_boxes,fractures}.csv and the fracture boxes of a synthetic set."""
    t = truth_root / "truth"
    out = {"slices": pd.read_csv(t / "slice_levels.csv"), "level_boxes": pd.read_csv(t / "level_boxes.csv"),
           "fractures": pd.read_csv(t / "fractures.csv")}
    for cand in (t / "train_bounding_boxes.csv", truth_root / "train_bounding_boxes.csv"):
        if cand.is_file():
            out["boxes"] = pd.read_csv(cand)
            break
    return out


def fracture_box_truth(truth: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Fracture boxes with slice_index and the set of true levels (fractures covering the box's slice)."""
    boxes = truth.get("boxes")
    if boxes is None or len(boxes) == 0:
        return pd.DataFrame()
    idx = truth["slices"][[STUDY_COL, "slice_number", "slice_index"]]
    boxes = boxes.merge(idx, on=[STUDY_COL, "slice_number"], how="inner")
    fr = truth["fractures"]
    first = [c for c in fr.columns if "first" in c][0]
    last = [c for c in fr.columns if "last" in c][0]
    levels = []
    for r in boxes.itertuples(index=False):
        f = fr[fr[STUDY_COL] == getattr(r, STUDY_COL)]
        lo, hi = np.minimum(f[first], f[last]), np.maximum(f[first], f[last])
        levels.append(frozenset(f.loc[(lo <= r.slice_number) & (r.slice_number <= hi), "level"]))
    boxes["true_levels"] = levels
    return boxes[boxes["true_levels"].map(len) > 0].reset_index(drop=True)


def bits_of(table: pd.DataFrame, uid: str, n: int) -> np.ndarray:
    """(n, 7) presence of one study from a slices table (C1..C7 bits, else p_C >= 0.5)."""
    g = table[table[STUDY_COL] == uid].sort_values("slice_index")
    out = np.zeros((n, len(LEVELS)), dtype=bool)
    cols = list(LEVELS) if set(LEVELS) <= set(g.columns) else [f"p_{x}" for x in LEVELS]
    vals = g[cols].to_numpy(dtype=float) >= 0.5
    ok = g["slice_index"].between(0, n - 1).to_numpy()
    out[g["slice_index"].to_numpy()[ok]] = vals[ok]
    return out


def score_predictions(truth: dict[str, pd.DataFrame], pred_slices: pd.DataFrame, pred_level_boxes: pd.DataFrame,
                      cfg, label: str) -> list[dict]:
    """Slice accuracy / boundary error of predicted levels, box-assignment accuracy, and relative-z baselines."""
    ts = truth["slices"]
    uids = sorted(set(ts[STUDY_COL]) & set(pred_slices[STUDY_COL]))
    n_of = ts.groupby(STUDY_COL)["slice_index"].max() + 1
    truth_bits = {u: bits_of(ts, u, int(n_of[u])) for u in uids}
    pred_rows = [compare(bits_of(pred_slices, u, int(n_of[u])), truth_bits[u]) for u in uids]
    rel_cfg = [compare(relative_z_levels(int(n_of[u]), config=cfg), truth_bits[u]) for u in uids]
    fr = np.stack([fractions(truth_bits[u]) for u in uids])
    total, counts = np.nansum(fr, axis=0), np.sum(~np.isnan(fr), axis=0)
    rel_loo = []
    for i, u in enumerate(uids):
        loo = (total - np.nan_to_num(fr[i])) / np.maximum(counts - (~np.isnan(fr[i])), 1)
        rel_loo.append(compare(relative_z_levels(int(n_of[u]), config=relz_config(loo)), truth_bits[u]))
    boxes = fracture_box_truth(truth)
    boxes = boxes[boxes[STUDY_COL].isin(uids)]
    rows = []
    box_acc = {}
    if len(boxes):
        got = assign_boxes(boxes, pred_level_boxes, pred_slices, config=cfg)
        box_acc[label] = _box_accuracy(got, boxes)
        oracle = assign_boxes(boxes, truth["level_boxes"], _with_p(ts), config=cfg)
        box_acc["truth level boxes"] = _box_accuracy(oracle, boxes)
        for name, bits in (("relative z (config)", "cfg"), ("relative z (LOO on this set)", "loo")):
            sl = _relz_slices(uids, n_of, cfg if bits == "cfg" else None, truth_bits)
            box_acc[name] = _box_accuracy(assign_boxes(boxes, pd.DataFrame(), sl, config=cfg), boxes)
    for name, rs in ((label, pred_rows), ("relative z (config)", rel_cfg), ("relative z (LOO on this set)", rel_loo)):
        rows.append({"method": name, "studies": len(uids), **summarise(rs), "box_acc": box_acc.get(name, np.nan),
                     "boxes": len(boxes)})
    if "truth level boxes" in box_acc:
        rows.append({"method": "truth level boxes", "studies": len(uids), "box_acc": box_acc["truth level boxes"],
                     "boxes": len(boxes)})
    return rows


def _with_p(slices: pd.DataFrame) -> pd.DataFrame:
    out = slices.copy()
    for x in LEVELS:
        out[f"p_{x}"] = out[x].astype(float)
    return out


def _relz_slices(uids, n_of, cfg, truth_bits) -> pd.DataFrame:
    frames = []
    fr = np.stack([fractions(truth_bits[u]) for u in uids])
    total, counts = np.nansum(fr, axis=0), np.sum(~np.isnan(fr), axis=0)
    for i, u in enumerate(uids):
        n = int(n_of[u])
        if cfg is None:
            loo = (total - np.nan_to_num(fr[i])) / np.maximum(counts - (~np.isnan(fr[i])), 1)
            bits = relative_z_levels(n, config=relz_config(loo))
        else:
            bits = relative_z_levels(n, config=cfg)
        df = pd.DataFrame(bits.astype(float), columns=[f"p_{x}" for x in LEVELS])
        df.insert(0, "slice_index", np.arange(n))
        df.insert(0, STUDY_COL, u)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _box_accuracy(assigned: pd.DataFrame, boxes: pd.DataFrame) -> float:
    hit = [lvl in true for lvl, true in zip(assigned["level"], boxes["true_levels"], strict=True)]
    return float(np.mean(hit)) if hit else float("nan")


def oracle_detections(truth: dict[str, pd.DataFrame], uid: str, n: int, *, k: int, noise: float, drop: float,
                      jitter_px: float, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Truth level boxes on every k-th slice as locator detections: dropped, relabelled, jittered."""
    sampled = np.arange(int(rng.integers(k)), n, k)
    lb = truth["level_boxes"]
    d = lb[(lb[STUDY_COL] == uid) & lb["slice_index"].isin(sampled)].copy()
    d = d[rng.random(len(d)) >= drop]
    swap = rng.random(len(d)) < noise
    shift = rng.choice([-1, 1], size=len(d))
    li = d["level"].map(LEVELS.index).to_numpy() + np.where(swap, shift, 0)
    d["cls"] = np.clip(li, 0, len(LEVELS) - 1)
    d = d.drop(columns=["level"])
    d["conf"] = rng.uniform(0.3, 0.95, size=len(d))
    for c in ("x", "y", "width", "height"):
        d[c] = d[c] + rng.normal(0, jitter_px, size=len(d))
    return d, sampled


def bench_oracle(truth_root: Path, cfg, *, k: int, noise: float, drop: float, jitter_px: float) -> list[dict]:
    """locate_study on noisy truth boxes of every study under truth_root, then score like a locator run."""
    truth = read_truth(truth_root)
    rng = np.random.default_rng(SEED)
    slices, lboxes = [], []
    n_of = truth["slices"].groupby(STUDY_COL)["slice_index"].max() + 1
    for uid, n in n_of.items():
        dets, sampled = oracle_detections(truth, str(uid), int(n), k=k, noise=noise, drop=drop,
                                          jitter_px=jitter_px, rng=rng)
        s, b = locate_study(dets, int(n), sampled, config=cfg, study_uid=str(uid),
                            spacing_mm=_spacing(truth_root, str(uid)))
        slices.append(s)
        lboxes.append(b)
    label = f"oracle k={k} swap={noise} drop={drop} jitter={jitter_px}px"
    return score_predictions(truth, pd.concat(slices, ignore_index=True), pd.concat(lboxes, ignore_index=True),
                             cfg, label)


def _spacing(root: Path, uid: str) -> float:
    """Slice spacing (mm) of a synthetic study from its DICOM geometry."""
    from data_prep.dicom.geometry import scan_study
    from detector.render import slice_spacing

    return slice_spacing(scan_study(next(root.glob(f"*_images/{uid}"))))


def make_synthetic(root: Path, n_studies: int, seed: int) -> Path:
    """Write a small held-out synthetic set (split test, so truth/ holds the hidden labels)."""
    from data_prep.synthetic.synth import synthesize

    synth_cfg = load_config("synth", overrides=["image.size=96", f"volume.slices={SYNTH_SLICES}",
                                                "labels.box_fraction=1.0"])
    synthesize(root, n_studies=n_studies, seed=seed, split="test", config=synth_cfg, progress=False, overwrite=True)
    return root


# ---------------------------------------------------------------- main
def _fmt(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print one table per section."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_levels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML merged over configs/levels.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--truth-dir", type=Path, default=None, help="synthetic dataset root with truth/ (held out)")
    p.add_argument("--pred-slices", type=Path, default=None, help="slices.csv of the locator pipeline (p_C1..p_C7)")
    p.add_argument("--pred-level-boxes", type=Path, default=None, help="level boxes table of the locator pipeline")
    p.add_argument("--oracle-studies", type=int, default=12, help="synthetic studies for the oracle run (0 = skip)")
    p.add_argument("--oracle-k", type=int, default=4, help="oracle: locator every k-th slice")
    p.add_argument("--skip-real", action="store_true", help="skip the real-table section")
    args = p.parse_args(argv)
    cfg = load_config("levels", args.config, args.overrides)
    pd.set_option("display.width", 200)

    path = realdata_file("vertebrae.csv")
    if args.skip_real:
        pass
    elif path is None:
        print("== real anatomy: skipped (vertebrae.csv not in ../shared/realdata)")
    else:
        seqs = real_sequences(path)
        print(f"== real anatomy: {len(seqs)} segmented studies from {path} (read in place)")
        print(_fmt(real_stats(seqs)))
        print(f"\n== real sequences, corrupted then decoded (truth = longest run per level, gaps <= {CLEAN_GAP} "
              f"closed; evidence {PRESENT_SCORE}/{1 - PRESENT_SCORE:.1f} for bits 1/0)")
        print(_fmt(bench_real(seqs, cfg)))

    if args.oracle_studies > 0:
        with tempfile.TemporaryDirectory(prefix="bench_levels_") as tmp:
            root = args.truth_dir or make_synthetic(Path(tmp) / "synth", args.oracle_studies, seed=SEED + 101)
            print(f"\n== synthetic oracle evidence + noise ({root})")
            rows = []
            for noise, drop, jitter in ((0.0, 0.0, 0.0), (0.1, 0.2, 3.0), (0.2, 0.3, 5.0)):
                rows += bench_oracle(root, cfg, k=args.oracle_k, noise=noise, drop=drop, jitter_px=jitter)
            print(_fmt(pd.DataFrame(rows).drop_duplicates("method")))

    if args.pred_slices is not None:
        if args.truth_dir is None or args.pred_level_boxes is None:
            p.error("--pred-slices needs --truth-dir and --pred-level-boxes")
        truth = read_truth(args.truth_dir)
        rows = score_predictions(truth, pd.read_csv(args.pred_slices), pd.read_csv(args.pred_level_boxes), cfg,
                                 "locator")
        print(f"\n== locator predictions vs {args.truth_dir}/truth")
        print(_fmt(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
