"""Level benchmark on held-out full-field synthetic studies: the size-aware decoder against the former one.

    python -m benchmarks.bench_level_field --work DIR                    # setting (a): 15 studies, 6 epochs
    python -m benchmarks.bench_level_field --work DIR --setting b                # (b): configs/locator.yaml, 6 epochs
    python -m benchmarks.bench_level_field --work DIR --seeds 0 1 2      # three locator seeds (same data)

What it does, every step resumable in DIR (a rerun reuses what is there):
1. `spinefrac synth` a training set of `--train-studies` segmented studies and a held-out test set of
   `--test-studies` (split test), both at the synth defaults (512 px, about 300 slices over the whole neck);
2. `prepare-locator` on the training set, then train one locator per setting and seed:
   (a) configs/locator.yaml with `train.epochs` = `--a-epochs` (4) at `render.imgsz` = `--a-imgsz` (160): at most
   15 studies and about 10 CPU minutes (the CPU seconds are measured and printed);
   (b) configs/locator.yaml as shipped except `train.epochs` capped at `--b-epochs` (stated in the table);
3. runs each locator once per test study on its sampled slices (`detector.locate.locator_detections`) and keeps
   the raw detections (DIR/dets_<setting>_s<seed>.csv);
4. decodes the SAME detections with the former decoder (`decode.model=runs`), the new one with the prior that
   `spinefrac train` would learn from the training set's segmentations (`level_prior.json`), and the new one with
   configs/levels.yaml's default prior;
5. scores every decode against truth/slice_levels.csv: share of slices whose set of levels is exactly right,
   recall per level (truth slices of L decoded with L), share of studies where each level is found, and each
   level's z-range error in mm (|first slice - truth| and |last slice - truth| x spacing; mean and 90th
   percentile), plus the decode time per study.
6. with `--calibrated` (a probe of issue 22's step 3, not wired into train/predict): fits a confusion table on the
   locator's own validation studies (the locator dataset's val fold, truth from the training set's truth table):
   P(each level | the slice's top detection's class and confidence bin), and P(any level | that bin), smoothed
   towards the base rates; decodes the test detections through it (log-odds against the base rate), once at full
   weight and once with the names' log-odds scaled by CALIBRATED_NAME_WEIGHT.
Aims (issue 22): >= 95% of slices right, recall >= 0.90 on every level, every level in >= 99% of studies.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL

log = logging.getLogger("benchmarks")

TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 11, 12
"""Synthetic sets' seeds: --data-seed + these (the locator seeds vary only the training)."""
A_EPOCHS, A_IMGSZ = 4, 160
"""Setting (a): the weak locator, 4 epochs at 160 px on 15 studies: a few CPU minutes on the 2-core machine
(about 80 s of wall time per epoch with --omp-wait passive beside other jobs)."""
B_EPOCHS = 6
"""Setting (b): epoch cap of the default locator (configs/locator.yaml says 20: hours on the slow, shared CPU)."""
DECODERS = ("runs (before)", "sizes, learned prior", "sizes, default prior")
PERCENTILE = 90


def synth_sets(work: Path, n_train: int, n_test: int, seed: int, extra: list[str]) -> tuple[Path, Path]:
    """The training set (every study segmented) and the held-out test set, made once (`extra`: synth overrides)."""
    from data_prep.synthetic.synth import synthesize

    train, test = work / "train", work / "test"
    if not (train / "train.csv").is_file():
        synthesize(train, n_studies=n_train, seed=seed + TRAIN_SEED_OFFSET, split="train",
                   config=load_config("synth", overrides=["labels.segmentation_fraction=1.0", *extra]),
                   overwrite=True)
    if not (test / "truth" / "slice_levels.csv").is_file():
        synthesize(test, n_studies=n_test, seed=seed + TEST_SEED_OFFSET, split="test",
                   config=load_config("synth", overrides=extra), overwrite=True)
    return train, test


def train_locator(work: Path, train: Path, setting: str, seed: int, epochs: int,
                  imgsz: int | None = None, omp_wait: str = "default") -> tuple[Path, float]:
    """prepare-locator once, then one locator run per (setting, seed); return (weights, CPU seconds of training)."""
    from detector.train import train_yolo
    from detector.yolo_dataset import prepare_locator_dataset

    run = work / f"loc_{setting}_s{seed}"
    record = run / "bench_cpu.json"
    if (run / "weights" / "best.pt").is_file() and record.is_file():
        return run / "weights" / "best.pt", float(json.loads(record.read_text())["cpu_s"])
    size = [f"render.imgsz={imgsz}"] if imgsz else []
    data_yaml = prepare_locator_dataset(train, work / (f"loc_ds_{imgsz}" if imgsz else "loc_ds"),
                                        config=load_config("locator", overrides=size), progress=False)
    cfg = load_config("locator", overrides=[f"train.epochs={epochs}", f"train.seed={seed}", "train.device=cpu",
                                            "train.patience=100", f"train.omp_wait={omp_wait}", *size])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    train_yolo(Path(data_yaml), run, config=cfg, overwrite=True)
    cpu = time.process_time() - cpu0
    record.write_text(json.dumps({"cpu_s": cpu, "wall_s": time.perf_counter() - wall0, "epochs": epochs}))
    return run / "weights" / "best.pt", cpu


