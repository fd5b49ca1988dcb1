"""Features from hand-built boxes/slices tables whose answers are worked out by hand."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from aggregation.features import (
    build_features,
    build_patient_features,
    features_markdown,
    level_feature_descriptions,
    level_feature_groups,
    longest_run,
    patient_feature_names,
)
from data_prep.errors import InputError
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL

# Study s1: 10 slices; C1 on slices 0-3, C2 on 3-6 (slice 3 holds both), C3 on 7-9.
# Box           slice  score  w                    size
#  b1             1     0.9   C1=1                 10 x 10
#  b2             2     0.4   C1=1                 20 x 10
#  b3             3     0.6   C1=0.5, C2=0.5       10 x 20
#  b4             5     0.2   C2=1                  5 x 5
#  b5             8     0.8   C3=0.1, C4=0.9       10 x 10   (C3 weight < min_level_weight 0.2)
BOXES = [
    (1, 0.9, {"C1": 1.0}, 10, 10),
    (2, 0.4, {"C1": 1.0}, 20, 10),
    (3, 0.6, {"C1": 0.5, "C2": 0.5}, 10, 20),
    (5, 0.2, {"C2": 1.0}, 5, 5),
    (8, 0.8, {"C3": 0.1, "C4": 0.9}, 10, 10),
]


def _boxes() -> pd.DataFrame:
    rows = []
    for sl, score, w, width, height in BOXES:
        rows.append({STUDY_COL: "s1", "slice_number": sl + 1, "slice_index": sl, "z_mm": -float(sl),
                     "x": 0.0, "y": 0.0, "width": float(width), "height": float(height), "score": score,
                     "level": max(w, key=w.get), **{f"w_{lv}": w.get(lv, 0.0) for lv in LEVELS}})
    return pd.DataFrame(rows)


def _slices() -> pd.DataFrame:
    rows = []
    for uid, n in (("s1", 10), ("s2", 6)):
        for i in range(n):
            p = {lv: 0.0 for lv in LEVELS}
            if uid == "s1":
                p["C1"] = 0.9 if i <= 3 else 0.0
                p["C2"] = 0.8 if 3 <= i <= 6 else 0.0
                p["C3"] = 0.7 if i >= 7 else 0.0
            else:
                p["C5"] = 0.6 if i < 4 else 0.4
            rows.append({STUDY_COL: uid, "slice_number": i + 1, "slice_index": i, "z_mm": -float(i),
                         "max_score": 0.0, "n_boxes": 0, **{f"p_{lv}": v for lv, v in p.items()}})
    return pd.DataFrame(rows)


def _cfg(*overrides: str):
    return load_config("aggregation", overrides=["features.score_thresholds=[0.1, 0.25, 0.5]",
                                                 "features.top_k=3", "features.min_level_weight=0.2",
                                                 "features.run_min_score=0.1", *overrides])


def _row(df: pd.DataFrame, uid: str, level: str) -> pd.Series:
    sel = df[(df[STUDY_COL] == uid) & (df["level"] == level)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_level_features_match_hand_computation():
    f = build_features(_boxes(), _slices(), config=_cfg())
    assert list(f[STUDY_COL]) == ["s1"] * 7 + ["s2"] * 7
    assert list(f["level"]) == list(LEVELS) * 2
    c1 = _row(f, "s1", "C1")
    assert c1["max_score"] == pytest.approx(0.9)
    assert c1["top_k_mean"] == pytest.approx((0.9 + 0.6 + 0.4) / 3)
    assert (c1["n_boxes_ge_0.1"], c1["n_boxes_ge_0.25"], c1["n_boxes_ge_0.5"]) == (3, 3, 2)
    assert (c1["n_slices_ge_0.1"], c1["n_slices_ge_0.5"]) == (3, 2)
    assert c1["score_mass"] == pytest.approx(0.9 + 0.4 + 0.6 * 0.5)
    # areas 100, 200, 200 weighted by score x w = 0.9, 0.4, 0.3
    assert c1["box_area_px"] == pytest.approx((0.9 * 100 + 0.4 * 200 + 0.3 * 200) / 1.6)
    assert c1["longest_run"] == 3                       # slices 1, 2, 3
    assert c1["level_slices"] == 4                      # p_C1 > 0.5 on slices 0-3
    assert c1["det_slice_frac"] == pytest.approx(3 / 4)
    assert (c1["above_max"], c1["below_max"]) == (0.0, pytest.approx(0.6))

    c2 = _row(f, "s1", "C2")
    assert c2["max_score"] == pytest.approx(0.6)
    assert c2["top_k_mean"] == pytest.approx((0.6 + 0.2) / 3)       # missing third box counts 0
    assert (c2["n_boxes_ge_0.1"], c2["n_boxes_ge_0.25"]) == (2, 1)
    assert c2["score_mass"] == pytest.approx(0.3 + 0.2)
    assert c2["longest_run"] == 1                        # slices 3 and 5: not consecutive
    assert c2["level_slices"] == 4
    assert (c2["above_max"], c2["below_max"]) == (pytest.approx(0.9), 0.0)

    c3 = _row(f, "s1", "C3")     # b5 has w_C3 = 0.1 < 0.2: not on C3, but its mass counts
    assert c3["max_score"] == 0.0 and c3["n_boxes_ge_0.1"] == 0 and c3["longest_run"] == 0
    assert c3["score_mass"] == pytest.approx(0.08)
    assert c3["box_area_px"] == 0.0
    assert c3["below_max"] == pytest.approx(0.8)
    c4 = _row(f, "s1", "C4")
    assert c4["max_score"] == pytest.approx(0.8) and c4["score_mass"] == pytest.approx(0.72)
    assert c4["level_slices"] == 0 and c4["det_slice_frac"] == 0.0
    assert _row(f, "s1", "C7")["below_max"] == 0.0

    for lv in LEVELS:   # study-wide columns repeat on every level row
        r = _row(f, "s1", lv)
        assert r["study_max_score"] == pytest.approx(0.9)
        assert r["study_mass"] == pytest.approx(0.9 + 0.4 + 0.6 + 0.2 + 0.8)
        assert (r["study_n_boxes"], r["study_longest_run"], r["study_n_slices"]) == (5, 3, 10)


def test_study_without_boxes_gets_zero_rows():
    f = build_features(_boxes(), _slices(), config=_cfg())
    s2 = f[f[STUDY_COL] == "s2"].set_index("level")
    groups = level_feature_groups(_cfg())
    detection = [c for c, g in groups.items() if g == "detector" and c != "level_slices"]
    assert (s2[detection].to_numpy() == 0).all()
    length = [c for c, g in groups.items() if g == "length"]
    assert (s2.loc["C5", length].to_numpy() == 0).all()          # present on 4 slices, no box: zeros
    assert s2.drop(index="C5")[length].isna().all().all()         # absent levels: NaN
    assert s2[[c for c, g in groups.items() if g == "classifier"]].isna().all().all()   # no vertebrae table
    assert s2.loc["C5", "level_slices"] == 4 and s2.loc["C1", "level_slices"] == 0
    assert (s2["study_n_slices"] == 6).all()
    assert list(s2["level_idx"]) == list(range(7))


def test_no_boxes_at_all_and_explicit_study_list(caplog):
    empty = _boxes().iloc[0:0]
    with caplog.at_level(logging.WARNING, logger="aggregation"):
        f = build_features(empty, _slices(), config=_cfg(), studies=["s2", "ghost", "s1"])
    assert list(pd.unique(f[STUDY_COL])) == ["s2", "ghost", "s1"]
    assert f["max_score"].eq(0).all() and f["study_n_boxes"].eq(0).all()
    assert "ghost" in caplog.text
    assert len(build_features(pd.DataFrame(), _slices(), config=_cfg())) == 14


def test_level_column_alone_gives_one_hot_weights():
    b = _boxes().drop(columns=[f"w_{lv}" for lv in LEVELS])
    f = build_features(b, _slices(), config=_cfg())
    c1, c2 = _row(f, "s1", "C1"), _row(f, "s1", "C2")
    # b3 now belongs wholly to its main level (C1: the first of the tie), so C1 gets its full score mass.
    assert c1["score_mass"] == pytest.approx(0.9 + 0.4 + 0.6)
    assert c2["max_score"] == pytest.approx(0.2)
    assert _row(f, "s1", "C4")["max_score"] == pytest.approx(0.8)


def test_thresholds_expand_into_named_features_and_patient_features():
    cfg = _cfg("features.patient_thresholds=[0.5, 0.7]")
    f = build_features(_boxes(), _slices(), config=cfg)
    pf = build_patient_features(f, config=cfg)
    assert list(pf.columns) == [STUDY_COL, *patient_feature_names(cfg)]
    s1 = pf.set_index(STUDY_COL).loc["s1"]
    assert s1["level_max"] == pytest.approx(0.9)
    assert s1["n_levels_ge_0.5"] == 3       # C1 0.9, C2 0.6, C4 0.8
    assert s1["n_levels_ge_0.7"] == 2       # C1, C4
    assert s1["study_n_boxes"] == 5
    s2 = pf.set_index(STUDY_COL).loc["s2"]
    assert s2["level_max"] == 0 and s2["n_levels_ge_0.5"] == 0 and s2["study_n_slices"] == 6
    with pytest.raises(InputError, match="levels"):
        build_patient_features(f.iloc[:-1], config=cfg)


def test_area_in_mm2_needs_spacing():
    cfg = _cfg("features.area_unit=mm")
    f = build_features(_boxes(), _slices(), config=cfg, spacing={"s1": (0.5, 0.4)})
    assert "box_area_mm2" in f.columns and "box_area_px" not in f.columns
    expected_px = (0.9 * 100 + 0.4 * 200 + 0.3 * 200) / 1.6
    assert _row(f, "s1", "C1")["box_area_mm2"] == pytest.approx(expected_px * 0.2)
    with pytest.raises(InputError, match="spacing"):
        build_features(_boxes(), _slices(), config=cfg)


def test_missing_columns_are_errors():
    with pytest.raises(InputError, match="p_C1"):
        build_features(_boxes(), _slices().drop(columns=["p_C1"]), config=_cfg())
    with pytest.raises(InputError, match="score"):
        build_features(_boxes().drop(columns=["score"]), _slices(), config=_cfg())
    with pytest.raises(InputError, match="level"):
        build_features(_boxes().drop(columns=["level", *[f"w_{lv}" for lv in LEVELS]]), _slices(), config=_cfg())


def test_every_feature_is_documented():
    cfg = _cfg()
    f = build_features(_boxes(), _slices(), config=cfg)
    desc = level_feature_descriptions(cfg)
    assert list(f.columns[2:]) == list(desc)
    assert all(len(text) > 10 for text in desc.values())
    md = features_markdown(cfg)
    for name in [*desc, *patient_feature_names(cfg), "pred_noisy_or"]:
        assert f"`{name}`" in md


@pytest.mark.parametrize(("idx", "expected"), [([], 0), ([5], 1), ([1, 2, 3, 7, 8], 3), ([2, 2, 3], 2),
                                                ([9, 3, 4, 5, 6, 1], 4), (np.array([0, 2, 4]), 1)])
def test_longest_run(idx, expected):
    assert longest_run(idx) == expected


def test_boxes_without_a_level_count_only_study_wide():
    b = _boxes().drop(columns=[f"w_{lv}" for lv in LEVELS])
    b.loc[0, "level"] = None            # b1 (0.9) outside C1-C7, e.g. a thoracic level
    b.loc[1, "level"] = "T1"
    f = build_features(b, _slices(), config=_cfg())
    c1 = _row(f, "s1", "C1")
    assert c1["max_score"] == pytest.approx(0.6) and c1["n_boxes_ge_0.1"] == 1
    assert c1["study_max_score"] == pytest.approx(0.9) and c1["study_n_boxes"] == 5


def test_features_csv_round_trip_with_sidecar(tmp_path):
    import json

    from aggregation.features import write_features

    f = build_features(_boxes(), _slices(), config=_cfg())
    write_features(f, tmp_path / "features.csv", config=_cfg(), inputs={"boxes": "boxes.csv"})
    back = pd.read_csv(tmp_path / "features.csv", dtype={STUDY_COL: str})
    pd.testing.assert_frame_equal(back, f, check_dtype=False)
    meta = json.loads((tmp_path / "features.csv.meta.json").read_text())
    assert meta["counts"] == {"studies": 2, "rows": 14} and "longest_run" in meta["extra"]["features"]
