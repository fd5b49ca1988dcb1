"""Does the chosen aggregator ever do worse than the simple rules? Held-out loss and patient AUC of every candidate.

Two test beds, each repeated over seeds (mean and standard deviation over seeds):
- simulated (default): detector outputs simulated from synthetic truth (`bench_aggregation.simulate_world`, worlds
  `bench_aggregation.WORLDS`: "weak" is the user's case of issue 22: few aggregator studies, fracture boxes often
  missed, scored like false positives and put on the wrong level, a weak classifier found on under half the
  levels). Per seed S: --train-studies aggregator studies (seed S) and --test-studies held-out studies (seed
  S + 1000) of the same world; the aggregator is fitted (model.random_state = S) and scores the held-out studies.
- a model folder (--model M --pred P --truth T --labels L): refit the aggregator on M's aggregator studies
  (M/work/aggregator_detect/, labels L, the folder's aggregation.yaml plus --set) with model.random_state = S,
  and score the prediction folder P's studies (boxes.csv, slices.csv, vertebrae.csv) against T (their train.csv).
Rows: every candidate fitted on all training studies (prior, max_score_rule, gbm, blend), the chosen one, and
the uncalibrated "max box score" rule `spinefrac evaluate` prints (probability = max box score on the level).
    python -m benchmarks.bench_candidates --worlds weak,medium,none,default --seeds 0,1,2
    python -m benchmarks.bench_candidates --model demo_out/model --pred demo_out/predict \\
        --truth demo_out/test/truth/train.csv --labels demo_out/data/train.csv --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from aggregation.candidates import CANDIDATES
from aggregation.evaluate import max_score_baseline, score_predictions
from aggregation.features import build_features
from aggregation.model import StudyAggregator
from data_prep.runs import registry
from data_prep.runs.config import load_config

CHOSEN = "chosen"
RAW_RULE = "max box score (uncalibrated)"
ROWS: tuple[str, ...] = (*CANDIDATES, CHOSEN, RAW_RULE)


def held_out_scores(model: StudyAggregator, features: pd.DataFrame, boxes: pd.DataFrame,
                    labels: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Return {row: {loss, auc_patient}} of every candidate, the chosen one and the raw rule on held-out studies."""
    uids = [str(u) for u in pd.unique(features[registry.STUDY_COL])]
    preds = model.predict_candidates(features)
    preds[CHOSEN] = preds[model.chosen_]
    preds[RAW_RULE] = max_score_baseline(boxes, uids)
    y = labels.assign(**{registry.STUDY_COL: labels[registry.STUDY_COL].astype(str)}).set_index(
        registry.STUDY_COL).loc[uids, list(registry.TARGETS)].to_numpy(dtype=float)
    out = {}
    for name, df in preds.items():
        p = df.assign(**{registry.STUDY_COL: df[registry.STUDY_COL].astype(str)}).set_index(
            registry.STUDY_COL).loc[uids, list(registry.TARGETS)].to_numpy(dtype=float)
        s = score_predictions(y, p, threshold=0.5)
        out[name] = {"loss": s["competition_loss"], "auc_patient": s["auc"][registry.PATIENT]}
    return out


def simulated_seed(world_name: str, seed: int, *, n_train: int, n_test: int, overrides: Sequence[str]) -> dict:
    """Fit on one seed's simulated aggregator studies and score its held-out studies."""
    from benchmarks.bench_aggregation import WORLDS, simulate_world

    world = WORLDS[world_name]
    cfg = load_config("aggregation", overrides=[*overrides, f"model.random_state={seed}"])
    b, s, lab, v = simulate_world(n_train, seed, world)
    tb, ts, tlab, tv = simulate_world(n_test, seed + 1000, world)
    t0 = time.perf_counter()
    model = StudyAggregator(cfg).fit(build_features(b, s, config=cfg, vertebrae=v), lab)
    fit_s = time.perf_counter() - t0
    scores = held_out_scores(model, build_features(tb, ts, config=cfg, vertebrae=tv), tb, tlab)
    return {"chosen": model.chosen_, "fit_s": fit_s, "scores": scores, "n_pos": int(lab[registry.PATIENT].sum())}


