"""The difficulty ladder: where the pipeline stops seeing, per synthetic world, as mean and spread over seeds.

    python -m benchmarks.bench_ladder --worlds coarse default subtle --seeds 0 1 2 --budget 7m --work DIR
    python -m benchmarks.bench_ladder ... --label crack --set 'detector.set=["render.imgsz=288"]'   # an ablation

For every world (configs/worlds.yaml) and seed S, one *cell*:
  1. `spinefrac synth --world W`: TRAIN training studies (seed S) and TEST held-out studies (seed S, split test)
     with the real geometry (512 px over the whole neck, the synth defaults) and the demo's protocol (100 slices
     of 2 mm, every positive study boxed, 30% segmented); cached in DIR/data/W/seedS/ and reused by every run
     and label (paired comparisons: an ablation sees the same studies). Across worlds, seed S gives the same
     patients and fractured levels; only the fractures and their look-alikes differ.
  2. `spinefrac train --budget B` with the demo's pipeline config (configs/pipeline.yaml `demo:`: detector 160 px
     on the spine ROI, locator 128 px, two fold classifiers at 64 px, depth-2 aggregator), every seed of the
     pipeline set to S (fold assignment, sampling, weights, splits, boosting), plus the run's --set overrides.
     The vertebra locator (levels, the ROI's centre, the classifier's crops) learns anatomy, which the worlds
     share: by default one locator per seed (20 epochs, trained once outside the budgets on the default world's
     training studies; DIR/locators/) is reused by every world's cell (`locator.reuse`), so each cell's budget
     goes to what learns fractures, and worlds differ in nothing else (`--locator cell`: each cell trains its own
     within its budget).
  3. `spinefrac predict` on the test studies.
  4. Scores against the hidden truth:
       loss per study   the competition metric (per-study normalisation), beside the training prior and the
                        max-box-score rule on the same studies (`spinefrac evaluate`); global: normalised globally
       AUC              patient_overall (model and max-score rule), and per level C1-C7 (model; their mean)
       box AP50         every predicted box on EVERY slice of the test studies against truth/fracture_boxes.csv
                        (IoU >= 0.5; a box on a slice without a fracture is a false positive)
       classifier AUC   vertebrae.csv cls_max against the level labels over study x level (a level the locator
                        did not find scores 0; `cls_coverage` is the share that has a score)
       level accuracy   share of slices whose decoded C1-C7 presence equals the truth (truth/slice_levels.csv)
       times            synthesis (recorded when it was made, also for cached sets), train, predict, cell; the
                        CPU seconds train and predict used and the share of the machine train got (a budget is
                        wall-clock: on a shared machine the training gets what the other jobs leave), and the
                        machine's 15-minute load average at the end of the cell (2 cores: 2 = busy)
`--synth-only` makes the cached studies alone (every world x seed), e.g. ahead of a run on a quieter machine.
Outputs: DIR/runs/LABEL/W/seedS/ (pipeline.yaml, model/, pred/, train.log, predict.log, cell.json),
DIR/runs/LABEL/cells.csv (one row per cell), and the table (mean +- SD over seeds per world, n = seeds) in
DIR/runs/LABEL/table.md and --out. A rerun skips finished cells (cell.json with the same settings) and resumes
an interrupted one (`spinefrac train` skips its finished stages); a cell or cached study set made with other
settings is refused, naming what changed (--overwrite redoes such cells; cached studies are never deleted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from data_prep.errors import InputError
from data_prep.runs.artifacts import (
    read_sidecar,
    write_csv_atomic,
    write_json_atomic,
    write_sidecar,
    write_text_atomic,
)
from data_prep.runs.config import Config, dump_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from data_prep.runs.resume import changed_settings, describe_changes, plain, settings_key

log = logging.getLogger("spinefrac")

TRAIN_STUDIES = 100
"""Training studies per cell: 60 for the detector's side and 40 aggregator studies at the demo's split
(splits.aggregator_fraction 0.4; the demo has 160). Fewer than the demo's keep synthesis and the prepare and
detect stages inside the budget short on 2 cores, where the budget, not the data, limits the detector."""
TEST_STUDIES = 40
"""Held-out studies per cell, as the demo's (19 positive at the real 47.6% rate)."""
BUDGET = "7m"
"""`spinefrac train --budget` per cell: measured on a quiet 2-core machine, a cell took 8.9-9.5 min (synthesis
1.3 min, train 6.5 min, predict 1.2 min) and each seed's shared locator 6.0-6.9 min, so 3 worlds x 3 seeds
take about 1.7 hours (docs/ladder.md, "Results")."""
WORLDS = ("coarse", "default", "subtle")
SEEDS = (0, 1, 2)
LADDER_SETS = ("budget.reserve=0.25",)
"""Pipeline overrides of the ladder besides the demo's: on 2 cores, detecting and scoring the 40 aggregator
studies (two fold classifiers) and fitting the aggregator took about a quarter of a 9-minute budget on a shared
machine, 65 s of a 7-minute one on a quiet machine (the rest of the reserve, ~40 s, went unused)."""
STAGES = ("detector", "locator", "levels", "aggregation", "classifier")
STAGE_SETS: dict[str, tuple[str, ...]] = {"locator": ("train.epochs=20",)}
"""The ladder's own stage overrides besides the demo's: a 20-epoch locator (with the demo's 10 epochs the classifier
had C7 crops in 8 of 40 test studies; with 20 it beat the prior alone: README, "What each step adds")."""
LOCATOR_WORLD = "default"
"""The shared locator of a seed learns the anatomy (which every world shares) from this world's training studies."""
LOCATOR_MODES = ("shared", "cell")
SEED_SETS: dict[str, tuple[str, ...]] = {
    "detector": ("prepare.seed={s}", "train.seed={s}"),
    "locator": ("prepare.seed={s}", "train.seed={s}"),
    "classifier": ("prepare.seed={s}", "train.seed={s}"),
    "aggregation": ("splits.seed={s}", "model.random_state={s}"),
}
"""Every seed of the pipeline follows the cell's seed, so seeds are independent replicates of the whole recipe."""
OMP_WAIT = "passive"
"""OMP_WAIT_POLICY of train: on a machine shared with other jobs, idle OpenMP threads that sleep made a training
step 5.8x faster (docs/train_cost.md); on a quiet machine of one's own pass --omp-wait default."""
CELL_JSON, CELLS_CSV, TABLE_MD = "cell.json", "cells.csv", "table.md"
SPREAD = "SD"
"""The spread in the table: the sample standard deviation over seeds (ddof 1)."""
SECONDS_PER_MINUTE = 60.0
METRICS: tuple[tuple[str, str, str], ...] = (
    # (column, row label, format)
    ("loss_model", "loss per study: model", ".3f"),
    ("loss_prior", "loss per study: training prior", ".3f"),
    ("loss_max_score", "loss per study: max box score rule", ".3f"),
    ("gain_over_prior", "prior - model (per study; > 0: better than the prior)", "+.3f"),
    ("global_loss_model", "loss global: model", ".3f"),
    ("global_loss_prior", "loss global: training prior", ".3f"),
    ("auc_patient", "AUC patient_overall: model", ".3f"),
    ("auc_patient_max_score", "AUC patient_overall: max box score rule", ".3f"),
    ("auc_levels_mean", "AUC C1-C7 (mean over levels): model", ".3f"),
    ("box_ap50", "box AP50, every test slice", ".3f"),
    ("classifier_auc", "vertebra classifier AUC, study x level", ".3f"),
    ("level_accuracy", "level accuracy (share of slices)", ".3f"),
    ("detector_epochs", "detector epochs in the budget", ".1f"),
    ("detector_val_map50", "detector validation mAP50", ".3f"),
    ("train_min", "train minutes (budget + overrun)", ".1f"),
    ("cell_min", "cell minutes (synthesis + train + predict + scores)", ".1f"),
    ("train_cpu_share", "share of the machine's CPU that train got (1 = every core)", ".2f"),
    ("load", "load average (15 min) at the end of the cell", ".1f"),
)


