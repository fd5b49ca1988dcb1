"""Study x level features from detection outputs (boxes.csv + slices.csv, optionally vertebrae.csv), and per-study
patient features.

Inputs follow docs/contracts.md "Detection outputs". A box is *on* level L when its overlap weight
`w_L >= features.min_level_weight` (when boxes.csv has only a `level` column, the weight is 1 on that
level). A level's *own slices* are those where slices.csv `p_L > features.presence_threshold`.
Every feature is described in `FEATURES` (study x level rows) and `PATIENT_FEATURES` (one row per study),
and belongs to one group in `FEATURE_GROUP` / `PATIENT_FEATURE_GROUP`:

- "detector": counts and scores of the detector's boxes (the aggregator's original features);
- "length": length-normalised features (a level's score profile over its own slices, shares of its slices);
- "classifier": the vertebra classifier's scores from vertebrae.csv (NaN when absent);
- "structural": `level_idx` and `study_n_slices`, kept whatever `features.groups` selects.

Names with `{t}` expand to one feature per configured threshold, `{i}` to one per profile bin and
`{unit}` to the area unit. The same registries give the model its feature lists and the documentation
its table (`features_markdown`). Studies without any box still get rows, with zero detection features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.tables import check_columns, read_csv_table

logger = logging.getLogger("aggregation")


LEVEL_COL = "level"
WEIGHT_COLS: tuple[str, ...] = tuple(f"w_{lv}" for lv in registry.LEVELS)
PRESENCE_COLS: tuple[str, ...] = tuple(f"p_{lv}" for lv in registry.LEVELS)
BOX_REQUIRED: tuple[str, ...] = (registry.STUDY_COL, "slice_index", "width", "height", "score")
SLICE_REQUIRED: tuple[str, ...] = (registry.STUDY_COL, "slice_index", *PRESENCE_COLS)
CLS_COLS: tuple[str, ...] = ("cls_max", "cls_topk", "cls_mean")
VERTEBRAE_USED: tuple[str, ...] = (registry.STUDY_COL, LEVEL_COL, *CLS_COLS)
VERTEBRAE_REQUIRED: tuple[str, ...] = (registry.STUDY_COL, LEVEL_COL, "first_slice", "last_slice", "n_slices",
                                       "source", "n_crops", *CLS_COLS)
AREA_UNITS: dict[str, str] = {"px": "px", "mm": "mm2"}
PRED_PREFIX = "pred_"

FEATURE_GROUPS: tuple[str, ...] = ("detector", "length", "classifier")
"""The feature groups `features.groups` may select (an ablation switch)."""
STRUCTURAL = "structural"
"""The group of the features every model keeps (level_idx, study_n_slices)."""

FEATURES: dict[str, str] = {
    "level_idx": "0-based index of the level (C1=0 .. C7=6); a categorical feature of the shared model",
    "max_score": "highest detector score among the boxes on the level; 0 when there is none",
    "top_k_mean": "mean of the features.top_k best scores on the level, missing ones counted as 0",
    "n_boxes_ge_{t}": "number of boxes on the level scoring >= t (one feature per features.score_thresholds)",
    "n_slices_ge_{t}": "number of distinct slices holding a box on the level that scores >= t",
    "score_mass": "sum over all the study's boxes of score x w_L (overlap-weighted detection mass of the level)",
    "box_area_{unit}": "mean area of the boxes on the level weighted by score x w_L; px^2 when "
                       "features.area_unit=px (boxes.csv has no pixel spacing), mm^2 when area_unit=mm; 0 without boxes",
    "longest_run": "longest run of consecutive slice_index values with a box on the level scoring >= "
                   "features.run_min_score",
    "level_slices": "slices on which the level is present (slices.csv p_L > features.presence_threshold)",
    "det_slice_frac": "n_slices_ge at the lowest score threshold divided by level_slices (0 when level_slices is 0)",
    "above_max": "max_score of the neighbouring level above (cranial, L-1); 0 for C1",
    "below_max": "max_score of the neighbouring level below (caudal, L+1); 0 for C7",
    "profile_bin_{i}": "score profile along the level: its own slices (in slice_index order) cut into "
                       "features.profile_bins equal parts, and the highest per-slice score (max score of the boxes "
                       "on the level on that slice, not weighted by w_L; 0 without a box) among the slices "
                       "overlapping part i (0 = cranial end); a slice spanning two parts counts in both; "
                       "NaN when the level has no slices",
    "profile_topk_mean": "mean of the features.profile_top_k highest profile_bin values; NaN when the level has "
                         "no slices",
    "frac_slices_ge_{t}": "share of the level's own slices holding a box on the level scoring >= t (one feature "
                          "per features.score_thresholds); NaN when the level has no slices",
    "run_frac": "longest_run / level_slices, capped at 1 (a run may reach slices outside the level's own); "
                "NaN when the level has no slices",
    "cls_max": "vertebra classifier: highest fracture probability over the level's crops (vertebrae.csv); "
               "NaN when no classifier ran or the level was not found",
    "cls_topk": "vertebra classifier: mean of the top-k crop probabilities of the level (vertebrae.csv); NaN as cls_max",
    "cls_mean": "vertebra classifier: mean crop probability of the level (vertebrae.csv); NaN as cls_max",
    "cls_above_max": "cls_max of the neighbouring level above (L-1); NaN for C1 or when that level has none",
    "cls_below_max": "cls_max of the neighbouring level below (L+1); NaN for C7 or when that level has none",
    "study_max_score": "highest score of any box in the study, whatever its level",
    "study_mass": "sum of the scores of all boxes in the study (overall detection mass)",
    "study_n_boxes": "number of boxes in the study",
    "study_longest_run": "longest run of consecutive slices holding any box scoring >= features.run_min_score",
    "study_n_slices": "number of slices of the study (rows of slices.csv)",
}
"""Study x level features (rows of features.csv), name -> description."""

FEATURE_GROUP: dict[str, str] = {
    "level_idx": STRUCTURAL,
    **dict.fromkeys(("max_score", "top_k_mean", "n_boxes_ge_{t}", "n_slices_ge_{t}", "score_mass", "box_area_{unit}",
                     "longest_run", "level_slices", "det_slice_frac", "above_max", "below_max"), "detector"),
    **dict.fromkeys(("profile_bin_{i}", "profile_topk_mean", "frac_slices_ge_{t}", "run_frac"), "length"),
    **dict.fromkeys(("cls_max", "cls_topk", "cls_mean", "cls_above_max", "cls_below_max"), "classifier"),
    **dict.fromkeys(("study_max_score", "study_mass", "study_n_boxes", "study_longest_run"), "detector"),
    "study_n_slices": STRUCTURAL,
}
"""Study x level feature name -> its group (one of FEATURE_GROUPS, or STRUCTURAL)."""

PATIENT_FEATURES: dict[str, str] = {
    "level_max": "max over C1..C7 of the level max_score",
    "n_levels_ge_{t}": "number of levels whose max_score >= t (one feature per features.patient_thresholds)",
    "study_cls_max": "max over C1..C7 of the level cls_max; NaN when no level has a classifier score",
    "n_levels_cls_ge_{t}": "number of levels whose cls_max >= t (one feature per features.patient_thresholds); "
                           "NaN when no level has a classifier score",
    "study_max_score": FEATURES["study_max_score"],
    "study_mass": FEATURES["study_mass"],
    "study_n_boxes": FEATURES["study_n_boxes"],
    "study_longest_run": FEATURES["study_longest_run"],
    "study_n_slices": FEATURES["study_n_slices"],
}
"""Per-study features of the patient_overall model, name -> description."""

PATIENT_FEATURE_GROUP: dict[str, str] = {
    **dict.fromkeys(("level_max", "n_levels_ge_{t}"), "detector"),
    **dict.fromkeys(("study_cls_max", "n_levels_cls_ge_{t}"), "classifier"),
    **dict.fromkeys(("study_max_score", "study_mass", "study_n_boxes", "study_longest_run"), "detector"),
    "study_n_slices": STRUCTURAL,
}
"""Patient feature name -> its group (one of FEATURE_GROUPS, or STRUCTURAL)."""

RISES = 1
"""Sign of a feature that never falls when a box score (boxes.csv `score`) or a classifier score (vertebrae.csv
cls_*) rises: a monotone model constrains it increasing."""
FIXED = 0
"""Sign of a feature no score moves (counts of boxes or slices, the level): left unconstrained."""
MIXED = None
"""Sign of a feature a rising score can move either way (a score-weighted mean): a monotone model leaves it out."""

SIGN_WORDS: dict[int | None, str] = {RISES: "rises (constrained increasing)", FIXED: "unmoved (unconstrained)",
                                     MIXED: "either way (left out of a monotone model)"}
"""How features_markdown states a feature's sign."""

