"""Ablation of issue 12 on held-out full-field synthetic studies: what each aggregator step and the classifier add.

    python -m benchmarks.bench_classifier --work WORK
    (or --model DIR --test DIR to reuse a trained model folder and synthetic test set, e.g. a demo's
     demo_out/model and demo_out/test)

Steps (through the library, as `spinefrac train` / `predict` run it):
  1. `spinefrac synth` the demo's training set (seed S) and --test-studies held-out studies (seed S+1), unless
     --model/--test are given.
  2. `spinefrac train` with the demo's config (locator, detector, one vertebra classifier per fold): the
     aggregator's studies get detector outputs and out-of-fold classifier scores (work/aggregator_detect/).
  3. `spinefrac predict` once on the test studies (boxes, slices, vertebrae with the fold classifiers averaged).
  4. Every row refits only the aggregator, with its own feature groups and sample weights, on the same
     training features, and predicts the same test features. Rows:
       today            groups [detector], sample_weights none   (the aggregator before issue 12)
       + metric weights groups [detector], sample_weights metric
       + length         groups [detector, length], metric
       + classifier     groups [detector, length, classifier], metric
       classifier alone groups [classifier], metric
     --repeats N refits each row with N aggregator seeds (model.random_state) and reports the mean.
Columns: per-study and global metric, patient AUC, per-level AUC, and the training time of what the row
needs (the detector and locator for every row; the classifier folds too for rows using its features), beside
the constant prior and the max-box-score rule. Compare as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.runs.registry import LEVELS, STUDY_COL

ROWS: tuple[tuple[str, list[str], str], ...] = (
    ("today (detector features, unweighted)", ["detector"], "none"),
    ("+ metric weights", ["detector"], "metric"),
    ("+ length-normalised features", ["detector", "length"], "metric"),
    ("+ classifier features", ["detector", "length", "classifier"], "metric"),
    ("classifier features alone", ["classifier"], "metric"),
)
"""(row label, features.groups, model.sample_weights)."""
CLASSIFIER_GROUP = "classifier"


def fit_rows(model_dir: Path, pred_dir: Path, labels_train: pd.DataFrame, labels_test: pd.DataFrame, *,
             repeats: int, rows_spec: tuple[tuple[str, list[str], str], ...] = ROWS,
             test_vertebrae: pd.DataFrame | None = None) -> list[dict]:
    """Refit the aggregator once per row (and seed) on the model's training features; score the test studies.

    `test_vertebrae` replaces the prediction folder's vertebrae.csv (another way of scoring the test crops).
    """
    from aggregation.evaluate import score_predictions
    from aggregation.features import build_features
    from aggregation.model import StudyAggregator
    from data_prep.runs.config import load_config
    from data_prep.runs.registry import TARGETS
    from spinefrac.results import read_detections

    agg_dir = model_dir / "work" / "aggregator_detect"
    folders = sorted(p for p in agg_dir.glob("fold*") if (p / "slices.csv").is_file()) or [agg_dir]
    tr_boxes, tr_slices, tr_vert = read_detections(folders)
    te_boxes, te_slices, te_vert = read_detections([pred_dir])
    te_vert = test_vertebrae if test_vertebrae is not None else te_vert
    train_uids = sorted(set(tr_slices[STUDY_COL].astype(str)))
    test_uids = sorted(set(te_slices[STUDY_COL].astype(str)))
    y = labels_test.set_index(STUDY_COL).loc[test_uids, list(TARGETS)].to_numpy(dtype=float)
    rows = []
    for label, groups, weights in rows_spec:
        losses, globals_, aucs, fit_s = [], [], [], []
        for seed in range(repeats):
            cfg = load_config("aggregation", model_dir / "aggregation.yaml",
                              [f"features.groups={json.dumps(groups)}", f"model.sample_weights={weights}",
                               f"model.random_state={seed}"])
            t0 = time.perf_counter()
            train_f = build_features(tr_boxes, tr_slices, config=cfg, studies=train_uids, vertebrae=tr_vert)
            model = StudyAggregator(cfg).fit(train_f, labels_train)
            fit_s.append(time.perf_counter() - t0)
            test_f = build_features(te_boxes, te_slices, config=cfg, studies=test_uids, vertebrae=te_vert)
            p = model.predict_proba(test_f).set_index(STUDY_COL).loc[test_uids, list(TARGETS)].to_numpy(float)
            s = score_predictions(y, p, 0.5)
            losses.append(s["competition_loss"])
            globals_.append(s["global_loss"])
            aucs.append(s["auc"])
        rows.append({"row": label, "groups": groups, "sample_weights": weights,
                     "loss_per_study": float(np.mean(losses)), "loss_per_study_sd": float(np.std(losses)),
                     "loss_global": float(np.mean(globals_)),
                     "auc": {t: float(np.nanmean([a[t] for a in aucs])) for t in TARGETS},
                     "aggregator_fit_s": float(np.mean(fit_s))})
    return rows


def ensemble_check(model: Path, test: Path, work: Path, labels_train: pd.DataFrame, labels_test: pd.DataFrame, *,
                   repeats: int, workers: int) -> list[dict]:
    """Predict-time classifier choice: the mean of the K fold models, one model retrained on every study, fold 0.

    The aggregator is the same in all three (trained on the fold models' out-of-fold scores); only the test
    studies' classifier scores change. Retraining on all studies costs one more classifier training (timed).
    """
    from data_prep.runs.config import load_config
    from detector.classifier import train_classifier
    from detector.classifier_dataset import read_classifier_index, write_fold_layout
    from detector.detect import detect_studies
    from spinefrac.model_folder import WEIGHTS, open_model
    from spinefrac.pipeline import CLASSIFIER_DATASET

    folder = open_model(model)
    ccfg = folder.configs["classifier"]
    dataset = model / "work" / CLASSIFIER_DATASET
    all_ds = work / "classifier_all"
    all_ds.mkdir(parents=True, exist_ok=True)
    if not (all_ds / "images").exists():
        (all_ds / "images").symlink_to((dataset / "images").resolve())
    index = read_classifier_index(dataset)
    patient = labels_train.set_index(STUDY_COL)["patient_overall"].astype(int).to_dict()
    write_fold_layout(all_ds, index, folds={0: sorted(set(index[STUDY_COL].astype(str)))}, patient=patient,
                      val_share=float(ccfg["prepare"]["val_share"]), seed=int(ccfg["prepare"]["seed"]))
    run = work / "classifier_all_run"
    t0 = time.perf_counter()
    if not (run / WEIGHTS).is_file():
        train_classifier(all_ds / "fold0", run, config=ccfg)
    retrain_s = time.perf_counter() - t0
    variants = {"mean of the fold models (predict's default)": folder.classifier_weights,
                "one model retrained on every study": [run / WEIGHTS],
                "fold 0 alone": folder.classifier_weights[:1]}
    full = tuple(r for r in ROWS if r[1] == ["detector", "length", "classifier"])
    out = []
    for name, weights in variants.items():
        pred = work / f"pred_cls_{len(out)}"
        detect_studies([test / "test_images"], weights=folder.detector_weights, out=pred,
                       config=load_config("detector", model / "detector.yaml", ["detect.overlays=false"]),
                       locator=folder.locator_weights, locator_config=folder.configs["locator"],
                       levels_config=folder.configs["levels"], classifier=weights, classifier_config=ccfg,
                       workers=workers, progress=False, overwrite=True)
        from aggregation.features import load_vertebrae_table

        rows = fit_rows(model, pred, labels_train, labels_test, repeats=repeats, rows_spec=full,
                        test_vertebrae=load_vertebrae_table(pred / "vertebrae.csv"))
        out.append({**rows[0], "row": name, "extra_training_s": retrain_s if "retrained" in name else 0.0})
    return out


def training_seconds(model_dir: Path) -> dict[str, float]:
    """Seconds of the training stages (model.json), summed per model: locator, detector, classifier folds."""
    stages = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))["stages"]

    def total(word: str) -> float:
        return float(sum(v.get("runtime_s", 0.0) for k, v in stages.items() if word in k))

    return {"locator_s": total("locator"), "detector_s": total("-detector"), "classifier_s": total("classifier"),
            "detect_aggregator_studies_s": total("detect-aggregator")}


def main(argv: list[str] | None = None) -> int:
    """Run the ablation and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-studies", type=int, default=None, help="default: the demo's (configs/pipeline.yaml)")
    p.add_argument("--test-studies", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="aggregator seeds per row (mean reported)")
    p.add_argument("--set", action="append", default=[], help="pipeline overrides (key=value), e.g. "
                                                              "classifier.set=[\"train.epochs=30\"]")
    p.add_argument("--model", type=Path, default=None, help="a trained model folder to reuse (skips training)")
    p.add_argument("--test", type=Path, default=None, help="a synthetic test folder to reuse (test_images/, truth/)")
    p.add_argument("--ensemble-check", action="store_true",
                   help="also compare the predict-time classifier: mean of the fold models vs one retrained on "
                        "every study vs fold 0 alone")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keep everything here (default: a new temp folder)")
    args = p.parse_args(argv)

    from detector.offline import configure_ultralytics

    configure_ultralytics()            # before anything imports Ultralytics (offline, settings in our cache)
    from data_prep.runs.tables import read_table
    from data_prep.synthetic.synth import synth_config, synthesize
    from spinefrac.demo import demo_config
    from spinefrac.pipeline import predict_all, train_all

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_classifier_"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(None, args.set)
    synth_cfg = synth_config(cfg.demo.world, None, list(cfg.demo.synth_set))
    data, test = work / "data", args.test or work / "test"
    model = args.model or work / "model"
    timings = {}
    if args.model is None:
        if not (data / "train.csv").is_file():
            synthesize(data, n_studies=args.train_studies or int(cfg.demo.train_studies), seed=args.seed,
                       split="train", config=synth_cfg, progress=False, overwrite=True)
        t0 = time.perf_counter()
        train_all(data, model, config=cfg, workers=args.workers, progress=False)
        timings["train_s"] = round(time.perf_counter() - t0, 1)
    if not (test / "test.csv").is_file():
        synthesize(test, n_studies=args.test_studies, seed=args.seed + 1, split="test", config=synth_cfg,
                   progress=False, overwrite=True)
    pred = work / "pred"
    t0 = time.perf_counter()
    predict_all([test / "test_images"], model_dir=model, out=pred, test_csv=test / "test.csv", workers=args.workers,
                progress=False, overwrite=True)
    timings["predict_s"] = round(time.perf_counter() - t0, 1)
    train_root = Path(json.loads((model / "model.json").read_text())["stages"]["prepare-detector"]["settings"]
                      ["data_root"])
    labels_train = read_table(train_root / "train.csv", "train")
    labels_test = read_table(test / "truth" / "train.csv", "train")
    rows = fit_rows(model, pred, labels_train, labels_test, repeats=args.repeats)
    cost = training_seconds(model)
    baselines = _baselines(model, pred, test)
    result = {"rows": rows, "training": cost, "timings": timings, "baselines": baselines,
              "test_studies": int(len(labels_test)), "model": str(model), "pred": str(pred)}
    if args.ensemble_check:
        result["ensemble"] = ensemble_check(model, test, work, labels_train, labels_test, repeats=args.repeats,
                                            workers=args.workers)
    (work / "bench_classifier.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(format_table(result))
    return 0


def _baselines(model: Path, pred: Path, test: Path) -> dict:
    """The prior and max-box-score rules on the same test studies (aggregation.evaluate)."""
    from aggregation.evaluate import evaluate_predictions

    report = evaluate_predictions(pred / "predictions.csv", labels=test / "truth" / "train.csv",
                                  boxes=pred / "boxes.csv", prior=model / "prior.json").to_dict()
    return {name: {"loss_per_study": report["scores"][name]["competition_loss"],
                   "loss_global": report["scores"][name]["global_loss"],
                   "auc_patient": report["scores"][name]["auc"]["patient_overall"]}
            for name in ("prior", "max_score")}


def format_table(result: dict) -> str:
    """Markdown table: one row per ablation step, then the baselines."""
    cost = result["training"]
    head = ("| row | loss per study | loss global | patient AUC | C1-C7 AUC | training s |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        train_s = cost["locator_s"]        # every row: the locator gives the levels (and places the crops)
        train_s += cost["detector_s"] if r["groups"] != [CLASSIFIER_GROUP] else 0
        train_s += cost["classifier_s"] if CLASSIFIER_GROUP in r["groups"] else 0
        levels = "/".join(f"{r['auc'][lv]:.2f}" for lv in LEVELS)
        lines.append(f"| {r['row']} | {r['loss_per_study']:.3f} (sd {r['loss_per_study_sd']:.3f}) | "
                     f"{r['loss_global']:.3f} | {r['auc']['patient_overall']:.3f} | {levels} | {train_s:.0f} |")
    for name, b in result["baselines"].items():
        lines.append(f"| {name} (baseline) | {b['loss_per_study']:.3f} | {b['loss_global']:.3f} | "
                     f"{b['auc_patient']:.3f} | | |")
    if result.get("ensemble"):
        lines.append("\n| classifier at predict (aggregator: every feature group) | loss per study | loss global | "
                     "patient AUC | extra training s |\n|---|---|---|---|---|")
        for r in result["ensemble"]:
            lines.append(f"| {r['row']} | {r['loss_per_study']:.3f} | {r['loss_global']:.3f} | "
                         f"{r['auc']['patient_overall']:.3f} | {r['extra_training_s']:.0f} |")
    lines.append(f"\n{result['test_studies']} held-out studies; training seconds from model.json "
                 f"(locator {cost['locator_s']:.0f} s, detector {cost['detector_s']:.0f} s, classifier folds "
                 f"{cost['classifier_s']:.0f} s; detecting the aggregator's studies {cost['detect_aggregator_studies_s']:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