# ---------------------------------------------------------------- configs
def split_overrides(overrides: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split pipeline --set items into per-stage `<stage>.set` lists (to be appended, not replaced) and the rest."""
    lists: dict[str, list[str]] = {stage: [] for stage in STAGES}
    rest = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        stage = key[: -len(".set")] if key.endswith(".set") else None
        if sep and stage in lists:
            value = yaml.safe_load(raw)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InputError(item, f"{key} must be a list of key=value strings, e.g. {key}='[\"train.epochs=5\"]'")
            lists[stage] += value
        else:
            rest.append(item)
    return lists, rest


def ladder_config(seed: int, overrides: Sequence[str] = ()) -> Config:
    """The pipeline config a cell trains: the demo's, every seed set to `seed`, then the run's overrides."""
    from spinefrac.demo import demo_config

    lists, rest = split_overrides(overrides)
    sets = [f"{stage}.set=" + json.dumps([*STAGE_SETS.get(stage, ()), *(s.format(s=seed) for s in SEED_SETS.get(
        stage, ())), *lists[stage]]) for stage in STAGES]
    return demo_config(None, [*LADDER_SETS, *rest, *sets])


def ensure_locator(work: Path, seed: int, cfg: Config, args: argparse.Namespace, env: Mapping[str, str]
                   ) -> tuple[Path, float]:
    """The seed's shared locator run folder (trained once, with the cell config's locator settings, on the
    LOCATOR_WORLD's training studies of the seed), and the seconds it took when it was made."""
    from data_prep.runs.resume import weights_id
    from spinefrac.model_folder import WEIGHTS
    from spinefrac.pipeline import stage_configs

    loc_cfg = stage_configs(cfg)["locator"]
    studies = synth_settings(LOCATOR_WORLD, seed, "train", args.train_studies, args.synth_set)
    settings = {"seed": seed, "studies": synth_settings_key(studies), "locator": loc_cfg.to_dict()}
    key = settings_key(plain(settings))
    root = work / "locators" / f"seed{seed}-{key}"
    record = root / "locator.json"
    if record.is_file() and (root / "run" / WEIGHTS).is_file():
        return root / "run", float(json.loads(record.read_text(encoding="utf-8"))["seconds"])
    data = work / "data" / LOCATOR_WORLD / f"seed{seed}" / "train"
    ensure_studies(data, studies, args.workers)
    root.mkdir(parents=True, exist_ok=True)
    dump_config(loc_cfg, root / "locator.yaml")
    log.info("ladder: the shared locator of seed %d -> %s", seed, root)
    t0, c0 = time.perf_counter(), _children_cpu()
    _spinefrac(["prepare-locator", str(data), "--out", str(root / "dataset"), "--config", str(root / "locator.yaml"),
                "--workers", str(args.workers), "--overwrite", "--no-progress"], root / "locator.log", env)
    _spinefrac(["train-locator", str(root / "dataset" / "data.yaml"), "--out", str(root / "run"), "--config",
                str(root / "locator.yaml"), "--overwrite", "--no-progress"], root / "locator.log", env)
    seconds = time.perf_counter() - t0
    write_json_atomic(record, {"key": key, "settings": plain(settings), "seconds": round(seconds, 1),
                               "cpu_s": round(_children_cpu() - c0, 1), "weights_sha256": weights_id(root / "run" / WEIGHTS)})
    return root / "run", seconds


def synth_settings(world: str, seed: int, split: str, n_studies: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """What a cached study set must have been made with: the world, seed, split, count and resolved synth config
    (the world's, then the demo's protocol, configs/pipeline.yaml demo.synth_set, then `extra`)."""
    from data_prep.runs.config import load_config
    from data_prep.synthetic.synth import synth_config

    protocol = list(load_config("pipeline").demo.synth_set)
    return {"world": world, "seed": seed, "split": split, "n_studies": n_studies,
            "config": synth_config(world, None, [*protocol, *extra]).to_dict()}


# ---------------------------------------------------------------- study sets
def ensure_studies(root: Path, settings: Mapping[str, Any], workers: int) -> float:
    """Synthesise a study set unless a complete one with the same settings exists; return its synthesis seconds
    (as recorded when it was made, for a cached set).

    A folder made with other settings is refused, never deleted; one left unfinished with these settings is
    made again.
    """
    from data_prep.synthetic.synth import META_NAME, synthesize

    if (root / f"{META_NAME}.meta.json").is_file():
        meta = read_sidecar(root / META_NAME)
        extra = meta.get("extra", {})
        had = {"world": extra.get("world"), "seed": extra.get("seed"), "split": extra.get("split"),
               "n_studies": extra.get("n_studies"), "config": meta.get("config")}
        changes = changed_settings(plain(had), plain(dict(settings)))
        if changes:
            raise InputError(root, f"holds studies made with other settings ({describe_changes(changes)}); use "
                                   "another --work, or delete the folder to make them again")
        if extra.get("status") == "complete":
            return float(meta.get("runtime_s") or 0.0)
    t0 = time.perf_counter()
    synthesize(root, n_studies=int(settings["n_studies"]), seed=int(settings["seed"]), split=str(settings["split"]),
               config=Config(settings["config"], "synth"), progress=False, overwrite=True, workers=workers,
               world=str(settings["world"]))
    return time.perf_counter() - t0


# ---------------------------------------------------------------- scores
def classifier_auc(vertebrae: pd.DataFrame, labels: pd.DataFrame) -> tuple[float, float]:
    """AUC of cls_max against the level labels over every study x level (unscored levels count as 0), and the
    share of study x level pairs that have a score."""
    from sklearn.metrics import roc_auc_score

    truth = labels.set_index(labels[STUDY_COL].astype(str))[list(LEVELS)]
    v = vertebrae.assign(**{STUDY_COL: vertebrae[STUDY_COL].astype(str)}).set_index([STUDY_COL, "level"])["cls_max"]
    y, p = [], []
    for uid, row in truth.iterrows():
        for level in LEVELS:
            y.append(int(row[level]))
            p.append(v.get((uid, level), np.nan))
    p_arr = np.asarray(p, dtype=float)
    coverage = float(np.isfinite(p_arr).mean()) if len(p_arr) else 0.0
    y_arr = np.asarray(y)
    if len(set(y_arr.tolist())) < 2:
        return float("nan"), coverage
    return float(roc_auc_score(y_arr, np.nan_to_num(p_arr, nan=0.0))), coverage


def level_accuracy(pred_slices: pd.DataFrame, truth_slices: pd.DataFrame) -> float:
    """Share of the truth's slices whose predicted C1-C7 presence is exactly right (benchmarks.bench_levels)."""
    from benchmarks.bench_levels import bits_of, compare, summarise

    truth_slices = truth_slices.assign(**{STUDY_COL: truth_slices[STUDY_COL].astype(str)})
    pred_slices = pred_slices.assign(**{STUDY_COL: pred_slices[STUDY_COL].astype(str)})
    n_of = truth_slices.groupby(STUDY_COL)["slice_index"].max() + 1
    uids = sorted(set(truth_slices[STUDY_COL]) & set(pred_slices[STUDY_COL]))
    if not uids or not (set(LEVELS) <= set(pred_slices.columns) or f"p_{LEVELS[0]}" in pred_slices.columns):
        return float("nan")
    rows = [compare(bits_of(pred_slices, u, int(n_of[u])), bits_of(truth_slices, u, int(n_of[u]))) for u in uids]
    return summarise(rows)["slice_acc"]


def score_cell(test: Path, model: Path, pred: Path) -> dict[str, Any]:
    """Every figure of a cell from its test studies' truth, its model folder and its prediction folder."""
    from aggregation.evaluate import evaluate_predictions
    from benchmarks.bench_detect_quality import box_ap50

    truth = test / "truth"
    report = evaluate_predictions(pred / "predictions.csv", labels=truth / "train.csv", boxes=pred / "boxes.csv",
                                  prior=model / "prior.json").to_dict()["scores"]
    boxes = pd.read_csv(pred / "boxes.csv", dtype={STUDY_COL: str})
    fracture_boxes = pd.read_csv(truth / "fracture_boxes.csv", dtype={STUDY_COL: str})
    labels = pd.read_csv(truth / "train.csv", dtype={STUDY_COL: str})
    vertebrae_csv = pred / "vertebrae.csv"
    cls_auc, coverage = (classifier_auc(pd.read_csv(vertebrae_csv, dtype={STUDY_COL: str}), labels)
                         if vertebrae_csv.is_file() else (float("nan"), 0.0))
    meta = json.loads((model / "model.json").read_text(encoding="utf-8"))
    det = meta.get("stages", {}).get("train-detector", {})
    m = report["model"]
    level_aucs = [m["auc"].get(lv) for lv in LEVELS]
    out = {"loss_model": m["competition_loss"], "loss_prior": report["prior"]["competition_loss"],
           "loss_max_score": report["max_score"]["competition_loss"],
           "gain_over_prior": report["prior"]["competition_loss"] - m["competition_loss"],
           "global_loss_model": m["global_loss"], "global_loss_prior": report["prior"]["global_loss"],
           "auc_patient": m["auc"].get("patient_overall"),
           "auc_patient_max_score": report["max_score"]["auc"].get("patient_overall"),
           "auc_levels_mean": _nanmean(level_aucs),
           **{f"auc_{lv}": a for lv, a in zip(LEVELS, level_aucs, strict=True)},
           "box_ap50": box_ap50(boxes, fracture_boxes)["ap50"],
           "classifier_auc": cls_auc, "cls_coverage": coverage,
           "level_accuracy": level_accuracy(pd.read_csv(pred / "slices.csv", dtype={STUDY_COL: str}),
                                            pd.read_csv(truth / "slice_levels.csv", dtype={STUDY_COL: str})),
           "detector_epochs": det.get("epochs"), "detector_val_map50": (det.get("metrics") or {}).get("metrics/mAP50(B)"),
           "budget_used_s": (meta.get("budget") or {}).get("used_s"),
           "test_studies": len(labels), "test_positive": int(labels["patient_overall"].sum())}
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


def _nanmean(values: Sequence[float | None]) -> float:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


# ---------------------------------------------------------------- cells
def run_cell(work: Path, label: str, world: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Synthesise (or reuse), train, predict and score one world x seed; skip it when finished with these settings."""
    cell = work / "runs" / label / world / f"seed{seed}"
    data = work / "data" / world / f"seed{seed}"
    cfg = ladder_config(seed, args.set)
    env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait.upper()} if args.omp_wait != "default" else dict(os.environ)
    locator_s = 0.0
    if args.locator == "shared":
        from data_prep.runs.resume import weights_id
        from spinefrac.model_folder import WEIGHTS

        run, locator_s = ensure_locator(work, seed, cfg, args, env)
        cfg = ladder_config(seed, [*args.set, f"locator.reuse={run}"])
    train_set = synth_settings(world, seed, "train", args.train_studies, args.synth_set)
    test_set = synth_settings(world, seed, "test", args.test_studies, args.synth_set)
    settings = {"label": label, "world": world, "seed": seed, "budget": args.budget, "omp_wait": args.omp_wait,
                "train_studies": synth_settings_key(train_set), "test_studies": synth_settings_key(test_set),
                "pipeline": cfg.to_dict(), "locator": args.locator}
    if args.locator == "shared":
        settings["locator_weights_sha256"] = weights_id(run / WEIGHTS)
    key = settings_key(plain(settings))
    done, started = cell / CELL_JSON, cell / "cell.settings.json"
    old = json.loads((done if done.is_file() else started).read_text(encoding="utf-8")) \
        if done.is_file() or started.is_file() else None
    if old is not None and old.get("key") == key and done.is_file():
        log.info("ladder %s %s seed %d: done already (%s), skipped", label, world, seed, done)
        return old
    if old is not None and old.get("key") != key:
        if not args.overwrite:
            raise InputError(cell, "holds a cell made with other settings ("
                             + describe_changes(changed_settings(old.get("settings"), plain(settings)))
                             + "); pass --overwrite to redo it, or use another --label or --work")
        log.warning("ladder: %s holds other settings; --overwrite: redoing the cell", cell)
        shutil.rmtree(cell)
    cell.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started, {"key": key, "settings": plain(settings)})
    t0 = time.perf_counter()
    log.info("ladder %s %s seed %d: studies", label, world, seed)
    synth_s = ensure_studies(data / "train", train_set, args.workers) + ensure_studies(data / "test", test_set,
                                                                                        args.workers)
    dump_config(cfg, cell / "pipeline.yaml")
    model, pred = cell / "model", cell / "pred"
    t1, c1 = time.perf_counter(), _children_cpu()
    log.info("ladder %s %s seed %d: train --budget %s", label, world, seed, args.budget)
    _spinefrac(["train", str(data / "train"), "--out", str(model), "--config", str(cell / "pipeline.yaml"),
                "--budget", args.budget, "--workers", str(args.workers), "--no-progress"], cell / "train.log", env)
    t2, c2 = time.perf_counter(), _children_cpu()
    log.info("ladder %s %s seed %d: predict", label, world, seed)
    _spinefrac(["predict", str(data / "test" / "test_images"), "--model", str(model), "--out", str(pred),
                "--test-csv", str(data / "test" / "test.csv"), "--workers", str(args.workers), "--overwrite",
                "--no-progress"], cell / "predict.log", env)
    t3, c3 = time.perf_counter(), _children_cpu()
    scores = score_cell(data / "test", model, pred)
    cell_s = synth_s + (time.perf_counter() - t1)
    result = {"label": label, "world": world, "seed": seed, **scores, "synth_s": round(synth_s, 1),
              "train_s": round(t2 - t1, 1), "predict_s": round(t3 - t2, 1), "cell_s": round(cell_s, 1),
              "locator_s": round(locator_s, 1),
              "train_cpu_s": round(c2 - c1, 1), "predict_cpu_s": round(c3 - c2, 1),
              "train_cpu_share": (c2 - c1) / max(t2 - t1, 1e-9) / (os.cpu_count() or 1),
              "train_min": (t2 - t1) / SECONDS_PER_MINUTE, "cell_min": cell_s / SECONDS_PER_MINUTE,
              "load": os.getloadavg()[2], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "wall_s": round(time.perf_counter() - t0, 1)}
    write_json_atomic(done, {**result, "key": key, "settings": plain(settings)})
    log.info("ladder %s %s seed %d: loss %.3f (prior %.3f), patient AUC %s, box AP50 %.3f, %.1f min", label, world,
             seed, result["loss_model"], result["loss_prior"], _fmt(result["auc_patient"], ".3f"),
             result["box_ap50"], result["cell_min"])
    return {**result, "key": key}


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def synth_settings_key(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A study set's identity in a cell's settings: its seed, split, size and the key of its synth config."""
    return {k: settings[k] for k in ("world", "seed", "split", "n_studies")} | {
        "config_key": settings_key(plain(settings["config"]))}


def _spinefrac(argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> None:
    """Run `spinefrac ARGV` in a child process (its own torch threads and memory), its output into `log_path`."""
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ spinefrac {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "spinefrac", *argv], stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(env), check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise RuntimeError(f"spinefrac {argv[0]} failed (exit {proc.returncode}); see {log_path}:\n" + "\n".join(tail))


# ---------------------------------------------------------------- table
def summarise_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Per world (in the run's order): n seeds, and each metric's mean and sample SD over seeds."""
    rows = []
    for world, g in cells.groupby("world", sort=False):
        row: dict[str, Any] = {"world": world, "n": len(g)}
        for col, _, _ in METRICS:
            vals = pd.to_numeric(g[col], errors="coerce").dropna() if col in g.columns else pd.Series(dtype=float)
            row[f"{col}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{col}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        row["wall_min_total"] = float(pd.to_numeric(g["cell_min"], errors="coerce").sum())
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(summary: pd.DataFrame, header: str) -> str:
    """Markdown: one row per metric, one column per world, `mean +- SD` over seeds."""
    worlds = summary["world"].tolist()
    lines = [header, "", "| | " + " | ".join(f"{w} (n={n})" for w, n in zip(worlds, summary["n"], strict=True)) + " |",
             "|---|" + "---|" * len(worlds)]
    for col, label, fmt in METRICS:
        cells = [f"{_fmt(r[f'{col}_mean'], fmt)} ± {_fmt(r[f'{col}_sd'], fmt.lstrip('+'))}"
                 if np.isfinite(r[f"{col}_sd"]) else _fmt(r[f"{col}_mean"], fmt) for _, r in summary.iterrows()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| world wall time, all seeds (min) | " + " | ".join(f"{v:.0f}" for v in summary["wall_min_total"])
                 + " |")
    return "\n".join(lines)


def _fmt(value: Any, fmt: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return format(v, fmt) if np.isfinite(v) else "n/a"


# ---------------------------------------------------------------- main
LABEL_CHARS = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""A --label names a folder: no separators, no leading dot."""


def synth_all(args: argparse.Namespace) -> int:
    """Make (or check) the cached train and test studies of every world x seed, seed by seed; print their times."""
    for seed in args.seeds:
        for world in args.worlds:
            for split, n in (("train", args.train_studies), ("test", args.test_studies)):
                root = args.work / "data" / world / f"seed{seed}" / split
                seconds = ensure_studies(root, synth_settings(world, seed, split, n, args.synth_set), args.workers)
                print(f"{root}: {n} studies, {seconds:.0f} s of synthesis", flush=True)
    return 0


def run_cells(args: argparse.Namespace) -> pd.DataFrame:
    """Run (or skip) every world x seed, seed by seed (so a run cut short still has every world); rewrite cells.csv
    after each cell; return its rows."""
    rows = []
    cells = pd.DataFrame()
    for seed in args.seeds:
        for world in args.worlds:
            rows.append(run_cell(args.work, args.label, world, seed, args))
            cells = pd.DataFrame(rows).drop(columns=["key", "settings"], errors="ignore")
            path = args.work / "runs" / args.label / CELLS_CSV
            write_csv_atomic(path, cells)
            write_sidecar(path, kind="ladder_cells", config={k: v for k, v in vars(args).items() if k != "work"},
                          inputs={"work": str(args.work)}, counts={"cells": len(cells)})
    return cells


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the ladder and write the per-seed CSV and the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", nargs="+", default=list(WORLDS), help="worlds of configs/worlds.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="replicates (data and training seeds)")
    p.add_argument("--budget", default=BUDGET, help="spinefrac train --budget of every cell")
    p.add_argument("--work", type=Path, required=True, help="cached studies (data/) and runs (runs/LABEL/)")
    p.add_argument("--label", default="baseline", help="name of this run's configuration (its folder and table)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline override for every cell's train, e.g. 'detector.set=[\"render.imgsz=288\"]' "
                        "(a <stage>.set list is appended to the ladder's own); repeatable")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    p.add_argument("--train-studies", type=int, default=TRAIN_STUDIES)
    p.add_argument("--test-studies", type=int, default=TEST_STUDIES)
    p.add_argument("--locator", choices=LOCATOR_MODES, default="shared",
                   help="shared: one locator per seed (20 epochs, outside the cells' budgets, on the default world's "
                        "training studies), which every world's cell reuses (locator.reuse), so the budget goes to the "
                        "detector and the classifier and the worlds share their levels; cell: each cell's train "
                        "trains its own inside the budget")
    p.add_argument("--synth-set", action="append", default=[], metavar="KEY=VALUE",
                   help="synth override after the ladder's protocol, for quick checks of the benchmark itself "
                        "(e.g. image.size=96); the ladder's figures use none. Cached studies are kept per setting "
                        "only by --work")
    p.add_argument("--omp-wait", choices=("passive", "default"), default=OMP_WAIT,
                   help="OMP_WAIT_POLICY of train and predict (passive: for a machine shared with other jobs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="redo cells made with other settings")
    p.add_argument("--synth-only", action="store_true",
                   help="only make (or check) the cached studies of every world x seed, e.g. ahead of a run on a "
                        "quieter machine; no training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from configs.durations import parse_duration
    from data_prep.errors import SpinefracError
    from data_prep.synthetic.synth import world_overrides
    from detector.offline import configure_ultralytics

    if not LABEL_CHARS.fullmatch(args.label):
        p.error(f"--label {args.label!r}: letters, digits, '_', '-' and '.' only, not first (it names a folder)")
    try:
        parse_duration(args.budget)                 # a bad budget, world or override fails before any work
        for world in args.worlds:
            world_overrides(world)
        ladder_config(args.seeds[0], args.set)
        configure_ultralytics()
        if args.synth_only:
            return synth_all(args)
        cells = run_cells(args)
    except (SpinefracError, ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    runs = args.work / "runs" / args.label
    summary = summarise_cells(cells)
    header = (f"Ladder `{args.label}`: budget {args.budget} per cell, {args.train_studies} training and "
              f"{args.test_studies} held-out studies per world and seed, seeds {' '.join(map(str, args.seeds))}; "
              f"mean ± {SPREAD} over seeds (n = seeds); overrides: {' '.join(args.set) or 'none'}; "
              f"synth overrides: {' '.join(args.synth_set) or 'none'}; "
              f"OMP_WAIT_POLICY {args.omp_wait}; locator: {args.locator}.")
    table = format_table(summary, header)
    write_text_atomic(runs / TABLE_MD, table + "\n")
    if args.out is not None:
        write_text_atomic(args.out, table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