def detections(work: Path, test: Path, weights: Path, tag: str, imgsz: int | None = None) -> pd.DataFrame:
    """Raw locator detections of every test study (one row per box; sampled slices listed with cls -1)."""
    from data_prep.dicom.geometry import scan_study
    from detector.locate import load_locator, locator_detections

    path = work / f"dets_{tag}.csv"
    if path.is_file():
        return pd.read_csv(path, dtype={STUDY_COL: str})
    config = load_config("locator", overrides=[f"render.imgsz={imgsz}"] if imgsz else [])
    locator = load_locator(weights, config=config, device="cpu")
    frames = []
    for folder in sorted((test / "test_images").iterdir()):
        geometry = scan_study(folder)
        dets, sampled = locator_detections(geometry, locator=locator)
        marks = pd.DataFrame({"slice_index": sampled, "cls": -1})      # the sampled slices, found or not
        frames.append(pd.concat([dets, marks], ignore_index=True).assign(**{STUDY_COL: folder.name}))
    out = pd.concat(frames, ignore_index=True)
    out.to_csv(path, index=False)
    return out


ORACLE_SETTINGS = {"oracle: every level, 20% dropped, 10% swapped": (list(range(7)), 0.2, 0.1),
                   "oracle: C1-C3 only (the issue's locator)": ([0, 1, 2], 0.0, 0.0)}
"""--oracle: locator-free evidence from the truth on every 4th slice: (levels seen, share of detections dropped,
share given a neighbouring level)."""
ORACLE_CONF = 0.8
ORACLE_EVERY_K = 4


def oracle_detections(truth: dict[str, np.ndarray], seen: list[int], drop: float, swap: float,
                      seed: int) -> pd.DataFrame:
    """Truth presence on every ORACLE_EVERY_K-th slice as locator detections (dummy boxes), with noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for uid, t in truth.items():
        sampled = np.arange(0, len(t), ORACLE_EVERY_K)
        s_idx, lv = np.nonzero(t[sampled][:, seen])
        lv = np.asarray(seen)[lv]
        keep = rng.random(len(lv)) >= drop
        moved = np.clip(lv + np.where(rng.random(len(lv)) < swap, rng.choice([-1, 1], len(lv)), 0), 0, 6)
        d = pd.DataFrame({"slice_index": sampled[s_idx][keep], "cls": moved[keep], "conf": ORACLE_CONF,
                          "x": 10.0, "y": 10.0, "width": 20.0, "height": 20.0})
        marks = pd.DataFrame({"slice_index": sampled, "cls": -1})
        frames.append(pd.concat([d, marks], ignore_index=True).assign(**{STUDY_COL: uid}))
    return pd.concat(frames, ignore_index=True)


CALIBRATION_EDGES = np.array([0.05, 0.1, 0.2, 0.4])
"""--calibrated: confidence bins of a slice's top detection (lower edges; below the first edge = the first bin)."""
CALIBRATION_SMOOTHING = 5.0
"""--calibrated: pseudo-count pulling each cell's rates towards the base rates (3 val studies, about 250 slices,
29 cells)."""
CALIBRATED_NAME_WEIGHT = 0.3
"""--calibrated: scale of the names' calibrated log-odds in the second variant: the table treats every sampled
slice as independent evidence, but a locator's errors are correlated along a study, so full weight over-counts.
Set once, not tuned."""
CALIBRATION_CLIP = 1e-3
"""--calibrated: calibrated rates are clipped to [clip, 1 - clip] before taking log-odds."""
CALIBRATED_OVERRIDES = ["decode.absent_weight=1.0", "decode.ignore_unseen=false", "decode.column_weight=1.0",
                        "decode.column_absent_weight=1.0"]
"""--calibrated: the calibrated log-odds are used as they are (no hand-set discounts)."""


