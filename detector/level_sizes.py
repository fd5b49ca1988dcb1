"""Levels C1..C7 decoded with their physical sizes: a segmental (hidden semi-Markov) model over the slices.

Along z (slice 0 = most superior) the cervical column is a sequence of runs of slices, each holding one set of
consecutive levels: C1, C1-C2 (C1's ring around C2's dens), C2, C2-C3, ... C7, with at most
`decode.max_levels_per_slice` levels per set. From one run to the next either the next level starts (C2 -> C2-C3)
or the set's first level ends (C2-C3 -> C3), so every level is one contiguous run, in order, neighbours overlap
and no level is skipped. Before C1 lie the slices above (skull), after C7 those below (thorax); neither holds a
level. Each run's length in mm has a log-normal prior and each branching its probability (configs/levels.yaml
`prior.segments`, learned from segmentations: detector/level_prior.py), turned into slices with the study's slice
spacing; all lengths of a study are multiplied by one size factor from `prior.scales` (so heights co-vary). A run
shorter than half a slice is skipped.

The field of view may cut the column: the field's top lies above C1 with P `prior.start_above`, else inside the
column, m mm below its top, with m exponential of mean `prior.cut_mm` (geometric in slices); the same for the
bottom (`prior.end_below`). The column missing beyond a cut end is the unseen rest of the cut run plus every run
beyond it, so a start inside run j after d of its slices weighs
    (1 - start_above) (1 - q) A_j sum_{D >= d} P_j(D) q^(D - d),   q = exp(-spacing / cut_mm),
with A_j = the sum over the chains from C1 to j of their branchings times E[q^D] of each run before j (a field
starting at C4 must explain the ~60 mm of C1-C3 it misses: e^(-60 / cut_mm)); the end likewise, and a field inside
one run cuts it at both ends. A long field ending inside the neck is so far less likely than one covering it, while
a short field (shorter than the column) has only cut explanations and is decoded by its evidence and the sizes.
So a level the locator never sees is still placed, from the levels it does see, the skull base and the study's
extent, and a level is absent only where the field does not reach it.

Emissions are the locator's evidence as log-odds per slice and level: a run adds the log-odds of the levels it
holds, plus the per-slice "column" log-odds (the locator found some vertebra there, whatever its name) in every
run, since every run holds a level (its negative values, nothing found, only in runs holding one of the levels the
locator finds somewhere in the study); slices above C1 and below C7 add 0. Viterbi gives the most likely
segmentation; forward-backward gives each level's presence probability per slice. Vectorised over slices, scales
and durations; a run's durations are bounded at `prior.max_sd` SDs above its mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import log_ndtr, logsumexp

from data_prep.runs.registry import LEVELS

N_LEVELS = len(LEVELS)
NEG = -np.inf
TINY = 1e-300
"""Floor inside a log (the result is -inf wherever the sum is 0)."""
MIN_LOG = -1e-12
"""Upper bound of a log-probability difference before log1p(-exp(.)) (keeps it finite)."""


def segment_name(a: int, b: int) -> str:
    """Name of the set of levels a..b (0-based): "C2" or "C2-C4"."""
    return LEVELS[a] if a == b else f"{LEVELS[a]}-{LEVELS[b]}"


def segment_sets(max_levels: int) -> list[tuple[int, int]]:
    """Every set (a, b) of consecutive levels a..b (0-based) with at most max_levels levels, in order along z."""
    sets = [(a, b) for a in range(N_LEVELS) for b in range(a, min(N_LEVELS, a + max_levels))]
    return sorted(sets, key=lambda s: (s[0] + s[1], s[0]))


def successors(a: int, b: int, max_levels: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(after the first level ends, after the next level starts): the runs that may follow (a, b); None if none."""
    shrink = (a + 1, b) if a < b else None
    grow = (a, b + 1) if b + 1 < N_LEVELS and b - a + 1 < max_levels else None
    return shrink, grow


