"""The level benchmark's --calibrated probe (benchmarks/bench_level_field.py): the confusion table it fits."""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmarks.bench_level_field import CALIBRATION_EDGES, calibration_cells, fit_calibration
from data_prep.runs.registry import LEVELS, STUDY_COL

N_STUDIES, N_SLICES, RUN = 6, 70, 10
"""Toy studies: 70 sampled slices, C1..C7 one after the other on 10 slices each from slice 0."""


def toy(named: str, seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Detections (every slice of the column, conf 0.5) named by the truth ("right") or at random ("random")."""
    rng = np.random.default_rng(seed)
    frames, truth = [], {}
    for i in range(N_STUDIES):
        uid = f"s{i}"
        t = np.zeros((N_SLICES + 20, len(LEVELS)), dtype=bool)       # 20 thorax slices without a level
        level = np.arange(N_SLICES) // RUN
        t[np.arange(N_SLICES), level] = True
        cls = level if named == "right" else rng.integers(0, len(LEVELS), N_SLICES)
        dets = pd.DataFrame({"slice_index": np.arange(N_SLICES), "cls": cls, "conf": 0.5})
        marks = pd.DataFrame({"slice_index": np.arange(len(t)), "cls": -1})
        frames.append(pd.concat([dets, marks], ignore_index=True).assign(**{STUDY_COL: uid}))
        truth[uid] = t
    return pd.concat(frames, ignore_index=True), truth


def test_cells_are_the_top_detection_class_and_bin():
    dets = pd.DataFrame({"slice_index": [0, 0, 2, 3], "cls": [1, 4, 6, -1], "conf": [0.3, 0.07, 0.5, np.nan]})
    cells = calibration_cells(dets, np.array([0, 1, 2, 3]))
    n_bins = len(CALIBRATION_EDGES)
    assert cells.tolist() == [1 * n_bins + 2, 7 * n_bins, 6 * n_bins + 3, 7 * n_bins]


def test_a_reliable_locator_gives_sharp_evidence_a_confused_one_diffuse():
    bin_ = int(np.searchsorted(CALIBRATION_EDGES, 0.5, side="right")) - 1
    n_bins = len(CALIBRATION_EDGES)
    sharp, sharp_col = fit_calibration(*toy("right"))
    diffuse, diffuse_col = fit_calibration(*toy("random"))
    for c in range(len(LEVELS)):
        row = sharp[c * n_bins + bin_]
        assert row[c] > 2.0 and np.delete(row, c).max() < -1.0       # its own level, and no other
        assert np.abs(diffuse[c * n_bins + bin_]).max() < 1.0        # names at random: little either way
    # both find the column: a detection says "some vertebra", none says "none" (the thorax slices)
    none = len(LEVELS) * n_bins
    assert sharp_col[bin_] > 0.5 and diffuse_col[bin_] > 0.5
    assert sharp_col[none] < -1.0 and diffuse_col[none] < -1.0
