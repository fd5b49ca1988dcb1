"""Vertebra levels along z from a locator's evidence, decoded with the anatomical-order prior; box assignment.

Two decoders (configs/levels.yaml `decode.model`): "sizes" (the default, detector/level_sizes.py) adds each run's
physical length, so levels the locator misses are placed by extrapolation; "runs" (below) has no size model and is
kept for the before/after benchmark (benchmarks/bench_level_field.py).

The "runs" prior is a left-to-right model over slices (index 0 = most superior). Each slice is in one state:
a run of consecutive levels [a..b] present on it (at most `max_levels_per_slice`), or no level at all
(above C1, between two levels, below C7). Along z, both a and b never decrease and no level is
skipped, so every level is one contiguous run, C1 above C2 ... above C7, neighbours may overlap, and
levels missing from the evidence can only be the ones outside the scan (top or bottom). Viterbi gives
the best state path; forward-backward gives each level's presence confidence per slice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, logit, logsumexp

from data_prep.runs.registry import LEVELS, STUDY_COL

log = logging.getLogger("detector")

N_LEVELS = len(LEVELS)
P_COLS: tuple[str, ...] = tuple(f"p_{name}" for name in LEVELS)
W_COLS: tuple[str, ...] = tuple(f"w_{name}" for name in LEVELS)
BOX_COLS: tuple[str, ...] = ("x", "y", "width", "height")
PRESENT = 0.5
"""A presence score above this says the level is there (the locator found it on that slice)."""
DECODE_MODELS: tuple[str, ...] = ("sizes", "runs")
"""decode.model values (configs/schema.py reads the same tuple)."""
SOURCE_EXTRAPOLATED = "extrapolated"
"""level_boxes `source` of a box held from another level's (its level was decoded, never detected)."""
SOURCE_OVERLAP, SOURCE_SLICE, SOURCE_NEAREST, SOURCE_NONE = "overlap", "slice", "nearest", "none"
"""`level_source` of an assigned box: from box overlaps, the slice's levels, the nearest slice's, or none."""


# ---------------------------------------------------------------- the state model
def level_states(max_levels_per_slice: int, allow_gaps: bool = True) -> np.ndarray:
    """Return the (a, b) states: levels a..b present (0-based, b = a - 1 for a slice with no level)."""
    states = []
    for a in range(N_LEVELS + 1):
        for b in range(a - 1, N_LEVELS):
            size = b - a + 1
            if size > max_levels_per_slice:
                break
            if size == 0 and not allow_gaps and 0 < a < N_LEVELS:
                continue
            states.append((a, b))
    return np.array(states, dtype=int)


def _state_bits(states: np.ndarray) -> np.ndarray:
    levels = np.arange(N_LEVELS)
    return (states[:, :1] <= levels) & (levels <= states[:, 1:])


def _log_transitions(states: np.ndarray, switch_penalty: float) -> np.ndarray:
    a, b = states[:, 0], states[:, 1]
    allowed = ((a[None, :] >= a[:, None]) & (b[None, :] >= b[:, None]) & (a[None, :] <= b[:, None] + 1))
    out = np.where(allowed, -float(switch_penalty), -np.inf)
    np.fill_diagonal(out, 0.0)
    return out


def _emissions(evidence: np.ndarray, states: np.ndarray, clip: float, weight: float,
               gap_penalty: float) -> np.ndarray:
    p = np.clip(np.asarray(evidence, dtype=float), clip, 1.0 - clip)
    emis = weight * (logit(p) @ _state_bits(states).T.astype(float))
    is_gap = (states[:, 1] < states[:, 0]) & (states[:, 0] > 0) & (states[:, 0] < N_LEVELS)
    emis[:, is_gap] -= gap_penalty
    return emis