@dataclass(frozen=True)
class SizePrior:
    """One decode's prior: the runs in order, their log-normal lengths (mm), branchings, scales and field cuts."""

    sets: list[tuple[int, int]]   # the runs (a, b), in an order where every predecessor comes first
    log_mean: np.ndarray          # (S,) log of the mean length in mm
    log_sd: np.ndarray            # (S,) SD of the log length
    log_shrink: np.ndarray        # (S,) log P(next run drops the first level | both are possible)
    log_grow: np.ndarray          # (S,) log P(next run adds the next level | both are possible)
    log_scales: np.ndarray        # (K,) log of the per-study size factors
    log_scale_w: np.ndarray       # (K,) log prior weight of each factor (sum 1)
    log_start_above: float        # log P(the field starts above C1)
    log_end_below: float          # log P(the field ends below C7)
    cut_mm: float                 # mean length (mm) of the column missing beyond a cut end of the field
    max_sd: float
    max_levels: int

    @property
    def bits(self) -> np.ndarray:
        """(S, 7) bool: the levels each run holds."""
        out = np.zeros((len(self.sets), N_LEVELS), dtype=bool)
        for i, (a, b) in enumerate(self.sets):
            out[i, a:b + 1] = True
        return out


def size_prior(config: Mapping[str, Any]) -> SizePrior:
    """Build the decode's SizePrior from a levels config (`prior:` and `decode.max_levels_per_slice`)."""
    pr = config["prior"]
    max_levels = int(config["decode"]["max_levels_per_slice"])
    sets = segment_sets(max_levels)
    table = pr["segments"]
    missing = [segment_name(a, b) for a, b in sets if segment_name(a, b) not in table]
    if missing:
        raise ValueError(f"prior.segments lacks {', '.join(missing)} (needed with max_levels_per_slice "
                         f"{max_levels})")
    rows = np.array([[float(v) for v in table[segment_name(a, b)]] for a, b in sets])
    p_shrink = np.clip(rows[:, 2], 0.0, 1.0)
    with np.errstate(divide="ignore"):
        log_shrink, log_grow = np.log(p_shrink), np.log1p(-p_shrink)
    for i, (a, b) in enumerate(sets):            # where only one move is possible it is certain
        shrink, grow = successors(a, b, max_levels)
        if shrink is None or grow is None:
            log_shrink[i] = 0.0 if shrink is not None else NEG
            log_grow[i] = 0.0 if grow is not None else NEG
    scales = np.asarray(pr["scales"], float)
    log_scales = np.log(scales)
    sd = float(pr["scale_sd"])
    w = -0.5 * (log_scales / sd) ** 2 if sd > 0 else np.where(np.isclose(scales, 1.0), 0.0, NEG)
    if not np.isfinite(w).any():
        w = np.zeros(len(scales))
    return SizePrior(sets, np.log(rows[:, 0]), rows[:, 1], log_shrink, log_grow, log_scales, w - logsumexp(w),
                     float(np.log(pr["start_above"])), float(np.log(pr["end_below"])), float(pr["cut_mm"]),
                     float(pr["max_sd"]), max_levels)


