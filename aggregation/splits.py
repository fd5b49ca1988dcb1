"""Which labelled studies train the detector and which train the aggregator: no study on both sides.

The aggregator must learn from detector outputs on studies the detector never trained on; otherwise it
learns from over-confident in-sample boxes. Schemes (config `splits.scheme`):

- "boxed" (the real data): the detector trains on every study with boxes (train_bounding_boxes.csv:
  235 studies, all positive) plus `negative_fraction` of the unboxed negatives; the aggregator trains on
  detector outputs over all the other labelled studies (unboxed positives and the remaining negatives).
- "holdout": a stratified `aggregator_fraction` of the labelled studies goes to the aggregator, the rest to
  the detector. For data where every positive has boxes (synthetic studies), where "boxed" would leave the
  aggregator without positives.
- "oof": every study gets one of `n_folds` folds; detector k trains on detector-eligible studies outside
  fold k and predicts fold k; the aggregator then trains on all labelled studies.
- "auto" (default): "boxed" when it leaves the aggregator `min_aggregator_positives` positives (true for
  the real data), else "holdout".

Every study also gets one of `n_folds` folds (stratified by patient_overall) in every scheme: the vertebra
classifier learns from every labelled study, so classifier k trains on all of them except the aggregator's
studies in fold k, and scores those (`classifier_train_studies`); "oof" uses the same folds for the detector.

Unboxed positive studies never go to the detector (it cannot learn from them). The split is written once to
`splits.json` and reused (`load_or_create_splits`); `assert_no_leakage` checks the actual training sets.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from data_prep.errors import InputError, SpinefracError
from data_prep.runs import registry
from data_prep.runs.artifacts import write_json_atomic

logger = logging.getLogger("aggregation")


DETECTOR = "detector"
AGGREGATOR = "aggregator"
SCHEMES = ("auto", "boxed", "holdout", "oof")
FORMAT_VERSION = 1
MAX_LISTED = 5
MIN_FOLDS = 2


class LeakageError(SpinefracError):
    """A study used to train the detector also feeds the aggregator's training (or the wrong fold's detector)."""


def _section(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is None:
        from data_prep.runs.config import load_config

        config = load_config("aggregation")
    return config.get("splits", config)


def _labelled(train_labels: pd.DataFrame) -> pd.DataFrame:
    for c in (registry.STUDY_COL, registry.PATIENT):
        if c not in train_labels.columns:
            raise InputError(None, f"labels lack column {c}")
    df = train_labels[[registry.STUDY_COL, registry.PATIENT]].copy()
    df[registry.STUDY_COL] = df[registry.STUDY_COL].astype(str)
    return df.drop_duplicates(registry.STUDY_COL).reset_index(drop=True)


def _boxed_roles(df: pd.DataFrame, boxed: set[str], fraction: float, rng: np.random.Generator) -> dict[str, str]:
    is_boxed = df[registry.STUDY_COL].isin(boxed).to_numpy()
    neg = (~is_boxed) & (df[registry.PATIENT].to_numpy() == 0)
    neg_idx = np.flatnonzero(neg)
    chosen = rng.choice(neg_idx, size=round(fraction * neg_idx.size), replace=False) if neg_idx.size else []
    det = is_boxed.copy()
    det[np.asarray(chosen, dtype=int)] = True
    return {u: DETECTOR if d else AGGREGATOR for u, d in zip(df[registry.STUDY_COL], det, strict=True)}


def _holdout_roles(df: pd.DataFrame, boxed: set[str], fraction: float, seed: int) -> dict[str, str]:
    uids = df[registry.STUDY_COL].to_numpy()
    y = df[registry.PATIENT].to_numpy()
    stratify = y if np.bincount(y.astype(int), minlength=2).min() >= 2 else None
    _, agg = train_test_split(uids, test_size=fraction, random_state=seed, stratify=stratify)
    agg_set = set(agg)
    roles = {}
    for u, pos in zip(uids, y, strict=True):
        unusable = pos == 1 and u not in boxed     # positives without boxes teach the detector nothing
        roles[u] = AGGREGATOR if (u in agg_set or unusable) else DETECTOR
    return roles


def split_studies(train_labels: pd.DataFrame, boxed_uids: set[str], *,
                  config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assign every labelled study to the detector or the aggregator (and a fold for "oof"); return the split."""
    cfg = _section(config)
    scheme = cfg["scheme"]
    if scheme not in SCHEMES:
        raise ValueError(f"splits.scheme must be one of {', '.join(SCHEMES)}, found {scheme!r}")
    df = _labelled(train_labels)
    boxed = {str(u) for u in boxed_uids}
    seed = int(cfg["seed"])
    unknown = boxed - set(df[registry.STUDY_COL])
    if unknown:
        logger.warning("%d boxed studies are not in the labels (ignored), e.g. %s", len(unknown), sorted(unknown)[0])
    resolved = scheme
    roles = _boxed_roles(df, boxed, float(cfg["negative_fraction"]), np.random.default_rng(seed))
    if scheme == "holdout":
        roles = _holdout_roles(df, boxed, float(cfg["aggregator_fraction"]), seed)
    elif scheme == "auto":
        agg_pos = int(df.loc[df[registry.STUDY_COL].map(roles) == AGGREGATOR, registry.PATIENT].sum())
        resolved = "boxed"
        if agg_pos < int(cfg["min_aggregator_positives"]):
            logger.info("splits: the boxed scheme leaves the aggregator %d positives (< %d): using holdout",
                        agg_pos, cfg["min_aggregator_positives"])
            resolved = "holdout"
            roles = _holdout_roles(df, boxed, float(cfg["aggregator_fraction"]), seed)
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "scheme": resolved, "config": dict(cfg),
                           "roles": roles}
    out.update(_folds(df, int(cfg["n_folds"]), seed))
    out["counts"] = _counts(out, df)
    logger.info("splits (%s): %s", resolved, out["counts"])
    return out