FEATURE_SIGN: dict[str, int | None] = {
    "level_idx": FIXED,
    **dict.fromkeys(("max_score", "top_k_mean", "n_boxes_ge_{t}", "n_slices_ge_{t}", "score_mass", "longest_run",
                     "det_slice_frac", "above_max", "below_max"), RISES),
    "box_area_{unit}": MIXED,            # the mean area weighted by score: a rising score shifts it either way
    "level_slices": FIXED,
    **dict.fromkeys(("profile_bin_{i}", "profile_topk_mean", "frac_slices_ge_{t}", "run_frac"), RISES),
    **dict.fromkeys(("cls_max", "cls_topk", "cls_mean", "cls_above_max", "cls_below_max"), RISES),
    **dict.fromkeys(("study_max_score", "study_mass", "study_longest_run"), RISES),
    **dict.fromkeys(("study_n_boxes", "study_n_slices"), FIXED),
}
"""Study x level feature -> how it moves when one score rises, all else fixed (RISES, FIXED or MIXED). A missing
value (NaN: no slices, no classifier) is not moved by any score."""

PATIENT_FEATURE_SIGN: dict[str, int | None] = {
    **dict.fromkeys(("level_max", "n_levels_ge_{t}", "study_cls_max", "n_levels_cls_ge_{t}"), RISES),
    **{name: FEATURE_SIGN[name] for name in ("study_max_score", "study_mass", "study_n_boxes", "study_longest_run",
                                             "study_n_slices")},
}
"""Patient feature -> how it moves when one score rises (as FEATURE_SIGN)."""

