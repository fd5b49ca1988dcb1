"""`spinefrac evaluate`: score study-level predictions against labels, beside two baselines.

Reports, for the model and for each baseline on the same studies: the competition metric (per-study and
global normalisation), per-target AUC, and sensitivity / specificity at a threshold. Baselines:
- "prior": every study gets the positive rate of each target in the labels file (all its studies);
- "max_score" (needs boxes.csv with levels): probability of level L = the highest box score on L
  (the box's main `level`), 0 without a box; patient_overall = max over levels.
With `out`: metrics.json, roc.png and calibration.png.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import write_json_atomic
from data_prep.runs.tables import read_csv_table, read_table

from .features import LEVEL_COL, WEIGHT_COLS
from .metric import competition_loss_arrays, global_loss_arrays
from .submission import (
    FAILED_COL,
    FRACTURED,
    ROW_ID,
    predictions_from_submission,
    prior_predictions,
    training_prior,
)

logger = logging.getLogger("aggregation")

MODEL = "model"
PRIOR = "prior"
MAX_SCORE = "max_score"
METRICS_FILE = "metrics.json"
ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
PLOT_COLS = 4
PLOT_CELL_IN = 3.2
PLOT_DPI = 100


@dataclass
class EvalReport:
    """Metrics of the model and the baselines on the same studies; `format()` gives the printed table."""

    predictions: Path
    labels: Path
    n_studies: int
    n_failed: int
    threshold: float
    scores: dict[str, dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    prior_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (NaN AUCs become null)."""
        return _nan_to_none({"predictions": str(self.predictions), "labels": str(self.labels),
                             "n_studies": self.n_studies, "n_failed": self.n_failed, "threshold": self.threshold,
                             "prior_source": self.prior_source, "scores": self.scores,
                             "files": [str(f) for f in self.files]})

    def format(self) -> str:
        """Return a human-readable table of every metric, model beside baselines."""
        names = list(self.scores)
        width = 12
        head = f"{'':<24}" + "".join(f"{n:>{width}}" for n in names)
        lines = [f"evaluated {self.n_studies} studies: {self.predictions} vs {self.labels}"
                 + (f" ({self.n_failed} failed, given the prior)" if self.n_failed else ""),
                 f"prior baseline: {self.prior_source}", head]

        def row(label: str, get: Any) -> str:
            vals = [get(self.scores[n]) for n in names]
            return f"{label:<24}" + "".join(f"{_fmt(v):>{width}}" for v in vals)

        lines.append(row("loss (per study)", lambda s: s["competition_loss"]))
        lines.append(row("loss (global)", lambda s: s["global_loss"]))
        for t in registry.TARGETS:
            lines.append(row(f"AUC {t}", lambda s, t=t: s["auc"][t]))
        lines.append(f"at threshold {self.threshold:g} (sensitivity / specificity):")
        for t in registry.TARGETS:
            lines.append(f"{'  ' + t:<24}" + "".join(
                f"{_fmt(self.scores[n]['sensitivity'][t]) + '/' + _fmt(self.scores[n]['specificity'][t]):>{width}}"
                for n in names))
        lines += [f"wrote {f}" for f in self.files]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# ---------------------------------------------------------------- reading