def calibration_cells(dets: pd.DataFrame, sampled: np.ndarray) -> np.ndarray:
    """Per sampled slice of one study: class x CALIBRATION_EDGES bin of its top detection (last cell: none)."""
    n_bins = len(CALIBRATION_EDGES)
    found = dets[dets["cls"] >= 0].sort_values("conf").drop_duplicates("slice_index", keep="last")
    top = found.set_index("slice_index")
    out = np.full(len(sampled), len(LEVELS) * n_bins)
    hit = np.isin(sampled, top.index)
    rows = top.loc[sampled[hit]]
    bins = np.clip(np.searchsorted(CALIBRATION_EDGES, rows["conf"].to_numpy(), side="right") - 1, 0, n_bins - 1)
    out[hit] = rows["cls"].to_numpy(dtype=int) * n_bins + bins
    return out


def fit_calibration(dets: pd.DataFrame, truth: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(cells, 7) level log-odds and (cells,) column log-odds against the base rates, from detections of studies
    with known truth (smoothed rates: module doc, step 6)."""
    from scipy.special import logit

    n_cells = len(LEVELS) * len(CALIBRATION_EDGES) + 1
    n, k, kc = np.zeros(n_cells), np.zeros((n_cells, len(LEVELS))), np.zeros(n_cells)
    for uid, g in dets.groupby(STUDY_COL):
        sampled = np.unique(g["slice_index"].to_numpy(dtype=int))
        cells, t = calibration_cells(g, sampled), truth[str(uid)][sampled]
        np.add.at(n, cells, 1.0)
        np.add.at(k, cells, t)
        np.add.at(kc, cells, t.any(axis=1))
    base, base_col = k.sum(axis=0) / n.sum(), kc.sum() / n.sum()
    rate = (k + CALIBRATION_SMOOTHING * base) / (n[:, None] + CALIBRATION_SMOOTHING)
    rate_col = (kc + CALIBRATION_SMOOTHING * base_col) / (n + CALIBRATION_SMOOTHING)

    def lo(x: np.ndarray) -> np.ndarray:
        return logit(np.clip(x, CALIBRATION_CLIP, 1.0 - CALIBRATION_CLIP))

    return lo(rate) - lo(base), lo(rate_col) - lo(np.asarray(base_col))


def validation_detections(work: Path, train: Path, weights: Path, tag: str, imgsz: int | None) -> pd.DataFrame:
    """The locator's detections on its own validation studies (the locator dataset's val fold), kept in
    DIR/valdets_<tag>.csv."""
    from data_prep.dicom.geometry import scan_study
    from detector.locate import load_locator, locator_detections

    path = work / f"valdets_{tag}.csv"
    if path.is_file():
        return pd.read_csv(path, dtype={STUDY_COL: str})
    index = pd.read_csv(work / (f"loc_ds_{imgsz}" if imgsz else "loc_ds") / "index.csv", dtype={STUDY_COL: str})
    config = load_config("locator", overrides=[f"render.imgsz={imgsz}"] if imgsz else [])
    locator = load_locator(weights, config=config, device="cpu")
    frames = []
    for uid in sorted(index.loc[index["split"] == "val", STUDY_COL].unique()):
        dets, sampled = locator_detections(scan_study(train / "train_images" / uid), locator=locator)
        marks = pd.DataFrame({"slice_index": sampled, "cls": -1})
        frames.append(pd.concat([dets, marks], ignore_index=True).assign(**{STUDY_COL: uid}))
    out = pd.concat(frames, ignore_index=True)
    out.to_csv(path, index=False)
    return out


def decode_calibrated(dets: pd.DataFrame, geometry: dict[str, tuple[int, float]], config: object,
                      table: tuple[np.ndarray, np.ndarray], name_weight: float) -> dict[str, np.ndarray]:
    """Decode every study's detections through a calibration table: {uid: (n, 7) bool}."""
    from scipy.special import expit

    from detector.levels import decode_sampled

    level_lo, column_lo = table
    out: dict[str, np.ndarray] = {}
    for uid, g in dets.groupby(STUDY_COL):
        n, spacing = geometry[str(uid)]
        sampled = np.unique(g["slice_index"].to_numpy(dtype=int))
        cells = calibration_cells(g, sampled)
        present, _ = decode_sampled(expit(name_weight * level_lo[cells]), sampled, n, config=config,
                                    spacing_mm=spacing, column=expit(column_lo[cells]))
        out[str(uid)] = present
    return out