def _viterbi(emis: np.ndarray, trans: np.ndarray) -> np.ndarray:
    n, s = emis.shape
    back = np.zeros((n, s), dtype=np.int64)
    score = emis[0].copy()
    for t in range(1, n):
        cand = score[:, None] + trans
        back[t] = cand.argmax(axis=0)
        score = cand[back[t], np.arange(s)] + emis[t]
    path = np.empty(n, dtype=np.int64)
    path[-1] = int(score.argmax())
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def _posteriors(emis: np.ndarray, trans: np.ndarray) -> np.ndarray:
    n, s = emis.shape
    alpha = np.empty((n, s))
    beta = np.zeros((n, s))
    alpha[0] = emis[0]
    for t in range(1, n):
        alpha[t] = logsumexp(alpha[t - 1][:, None] + trans, axis=0) + emis[t]
    for t in range(n - 2, -1, -1):
        beta[t] = logsumexp(trans + (emis[t + 1] + beta[t + 1])[None, :], axis=1)
    post = alpha + beta
    return np.exp(post - logsumexp(post, axis=1, keepdims=True))


def _decode(evidence: np.ndarray, config: Any, weight: float, spacing_mm: float | None = None,
            column: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    evidence = np.asarray(evidence, dtype=float)
    if evidence.ndim != 2 or evidence.shape[1] != N_LEVELS:
        raise ValueError(f"evidence must be (slices, {N_LEVELS}), got shape {evidence.shape}")
    dec = config["decode"]
    if dec["model"] == "sizes":
        from detector.level_sizes import decode_sizes, size_prior

        if spacing_mm is None:
            raise ValueError("decode.model 'sizes' needs the study's slice spacing (spacing_mm)")
        llr = evidence_log_odds(evidence, config, weight)
        col = None
        if column is not None and float(dec["column_weight"]) > 0:
            col = column_log_odds(column, config, weight)
        if not (llr > 0).any() and not (col is not None and (col > 0).any()):
            return np.zeros(evidence.shape, dtype=bool), np.zeros(evidence.shape)   # nothing to place the column by
        seen = (evidence > PRESENT).any(axis=0) if bool(dec["ignore_unseen"]) else np.ones(N_LEVELS, dtype=bool)
        return decode_sizes(llr, float(spacing_mm), size_prior(config), col, column_levels=seen)
    states = level_states(int(dec["max_levels_per_slice"]), bool(dec["allow_gaps"]))
    bits = _state_bits(states)
    trans = _log_transitions(states, float(dec["switch_penalty"]))
    emis = _emissions(evidence, states, float(dec["evidence_clip"]), float(dec["evidence_weight"]) * weight,
                      float(dec["gap_penalty"]))
    path = _viterbi(emis, trans)
    marg = _posteriors(emis, trans) @ bits.astype(float)
    return bits[path], np.clip(marg, 0.0, 1.0)


def evidence_log_odds(evidence: np.ndarray, config: Any, weight: float = 1.0) -> np.ndarray:
    """(n, 7) presence scores -> what each adds to a path holding that level: weighted log-odds, negatives scaled.

    Scores are clipped to decode.evidence_clip, the log-odds scaled by decode.evidence_weight x weight, and the
    negative ones (the locator found no such level there) further by decode.absent_weight. With
    decode.ignore_unseen, a level never above 0.5 on any slice counts only relative to its own floor: its least
    log-odds in the study becomes 0 (not finding it is no evidence), its weak detections stay positive.
    """
    dec = config["decode"]
    clip = float(dec["evidence_clip"])
    evidence = np.asarray(evidence, dtype=float)
    lo = logit(np.clip(evidence, clip, 1.0 - clip)) * float(dec["evidence_weight"]) * weight
    lo = np.where(lo < 0, lo * float(dec["absent_weight"]), lo)
    if bool(dec["ignore_unseen"]) and len(evidence):
        unseen = ~(evidence > PRESENT).any(axis=0)
        lo[:, unseen] -= lo[:, unseen].min(axis=0)
    return lo


def column_log_odds(column: np.ndarray, config: Any, weight: float = 1.0) -> np.ndarray:
    """(n,) "some vertebra here" scores -> what each adds to a path holding any level there (decode.model sizes).

    The same mapping as evidence_log_odds (clip, log-odds x decode.evidence_weight x weight), scaled by
    decode.column_weight, the negative ones (nothing found on the slice) by decode.column_absent_weight instead.
    With decode.ignore_unseen the negative ones count only against runs holding a level the locator finds
    somewhere in the study (finding nothing where only unseen levels could be says nothing: the issue's C1-C3
    locator finds nothing below C3).
    """
    dec = config["decode"]
    clip = float(dec["evidence_clip"])
    lo = logit(np.clip(np.asarray(column, dtype=float), clip, 1.0 - clip))
    lo = lo * float(dec["evidence_weight"]) * float(dec["column_weight"]) * weight
    return np.where(lo < 0, lo * float(dec["column_absent_weight"]), lo)


def decode_levels(evidence: np.ndarray, *, config: Any, weight: float = 1.0,
                  spacing_mm: float | None = None) -> np.ndarray:
    """Return the most likely level presence (bool, same shape) under the anatomical-order prior.

    `evidence` is (slices, 7) presence scores in [0, 1] (0.5 = no information), slices in canonical
    order; `weight` scales the evidence log-odds (e.g. sampled/total slices after interpolation);
    `spacing_mm` (the slice spacing) is needed by decode.model "sizes".
    """
    return _decode(evidence, config, weight, spacing_mm)[0]


def level_confidence(evidence: np.ndarray, *, config: Any, weight: float = 1.0,
                     spacing_mm: float | None = None) -> np.ndarray:
    """Return each level's posterior presence probability per slice (forward-backward, same model)."""
    return _decode(evidence, config, weight, spacing_mm)[1]


def interpolate_evidence(sampled: np.ndarray, evidence: np.ndarray, n_slices: int) -> np.ndarray:
    """Linearly interpolate (m, 7) evidence on sampled slice indices to all n slices (constant at the ends)."""
    sampled = np.asarray(sampled, dtype=float)
    order = np.argsort(sampled)
    grid = np.arange(n_slices, dtype=float)
    return np.stack([np.interp(grid, sampled[order], np.asarray(evidence)[order, j]) for j in range(N_LEVELS)],
                    axis=1)


def decode_sampled(evidence: np.ndarray, sampled: np.ndarray, n_slices: int, *,
                   config: Any, spacing_mm: float | None = None, column: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Decode (m, 7) evidence on sampled slices into every slice: (presence bool (n, 7), confidence (n, 7)).

    The evidence (and the optional (m,) column evidence) is interpolated linearly to all slices, then decoded
    with its log-odds scaled by m / n, so the total weight of the evidence does not depend on the sampling step.
    """
    full = interpolate_evidence(sampled, evidence, n_slices)
    col = None
    if column is not None:
        order = np.argsort(np.asarray(sampled, dtype=float))
        col = np.interp(np.arange(n_slices, dtype=float), np.asarray(sampled, dtype=float)[order],
                        np.asarray(column, dtype=float)[order])
    return _decode(full, config, len(sampled) / n_slices, spacing_mm, col)


# ---------------------------------------------------------------- from locator detections
def detections_evidence(detections: pd.DataFrame, sampled: np.ndarray, *, config: Any) -> np.ndarray:
    """Return (len(sampled), 7) presence probabilities from raw detections (best conf per slice and level)."""
    sampled = np.asarray(sampled, dtype=int)
    loc = config["locate"]
    clip = float(config["decode"]["evidence_clip"])
    best = np.zeros((len(sampled), N_LEVELS))
    dets = _with_level_index(detections)
    dets = dets[dets["conf"] >= float(loc["min_conf"])]
    if len(dets):
        row_of = pd.Series(np.arange(len(sampled)), index=sampled)
        rows = dets["slice_index"].map(row_of)
        ok = rows.notna().to_numpy()
        if not ok.all():
            log.debug("ignoring %d detections on slices not listed as sampled", int((~ok).sum()))
        np.maximum.at(best, (rows[ok].to_numpy(dtype=int), dets["_li"].to_numpy()[ok]), dets["conf"].to_numpy()[ok])
    shift = logit(float(loc["presence_threshold"]))
    return expit(logit(np.clip(best, clip, 1.0 - clip)) - shift)


def column_evidence(evidence: np.ndarray, *, config: Any) -> np.ndarray:
    """(m,) "some vertebra on this slice" presence from detections_evidence's (m, 7): the best over the levels,
    its odds moved from locate.presence_threshold to locate.column_threshold."""
    if not len(evidence):
        return np.zeros(0)
    loc = config["locate"]
    clip = float(config["decode"]["evidence_clip"])
    best = np.clip(np.asarray(evidence, dtype=float).max(axis=1), clip, 1.0 - clip)
    return expit(logit(best) + logit(float(loc["presence_threshold"])) - logit(float(loc["column_threshold"])))


def locate_study(detections: pd.DataFrame, n_slices: int, sampled: np.ndarray, *, config: Any,
                 study_uid: str | None = None, slice_numbers: Sequence[int] | None = None,
                 spacing_mm: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Turn locator detections on the sampled slices into (slice_levels, level_boxes) for every slice.

    detections: slice_index, level (C1..C7) or cls (0..6), conf, x, y, width, height.
    slice_levels: [StudyInstanceUID,] slice_index, [slice_number,] C1..C7 (0/1), p_C1..p_C7.
    level_boxes: [StudyInstanceUID,] slice_index, [slice_number,] level, x, y, width, height, conf, source
    ('detected' on a sampled slice, 'interpolated' between/after detected slices of the decoded run,
    'extrapolated' on a decoded run without any detection: the nearest located box, held).
    spacing_mm: the study's slice spacing (decode.model "sizes" needs it).
    """
    sampled = np.unique(np.asarray(sampled, dtype=int))
    if len(sampled) == 0:
        raise ValueError("no sampled slices: the locator ran on no slice of this study")
    if sampled[0] < 0 or sampled[-1] >= n_slices:
        raise ValueError(f"sampled slice indices {sampled[0]}..{sampled[-1]} outside 0..{n_slices - 1}")
    evidence = detections_evidence(detections, sampled, config=config)
    present, conf = decode_sampled(evidence, sampled, n_slices, config=config, spacing_mm=spacing_mm,
                                   column=column_evidence(evidence, config=config))

    slice_levels = pd.DataFrame({"slice_index": np.arange(n_slices)})
    if slice_numbers is not None:
        slice_levels["slice_number"] = np.asarray(slice_numbers)
    for j, name in enumerate(LEVELS):
        slice_levels[name] = present[:, j].astype(np.int64)
    for j, name in enumerate(P_COLS):
        slice_levels[name] = conf[:, j]
    boxes = _level_boxes(_with_level_index(detections), present, conf, config=config)
    if slice_numbers is not None and len(boxes):
        boxes.insert(1, "slice_number", np.asarray(slice_numbers)[boxes["slice_index"].to_numpy()])
    if study_uid is not None:
        slice_levels.insert(0, STUDY_COL, study_uid)
        boxes.insert(0, STUDY_COL, study_uid)
    return slice_levels, boxes


def _with_level_index(detections: pd.DataFrame) -> pd.DataFrame:
    dets = detections.copy()
    if "level" in dets.columns:
        dets["_li"] = dets["level"].map({name: i for i, name in enumerate(LEVELS)})
        if dets["_li"].isna().any():
            bad = sorted(set(dets.loc[dets["_li"].isna(), "level"].astype(str)))
            raise ValueError(f"unknown level names in detections: {bad}")
    elif "cls" in dets.columns:
        dets["_li"] = dets["cls"]
    else:
        raise ValueError("detections need a 'level' (C1..C7) or 'cls' (0..6) column")
    dets["_li"] = dets["_li"].astype(int)
    if len(dets) and not dets["_li"].between(0, N_LEVELS - 1).all():
        raise ValueError(f"locator classes must be 0..{N_LEVELS - 1}")
    return dets


def _level_boxes(dets: pd.DataFrame, present: np.ndarray, conf: np.ndarray, *, config: Any) -> pd.DataFrame:
    """Per slice and decoded level: the detected box, or corners interpolated along the level's run; a decoded
    level without any detection on its run holds the nearest located box of another level (`extrapolated`)."""
    dets = dets[dets["conf"] >= float(config["locate"]["min_conf"])]
    frames = []
    missing = []
    for j, name in enumerate(LEVELS):
        run = np.nonzero(present[:, j])[0]
        d = dets[dets["_li"] == j]
        d = d[d["slice_index"].isin(run)]
        if len(run) and not len(d):
            missing.append((j, run))
        if len(run) == 0 or len(d) == 0:
            continue
        d = d.sort_values("conf", ascending=False).drop_duplicates("slice_index").sort_values("slice_index")
        z = d["slice_index"].to_numpy(dtype=float)
        corners = [d["x"].to_numpy(float), d["y"].to_numpy(float),
                   (d["x"] + d["width"]).to_numpy(float), (d["y"] + d["height"]).to_numpy(float)]
        x0, y0, x1, y1 = (np.interp(run, z, c) for c in corners)
        frames.append(pd.DataFrame({
            "slice_index": run, "level": name, "x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0,
            "conf": conf[run, j], "source": np.where(np.isin(run, z.astype(int)), "detected", "interpolated")}))
    if frames and missing:
        frames += [_held_boxes(pd.concat(frames, ignore_index=True), j, run, conf) for j, run in missing]
    if not frames:
        return pd.DataFrame({"slice_index": pd.Series(dtype=int), "level": pd.Series(dtype=object),
                             **{c: pd.Series(dtype=float) for c in (*BOX_COLS, "conf")},
                             "source": pd.Series(dtype=object)})
    out = pd.concat(frames, ignore_index=True)
    out["_o"] = out["level"].map(LEVELS.index)
    return out.sort_values(["slice_index", "_o"]).drop(columns="_o").reset_index(drop=True)


def _held_boxes(located: pd.DataFrame, j: int, run: np.ndarray, conf: np.ndarray) -> pd.DataFrame:
    """Boxes for level j's decoded run without detections: on each slice, the nearest located slice's box of the
    nearest located level (the column moves little between neighbouring vertebrae), source `extrapolated`."""
    li = located["level"].map(LEVELS.index).to_numpy()
    nearest_level = li[np.argmin(np.abs(li - j))]
    ref = located[li == nearest_level].sort_values("slice_index")
    z = ref["slice_index"].to_numpy()
    pick = ref.iloc[np.abs(z[None, :] - run[:, None]).argmin(axis=1)]
    return pd.DataFrame({"slice_index": run, "level": LEVELS[j], **{c: pick[c].to_numpy(float) for c in BOX_COLS},
                         "conf": conf[run, j], "source": SOURCE_EXTRAPOLATED})


# ---------------------------------------------------------------- per-level summary
LEVEL_LOCATED, LEVEL_EXTRAPOLATED, LEVEL_NONE = "located", "extrapolated", "none"
"""vertebrae.csv `source` with a locator: found by the locator on its decoded run, placed by the decoder from the
other levels and the field without a detection, or outside the field."""
SUMMARY_COLUMNS: tuple[str, ...] = ("level", "first_slice", "last_slice", "n_slices", "source", "confidence")


def level_summary(slice_levels: pd.DataFrame, level_boxes: pd.DataFrame | None) -> pd.DataFrame:
    """One row per level C1..C7 from locate_study's tables: its decoded z-range, source and confidence.

    first_slice / last_slice / n_slices: the decoded run (-1, -1, 0 when absent); source: `located` (a detection
    on the run), `extrapolated` (none) or `none`; confidence: the mean presence probability p_L over the run (how
    sure the decoder is of the level on its slices; 0 when absent).
    """
    rows = []
    for name in LEVELS:
        run = np.flatnonzero(slice_levels[name].to_numpy() > 0) if name in slice_levels.columns else np.zeros(0, int)
        if not len(run):
            rows.append((name, -1, -1, 0, LEVEL_NONE, 0.0))
            continue
        located = level_boxes is not None and len(level_boxes) and (
            (level_boxes["level"] == name) & (level_boxes["source"] != SOURCE_EXTRAPOLATED)).any()
        index = slice_levels["slice_index"].to_numpy()
        p = slice_levels[f"p_{name}"].to_numpy(dtype=float)
        rows.append((name, int(index[run[0]]), int(index[run[-1]]), int(len(run)),
                     LEVEL_LOCATED if located else LEVEL_EXTRAPOLATED, round(float(p[run].mean()), 4)))
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


# ---------------------------------------------------------------- relative-z baseline
def relative_z_levels(n_slices: int, *, config: Any) -> np.ndarray:
    """Return (n, 7) bool presence from mean fractional level extents alone (no image evidence)."""
    rel = config["relative_z"]
    start, end = np.asarray(rel["start"], float), np.asarray(rel["end"], float)
    if start.shape != (N_LEVELS,) or end.shape != (N_LEVELS,):
        raise ValueError(f"relative_z.start/end need {N_LEVELS} fractions each")
    centre = (np.arange(n_slices) + 0.5) / n_slices
    return (centre[:, None] >= start[None, :]) & (centre[:, None] < end[None, :])


# ---------------------------------------------------------------- box assignment
def assign_boxes(boxes: pd.DataFrame, level_boxes: pd.DataFrame, slice_levels: pd.DataFrame, *,
                 config: Any) -> pd.DataFrame:
    """Add `level`, `w_C1..w_C7` (sum 1) and `level_source` to each fracture box.

    Weights are the box's intersection areas with the located vertebra boxes on its slice; with no
    overlap, the slice's presence confidences p_C (levels with p >= assign.presence_min); with no level
    on the slice, those of the nearest slice that has one. A study without any level gets no level
    (level missing, weights 0, level_source 'none').
    """
    acfg = config["assign"]
    out = boxes.reset_index(drop=True).copy()
    weights = np.zeros((len(out), N_LEVELS))
    source = np.full(len(out), SOURCE_NONE, dtype=object)
    if len(out) == 0:
        return _finish_assignment(out, weights, source)
    by_study = STUDY_COL in out.columns and STUDY_COL in slice_levels.columns
    keys = out[STUDY_COL] if by_study else pd.Series("", index=out.index)

    # 1) overlaps with located vertebra boxes on the same slice
    if len(level_boxes):
        lb = level_boxes.copy()
        lb["_li"] = lb["level"].map(LEVELS.index)
        on = ["slice_index"] + ([STUDY_COL] if by_study and STUDY_COL in lb.columns else [])
        pairs = out[on].assign(_bi=np.arange(len(out))).merge(
            lb[on + ["_li", *BOX_COLS]], on=on, how="inner")
        if len(pairs):
            b = out.loc[pairs["_bi"].to_numpy(), list(BOX_COLS)].to_numpy(float)
            v = pairs[list(BOX_COLS)].to_numpy(float)
            iw = np.minimum(b[:, 0] + b[:, 2], v[:, 0] + v[:, 2]) - np.maximum(b[:, 0], v[:, 0])
            ih = np.minimum(b[:, 1] + b[:, 3], v[:, 1] + v[:, 3]) - np.maximum(b[:, 1], v[:, 1])
            inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
            inter[inter < float(acfg["min_overlap_px"])] = 0.0
            np.maximum.at(weights, (pairs["_bi"].to_numpy(), pairs["_li"].to_numpy()), inter)
    has = weights.sum(axis=1) > 0
    source[has] = SOURCE_OVERLAP

    # 2) the slice's level confidences, 3) the nearest slice that has levels
    todo = np.nonzero(~has)[0]
    if len(todo):
        presence_min = float(acfg["presence_min"])
        for key, idx in pd.Series(todo).groupby(keys.iloc[todo].to_numpy()).groups.items():
            rows = todo[np.asarray(list(idx))]
            sl = slice_levels[slice_levels[STUDY_COL] == key] if by_study else slice_levels
            conf = _slice_confidence(sl)
            if conf is None:
                continue
            z, p = conf
            p = np.where(p >= presence_min, p, 0.0)
            with_levels = np.nonzero(p.sum(axis=1) > 0)[0]
            if len(with_levels) == 0:
                continue
            pos = {int(s): k for k, s in enumerate(z)}
            for r in rows:
                s = int(out.at[r, "slice_index"])
                k = pos.get(s)
                if k is not None and p[k].sum() > 0:
                    weights[r], source[r] = p[k], SOURCE_SLICE
                else:
                    near = with_levels[np.argmin(np.abs(z[with_levels] - s))]
                    weights[r], source[r] = p[near], SOURCE_NEAREST
    return _finish_assignment(out, weights, source)


def _slice_confidence(slice_levels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    if len(slice_levels) == 0:
        return None
    cols = list(P_COLS) if set(P_COLS) <= set(slice_levels.columns) else list(LEVELS)
    return slice_levels["slice_index"].to_numpy(int), slice_levels[cols].to_numpy(float)


def _finish_assignment(out: pd.DataFrame, weights: np.ndarray, source: np.ndarray) -> pd.DataFrame:
    total = weights.sum(axis=1, keepdims=True)
    w = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    level = np.where(total[:, 0] > 0, np.asarray(LEVELS, dtype=object)[w.argmax(axis=1)], None)
    out["level"] = pd.Series(level, index=out.index, dtype=object)
    for j, name in enumerate(W_COLS):
        out[name] = w[:, j]
    out["level_source"] = source
    return out