def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read predictions.csv (one row per study) or submission.csv (row_id,fractured) as a wide table."""
    path = Path(path)
    head = read_csv_table(path, (), "predictions file")
    if ROW_ID in head.columns and FRACTURED in head.columns:
        return predictions_from_submission(head, path)
    missing = [c for c in (registry.STUDY_COL, *registry.TARGETS) if c not in head.columns]
    if missing:
        raise InputError(path, f"lacks column(s) {', '.join(missing)}: expected predictions.csv "
                               f"({registry.STUDY_COL}, C1..C7, {registry.PATIENT}) or submission.csv (row_id, fractured)")
    if head[registry.STUDY_COL].duplicated().any():
        raise InputError(path, f"study {head.loc[head[registry.STUDY_COL].duplicated(), registry.STUDY_COL].iloc[0]}"
                               " appears more than once")
    values = head[list(registry.TARGETS)].apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        raise InputError(path, "holds missing or non-numeric probabilities")
    return head


def max_score_baseline(boxes: pd.DataFrame, studies: list[str], path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Return the "probability = max box score on the level" predictions (patient = max over levels)."""
    if LEVEL_COL in boxes.columns:
        level = boxes[LEVEL_COL].astype("string")
    elif all(c in boxes.columns for c in WEIGHT_COLS):
        w = boxes[list(WEIGHT_COLS)].to_numpy(dtype=float)
        level = pd.Series(np.array(registry.LEVELS)[w.argmax(axis=1)] if len(w) else [], dtype="string")
    elif len(boxes) == 0:      # no box at all (an empty boxes.csv has only the base columns): every score 0
        level = pd.Series([], dtype="string")
    else:
        raise InputError(path, "boxes table has no level (or w_C1..w_C7) column: the max-score baseline needs levels")
    b = pd.DataFrame({registry.STUDY_COL: boxes[registry.STUDY_COL].astype(str).to_numpy(),
                      LEVEL_COL: level.to_numpy(), "score": boxes["score"].astype(float).to_numpy()})
    wide = b.dropna(subset=[LEVEL_COL]).groupby([registry.STUDY_COL, LEVEL_COL])["score"].max().unstack()
    wide = wide.reindex(index=studies, columns=list(registry.LEVELS)).fillna(0.0)
    wide[registry.PATIENT] = wide[list(registry.LEVELS)].max(axis=1)
    return wide.rename_axis(index=registry.STUDY_COL, columns=None).reset_index()


