"""The size prior of the level decode (configs/levels.yaml `prior:`), learned from per-slice level presence.

Input: per study its (n, 7) presence bits (segmentation, canonical slice order) and its slice spacing in mm. Each
level is cleaned to one run (its longest after closing gaps of `CLEAN_GAP` slices: stray voxels), the slices are
cut into runs holding one set of consecutive levels, and per set the runs' lengths in mm are pooled after dividing
out each study's size factor (the geometric mean of its complete level heights over the pooled means). Per set:
the mean and SD of the log length (a log-normal; sets seen in fewer than `MIN_RUNS` complete runs keep the
configured values) and P(the next run drops the first level rather than adding the next one). Further: the SD of
the log size factor, and how often the field starts above C1 / ends below C7. A run cut by the field's start or end
counts for the branching but not for the lengths.

`spinefrac train` learns it from the training data's segmentations (`learn_level_prior`, the model folder's
`level_prior.json`, docs/contracts.md "Model folder"); the defaults of configs/levels.yaml were learned the same
way from the real per-slice table (see there and docs/levels.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_prep.runs.registry import LEVELS
from detector.level_sizes import segment_name, segment_sets, successors

log = logging.getLogger("detector")

N_LEVELS = len(LEVELS)
CLEAN_GAP = 2
"""Gaps of at most this many slices inside a level's run are closed before the longest run is kept."""
MIN_RUNS = 3
"""A set needs at least this many complete runs for its length to be learned (else the configured value stays)."""
MIN_LOG_SD = 0.05
"""Floor of a learned SD of log length (a few runs of equal length must not make the prior rigid)."""
PROB_FLOOR = 0.02
"""Learned probabilities (branchings, field cuts) are kept within [floor, 1 - floor]."""
PRIOR_KEYS = ("segments", "scale_sd", "start_above", "end_below")
"""The `prior:` keys a learned prior replaces."""


def clean_levels(bits: np.ndarray, gap: int = CLEAN_GAP) -> np.ndarray:
    """Keep each level's longest run (after closing gaps of <= gap slices): drops stray segmentation voxels."""
    bits = np.asarray(bits, dtype=bool)
    out = np.zeros_like(bits)
    for j in range(bits.shape[1]):
        idx = np.nonzero(bits[:, j])[0]
        if len(idx) == 0:
            continue
        segs = np.split(idx, np.nonzero(np.diff(idx) > gap + 1)[0] + 1)
        best = max(segs, key=lambda s: s[-1] - s[0])
        out[best[0]:best[-1] + 1, j] = True
    return out


def level_runs(bits: np.ndarray, max_levels: int) -> tuple[list[tuple[tuple[int, int], int, bool]], bool, bool]:
    """Cut cleaned (n, 7) bits into runs: ([(set (a, b), slices, complete)], starts above C1, ends below C7).

    A move that changes both ends at one slice gets a zero-length run of the set in between (C2-C3 -> C3-C4 via
    C3); a set that is not consecutive levels or larger than max_levels ends the study's runs there.
    """
    bits = np.asarray(bits, dtype=bool)
    rows = np.nonzero(bits.any(axis=1))[0]
    if len(rows) == 0:
        return [], True, True
    lo, hi = int(rows[0]), int(rows[-1])
    runs: list[tuple[tuple[int, int], int, bool]] = []
    t = lo
    while t <= hi:
        on = np.nonzero(bits[t])[0]
        if len(on) == 0 or on[-1] - on[0] + 1 != len(on) or len(on) > max_levels:
            break
        s = (int(on[0]), int(on[-1]))
        u = t
        while u + 1 <= hi and np.array_equal(bits[u + 1], bits[t]):
            u += 1
        if runs:
            prev = runs[-1][0]
            if s[0] == prev[0] + 1 and s[1] == prev[1] + 1:        # both ends moved: a zero-length run between
                mid = (prev[0] + 1, prev[1]) if prev[0] + 1 <= prev[1] else (prev[0], prev[1] + 1)
                runs.append((mid, 0, False))
            elif not ((s[0] == prev[0] and s[1] == prev[1] + 1) or (s[0] == prev[0] + 1 and s[1] == prev[1])):
                break
        runs.append((s, u - t + 1, t > lo and u < hi))
        t = u + 1
    above, below = lo > 0, hi < len(bits) - 1
    if runs:    # a first (last) run that touches the field's edge is cut unless the column starts (ends) inside
        runs[0] = (runs[0][0], runs[0][1], above and runs[0][1] > 0 and runs[0][0] == (0, 0)
                   and (len(runs) > 1 or below))
        runs[-1] = (runs[-1][0], runs[-1][1], below and runs[-1][0] == (N_LEVELS - 1, N_LEVELS - 1)
                    and runs[-1][1] > 0 and (len(runs) > 1 or above))
    return runs, above, below


