"""Level decoding with the anatomical-order prior, locating from detections, and fracture-box assignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS
from detector.levels import (
    assign_boxes,
    decode_levels,
    level_confidence,
    level_states,
    locate_study,
    relative_z_levels,
)

RUNS = [(10, 25), (15, 40), (35, 50), (48, 60), (58, 70), (66, 80), (69, 92)]
"""Truth runs (first, last slice) of C1..C7 on a 100-slice study: overlaps, and 3 levels on slices 69-70."""
N = 100


@pytest.fixture(scope="module")
def cfg():
    return load_config("levels", overrides=["decode.model=runs"])   # the former decoder, kept for the benchmark


def truth_bits(runs=RUNS, n=N) -> np.ndarray:
    bits = np.zeros((n, len(LEVELS)), dtype=bool)
    for j, run in enumerate(runs):
        if run is not None:
            bits[run[0]:run[1] + 1, j] = True
    return bits


def soft(bits: np.ndarray, hi: float = 0.9) -> np.ndarray:
    return np.where(bits, hi, 1.0 - hi)


def assert_anatomical(bits: np.ndarray) -> None:
    """Each level one contiguous run, starts and ends non-decreasing C1..C7, no level missing in the middle."""
    present = [j for j in range(bits.shape[1]) if bits[:, j].any()]
    assert present == list(range(present[0], present[-1] + 1)), f"a middle level is missing: {present}"
    spans = []
    for j in present:
        idx = np.nonzero(bits[:, j])[0]
        assert idx[-1] - idx[0] + 1 == len(idx), f"{LEVELS[j]} is not contiguous"
        spans.append((idx[0], idx[-1]))
    for (s0, e0), (s1, e1) in zip(spans[:-1], spans[1:], strict=True):
        assert s1 >= s0 and e1 >= e0, f"order violated: {spans}"


def test_states_respect_the_slice_limit():
    for k in (1, 2, 3):
        states = level_states(k)
        assert (states[:, 1] - states[:, 0] + 1 <= k).all()
        assert len({tuple(s) for s in states}) == len(states)
    assert len(level_states(2, allow_gaps=False)) == len(level_states(2)) - 6  # the 6 between-level gaps
    assert {(0, -1), (7, 6)} <= {tuple(s) for s in level_states(2, allow_gaps=False)}  # above C1, below C7


def test_clean_evidence_is_reproduced_exactly(cfg):
    truth = truth_bits()
    np.testing.assert_array_equal(decode_levels(soft(truth), config=cfg), truth)


def test_noise_is_cleaned_into_order(cfg):
    truth = truth_bits()
    rng = np.random.default_rng(3)
    noisy = truth ^ (rng.random(truth.shape) < 0.1)
    dec = decode_levels(soft(noisy), config=cfg)
    assert_anatomical(dec)
    raw_acc = (noisy == truth).mean()
    acc = (dec == truth).mean()
    assert acc >= 0.97 and acc > raw_acc + 0.05


def test_dropouts_are_bridged(cfg):
    truth = truth_bits()
    ev = soft(truth)
    ev[[20, 21, 30, 44, 45, 46, 65]] = 0.02  # slices where the locator found nothing at all
    np.testing.assert_array_equal(decode_levels(ev, config=cfg), truth)


def test_swapped_pair_is_put_back_in_order(cfg):
    truth = truth_bits()
    ev = soft(truth)
    ev[52:55, [3, 4]] = ev[52:55, [4, 3]]  # C4 called C5 on three slices inside C4's run
    assert (ev[52:55, 4] > 0.5).all()
    np.testing.assert_array_equal(decode_levels(ev, config=cfg), truth)


def test_missing_levels_outside_the_scan_stay_missing(cfg):
    runs = [None, (0, 20), (15, 35), (33, 50), (48, 64), (60, 79), None]  # starts in C2, ends in C6
    truth = truth_bits(runs, n=80)
    rng = np.random.default_rng(0)
    noisy = truth ^ (rng.random(truth.shape) < 0.05)
    dec = decode_levels(soft(noisy), config=cfg)
    assert not dec[:, 0].any() and not dec[:, 6].any()
    assert_anatomical(dec)
    assert (dec == truth).mean() >= 0.98


def test_a_level_without_evidence_is_placed_between_its_neighbours(cfg):
    truth = truth_bits()
    ev = soft(truth)
    ev[:, 2] = 0.1  # no C3 anywhere
    dec = decode_levels(ev, config=cfg)
    assert_anatomical(dec)
    c3 = np.nonzero(dec[:, 2])[0]
    assert len(c3) >= 1 and RUNS[1][0] <= c3[0] and c3[-1] <= RUNS[3][1]


def test_max_levels_per_slice_is_enforced(cfg):
    truth = truth_bits()
    one = load_config("levels", overrides=["decode.model=runs", "decode.max_levels_per_slice=1"])
    dec = decode_levels(soft(truth), config=one)
    assert dec.sum(axis=1).max() == 1
    assert_anatomical(dec)
    assert decode_levels(soft(truth), config=cfg).sum(axis=1).max() == 3


def test_confidence_is_high_inside_runs_and_low_outside(cfg):
    truth = truth_bits()
    conf = level_confidence(soft(truth), config=cfg)
    assert conf.shape == truth.shape and (conf >= 0).all() and (conf <= 1).all()
    assert conf[20, 0] > 0.95 and conf[20, 6] < 0.05 and conf[5, :].max() < 0.05


def detections_from_truth(truth: np.ndarray, sampled: np.ndarray) -> pd.DataFrame:
    rows = []
    for s in sampled:
        for j in np.nonzero(truth[s])[0]:
            rows.append({"slice_index": s, "level": LEVELS[j], "conf": 0.8,
                         "x": 10.0 + j * 5 + s * 0.5, "y": 20.0, "width": 30.0, "height": 10.0 + s * 0.1})
    return pd.DataFrame(rows)


def test_locate_study_from_every_kth_slice(cfg):
    truth = truth_bits()
    sampled = np.arange(0, N, 4)
    dets = detections_from_truth(truth, sampled)
    # a spurious C7 far up and a swapped class: both must be overruled by the order prior
    dets = pd.concat([dets, pd.DataFrame([
        {"slice_index": 12, "level": "C7", "conf": 0.6, "x": 0.0, "y": 0.0, "width": 5.0, "height": 5.0}])])
    slices, boxes = locate_study(dets, N, sampled, config=cfg, study_uid="u1", slice_numbers=np.arange(N, 0, -1))
    assert list(slices.columns[:3]) == ["StudyInstanceUID", "slice_index", "slice_number"]
    bits = slices[list(LEVELS)].to_numpy().astype(bool)
    assert_anatomical(bits)
    for j, (first, last) in enumerate(RUNS):
        idx = np.nonzero(bits[:, j])[0]
        assert abs(idx[0] - first) <= 2 and abs(idx[-1] - last) <= 2, (LEVELS[j], idx[0], idx[-1])
    assert not bits[12, 6]
    # a box on an unsampled slice is the straight-line interpolation of the detected ones around it
    c2 = boxes[(boxes.level == "C2") & (boxes.slice_index == 22)].iloc[0]
    assert c2.source == "interpolated" and c2.x == pytest.approx(10 + 5 + 22 * 0.5)
    assert c2.height == pytest.approx(10 + 2.2) and c2.slice_number == N - 22
    assert set(boxes.loc[boxes.slice_index == 20, "source"]) == {"detected"}
    assert (slices.loc[30, ["p_C2"]] > 0.9).all()


def test_locate_study_accepts_class_ids(cfg):
    truth = truth_bits()
    sampled = np.arange(0, N, 2)
    dets = detections_from_truth(truth, sampled)
    dets["cls"] = dets.pop("level").map(LEVELS.index)
    slices, _ = locate_study(dets, N, sampled, config=cfg)
    assert "StudyInstanceUID" not in slices.columns
    assert (slices[list(LEVELS)].to_numpy().astype(bool) == truth).mean() > 0.98


def test_relative_z_baseline_follows_the_configured_fractions(cfg):
    bits = relative_z_levels(1000, config=cfg)
    start = np.asarray(cfg.relative_z.start)
    for j in range(7):
        idx = np.nonzero(bits[:, j])[0]
        assert abs(idx[0] / 1000 - start[j]) < 0.002


# ---------------------------------------------------------------- box assignment
def level_box_table() -> pd.DataFrame:
    return pd.DataFrame([
        {"slice_index": 5, "level": "C1", "x": 0.0, "y": 0.0, "width": 10.0, "height": 10.0},
        {"slice_index": 5, "level": "C2", "x": 10.0, "y": 0.0, "width": 10.0, "height": 10.0},
        {"slice_index": 6, "level": "C2", "x": 10.0, "y": 0.0, "width": 10.0, "height": 10.0},
    ])


def slice_table(n: int = 10) -> pd.DataFrame:
    sl = pd.DataFrame({"slice_index": np.arange(n)})
    for name in LEVELS:
        sl[f"p_{name}"] = 0.0
    sl.loc[5, ["p_C1", "p_C2"]] = [0.9, 0.6]
    sl.loc[6, ["p_C2"]] = [0.8]
    return sl


def test_box_straddling_two_levels_gets_both_by_overlap(cfg):
    boxes = pd.DataFrame([{"slice_index": 5, "x": 7.0, "y": 2.0, "width": 10.0, "height": 4.0, "score": 0.9}])
    out = assign_boxes(boxes, level_box_table(), slice_table(), config=cfg)
    row = out.iloc[0]
    assert row.w_C1 == pytest.approx(0.3) and row.w_C2 == pytest.approx(0.7)  # 3x4 px vs 7x4 px
    assert row.level == "C2" and row.level_source == "overlap" and row.score == 0.9
    assert out[[f"w_{n}" for n in LEVELS]].sum(axis=1).iloc[0] == pytest.approx(1.0)


def test_box_without_overlap_falls_back_to_slice_then_nearest(cfg):
    boxes = pd.DataFrame([
        {"slice_index": 5, "x": 50.0, "y": 50.0, "width": 5.0, "height": 5.0},   # no overlap: slice p
        {"slice_index": 9, "x": 10.0, "y": 0.0, "width": 5.0, "height": 5.0},   # no levels: nearest (6)
        {"slice_index": 6, "x": 12.0, "y": 1.0, "width": 2.0, "height": 2.0},   # inside C2 on slice 6
    ])
    out = assign_boxes(boxes, level_box_table(), slice_table(), config=cfg)
    assert out.loc[0, "level"] == "C1" and out.loc[0, "level_source"] == "slice"
    assert out.loc[0, "w_C1"] == pytest.approx(0.9 / 1.5) and out.loc[0, "w_C2"] == pytest.approx(0.6 / 1.5)
    assert out.loc[1, "level"] == "C2" and out.loc[1, "level_source"] == "nearest"
    assert out.loc[1, "w_C2"] == pytest.approx(1.0)
    assert out.loc[2, "level"] == "C2" and out.loc[2, "level_source"] == "overlap"


def test_assignment_keeps_studies_apart_and_handles_no_levels(cfg):
    lb = level_box_table().assign(StudyInstanceUID="a")
    sl = pd.concat([slice_table().assign(StudyInstanceUID="a"),
                    slice_table().assign(StudyInstanceUID="b", p_C1=0.0, p_C2=0.0)])
    boxes = pd.DataFrame([
        {"StudyInstanceUID": "a", "slice_index": 5, "x": 1.0, "y": 1.0, "width": 2.0, "height": 2.0},
        {"StudyInstanceUID": "b", "slice_index": 5, "x": 1.0, "y": 1.0, "width": 2.0, "height": 2.0},
    ])
    out = assign_boxes(boxes, lb, sl, config=cfg)
    assert out.loc[0, "level"] == "C1"
    assert pd.isna(out.loc[1, "level"]) and out.loc[1, "level_source"] == "none"
    assert out.loc[1, [f"w_{n}" for n in LEVELS]].sum() == 0