def decode_all(dets: pd.DataFrame, geometry: dict[str, tuple[int, float]], configs: dict[str, object]
               ) -> dict[str, dict[str, np.ndarray]]:
    """Decode every study's detections with each config: {decoder: {uid: (n, 7) bool}}, and the time per decode."""
    from detector.levels import locate_study

    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in configs}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for uid, g in dets.groupby(STUDY_COL):
        n, spacing = geometry[str(uid)]
        sampled = np.unique(g["slice_index"].to_numpy(dtype=int))
        found = g[g["cls"] >= 0]
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            slices, _ = locate_study(found, n, sampled, config=cfg, spacing_mm=spacing)
            seconds[name].append(time.perf_counter() - t0)
            out[name][str(uid)] = slices[list(LEVELS)].to_numpy().astype(bool)
    for name in configs:
        out[name]["__seconds__"] = np.asarray(seconds[name])
    return out


def score(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], spacing: dict[str, float]) -> dict[str, float]:
    """The benchmark's figures for one decoder over the test studies (module doc, step 5)."""
    right = n_slices = 0
    hits, totals, found, have = np.zeros(7), np.zeros(7), np.zeros(7), np.zeros(7)
    errs: list[list[float]] = [[] for _ in range(7)]
    for uid, t in truth.items():
        p = pred[uid]
        right += int((p == t).all(axis=1).sum())
        n_slices += len(t)
        hits += (p & t).sum(axis=0)
        totals += t.sum(axis=0)
        for j in range(7):
            ti, pi = np.nonzero(t[:, j])[0], np.nonzero(p[:, j])[0]
            if len(ti):
                have[j] += 1
                if len(pi):
                    found[j] += 1
                    errs[j] += [abs(pi[0] - ti[0]) * spacing[uid], abs(pi[-1] - ti[-1]) * spacing[uid]]
    row: dict[str, float] = {"slices_right": right / max(n_slices, 1)}
    for j, lv in enumerate(LEVELS):
        row[f"recall_{lv}"] = hits[j] / max(totals[j], 1)
    for j, lv in enumerate(LEVELS):
        row[f"found_{lv}"] = found[j] / max(have[j], 1)
    for j, lv in enumerate(LEVELS):
        row[f"err_mm_{lv}"] = float(np.mean(errs[j])) if errs[j] else float("nan")
        row[f"err_p{PERCENTILE}_{lv}"] = float(np.percentile(errs[j], PERCENTILE)) if errs[j] else float("nan")
    return row


def truth_of(test: Path, images: str = "test_images") -> tuple[dict[str, np.ndarray], dict[str, tuple[int, float]]]:
    """Truth presence per study of a synthetic set and (slices, spacing mm) from its DICOM geometry."""
    from data_prep.dicom.geometry import scan_study
    from detector.render import slice_spacing

    table = pd.read_csv(test / "truth" / "slice_levels.csv", dtype={STUDY_COL: str})
    truth, geometry = {}, {}
    for uid, g in table.groupby(STUDY_COL):
        truth[str(uid)] = g.sort_values("slice_index")[list(LEVELS)].to_numpy().astype(bool)
        geo = scan_study(test / images / str(uid))
        geometry[str(uid)] = (len(geo.paths), slice_spacing(geo))
    return truth, geometry