def _duration_tables(prior: SizePrior, spacing_mm: float, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per run: (log P(d), log P(D >= d)) for d = 0..D_j, each (K, D_j + 1); d = 0: the run is skipped.

    Length in mm = d x spacing: P(d) = P((d - 1/2) s <= L < (d + 1/2) s) under the run's log-normal times the
    scale, so P(0) = P(L < s / 2).
    """
    out = []
    top = prior.log_scales.max()
    for j in range(len(prior.sets)):
        mu = prior.log_mean[j] + prior.log_scales[:, None]
        sd = max(float(prior.log_sd[j]), 1e-3)
        d_max = int(np.ceil(np.exp(prior.log_mean[j] + top + prior.max_sd * sd) / spacing_mm)) + 1
        d = np.arange(max(1, min(d_max, n)) + 1, dtype=float)
        z_lo = (np.log(np.maximum(d - 0.5, 1e-9) * spacing_mm)[None, :] - mu) / sd
        z_hi = (np.log((d + 0.5) * spacing_mm)[None, :] - mu) / sd
        hi = log_ndtr(z_hi)
        lo = np.where(d[None, :] > 0, log_ndtr(z_lo), NEG)
        log_p = hi + np.log1p(-np.exp(np.minimum(lo - hi, MIN_LOG)))
        log_surv = np.where(d[None, :] > 0, log_ndtr(-z_lo), 0.0)
        out.append((log_p, log_surv))
    return out


def _windows(values: np.ndarray, width: int) -> np.ndarray:
    """(K, n + 1) -> (K, n + 1, width + 1): [k, t, d] = values[k, t - d] (-inf before 0)."""
    pad = np.concatenate([np.full((values.shape[0], width), NEG), values], axis=1)
    return sliding_window_view(pad, width + 1, axis=1)[:, :, ::-1]


def _windows_ahead(values: np.ndarray, width: int) -> np.ndarray:
    """(K, n + 1) -> (K, n + 1, width + 1): [k, t, d] = values[k, t + d] (-inf past the end)."""
    pad = np.concatenate([values, np.full((values.shape[0], width), NEG)], axis=1)
    return sliding_window_view(pad, width + 1, axis=1)


def _window_lse(x: np.ndarray, log_p: np.ndarray, *, ahead: bool) -> np.ndarray:
    """out[k, t] = log sum_{d >= 1} exp(x[k, t -/+ d] + log_p[k, d]) for (K, T) x and (K, D + 1) log_p.

    One exp per (t, d), shared by the K scales: x = m[t] + log y[k, t] with m the max over k, and
    log_p = lp_max[d] + log q[k, d]; the (t, d) part is normalised by its max over d, so nothing overflows and a
    term is lost to underflow only where it is e^-700 below the others.
    """
    width = log_p.shape[1] - 1
    m = x.max(axis=0)
    finite = np.isfinite(m)
    y = np.where(finite, np.exp(x - np.where(finite, m, 0.0)), 0.0).astype(np.float32)
    lp = log_p.copy()
    lp[:, 0] = NEG                                     # d = 0 is the skip, handled by the caller
    lp_max = lp.max(axis=0)
    q = np.where(np.isfinite(lp_max), np.exp(lp - np.where(np.isfinite(lp_max), lp_max, 0.0)), 0.0).astype(np.float32)
    view = _windows_ahead if ahead else _windows
    a = view(m[None, :], width)[0] + lp_max[None, :]  # (T, D + 1)
    big = a.max(axis=1)
    ok = np.isfinite(big)
    e = np.exp(a - np.where(ok, big, 0.0)[:, None]).astype(np.float32)
    pad = np.zeros((y.shape[0], width), dtype=np.float32)
    yw = sliding_window_view(np.concatenate([y, pad], axis=1) if ahead else np.concatenate([pad, y], axis=1),
                             width + 1, axis=1)
    if not ahead:
        yw = yw[:, :, ::-1]
    total = np.einsum("ktd,kd,td->kt", yw, q, e).astype(float)   # float32 products: 1e-7 relative, ample here
    with np.errstate(divide="ignore"):
        return np.where(ok[None, :] & (total > 0), np.log(np.maximum(total, TINY)) + np.where(ok, big, 0.0), NEG)


def _windows_max(x: np.ndarray, log_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max over d >= 1 of x[t - d] + log_p[d], its argmax d) for 1-D x (T,) and log_p (D + 1,)."""
    width = len(log_p) - 1
    cand = _windows(x[None, :], width)[0] + log_p[None, :]
    cand[:, 0] = NEG
    best = np.argmax(cand, axis=1)
    return cand[np.arange(len(x)), best], best


def _cut_tables(durs: list[tuple[np.ndarray, np.ndarray]], log_q: float, n: int
                ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per run, what a cut costs with q = P(one more slice missing) (log_q < 0), from the duration tables:

    - (K, D + 1) log sum_{D' >= d} P(D') q^(D' - d): d of the run seen, the rest of it missing beyond the cut;
    - (S, K) log E[q^D]: the run missing entirely (its skip, D = 0, included);
    - (S, K) log sum_{D >= n} P(D) (D - n + 1) q^(D - n): the run holds all n slices, cut at both ends (the
      missing D - n slices split between the two ends in D - n + 1 ways).
    """
    cut, whole, mgf = [], [], []
    for log_p, _ in durs:
        d = np.arange(log_p.shape[1], dtype=float)
        x = log_p + d * log_q
        cut.append(np.logaddexp.accumulate(x[:, ::-1], axis=1)[:, ::-1] - d * log_q)
        mgf.append(logsumexp(x, axis=1))
        if log_p.shape[1] > n:
            tail = x[:, n:] - n * log_q + np.log(d[n:] - n + 1.0)
            whole.append(logsumexp(tail, axis=1))
        else:
            whole.append(np.full(log_p.shape[0], NEG))
    return cut, np.array(mgf), np.array(whole)


def _chain_sums(n_sets: int, k: int, log_mgf: np.ndarray, links: list[list[tuple[int, float]]], root: int,
                order: range) -> np.ndarray:
    """(S, K) log sum over the chains from `root` to each run of their branchings x E[q^D] of the runs between
    (root's included, the run's own excluded); `links[j]`: (neighbour towards root, log P(move)); `order`: root
    first."""
    out = np.full((n_sets, k), NEG)
    out[root] = 0.0
    for j in order:
        for i, logp in links[j]:
            out[j] = np.logaddexp(out[j], out[i] + log_mgf[i] + logp)
    return out


def decode_sizes(llr: np.ndarray, spacing_mm: float, prior: SizePrior, column: np.ndarray | None = None,
                 column_levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode (n, 7) per-slice evidence log-odds: (presence bool (n, 7) of the best path, P(present) (n, 7)).

    `llr[t, L]` is what the evidence adds to the log-likelihood of a path holding level L on slice t
    (0 = no information); `column[t]` (optional, (n,)) what it adds to a path holding any level on slice t
    (its negative values only where the path holds one of `column_levels`, (7,) bool, default all);
    `spacing_mm` is the study's slice spacing. The hard decode is the best path at the most probable size
    factor; the probabilities are summed over every path and factor.
    """
    llr = np.asarray(llr, dtype=float)
    if llr.ndim != 2 or llr.shape[1] != N_LEVELS or llr.shape[0] == 0:
        raise ValueError(f"evidence must be (slices >= 1, {N_LEVELS}), got shape {llr.shape}")
    if not spacing_mm > 0:
        raise ValueError(f"slice spacing must be > 0 mm, got {spacing_mm}")
    n, k = llr.shape[0], len(prior.log_scales)
    bits = prior.bits
    n_sets = len(prior.sets)
    index = {s: i for i, s in enumerate(prior.sets)}
    per_slice = llr @ bits.T.astype(float)                                   # (n, S)
    if column is not None:
        column = np.asarray(column, dtype=float)
        if column.shape != (n,):
            raise ValueError(f"column evidence must be ({n},), got shape {column.shape}")
        holds = np.ones(n_sets, dtype=bool) if column_levels is None else \
            (bits.astype(int) @ np.asarray(column_levels, dtype=int)) > 0                 # (S,)
        per_slice = per_slice + np.maximum(column, 0.0)[:, None] + np.minimum(column, 0.0)[:, None] * holds[None, :]
    cum = np.vstack([np.zeros((1, n_sets)), np.cumsum(per_slice, axis=0)])   # (n + 1, S)
    durs = _duration_tables(prior, spacing_mm, n)
    preds: list[list[tuple[int, float]]] = [[] for _ in range(n_sets)]     # (predecessor, log P(move))
    succs: list[list[tuple[int, float]]] = [[] for _ in range(n_sets)]
    for i, (a, b) in enumerate(prior.sets):
        shrink, grow = successors(a, b, prior.max_levels)
        for nxt, logp in ((shrink, prior.log_shrink[i]), (grow, prior.log_grow[i])):
            if nxt is not None and nxt in index and np.isfinite(logp):
                preds[index[nxt]].append((i, float(logp)))
                succs[i].append((index[nxt], float(logp)))
    first, last = index[(0, 0)], index[(N_LEVELS - 1, N_LEVELS - 1)]
    # the field's top (bottom) lies m slices inside the column with P (1 - start_above) (1 - q) q^m (module doc)
    log_q = -spacing_mm / prior.cut_mm
    log_1mq = float(np.log(-np.expm1(log_q)))
    cut_d, log_mgf, log_whole = _cut_tables(durs, log_q, n)
    above = _chain_sums(n_sets, k, log_mgf, preds, first, range(n_sets))          # (S, K) runs above j, missing
    below = _chain_sums(n_sets, k, log_mgf, succs, last, range(n_sets - 1, -1, -1))
    log_in_start = float(np.log1p(-np.exp(prior.log_start_above))) + log_1mq + above     # (S, K)
    log_in_end = float(np.log1p(-np.exp(prior.log_end_below))) + log_1mq + below
    whole = log_in_start + log_in_end + log_whole + prior.log_scale_w[None, :] + cum[n][:, None]  # (S, K): one
    # run holds every slice, cut at both ends
    left = n - np.arange(n + 1)
    log_w = prior.log_scale_w[:, None]

    def cut_start_of(j: int, gain: np.ndarray) -> np.ndarray:
        """(K, n + 1): run j covers [0, t), cut by the field's start: t of it seen, the rest and the runs above
        missing."""
        out = np.full((k, n + 1), NEG)
        m = min(n, cut_d[j].shape[1] - 1)
        out[:, 1:m + 1] = cut_d[j][:, 1:m + 1] + log_in_start[j][:, None] + log_w + gain[None, 1:m + 1]
        return out

    def cut_end_of(j: int, gain: np.ndarray) -> np.ndarray:
        """(K, n + 1): run j begins at s and goes on past the last slice: n - s of it seen (without begin)."""
        ok = left < cut_d[j].shape[1]
        if j == first:
            ok[n] = False          # C1 beginning past the last slice: a field without any level (not decoded)
        out = np.full((k, n + 1), NEG)
        out[:, ok] = cut_d[j][:, left[ok]] + log_in_end[j][:, None] + gain[n] - gain[ok][None, :]
        return out

    # ---------------- forward: log P(evidence before t, run j begins / ends / is left at t)
    shape = (n_sets, k, n + 1)
    begin, end, leave, cut_start = (np.full(shape, NEG) for _ in range(4))
    for j in range(n_sets):
        if j == first:                                   # after the slices above C1 (flat)
            begin[j][:, 1:] = prior.log_start_above
            begin[j] += log_w
        for i, logp in preds[j]:
            begin[j] = np.logaddexp(begin[j], leave[i] + logp)
        gain = cum[:, j]
        cut_start[j] = cut_start_of(j, gain)
        end[j] = np.logaddexp(_window_lse(begin[j] - gain, durs[j][0], ahead=False) + gain, cut_start[j])
        leave[j] = np.logaddexp(end[j], begin[j] + durs[j][0][:, :1])
    terms = np.stack([leave[last] + prior.log_end_below,
                      *(begin[j] + cut_end_of(j, cum[:, j]) for j in range(n_sets))])
    per_scale = np.logaddexp(logsumexp(terms, axis=(0, 2)), logsumexp(whole, axis=0))
    log_z = float(logsumexp(per_scale))
    if not np.isfinite(log_z):
        raise ValueError("no segmentation of the slices fits the size prior (check prior: and the spacing)")
    present = _viterbi(int(np.argmax(per_scale)), n, bits, cum, durs, preds, first, last, prior,
                       cut_start, cut_end_of, whole)

    # ---------------- backward: log P(evidence from t on | run j left at t / begins non-empty at t)
    bleave, nonskip, bbegin = (np.full(shape, NEG) for _ in range(3))
    for j in range(n_sets - 1, -1, -1):
        if j == last:
            bleave[j] = prior.log_end_below
        for i, logp in succs[j]:
            bleave[j] = np.logaddexp(bleave[j], bbegin[i] + logp)
        gain = cum[:, j]
        nonskip[j] = np.logaddexp(_window_lse(bleave[j] + gain, durs[j][0], ahead=True) - gain, cut_end_of(j, gain))
        bbegin[j] = np.logaddexp(nonskip[j], durs[j][0][:, :1] + bleave[j])

    # ---------------- occupancy of slice t: P(run j began at or before t) - P(run j ended at or before t)
    occ = np.empty((n, n_sets))
    for j in range(n_sets):
        p_begin = np.exp(begin[j] + nonskip[j] - log_z).sum(axis=0)
        p_begin[0] += float(np.exp(cut_start[j] + bleave[j] - log_z).sum())
        p_end = np.exp(end[j] + bleave[j] - log_z).sum(axis=0)
        occ[:, j] = np.cumsum(p_begin)[:n] - np.cumsum(p_end)[:n] + float(np.exp(whole[j] - log_z).sum())
    return present, np.clip(occ @ bits.astype(float), 0.0, 1.0)


def _viterbi(kk: int, n: int, bits: np.ndarray, cum: np.ndarray, durs: list[tuple[np.ndarray, np.ndarray]],
             preds: list[list[tuple[int, float]]], first: int, last: int, prior: SizePrior,
             cut_start: np.ndarray, cut_end_of: Any, whole: np.ndarray) -> np.ndarray:
    """The best path at size factor kk: its (n, 7) presence."""
    n_sets = len(prior.sets)
    vbegin, vend, vleave = (np.full((n_sets, n + 1), NEG) for _ in range(3))
    vend_d = np.zeros((n_sets, n + 1), dtype=np.int64)      # duration of the best run ending there (-1: cut)
    vfrom = np.full((n_sets, n + 1), -1, dtype=np.int64)    # the best predecessor run (-1: above C1)
    vskip = np.zeros((n_sets, n + 1), dtype=bool)           # the best way to leave run j at t skipped it
    for j in range(n_sets):
        if j == first:
            vbegin[j][1:] = prior.log_start_above + prior.log_scale_w[kk]
        for i, logp in preds[j]:
            cand = vleave[i] + logp
            better = cand > vbegin[j]
            vbegin[j] = np.where(better, cand, vbegin[j])
            vfrom[j] = np.where(better, i, vfrom[j])
        gain = cum[:, j]
        reg, best_d = _windows_max(vbegin[j] - gain, durs[j][0][kk])
        reg = reg + gain
        cs = cut_start[j][kk]
        vend[j] = np.maximum(reg, cs)
        vend_d[j] = np.where(cs > reg, -1, best_d)
        sk = vbegin[j] + durs[j][0][kk, 0]
        vskip[j] = sk > vend[j]
        vleave[j] = np.maximum(vend[j], sk)
    vterms = [vleave[last] + prior.log_end_below, *(vbegin[j] + cut_end_of(j, cum[:, j])[kk] for j in range(n_sets))]
    best = max(range(len(vterms)), key=lambda i: float(vterms[i].max()))
    t = int(np.argmax(vterms[best]))
    present = np.zeros((n, bits.shape[1]), dtype=bool)
    j_whole = int(np.argmax(whole[:, kk]))
    if whole[j_whole, kk] > vterms[best][t]:       # one run holds the whole field
        present[:] = bits[j_whole]
        return present
    if best == 0:                                   # the last run is left at t ("below" after it)
        j, state = last, "leave"
    else:                                           # run best - 1 begins at t and goes on past the last slice
        j, state = best - 1, "begin"
        present[t:n] |= bits[j]
    bound = t
    while True:
        if state == "leave":
            state = "begin" if vskip[j, bound] else "end"
        elif state == "end":
            d = int(vend_d[j, bound])
            if d < 0:                               # cut by the field's start: covers [0, bound)
                present[:bound] |= bits[j]
                return present
            present[bound - d:bound] |= bits[j]
            bound -= d
            state = "begin"
        else:                                       # run j begins at bound
            i = int(vfrom[j, bound])
            if i < 0:
                return present                      # after the slices above C1
            j, state = i, "leave"