# ---------------------------------------------------------------- scoring
def score_predictions(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Return both losses, per-target AUC (NaN with one class) and sensitivity/specificity at `threshold`."""
    auc, sens, spec = {}, {}, {}
    for j, t in enumerate(registry.TARGETS):
        yt, pt = y[:, j].astype(int), p[:, j]
        both = len(np.unique(yt)) == 2
        auc[t] = float(roc_auc_score(yt, pt)) if both else float("nan")
        hit = pt >= threshold
        sens[t] = float((hit & (yt == 1)).sum() / (yt == 1).sum()) if (yt == 1).any() else float("nan")
        spec[t] = float((~hit & (yt == 0)).sum() / (yt == 0).sum()) if (yt == 0).any() else float("nan")
    return {"competition_loss": competition_loss_arrays(y, p), "global_loss": global_loss_arrays(y, p),
            "auc": auc, "sensitivity": sens, "specificity": spec}


def _matrix(df: pd.DataFrame, studies: list[str]) -> np.ndarray:
    return df.assign(**{registry.STUDY_COL: df[registry.STUDY_COL].astype(str)}).set_index(
        registry.STUDY_COL).loc[studies, list(registry.TARGETS)].to_numpy(dtype=float)


def evaluate_predictions(predictions: Path, *, labels: Path, out: Path | None = None, boxes: Path | None = None,
                         threshold: float = 0.5, prior: Path | None = None,
                         config: Mapping[str, Any] | None = None) -> EvalReport:
    """Score predictions.csv or submission.csv against train.csv-style labels, with baselines and optional plots.

    The constant-prior baseline uses `prior` (a model folder's prior.json: the training positive rates)
    when given; otherwise the positive rates of `labels` themselves, which flatters that baseline.
    """
    predictions, labels = Path(predictions), Path(labels)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], found {threshold}")
    pred = read_predictions(predictions)
    lab = read_table(labels, "train")
    studies = [str(u) for u in pred[registry.STUDY_COL]]
    unlabelled = sorted(set(studies) - set(lab[registry.STUDY_COL]))
    if unlabelled:
        raise InputError(predictions, f"{len(unlabelled)} of its {len(studies)} studies are not in {labels}, "
                                      f"e.g. {', '.join(unlabelled[:3])}")
    y = _matrix(lab, studies)
    n_failed = int(pred[FAILED_COL].astype(int).sum()) if FAILED_COL in pred.columns else 0
    prior_rates = _read_prior(Path(prior)) if prior is not None else training_prior(lab)
    candidates = {MODEL: pred, PRIOR: prior_predictions(prior_rates, studies)}
    if boxes is not None:
        boxes = Path(boxes)
        b = read_csv_table(boxes, (registry.STUDY_COL, "score"), "boxes table")
        candidates[MAX_SCORE] = max_score_baseline(b, studies, boxes)
    probs = {name: _matrix(df, studies) for name, df in candidates.items()}
    scores = {name: score_predictions(y, p, threshold) for name, p in probs.items()}
    report = EvalReport(predictions=predictions, labels=labels, n_studies=len(studies), n_failed=n_failed,
                        threshold=threshold, scores=scores,
                        prior_source=str(prior) if prior is not None else "the labels' own positive rates")
    if out is not None:
        out = Path(out)
        cfg = config
        if cfg is None:
            from data_prep.runs.config import load_config

            cfg = load_config("aggregation")
        report.files = [out / METRICS_FILE, *plot_curves(y, probs, out, n_bins=int(cfg["evaluate"]["calibration_bins"]))]
        write_json_atomic(out / METRICS_FILE, report.to_dict())
    logger.info("evaluated %d studies: per-study loss %.4f (prior %.4f)", len(studies),
                scores[MODEL]["competition_loss"], scores[PRIOR]["competition_loss"])
    return report


def _read_prior(path: Path) -> dict[str, float]:
    """Read a prior.json ({target: positive rate} for the eight targets)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the prior: {exc}") from None
    missing = [t for t in registry.TARGETS if t not in data]
    if missing:
        raise InputError(path, f"prior lacks target(s) {', '.join(missing)}")
    return {t: float(data[t]) for t in registry.TARGETS}


def plot_curves(y: np.ndarray, probs: Mapping[str, np.ndarray], out: Path, *, n_bins: int) -> list[Path]:
    """Write roc.png (every candidate) and calibration.png (every candidate but the constant prior) into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import RocCurveDisplay

    from data_prep.runs.artifacts import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    n = len(registry.TARGETS)
    rows = -(-n // PLOT_COLS)
    written = []
    for fname, kind in ((ROC_FILE, "roc"), (CALIBRATION_FILE, "calibration")):
        fig, axes = plt.subplots(rows, PLOT_COLS, figsize=(PLOT_CELL_IN * PLOT_COLS, PLOT_CELL_IN * rows),
                                 squeeze=False)
        for j, (t, ax) in enumerate(zip(registry.TARGETS, axes.ravel(), strict=True)):
            yt = y[:, j].astype(int)
            if len(np.unique(yt)) < 2:
                ax.text(0.5, 0.5, "one class only", ha="center", va="center")
            else:
                for name, p in probs.items():
                    if kind == "roc":
                        RocCurveDisplay.from_predictions(yt, p[:, j], ax=ax, name=name, plot_chance_level=False)
                    elif name != PRIOR:
                        CalibrationDisplay.from_predictions(yt, np.clip(p[:, j], 0, 1), n_bins=n_bins, ax=ax,
                                                            name=name)
                ax.legend(fontsize="x-small")
            ax.set_title(t)
            ax.set_xlabel("false positive rate" if kind == "roc" else "mean predicted probability", fontsize="small")
            ax.set_ylabel("true positive rate" if kind == "roc" else "fraction positive", fontsize="small")
        fig.tight_layout()
        with atomic_path(out / fname) as tmp:
            fig.savefig(tmp, dpi=PLOT_DPI, format="png")
        plt.close(fig)
        written.append(out / fname)
    return written