def model_folder_seed(model_dir: Path, pred_dir: Path, truth: Path, labels: Path, seed: int,
                      overrides: Sequence[str]) -> dict:
    """Refit the aggregator on a model folder's aggregator studies (seed) and score a prediction folder's studies."""
    from data_prep.runs.tables import read_table
    from spinefrac.results import read_detections

    cfg = load_config("aggregation", model_dir / "aggregation.yaml", [*overrides, f"model.random_state={seed}"])
    agg_dir = model_dir / "work" / "aggregator_detect"
    folders = sorted(p for p in agg_dir.glob("fold*") if (p / "slices.csv").is_file()) or [agg_dir]
    b, s, v = read_detections(folders)
    tb, ts, tv = read_detections([pred_dir])
    train_labels, test_labels = read_table(labels, "train"), read_table(truth, "train")
    uids = sorted(set(s[registry.STUDY_COL].astype(str)))
    t0 = time.perf_counter()
    model = StudyAggregator(cfg).fit(build_features(b, s, config=cfg, studies=uids, vertebrae=v), train_labels)
    fit_s = time.perf_counter() - t0
    test_uids = sorted(set(ts[registry.STUDY_COL].astype(str)))
    scores = held_out_scores(model, build_features(tb, ts, config=cfg, studies=test_uids, vertebrae=tv), tb,
                             test_labels)
    pos = train_labels[train_labels[registry.STUDY_COL].astype(str).isin(uids)][registry.PATIENT].sum()
    return {"chosen": model.chosen_, "fit_s": fit_s, "scores": scores, "n_pos": int(pos)}


def summarise(name: str, runs: list[dict]) -> pd.DataFrame:
    """Return one row per predictor: mean and sd over seeds of held-out loss and patient AUC."""
    rows = []
    for row in ROWS:
        loss = [r["scores"][row]["loss"] for r in runs if row in r["scores"]]
        auc = [r["scores"][row]["auc_patient"] for r in runs if row in r["scores"]]
        if not loss:
            continue
        rows.append({"test bed": name, "predictor": row, "loss mean": np.mean(loss), "loss sd": np.std(loss),
                     "AUC patient mean": np.nanmean(auc), "AUC patient sd": np.nanstd(auc), "seeds": len(loss)})
    return pd.DataFrame(rows)


def aims(runs: list[dict]) -> str:
    """Per seed: is the chosen loss <= min(prior, calibrated rule, raw rule) and its AUC >= the rules'?"""
    ok_loss = sum(r["scores"][CHOSEN]["loss"] <= min(r["scores"][k]["loss"] for k in ("prior", "max_score_rule",
                                                                                         RAW_RULE)) + 1e-12
                  for r in runs)
    ok_auc = sum(r["scores"][CHOSEN]["auc_patient"] >= r["scores"]["max_score_rule"]["auc_patient"] - 1e-12
                 for r in runs)
    ok_raw = sum(r["scores"][CHOSEN]["auc_patient"] >= r["scores"][RAW_RULE]["auc_patient"] - 1e-12 for r in runs)
    chosen = ", ".join(r["chosen"] for r in runs)
    return (f"chosen per seed: {chosen}; loss <= min(prior, rules) in {ok_loss}/{len(runs)} seeds; patient AUC >= "
            f"calibrated rule's in {ok_auc}/{len(runs)}, >= raw rule's in {ok_raw}/{len(runs)}; fit "
            f"{np.mean([r['fit_s'] for r in runs]):.1f} s per seed")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: simulated worlds by default, or a model folder with --model/--pred/--truth/--labels."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="weak,medium,none,default", help="comma-separated bench_aggregation.WORLDS")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--train-studies", type=int, default=40, help="simulated aggregator studies per seed")
    ap.add_argument("--test-studies", type=int, default=400, help="simulated held-out studies per seed")
    ap.add_argument("--set", action="append", default=[], help="aggregation override key=value (repeatable)")
    ap.add_argument("--model", type=Path, default=None, help="a model folder written by spinefrac train")
    ap.add_argument("--pred", type=Path, default=None, help="a prediction folder of held-out studies")
    ap.add_argument("--truth", type=Path, default=None, help="the held-out studies' train.csv")
    ap.add_argument("--labels", type=Path, default=None, help="the training train.csv (the aggregator's labels)")
    args = ap.parse_args(argv)
    logging.getLogger("aggregation").setLevel(logging.ERROR)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    given = [args.model, args.pred, args.truth, args.labels]
    if any(given) and not all(given):
        ap.error("--model, --pred, --truth and --labels go together")
    tables = []
    if all(given):
        runs = [model_folder_seed(args.model, args.pred, args.truth, args.labels, s, args.set) for s in seeds]
        print(f"model folder {args.model} ({runs[0]['n_pos']} positive aggregator studies), held out {args.pred}")
        print("  " + aims(runs), flush=True)
        tables.append(summarise(str(args.model), runs))
    else:
        for world in [w for w in args.worlds.split(",") if w]:
            runs = [simulated_seed(world, s, n_train=args.train_studies, n_test=args.test_studies,
                                   overrides=args.set) for s in seeds]
            print(f"world {world}: {args.train_studies} aggregator studies, {args.test_studies} held out")
            print("  " + aims(runs), flush=True)
            tables.append(summarise(world, runs))
    table = pd.concat(tables, ignore_index=True)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
