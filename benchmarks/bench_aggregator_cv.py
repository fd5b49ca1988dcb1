"""Which aggregator settings suit a model folder's training studies? Repeated k-fold CV inside them, no test set.

Reads what `spinefrac train` left in MODEL_DIR: the aggregator's features (`work/aggregator_detect/features.csv`)
and its resolved `aggregation.yaml`; the labels come from the training train.csv. Each variant is a list of
`--set`-style overrides of the folder's settings (the first
preset row: the folder's own; the second: configs/aggregation.yaml's tree defaults, which the demo overrides); the table gives the mean per-study competition loss over `--repeats` x `--folds`
stratified splits of the aggregator's studies (the variant is refitted on each training part).
    python -m benchmarks.bench_aggregator_cv --model demo_out/model --labels demo_out/data/train.csv
    python -m benchmarks.bench_aggregator_cv --model M --labels L --variant "model.max_depth=2,model.max_iter=100"
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from aggregation.metric import competition_loss
from aggregation.model import StudyAggregator
from data_prep.runs import registry
from data_prep.runs.config import load_config
from data_prep.runs.tables import read_csv_table

FEATURES = Path("work") / "aggregator_detect" / "features.csv"
DEFAULT_VARIANTS = (
    "",
    "model.max_depth=null,model.max_iter=150",
    "model.max_depth=2,model.max_iter=100",
    "model.max_iter=50",
    "model.learning_rate=0.02",
    "model.min_samples_leaf=20",
    "model.min_samples_leaf=20,model.max_leaf_nodes=4",
    "model.l2_regularization=10",
)


def cv_loss(features: pd.DataFrame, labels: pd.DataFrame, config: object, *, folds: int, repeats: int) -> float:
    """Return the mean held-out per-study loss of the aggregator over repeated stratified k-fold splits."""
    losses = []
    for rep in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=rep)
        for tr, va in splitter.split(labels, labels[registry.PATIENT]):
            ltr, lva = labels.iloc[tr], labels.iloc[va]
            model = StudyAggregator(config).fit(
                features[features[registry.STUDY_COL].isin(ltr[registry.STUDY_COL])], ltr)
            pred = model.predict_proba(features[features[registry.STUDY_COL].isin(lva[registry.STUDY_COL])])
            losses.append(competition_loss(lva, pred))
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> None:
    """Print the CV loss of every variant."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder written by spinefrac train")
    ap.add_argument("--labels", type=Path, required=True, help="the training train.csv")
    ap.add_argument("--variant", action="append", help="comma-separated overrides; repeatable (default: a preset list)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    logging.getLogger("aggregation").setLevel(logging.ERROR)
    features = read_csv_table(args.model / FEATURES, (registry.STUDY_COL,), "aggregator features")
    labels = read_csv_table(args.labels, (registry.STUDY_COL, *registry.TARGETS), "labels")
    labels = labels[labels[registry.STUDY_COL].isin(features[registry.STUDY_COL])].reset_index(drop=True)
    print(f"{len(labels)} aggregator studies ({int(labels[registry.PATIENT].sum())} positive), "
          f"{args.repeats} x {args.folds}-fold CV")
    for variant in args.variant or DEFAULT_VARIANTS:
        sets = [s for s in variant.split(",") if s]
        config = load_config("aggregation", args.model / "aggregation.yaml", sets)
        loss = cv_loss(features, labels, config, folds=args.folds, repeats=args.repeats)
        print(f"  CV loss per study {loss:.4f}  {variant or '(model folder settings)'}", flush=True)


if __name__ == "__main__":
    main()
