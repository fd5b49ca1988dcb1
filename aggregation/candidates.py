"""Candidates compared out of fold: the constant prior, the max-score rule, the gradient-boosted model, their blend.

At training (`StudyAggregator.fit`), the aggregator's studies are cut `candidates.repeats` times into
`operating.heldout_folds` folds by study (stratified by patient_overall, seeds `model.random_state` + repeat;
fewer folds when a class has fewer studies). In every fold each member is fitted on the other folds and
predicts this one:
- `prior`: the training positive rate of each target, smoothed by half a study each way ((k + 0.5) / (n + 1):
  a fold without a positive C3 must not predict 0, which would cost the held-out C3 fracture everything);
- `max_score_rule`: `aggregation.rules.MaxScoreRule` (monotone logistic of max box score and cls_max);
- `gbm`: the monotone gradient-boosted model (`aggregation.model`);
- `blend`: `aggregation.blend` over the three, cross-fitted: the weights that predict fold k are fitted on the
  other folds' out-of-fold rows of the same repeat, so no study's own label sets the weights it is scored with.
Table (`CANDIDATES_FILE`): per candidate the competition metric per study (mean over repeats, and its standard
deviation over repeats), the globally normalised metric, the patient AUC (mean over repeats), and which one was
chosen: the lowest loss per study (`candidates.choose: auto`; ties go to the simpler, earlier candidate), or the one
`candidates.choose` names. Its out-of-fold patient predictions give the operating point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import write_csv_atomic, write_sidecar

from .blend import fit_blend, predict_blend
from .metric import competition_loss_arrays, global_loss_arrays

logger = logging.getLogger("aggregation")

PRIOR, RULE, GBM, BLEND = "prior", "max_score_rule", "gbm", "blend"
CANDIDATES: tuple[str, ...] = (PRIOR, RULE, GBM, BLEND)
"""Every candidate, simplest first (the order ties are broken in)."""
MEMBERS: tuple[str, ...] = (PRIOR, RULE, GBM)
"""The candidates fitted directly (the blend combines them)."""
AUTO = "auto"
CHOICES: tuple[str, ...] = (AUTO, *CANDIDATES)
"""Values of candidates.choose."""
CANDIDATES_FILE = "candidates.csv"
TABLE_COLUMNS: tuple[str, ...] = ("candidate", "loss_per_study", "loss_per_study_sd", "loss_global", "auc_patient",
                                  "chosen")
HELDOUT_COLUMNS: tuple[str, ...] = (registry.STUDY_COL, "repeat", "fold", "label", "probability")
MIN_FOLDS = 2
FitPredict = Callable[[Sequence[str], Sequence[str]], Mapping[str, np.ndarray]]
"""fit_predict(train studies, held-out studies) -> {member: (held-out, 8) probabilities in TARGETS order}."""


@dataclass
class Comparison:
    """Out-of-fold predictions of every candidate on the training studies, the table and the choice."""

    uids: list[str]
    y: np.ndarray                      # (n, 8) labels in TARGETS order
    folds: np.ndarray                  # (repeats, n) fold of each study in each repeat
    oof: dict[str, np.ndarray]         # candidate -> (repeats, n, 8) out-of-fold probabilities
    table: pd.DataFrame                # TABLE_COLUMNS, one row per candidate
    chosen: str

    def heldout(self, candidate: str | None = None) -> pd.DataFrame:
        """Return a candidate's (default: the chosen one's) out-of-fold patient_overall rows (HELDOUT_COLUMNS)."""
        p = self.oof[candidate or self.chosen][:, :, len(registry.LEVELS)]
        repeats, n = p.shape
        return pd.DataFrame({registry.STUDY_COL: np.tile(self.uids, repeats),
                             "repeat": np.repeat(np.arange(repeats), n), "fold": self.folds.ravel(),
                             "label": np.tile(self.y[:, len(registry.LEVELS)].astype(int), repeats),
                             "probability": p.ravel()})


def n_folds(y_patient: np.ndarray, wanted: int) -> int:
    """Return the folds a stratified split can make: `wanted`, cut to the positive and negative counts."""
    y_patient = np.asarray(y_patient, dtype=int)
    return min(int(wanted), int(y_patient.sum()), int((y_patient == 0).sum()))


def compare(uids: Sequence[str], y: np.ndarray, fit_predict: FitPredict, *, folds: int, repeats: int, seed: int,
            l2: float, sample_weights: str, choose: str = AUTO) -> Comparison:
    """Out-of-fold predictions of every candidate, the table and the chosen candidate (see the module docstring)."""
    if choose not in CHOICES:
        raise ValueError(f"candidates.choose must be one of {', '.join(CHOICES)}, found {choose!r}")
    uids = [str(u) for u in uids]
    y = np.asarray(y, dtype=float)
    patient = y[:, len(registry.LEVELS)].astype(int)
    k = n_folds(patient, folds)
    if k < MIN_FOLDS:
        raise ValueError(f"{int(patient.sum())} positive and {int((patient == 0).sum())} negative studies: too few "
                         f"for {MIN_FOLDS} folds")
    n = len(uids)
    oof = {c: np.full((repeats, n, len(registry.TARGETS)), np.nan) for c in CANDIDATES}
    fold_of = np.full((repeats, n), -1, dtype=int)
    ids = np.array(uids, dtype=object)
    for r in range(repeats):
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed) + r)
        for f, (tr, va) in enumerate(splitter.split(np.zeros(n), patient)):
            fold_of[r, va] = f
            pred = fit_predict(list(ids[tr]), list(ids[va]))
            for m in MEMBERS:
                oof[m][r, va] = pred[m]
        for f in range(k):     # the blend, cross-fitted on this repeat's out-of-fold rows
            va, tr = fold_of[r] == f, fold_of[r] != f
            weights = fit_blend(MEMBERS, [oof[m][r, tr] for m in MEMBERS], y[tr], l2=l2, sample_weights=sample_weights)
            oof[BLEND][r, va] = predict_blend(weights, [oof[m][r, va] for m in MEMBERS])
    table = score_table(y, oof)
    chosen = choose if choose != AUTO else str(table.loc[table["loss_per_study"].idxmin(), "candidate"])
    table["chosen"] = table["candidate"] == chosen
    return Comparison(uids, y, fold_of, oof, table, chosen)


def score_table(y: np.ndarray, oof: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Return the TABLE_COLUMNS table (without a choice) of out-of-fold predictions {candidate: (R, n, 8)}."""
    rows = []
    pj = len(registry.LEVELS)
    both = len(np.unique(y[:, pj])) == 2
    for c, p in oof.items():
        per_repeat = [competition_loss_arrays(y, p[r]) for r in range(len(p))]
        aucs = [roc_auc_score(y[:, pj], p[r, :, pj]) if both else np.nan for r in range(len(p))]
        rows.append({"candidate": c, "loss_per_study": float(np.mean(per_repeat)),
                     "loss_per_study_sd": float(np.std(per_repeat)),
                     "loss_global": float(np.mean([global_loss_arrays(y, p[r]) for r in range(len(p))])),
                     "auc_patient": float(np.mean(aucs)), "chosen": False})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def format_table(table: pd.DataFrame, *, n_studies: int | None = None, folds: int | None = None,
                 repeats: int | None = None) -> str:
    """Return the candidates table as printed at training (one line per candidate, the chosen one marked)."""
    head = "aggregator candidates, out of fold"
    if n_studies is not None:
        head += f" on {n_studies} studies ({repeats} x {folds}-fold)"
    lines = [head + ":", f"  {'candidate':<16}{'loss/study':>11}{'(sd)':>8}{'global':>9}{'AUC patient':>13}"]
    for row in table.to_dict("records"):
        auc = "n/a" if pd.isna(row["auc_patient"]) else f"{row['auc_patient']:.3f}"
        lines.append(f"  {row['candidate']:<16}{row['loss_per_study']:>11.4f}{row['loss_per_study_sd']:>8.4f}"
                     f"{row['loss_global']:>9.4f}{auc:>13}" + ("  <- chosen" if row["chosen"] else ""))
    return "\n".join(lines)


def write_table(directory: str | os.PathLike, table: pd.DataFrame, *, config: Mapping[str, Any],
                extra: Mapping[str, Any]) -> Path:
    """Write CANDIDATES_FILE (+ its .meta.json sidecar) into an aggregator folder."""
    path = write_csv_atomic(Path(directory) / CANDIDATES_FILE, table[list(TABLE_COLUMNS)])
    write_sidecar(path, kind="aggregator-candidates", config=config,
                  counts={"candidates": len(table)}, extra=dict(extra))
    return path


def read_table(directory: str | os.PathLike) -> pd.DataFrame | None:
    """Return an aggregator folder's candidates table, or None when it has none (trained before candidates)."""
    from data_prep.runs.tables import read_csv_table

    path = Path(directory) / CANDIDATES_FILE
    if not path.is_file():
        return None
    table = read_csv_table(path, TABLE_COLUMNS, "aggregator candidates table")
    unknown = sorted(set(table["candidate"]) - set(CANDIDATES))
    if unknown:
        raise InputError(path, f"unknown candidate(s) {', '.join(unknown)}; expected {', '.join(CANDIDATES)}")
    return table