def _folds(df: pd.DataFrame, n_folds: int, seed: int) -> dict[str, Any]:
    """Stratified study folds: {"n_folds": k, "folds": {uid: fold}} (k cut to what the minority class allows)."""
    y = df[registry.PATIENT].to_numpy().astype(int)
    k = min(n_folds, max(MIN_FOLDS, int(np.bincount(y, minlength=2).min())), len(df))
    if k < MIN_FOLDS:
        return {"n_folds": 1, "folds": dict.fromkeys(df[registry.STUDY_COL], 0)}
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = np.zeros(len(df), dtype=int)
    for f, (_, idx) in enumerate(skf.split(np.zeros(len(df)), y)):
        folds[idx] = f
    return {"n_folds": k, "folds": {u: int(f) for u, f in zip(df[registry.STUDY_COL], folds, strict=True)}}


def classifier_train_studies(splits: Mapping[str, Any]) -> dict[int, list[str]]:
    """Fold k -> the studies classifier k trains on: every labelled study but the aggregator's studies in fold k."""
    agg = set(aggregator_train_studies(splits))
    return {k: [u for u in splits["roles"] if not (u in agg and splits["folds"][u] == k)]
            for k in range(int(splits["n_folds"]))}


def aggregator_fold_studies(splits: Mapping[str, Any]) -> dict[int, list[str]]:
    """Fold k -> the aggregator's studies in fold k (scored by classifier k, and by detector k under "oof")."""
    agg = aggregator_train_studies(splits)
    return {k: [u for u in agg if splits["folds"][u] == k] for k in range(int(splits["n_folds"]))}


def assert_no_classifier_leakage(classifier_train: Mapping[int, Iterable[str]],
                                 scored_by: Mapping[int, Iterable[str]]) -> None:
    """Raise LeakageError when an aggregator study was scored by a classifier that trained on it.

    `classifier_train` maps fold k to the studies classifier k actually trained on (its dataset), `scored_by`
    maps fold k to the aggregator studies whose features came from classifier k.
    """
    crossed = set()
    for k, scored in scored_by.items():
        crossed |= {str(u) for u in scored} & {str(u) for u in classifier_train.get(k, ())}
    if crossed:
        raise LeakageError(f"{len(crossed)} aggregator studies were scored by a classifier that trained on them: "
                           f"{_listed(crossed)}")
    twice = [u for u, n in pd.Series([str(u) for us in scored_by.values() for u in us]).value_counts().items()
             if n > 1]
    if twice:
        raise LeakageError(f"{len(twice)} aggregator studies were scored by more than one fold: {_listed(twice)}")


def _counts(splits: Mapping[str, Any], df: pd.DataFrame) -> dict[str, int]:
    role = df[registry.STUDY_COL].map(splits["roles"])
    pos = df[registry.PATIENT].to_numpy() == 1
    return {f"{r}_studies": int((role == r).sum()) for r in (DETECTOR, AGGREGATOR)} | {
        f"{r}_positives": int(((role == r).to_numpy() & pos).sum()) for r in (DETECTOR, AGGREGATOR)}


def detector_train_studies(splits: Mapping[str, Any], fold: int | None = None) -> list[str]:
    """Return the studies the detector trains on (for "oof": the detector of `fold`, trained without it)."""
    det = [u for u, r in splits["roles"].items() if r == DETECTOR]
    if splits["scheme"] == "oof":
        if fold is None:
            raise ValueError("an out-of-fold split needs the fold of the detector")
        return [u for u in det if splits["folds"][u] != fold]
    return det