LEVEL_PREDICTION_FEATURES: dict[str, str] = {
    **{f"{PRED_PREFIX}{lv}": f"the level model's probability for {lv} (out-of-fold when training)"
       for lv in registry.LEVELS},
    "pred_max": "max over levels of the level model's probabilities",
    "pred_noisy_or": "1 - prod(1 - p_L): chance of at least one fractured level if levels were independent",
}
"""Features the StudyAggregator adds to PATIENT_FEATURES from its own level model."""
LEVEL_PREDICTION_SIGN: dict[str, int | None] = dict.fromkeys(LEVEL_PREDICTION_FEATURES, RISES)
"""The level model's probabilities rise with the scores (a monotone level model): constrained increasing."""


def _section(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Return the `features` section from a whole aggregation config (or the section itself)."""
    if config is None:
        from data_prep.runs.config import load_config

        config = load_config("aggregation")
    return config.get("features", config)


def _fmt(t: float) -> str:
    return f"{float(t):g}"


def selected_groups(config: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Return the feature groups a config selects (features.groups), checked, in FEATURE_GROUPS order."""
    groups = _section(config)["groups"]
    if isinstance(groups, str) or not groups:
        raise ValueError(f"features.groups must be a non-empty list of {', '.join(FEATURE_GROUPS)}, found {groups!r}")
    unknown = [g for g in groups if g not in FEATURE_GROUPS]
    if unknown:
        raise ValueError(f"features.groups: unknown group(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(FEATURE_GROUPS)}")
    return tuple(g for g in FEATURE_GROUPS if g in groups)


def _expand(templates: Mapping[str, str], group_of: Mapping[str, str], cfg: Mapping[str, Any],
            thresholds_key: str, groups: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    """Return expanded name -> (group, description, template) for the templates of the selected groups (+ structural)."""
    keep = {STRUCTURAL, *groups}
    unit = AREA_UNITS.get(cfg["area_unit"])
    if unit is None:
        raise ValueError(f"features.area_unit must be one of {', '.join(AREA_UNITS)}, found {cfg['area_unit']!r}")
    out: dict[str, tuple[str, str, str]] = {}
    for name, desc in templates.items():
        group = group_of[name]
        if group not in keep:
            continue
        if "{t}" in name:
            key = "score_thresholds" if name.startswith("frac_slices") else thresholds_key
            for t in cfg[key]:
                out[name.format(t=_fmt(t))] = (group, desc.replace(">= t", f">= {_fmt(t)}"), name)
        elif "{i}" in name:
            bins = int(cfg["profile_bins"])
            for i in range(bins):
                out[name.format(i=i)] = (group, desc.replace("part i", f"part {i} of {bins}"), name)
        else:
            out[name.format(unit=unit)] = (group, desc, name)
    return out


def _level_expanded(config: Mapping[str, Any] | None,
                    groups: Iterable[str] | None) -> dict[str, tuple[str, str, str]]:
    cfg = _section(config)
    return _expand(FEATURES, FEATURE_GROUP, cfg, "score_thresholds",
                   selected_groups(cfg) if groups is None else groups)


def _patient_expanded(config: Mapping[str, Any] | None,
                      groups: Iterable[str] | None) -> dict[str, tuple[str, str, str]]:
    cfg = _section(config)
    return _expand(PATIENT_FEATURES, PATIENT_FEATURE_GROUP, cfg, "patient_thresholds",
                   selected_groups(cfg) if groups is None else groups)


def level_feature_descriptions(config: Mapping[str, Any] | None = None, *,
                               groups: Iterable[str] | None = None) -> dict[str, str]:
    """Return the expanded study x level feature names -> descriptions (groups: default features.groups)."""
    return {name: desc for name, (_, desc, _) in _level_expanded(config, groups).items()}


def patient_feature_descriptions(config: Mapping[str, Any] | None = None, *,
                                 groups: Iterable[str] | None = None) -> dict[str, str]:
    """Return the expanded per-study patient feature names -> descriptions (without level predictions)."""
    return {name: desc for name, (_, desc, _) in _patient_expanded(config, groups).items()}


def level_feature_groups(config: Mapping[str, Any] | None = None, *,
                         groups: Iterable[str] | None = None) -> dict[str, str]:
    """Return the expanded study x level feature names -> group (FEATURE_GROUPS or STRUCTURAL)."""
    return {name: group for name, (group, _, _) in _level_expanded(config, groups).items()}


def level_feature_names(config: Mapping[str, Any] | None = None, *, groups: Iterable[str] | None = None) -> list[str]:
    """Return the study x level feature columns, in order, of the config's groups (or of `groups`)."""
    return list(_level_expanded(config, groups))


def patient_feature_names(config: Mapping[str, Any] | None = None, *,
                          groups: Iterable[str] | None = None) -> list[str]:
    """Return the per-study patient feature columns, in order, of the config's groups (or of `groups`)."""
    return list(_patient_expanded(config, groups))


def level_feature_signs(config: Mapping[str, Any] | None = None, *,
                        groups: Iterable[str] | None = None) -> dict[str, int | None]:
    """Return the expanded study x level feature names -> FEATURE_SIGN (RISES, FIXED or MIXED)."""
    return {name: FEATURE_SIGN[template] for name, (_, _, template) in _level_expanded(config, groups).items()}


def patient_feature_signs(config: Mapping[str, Any] | None = None, *,
                          groups: Iterable[str] | None = None) -> dict[str, int | None]:
    """Return the expanded patient feature names (level predictions included) -> their sign (as FEATURE_SIGN)."""
    signs = {name: PATIENT_FEATURE_SIGN[template] for name, (_, _, template) in _patient_expanded(config, groups).items()}
    return {**signs, **LEVEL_PREDICTION_SIGN}


def features_markdown(config: Mapping[str, Any] | None = None) -> str:
    """Return a Markdown table documenting every feature of every group (for docs and `features.csv` readers)."""
    lines = ["| table | feature | group | meaning | when a score rises |", "|---|---|---|---|---|"]
    for table, expanded, sign_of in (
            ("features.csv (study x level)", _level_expanded(config, FEATURE_GROUPS), FEATURE_SIGN),
            ("patient", _patient_expanded(config, FEATURE_GROUPS), PATIENT_FEATURE_SIGN)):
        lines += [f"| {table} | `{name}` | {group} | {text} | {SIGN_WORDS[sign_of[template]]} |"
                  for name, (group, text, template) in expanded.items()]
    lines += [f"| patient (added by the model) | `{name}` | model | {text} | {SIGN_WORDS[RISES]} |"
              for name, text in LEVEL_PREDICTION_FEATURES.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- computation
def longest_run(indices: Iterable[int]) -> int:
    """Return the length of the longest run of consecutive integers in `indices` (duplicates ignored)."""
    a = np.unique(np.asarray(list(indices), dtype=np.int64))
    if a.size == 0:
        return 0
    breaks = np.flatnonzero(np.diff(a) != 1)
    return int(np.diff(np.r_[-1, breaks, a.size - 1]).max())


def level_weights(boxes: pd.DataFrame, path: str | os.PathLike | None = None) -> np.ndarray:
    """Return the (n_boxes, 7) level weights: w_C1..w_C7 when present, else one-hot of `level` (unknown = 0)."""
    if all(c in boxes.columns for c in WEIGHT_COLS):
        return np.nan_to_num(boxes[list(WEIGHT_COLS)].to_numpy(dtype=float))
    if LEVEL_COL in boxes.columns:
        names = boxes[LEVEL_COL].astype("string").fillna("").to_numpy(dtype=object)
        return np.array([[name == lv for lv in registry.LEVELS] for name in names], dtype=float).reshape(
            len(names), len(registry.LEVELS))
    if boxes.empty:
        return np.zeros((0, len(registry.LEVELS)))
    raise InputError(path, "boxes table has neither w_C1..w_C7 nor a level column; run detection with levels "
                           "(e.g. `spinefrac detect --locator ...`)")


def _box_areas(boxes: pd.DataFrame, unit: str, spacing: Mapping[str, tuple[float, float]] | None) -> np.ndarray:
    area = boxes["width"].to_numpy(dtype=float) * boxes["height"].to_numpy(dtype=float)
    if unit == "px":
        return area
    if spacing is None:
        raise InputError(None, "features.area_unit=mm needs a pixel spacing per study (spacing=...)")
    uids = boxes[registry.STUDY_COL].astype(str)
    absent = sorted(set(uids) - set(spacing))
    if absent:
        raise InputError(None, f"features.area_unit=mm: no pixel spacing for {len(absent)} studies, "
                               f"e.g. {absent[0]}")
    scale = np.array([float(spacing[u][0]) * float(spacing[u][1]) for u in uids])
    return area * scale


def length_profile(per_slice: np.ndarray, bins: int) -> np.ndarray:
    """Return `bins` maxima of a level's per-slice scores over equal parts of its length (NaN when it has no slice).

    Slice k covers [k, k+1) of the n slices; part b covers [b n / bins, (b + 1) n / bins) and takes the max
    over the slices overlapping it, so a slice spanning two parts counts in both and a short level repeats
    its slices rather than leaving empty parts.
    """
    per_slice = np.asarray(per_slice, dtype=float)
    n = per_slice.size
    if n == 0:
        return np.full(bins, np.nan)
    out = np.empty(bins)
    for b in range(bins):
        lo, hi = (b * n) // bins, -(-((b + 1) * n) // bins)
        out[b] = per_slice[lo:hi].max()
    return out


def _per_slice_max(own: np.ndarray, sl: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (max box score, has a box) on each of the level's own slices `own` (sorted) for its boxes (sl, score)."""
    best, has = np.zeros(own.size), np.zeros(own.size, dtype=bool)
    inside = np.isin(sl, own)
    pos = np.searchsorted(own, sl[inside])
    np.maximum.at(best, pos, score[inside])
    has[pos] = True
    return best, has


def _length_features(row: Mapping[str, float], own: np.ndarray, sl_on: np.ndarray, score_on: np.ndarray,
                     cfg: Mapping[str, Any]) -> dict[str, float]:
    """Return the "length" group features of one level from its own slices and its boxes."""
    bins, k = int(cfg["profile_bins"]), int(cfg["profile_top_k"])
    thresholds = [float(t) for t in cfg["score_thresholds"]]
    best, has = _per_slice_max(own, sl_on, score_on)
    profile = length_profile(best, bins)
    out: dict[str, float] = {f"profile_bin_{i}": float(v) for i, v in enumerate(profile)}
    out["profile_topk_mean"] = float(np.sort(profile)[::-1][:k].mean()) if own.size else np.nan
    for t in thresholds:
        out[f"frac_slices_ge_{_fmt(t)}"] = float((has & (best >= t)).mean()) if own.size else np.nan
    n = row["level_slices"]
    out["run_frac"] = float(min(row["longest_run"] / n, 1.0)) if n > 0 else np.nan
    return out


def _level_rows(score: np.ndarray, sl: np.ndarray, area: np.ndarray, w: np.ndarray, level_slices: np.ndarray,
                own_slices: Sequence[np.ndarray], cls: np.ndarray, cfg: Mapping[str, Any],
                groups: Sequence[str]) -> list[dict[str, float]]:
    """Return the seven feature dicts (C1..C7) of one study from its box arrays, level slices and (7, 3) cls scores."""
    min_w, k = float(cfg["min_level_weight"]), int(cfg["top_k"])
    thresholds = [float(t) for t in cfg["score_thresholds"]]
    unit = AREA_UNITS[cfg["area_unit"]]
    rows: list[dict[str, float]] = []
    for j in range(len(registry.LEVELS)):
        on = w[:, j] >= min_w
        s_on = score[on]
        top = np.sort(s_on)[::-1][:k]
        row: dict[str, float] = {
            "level_idx": j,
            "max_score": float(s_on.max()) if s_on.size else 0.0,
            "top_k_mean": float(top.sum() / k) if k > 0 else 0.0,
        }
        for t in thresholds:
            row[f"n_boxes_ge_{_fmt(t)}"] = int((s_on >= t).sum())
        for t in thresholds:
            row[f"n_slices_ge_{_fmt(t)}"] = int(np.unique(sl[on & (score >= t)]).size)
        row["score_mass"] = float((score * w[:, j]).sum())
        ww = score[on] * w[on, j]
        row[f"box_area_{unit}"] = float((ww * area[on]).sum() / ww.sum()) if ww.sum() > 0 else 0.0
        row["longest_run"] = longest_run(sl[on & (score >= float(cfg["run_min_score"]))])
        row["level_slices"] = int(level_slices[j])
        first = row[f"n_slices_ge_{_fmt(thresholds[0])}"] if thresholds else 0
        row["det_slice_frac"] = float(first / level_slices[j]) if level_slices[j] > 0 else 0.0
        if "length" in groups:
            row.update(_length_features(row, own_slices[j], sl[on], s_on, cfg))
        row.update(dict(zip(CLS_COLS, (float(v) for v in cls[j]), strict=True)))
        rows.append(row)
    for j, row in enumerate(rows):
        row["above_max"] = rows[j - 1]["max_score"] if j > 0 else 0.0
        row["below_max"] = rows[j + 1]["max_score"] if j + 1 < len(rows) else 0.0
        row["cls_above_max"] = rows[j - 1]["cls_max"] if j > 0 else np.nan
        row["cls_below_max"] = rows[j + 1]["cls_max"] if j + 1 < len(rows) else np.nan
    return rows


def check_vertebrae(vertebrae: pd.DataFrame, path: str | os.PathLike | None = None,
                    required: Sequence[str] = VERTEBRAE_USED) -> pd.DataFrame:
    """Return the vertebrae table with numeric cls_* columns; raise InputError on missing columns, bad levels, repeats."""
    what = "vertebrae table"
    check_columns(vertebrae, required, what, path)
    v = vertebrae.assign(**{registry.STUDY_COL: vertebrae[registry.STUDY_COL].astype(str),
                            LEVEL_COL: vertebrae[LEVEL_COL].astype(str)})
    bad = ~v[LEVEL_COL].isin(registry.LEVELS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(path, f"{what} row {i + 1} (study {v[registry.STUDY_COL].iloc[i]}): level "
                               f"{v[LEVEL_COL].iloc[i]!r} is not one of {', '.join(registry.LEVELS)}")
    dup = v.duplicated([registry.STUDY_COL, LEVEL_COL])
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise InputError(path, f"{what} row {i + 1}: study {v[registry.STUDY_COL].iloc[i]} level "
                               f"{v[LEVEL_COL].iloc[i]} appears more than once")
    for col in CLS_COLS:
        values = pd.to_numeric(v[col], errors="coerce")
        wrong = values.isna() & v[col].notna()
        if wrong.any():
            i = int(np.flatnonzero(wrong.to_numpy())[0])
            raise InputError(path, f"{what} row {i + 1}, column {col}: {v[col].iloc[i]!r} is not a number")
        v[col] = values.astype(float)
    return v


def _cls_lookup(vertebrae: pd.DataFrame | None, uids: Sequence[str]) -> dict[str, np.ndarray]:
    """Return StudyInstanceUID -> (7, 3) array of cls_max, cls_topk, cls_mean (NaN where absent)."""
    if vertebrae is None:
        return {}
    v = check_vertebrae(vertebrae)
    v = v[v[registry.STUDY_COL].isin(set(uids))]
    out: dict[str, np.ndarray] = {}
    for uid, part in v.groupby(registry.STUDY_COL, sort=False):
        out[str(uid)] = part.set_index(LEVEL_COL)[list(CLS_COLS)].reindex(list(registry.LEVELS)).to_numpy(float)
    return out


def build_features(boxes: pd.DataFrame, slices: pd.DataFrame, *, config: Mapping[str, Any] | None = None,
                   studies: Iterable[str] | None = None, vertebrae: pd.DataFrame | None = None,
                   spacing: Mapping[str, tuple[float, float]] | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Return one row per study x level (long format: StudyInstanceUID, level, then the selected FEATURES).

    `studies` fixes the studies (and their order); by default those of slices.csv then boxes.csv.
    `vertebrae` is the detect stage's vertebrae.csv (classifier scores); None leaves the cls_* columns NaN.
    `spacing` maps StudyInstanceUID -> (row_mm, col_mm) and is needed only when features.area_unit is "mm".
    Only the columns of features.groups (plus level_idx and study_n_slices) are returned.
    """
    cfg = _section(config)
    groups = selected_groups(cfg)
    if not len(boxes.columns):
        boxes = pd.DataFrame(columns=list(BOX_REQUIRED))
    check_columns(boxes, BOX_REQUIRED, "boxes table", None)
    check_columns(slices, SLICE_REQUIRED, "slices table", None)
    names = level_feature_names(cfg)
    unit = AREA_UNITS[cfg["area_unit"]]
    w_all = level_weights(boxes)
    if studies is None:
        uids = list(dict.fromkeys([*slices[registry.STUDY_COL].astype(str), *boxes[registry.STUDY_COL].astype(str)]))
    else:
        uids = [str(u) for u in studies]
    cls_of = _cls_lookup(vertebrae, uids)
    no_cls = np.full((len(registry.LEVELS), len(CLS_COLS)), np.nan)
    box_uid = boxes[registry.STUDY_COL].astype(str).to_numpy()
    score_all = boxes["score"].to_numpy(dtype=float)
    sl_all = boxes["slice_index"].to_numpy(dtype=np.int64) if len(boxes) else np.zeros(0, np.int64)
    area_all = _box_areas(boxes, cfg["area_unit"], spacing) if len(boxes) else np.zeros(0)
    presence = slices[list(PRESENCE_COLS)].to_numpy(dtype=float) > float(cfg["presence_threshold"])
    slice_uid = slices[registry.STUDY_COL].astype(str).to_numpy()
    slice_idx = slices["slice_index"].to_numpy(dtype=np.int64) if len(slices) else np.zeros(0, np.int64)
    box_groups = pd.Series(np.arange(len(box_uid))).groupby(box_uid).indices if len(box_uid) else {}
    slice_groups = pd.Series(np.arange(len(slice_uid))).groupby(slice_uid).indices if len(slice_uid) else {}
    run_min = float(cfg["run_min_score"])
    out: list[dict[str, Any]] = []
    for uid in tqdm(uids, desc="features", unit="study", disable=not progress):
        bi = box_groups.get(uid, np.zeros(0, dtype=np.int64))
        si = slice_groups.get(uid, np.zeros(0, dtype=np.int64))
        if si.size == 0:
            logger.warning("study %s has no rows in slices.csv: level_slices and study_n_slices are 0", uid)
        score, sl = score_all[bi], sl_all[bi]
        own = [np.unique(slice_idx[si][presence[si, j]]) for j in range(len(registry.LEVELS))]
        rows = _level_rows(score, sl, area_all[bi], w_all[bi], presence[si].sum(axis=0), own,
                           cls_of.get(uid, no_cls), cfg, groups)
        study = {
            "study_max_score": float(score.max()) if score.size else 0.0,
            "study_mass": float(score.sum()),
            "study_n_boxes": int(score.size),
            "study_longest_run": longest_run(sl[score >= run_min]),
            "study_n_slices": int(si.size),
        }
        for lv, row in zip(registry.LEVELS, rows, strict=True):
            out.append({registry.STUDY_COL: uid, LEVEL_COL: lv, **row, **study})
    df = pd.DataFrame(out, columns=[registry.STUDY_COL, LEVEL_COL, *names])
    logger.debug("features: %d studies x %d levels, %d features (groups %s, area in %s)", len(uids),
                 len(registry.LEVELS), len(names), ",".join(groups), unit)
    return df


def build_patient_features(level_features: pd.DataFrame, *, config: Mapping[str, Any] | None = None,
                           path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Return one row per study (StudyInstanceUID, then the selected PATIENT_FEATURES) from the long table."""
    cfg = _section(config)
    groups = selected_groups(cfg)
    names = patient_feature_names(cfg)
    copied = [c for c in names if c in FEATURES]
    needed = [*(["max_score"] if "detector" in groups else []), *(["cls_max"] if "classifier" in groups else [])]
    check_columns(level_features, (registry.STUDY_COL, LEVEL_COL, *needed, *copied), "features table", path)
    counts = level_features.groupby(registry.STUDY_COL, sort=False)[LEVEL_COL].nunique()
    short = counts[counts != len(registry.LEVELS)]
    if len(short):
        raise InputError(path, f"features table: study {short.index[0]} has {short.iloc[0]} of the "
                               f"{len(registry.LEVELS)} levels")
    g = level_features.groupby(registry.STUDY_COL, sort=False)
    out = pd.DataFrame(index=pd.Index(counts.index, name=registry.STUDY_COL))
    if "detector" in groups:
        out["level_max"] = g["max_score"].max()
        for t in cfg["patient_thresholds"]:
            out[f"n_levels_ge_{_fmt(t)}"] = g["max_score"].agg(lambda s, t=float(t): int((s >= t).sum()))
    if "classifier" in groups:
        out["study_cls_max"] = g["cls_max"].max()
        seen = g["cls_max"].agg(lambda s: bool(s.notna().any()))
        for t in cfg["patient_thresholds"]:
            n = g["cls_max"].agg(lambda s, t=float(t): int((s >= t).sum())).astype(float)
            out[f"n_levels_cls_ge_{_fmt(t)}"] = n.where(seen)
    for c in copied:
        out[c] = g[c].first()
    out = out.reset_index()
    return out[[registry.STUDY_COL, *names]]


def write_features(features: pd.DataFrame, path: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                   inputs: Mapping[str, Any] | None = None) -> Path:
    """Write features.csv atomically with its `.meta.json` sidecar (config, inputs, counts, feature docs)."""
    from data_prep.runs.artifacts import write_csv_atomic, write_sidecar

    cfg = _section(config)
    out = write_csv_atomic(path, features)
    write_sidecar(out, kind="features", config=dict(cfg), inputs=inputs,
                  counts={"studies": int(features[registry.STUDY_COL].nunique()), "rows": len(features)},
                  extra={"groups": list(selected_groups(cfg)), "features": level_feature_descriptions(cfg)})
    return out


# ---------------------------------------------------------------- reading tables
def load_detection_tables(boxes: str | os.PathLike, slices: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read boxes.csv and slices.csv, checking the columns the features need (levels included)."""
    b = read_csv_table(boxes, BOX_REQUIRED, "boxes table")
    if len(b):
        level_weights(b, boxes)
    s = read_csv_table(slices, SLICE_REQUIRED, "slices table")
    return b, s


def load_vertebrae_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read vertebrae.csv (detect's per study x level classifier scores), checking columns, levels and values."""
    table = read_csv_table(path, VERTEBRAE_REQUIRED, "vertebrae table")
    return check_vertebrae(table, path, VERTEBRAE_REQUIRED)