def learned_levels_config(work: Path, train: Path, overrides: list[str] | None = None):
    """configs/levels.yaml with the prior `spinefrac train` learns from these segmentations (level_prior.json)."""
    from detector.level_prior import (
        LEVEL_PRIOR_JSON,
        learn_from_segmentations,
        prior_overrides,
        read_level_prior,
    )

    base = load_config("levels")
    path = work / LEVEL_PRIOR_JSON
    if not path.is_file():
        uids = sorted(p.name.split(".nii")[0] for p in (train / "segmentations").iterdir() if ".nii" in p.name)
        learn_from_segmentations(train, uids, work, config=base, progress=False)
    return load_config("levels", overrides=[*prior_overrides(read_level_prior(path)), *(overrides or [])])


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """Mean and SD over seeds per setting and decoder."""
    df = pd.DataFrame(rows)
    keys = ["setting", "decoder"]
    num = [c for c in df.columns if c not in (*keys, "seed")]
    mean = df.groupby(keys, sort=False)[num].mean()
    sd = df.groupby(keys, sort=False)[num].std(ddof=1)
    out = mean.copy()
    if df["seed"].nunique() > 1:
        for c in num:
            out[c] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[c], sd[c], strict=True)]
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and write DIR/level_bench.csv (one row per setting, seed and decoder)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_level_field", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="work folder (data, locators, detections, tables)")
    p.add_argument("--setting", choices=("a", "b", "both"), default="a")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="locator training seeds")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--train-studies", type=int, default=15)
    p.add_argument("--test-studies", type=int, default=20)
    p.add_argument("--a-epochs", type=int, default=A_EPOCHS)
    p.add_argument("--a-imgsz", type=int, default=A_IMGSZ, help="setting (a)'s locator image size")
    p.add_argument("--b-epochs", type=int, default=B_EPOCHS)
    p.add_argument("--size", type=int, default=None, help="synth image size (default: the synth default, 512)")
    p.add_argument("--slices", type=int, default=None, help="synth slices per study (default: the synth default)")
    p.add_argument("--imgsz", type=int, default=None, help="locator image size of both settings (quick runs)")
    p.add_argument("--omp-wait", choices=("default", "passive"), default="default",
                   help="locator training's train.omp_wait: passive on a machine shared with other jobs")
    p.add_argument("--oracle", action="store_true",
                   help="also decode locator-free evidence made from the truth (ORACLE_SETTINGS; no training)")
    p.add_argument("--no-locator", action="store_true", help="only the oracle rows (no locator is trained)")
    p.add_argument("--calibrated", action="store_true",
                   help="also decode through a confusion table fitted on the locator's validation studies (step 6)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.train_studies > 15 and args.setting in ("a", "both"):
        p.error("setting (a) trains on at most 15 segmented studies")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    extra = [*([f"image.size={args.size}"] if args.size else []), *([f"volume.slices={args.slices}"] if args.slices
                                                                     else [])]
    train, test = synth_sets(work, args.train_studies, args.test_studies, args.data_seed, extra)
    truth, geometry = truth_of(test)
    spacing = {u: s for u, (_, s) in geometry.items()}
    configs = {DECODERS[0]: load_config("levels", overrides=["decode.model=runs"]),
               DECODERS[1]: learned_levels_config(work, train), DECODERS[2]: load_config("levels")}
    settings = [] if args.no_locator else ["a", "b"] if args.setting == "both" else [args.setting]
    rows = []
    if args.oracle or args.no_locator:
        for label, (seen, drop, swap) in ORACLE_SETTINGS.items():
            for seed in args.seeds:
                decoded = decode_all(oracle_detections(truth, seen, drop, swap, seed), geometry, configs)
                for name in configs:
                    secs = decoded[name].pop("__seconds__")
                    rows.append({"setting": label, "seed": seed, "decoder": name,
                                 **score(decoded[name], truth, spacing), "decode_ms": float(np.median(secs) * 1e3)})
    for setting in settings:
        epochs = args.a_epochs if setting == "a" else args.b_epochs
        imgsz = args.imgsz or (args.a_imgsz if setting == "a" else None)
        for seed in args.seeds:
            weights, cpu = train_locator(work, train, setting, seed, epochs, imgsz, args.omp_wait)
            dets = detections(work, test, weights, f"{setting}_s{seed}", imgsz)
            decoded = decode_all(dets, geometry, configs)
            for name in configs:
                secs = decoded[name].pop("__seconds__")
                px = imgsz or int(load_config("locator").render.imgsz)
                rows.append({"setting": f"({setting}) {epochs} ep {px} px, {cpu / 60:.1f} CPU min", "seed": seed,
                             "decoder": name, **score(decoded[name], truth, spacing),
                             "decode_ms": float(np.median(secs) * 1e3)})
            if args.calibrated:
                train_truth, _ = truth_of(train, images="train_images")
                table = fit_calibration(validation_detections(work, train, weights, f"{setting}_s{seed}", imgsz),
                                        train_truth)
                cfg = learned_levels_config(work, train, overrides=CALIBRATED_OVERRIDES)
                for label, weight in (("sizes, calibrated names", 1.0),
                                      (f"sizes, calibrated names x {CALIBRATED_NAME_WEIGHT}",
                                       CALIBRATED_NAME_WEIGHT)):
                    rows.append({"setting": f"({setting}) {epochs} ep {px} px, {cpu / 60:.1f} CPU min",
                                 "seed": seed, "decoder": label,
                                 **score(decode_calibrated(dets, geometry, cfg, table, weight), truth, spacing),
                                 "decode_ms": float("nan")})
    table = pd.DataFrame(rows)
    table.to_csv(work / "level_bench.csv", index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 60)
    summary = summary_table(rows)
    for block in ("slices_right|recall_", "found_", "err_mm_", f"err_p{PERCENTILE}_"):
        cols = ["setting", "decoder", *[c for c in summary.columns if any(c.startswith(b) for b in block.split("|"))]]
        if block.startswith("slices"):
            cols.append("decode_ms")
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print()
    print(f"{len(truth)} held-out studies, {sum(len(t) for t in truth.values())} slices; table: "
          f"{work / 'level_bench.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