def aggregator_train_studies(splits: Mapping[str, Any]) -> list[str]:
    """Return the studies whose detector outputs train the aggregator."""
    if splits["scheme"] == "oof":
        return list(splits["roles"])
    return [u for u, r in splits["roles"].items() if r == AGGREGATOR]


def _listed(uids: Iterable[str]) -> str:
    u = sorted(uids)
    return ", ".join(u[:MAX_LISTED]) + (f" (+{len(u) - MAX_LISTED} more)" if len(u) > MAX_LISTED else "")


def assert_no_leakage(splits: Mapping[str, Any], *, detector_train: Iterable[str] | Mapping[int, Iterable[str]],
                      aggregator_train: Iterable[str],
                      classifier_train: Mapping[int, Iterable[str]] | None = None,
                      classifier_scored: Mapping[int, Iterable[str]] | None = None) -> None:
    """Raise LeakageError when a study trains the detector (or a classifier) and also, via its outputs, the aggregator.

    For "boxed"/"holdout" splits `detector_train` is the set of studies the detector trained on; for "oof"
    it maps each fold to the studies its detector trained on, and each aggregator study must have been
    predicted by the detector of its own fold, which must not have seen it. With `classifier_train` (fold k ->
    the studies classifier k saw) and `classifier_scored` (fold k -> the aggregator studies it scored), no
    aggregator study may have been scored by a classifier that saw it (`assert_no_classifier_leakage`).
    """
    if classifier_train is not None or classifier_scored is not None:
        assert_no_classifier_leakage(classifier_train or {}, classifier_scored or {})
    agg = {str(u) for u in aggregator_train}
    unknown = agg - set(splits["roles"])
    if unknown:
        raise LeakageError(f"{len(unknown)} aggregator studies are not in the split: {_listed(unknown)}")
    if splits["scheme"] == "oof":
        if not isinstance(detector_train, Mapping):
            raise TypeError("an out-of-fold split needs detector_train as {fold: studies}")
        seen = {int(f): {str(u) for u in us} for f, us in detector_train.items()}
        crossed = {u for u in agg if u in seen.get(int(splits["folds"][u]), set())}
        if crossed:
            raise LeakageError(f"{len(crossed)} studies were seen by the detector of their own fold and feed "
                               f"the aggregator: {_listed(crossed)}")
        wrong_role = {u for us in seen.values() for u in us if splits["roles"].get(u) != DETECTOR}
        if wrong_role:
            raise LeakageError(f"{len(wrong_role)} detector training studies are not detector studies in the "
                               f"split: {_listed(wrong_role)}")
        return
    if isinstance(detector_train, Mapping):
        raise TypeError(f"a {splits['scheme']!r} split has one detector: pass its training studies as a set")
    det = {str(u) for u in detector_train}
    both = det & agg
    if both:
        raise LeakageError(f"{len(both)} studies train the detector and the aggregator: {_listed(both)}")
    bad_det = {u for u in det if splits["roles"].get(u) != DETECTOR}
    bad_agg = {u for u in agg if splits["roles"].get(u) != AGGREGATOR}
    if bad_det or bad_agg:
        raise LeakageError("studies used outside their role in the split: "
                           + "; ".join(f"{n} as {role}: {_listed(s)}" for role, s in
                                       ((DETECTOR, bad_det), (AGGREGATOR, bad_agg)) if (n := len(s))))


def load_or_create_splits(path: str | os.PathLike, train_labels: pd.DataFrame, boxed_uids: set[str], *,
                          config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the split stored at `path`, or make one with `split_studies` and write it there (once)."""
    path = Path(path)
    cfg = _section(config)
    if path.is_file():
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON: {exc}") from None
        if not isinstance(splits, dict) or "roles" not in splits or splits.get("format_version") != FORMAT_VERSION:
            raise InputError(path, f"not a spinefrac splits file (format {FORMAT_VERSION} with 'roles')")
        uncovered = set(_labelled(train_labels)[registry.STUDY_COL]) - set(splits["roles"])
        if uncovered:
            raise InputError(path, f"does not cover {len(uncovered)} labelled studies (e.g. {sorted(uncovered)[0]});"
                                   " delete it to make a new split (the models trained on the old one go too)")
        if splits.get("config") != dict(cfg):
            logger.warning("%s: made with other split settings %s; reusing it (delete it to re-split)", path,
                           splits.get("config"))
        if "folds" not in splits:     # written before every scheme had folds: add them, the roles stay
            labelled = _labelled(train_labels)
            labelled = labelled[labelled[registry.STUDY_COL].isin(set(splits["roles"]))]
            splits.update(_folds(labelled, int(cfg["n_folds"]), int(cfg["seed"])))
            write_json_atomic(path, splits)
        return splits
    splits = split_studies(train_labels, boxed_uids, config=cfg)
    write_json_atomic(path, splits)
    return splits