def learn_level_prior(studies: Sequence[tuple[np.ndarray, float]], *, config: Mapping[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Learn `prior:` values from (bits (n, 7), slice spacing mm) per study; return (prior values, counts).

    `config` is the levels config whose `prior:` values stay where the data are too few. The first dict holds the
    PRIOR_KEYS (segments as {set name: [median mm, SD of log length, P(drop the first level next)]}).
    """
    max_levels = int(config["decode"]["max_levels_per_slice"])
    base = config["prior"]
    sets = segment_sets(max_levels)
    per_study = []
    for bits, spacing in studies:
        if not spacing > 0:
            raise ValueError(f"slice spacing must be > 0 mm, got {spacing}")
        clean = clean_levels(bits)
        runs, above, below = level_runs(clean, max_levels)
        heights = np.full(N_LEVELS, np.nan)
        n = len(clean)
        for j in range(N_LEVELS):
            idx = np.nonzero(clean[:, j])[0]
            if len(idx) and idx[0] > 0 and idx[-1] < n - 1:
                heights[j] = (idx[-1] - idx[0] + 1) * spacing
        per_study.append((runs, above, below, heights, float(spacing)))
    log_h = np.log(np.array([h for *_, h, _ in per_study])) if per_study else np.zeros((0, N_LEVELS))
    mean_log_h = np.nanmean(log_h, axis=0) if len(log_h) else np.full(N_LEVELS, np.nan)
    scales = np.array([np.nanmean(r - mean_log_h) if np.isfinite(r - mean_log_h).any() else 0.0 for r in log_h])
    lengths: dict[tuple[int, int], list[float]] = {s: [] for s in sets}
    shrinks: dict[tuple[int, int], list[int]] = {s: [0, 0] for s in sets}
    for (runs, *_rest, spacing), log_scale in zip(per_study, scales, strict=True):
        for i, (s, length, complete) in enumerate(runs):
            if complete and length > 0 and s in lengths:
                lengths[s].append(float(np.log(length * spacing) - log_scale))
            if i + 1 < len(runs) and s in shrinks:
                nxt = runs[i + 1][0]
                shrinks[s][0 if nxt == (s[0] + 1, s[1]) else 1] += 1
    segments: dict[str, list[float]] = {}
    counts: dict[str, Any] = {"studies": len(per_study), "runs": {}}
    for a, b in sets:
        name = segment_name(a, b)
        mean_mm, sd, p_shrink = (float(v) for v in base["segments"][name])
        x = lengths[(a, b)]
        if len(x) >= MIN_RUNS:
            mean_mm, sd = float(np.exp(np.mean(x))), max(float(np.std(x, ddof=1)), MIN_LOG_SD)
        shrink, grow = successors(a, b, max_levels)
        k_shrink, k_grow = shrinks[(a, b)]
        if shrink is not None and grow is not None and k_shrink + k_grow > 0:
            p_shrink = _bounded((k_shrink + 1) / (k_shrink + k_grow + 2))
        segments[name] = [round(mean_mm, 3), round(sd, 4), round(p_shrink, 4)]
        counts["runs"][name] = len(x)
    valid = [s for s in scales if np.isfinite(s)]
    scale_sd = float(np.std(valid, ddof=1)) if len(valid) >= MIN_RUNS else float(base["scale_sd"])
    n = max(len(per_study), 1)
    values = {"segments": segments, "scale_sd": round(max(scale_sd, MIN_LOG_SD / 2), 4),
              "start_above": round(_bounded((sum(p[1] for p in per_study) + 1) / (n + 2)), 4),
              "end_below": round(_bounded((sum(p[2] for p in per_study) + 1) / (n + 2)), 4)}
    return values, counts


def prior_overrides(values: Mapping[str, Any]) -> list[str]:
    """`--set`-style overrides (prior.KEY=JSON) that put learned prior values into a levels config."""
    import json

    out = [f"prior.segments.{name}={json.dumps(list(v))}" for name, v in values["segments"].items()]
    out += [f"prior.{key}={json.dumps(values[key])}" for key in PRIOR_KEYS if key != "segments"]
    return out


def _bounded(p: float) -> float:
    return float(min(max(p, PROB_FLOOR), 1.0 - PROB_FLOOR))


# ---------------------------------------------------------------- from a dataset's segmentations (spinefrac train)
LEVEL_PRIOR_JSON = "level_prior.json"
"""The model folder's learned prior (docs/contracts.md "Model folder")."""
FORMAT_VERSION = 1


def segmentation_bits(data_root: Any, uid: str) -> tuple[np.ndarray, float]:
    """(n, 7) per-slice presence of one training study's segmentation and its slice spacing (mm)."""
    from pathlib import Path

    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.segmentation import load_axial_mask, slice_level_table, slice_presence
    from detector.render import slice_spacing

    root = Path(data_root)
    seg = next((p for p in sorted((root / "segmentations").glob(f"{uid}.nii*"))), None)
    if seg is None:
        raise FileNotFoundError(f"no segmentation for study {uid} under {root / 'segmentations'}")
    geometry = scan_study(root / "train_images" / uid)
    mask = load_axial_mask(seg, geometry)
    table = slice_level_table(mask, geometry)
    bits = slice_presence(table, len(geometry.paths))[list(LEVELS)].to_numpy().astype(bool)
    return bits, slice_spacing(geometry)


def learn_from_segmentations(data_root: Any, studies: Sequence[str], out: Any, *, config: Mapping[str, Any],
                             progress: bool = True) -> dict[str, Any] | None:
    """Learn the prior from the studies' segmentations into OUT/level_prior.json (+ sidecar); return its record.

    A study that fails to load is logged and left out. With fewer than `prior.min_studies` usable studies nothing
    is written and None is returned (the configured defaults stay).
    """
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from data_prep.runs.artifacts import write_json_atomic, write_sidecar
    from data_prep.runs.resume import plain

    t0 = time.perf_counter()
    path = Path(out) / LEVEL_PRIOR_JSON
    used, data = [], []
    for uid in tqdm(sorted(studies), desc="level prior", unit="study", disable=not progress):
        try:
            data.append(segmentation_bits(data_root, uid))
            used.append(uid)
        except Exception as exc:   # noqa: BLE001 - one unreadable segmentation must not stop training
            log.warning("level prior: study %s left out: %s", uid, exc)
    minimum = int(config["prior"]["min_studies"])
    if len(used) < minimum:
        log.warning("level prior: %d usable segmented studies (< prior.min_studies %d): the configured prior stays",
                    len(used), minimum)
        path.unlink(missing_ok=True)
        return None
    values, counts = learn_level_prior(data, config=config)
    record = {"format_version": FORMAT_VERSION, "prior": values, "studies": used, "counts": counts}
    write_json_atomic(path, record)
    write_sidecar(path, kind="level_prior", config=plain(config["prior"]), counts={"studies": len(used)},
                  runtime_s=time.perf_counter() - t0,
                  inputs={"segmentations": str(Path(data_root) / "segmentations"), "studies": len(studies)})
    log.info("level prior learned from %d segmented studies: %s", len(used), path)
    return record


def read_level_prior(path: Any) -> dict[str, Any]:
    """Read a level_prior.json, checking its format; return its `prior` values (PRIOR_KEYS)."""
    import json
    from pathlib import Path

    from data_prep.errors import InputError

    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the learned level prior: {exc}") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"not a level prior of format {FORMAT_VERSION}")
    prior = record.get("prior")
    if not isinstance(prior, dict) or set(prior) != set(PRIOR_KEYS):
        raise InputError(path, f"'prior' must hold exactly {', '.join(PRIOR_KEYS)}")
    return prior
