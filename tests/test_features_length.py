"""Length-normalised and classifier features, feature groups and the vertebrae.csv reader, on hand-built tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aggregation import features as F
from aggregation.features import (
    build_features,
    build_patient_features,
    length_profile,
    level_feature_groups,
    level_feature_names,
    load_vertebrae_table,
    patient_feature_names,
)
from configs import schema as config_schema
from data_prep.errors import InputError
from data_prep.runs.config import ConfigError, load_config
from data_prep.runs.registry import LEVELS, STUDY_COL

# Study "a": 12 slices (0-11). C1 is present on slice 0 only, C2 on slices 1-10 (10 slices: positions 0-9),
# C3..C7 nowhere. Study "b": 5 slices, C5 on all of them, no box.
# Box   slice  score  w                 note
#  a1     0    0.7    C1=1
#  a2     4    0.5    C2=1              C2 position 3
#  a3     5    0.9    C2=1              C2 position 4
#  a4     5    0.3    C2=1              same slice: the slice keeps its max 0.9
#  a5     6    0.6    C2=1              C2 position 5
#  a6    11    0.95   C2=1              on C2 but outside its own slices: not in the profile or its shares
#  a7     2    0.8    C2=0.1, C3=0.9    below min_level_weight on C2
A_BOXES = [(0, 0.7, {"C1": 1.0}), (4, 0.5, {"C2": 1.0}), (5, 0.9, {"C2": 1.0}), (5, 0.3, {"C2": 1.0}),
           (6, 0.6, {"C2": 1.0}), (11, 0.95, {"C2": 1.0}), (2, 0.8, {"C2": 0.1, "C3": 0.9})]

OLD_LEVEL_FEATURES = [  # the aggregator's features before groups existed (default thresholds)
    "level_idx", "max_score", "top_k_mean", "n_boxes_ge_0.1", "n_boxes_ge_0.25", "n_boxes_ge_0.5", "n_boxes_ge_0.75",
    "n_slices_ge_0.1", "n_slices_ge_0.25", "n_slices_ge_0.5", "n_slices_ge_0.75", "score_mass", "box_area_px",
    "longest_run", "level_slices", "det_slice_frac", "above_max", "below_max", "study_max_score", "study_mass",
    "study_n_boxes", "study_longest_run", "study_n_slices"]
OLD_PATIENT_FEATURES = ["level_max", "n_levels_ge_0.25", "n_levels_ge_0.5", "study_max_score", "study_mass",
                        "study_n_boxes", "study_longest_run", "study_n_slices"]


def _boxes() -> pd.DataFrame:
    return pd.DataFrame([{STUDY_COL: "a", "slice_number": sl + 1, "slice_index": sl, "x": 0.0, "y": 0.0,
                          "width": 10.0, "height": 10.0, "score": score,
                          **{f"w_{lv}": w.get(lv, 0.0) for lv in LEVELS}} for sl, score, w in A_BOXES])


def _slices() -> pd.DataFrame:
    rows = []
    for i in range(12):
        p = dict.fromkeys(LEVELS, 0.0)
        p["C1"] = 0.9 if i == 0 else 0.0
        p["C2"] = 0.8 if 1 <= i <= 10 else 0.2
        rows.append({STUDY_COL: "a", "slice_index": i, **{f"p_{lv}": v for lv, v in p.items()}})
    for i in range(5):
        rows.append({STUDY_COL: "b", "slice_index": i, **{f"p_{lv}": float(lv == "C5") for lv in LEVELS}})
    return pd.DataFrame(rows)


def _vertebrae() -> pd.DataFrame:
    """Classifier scores of study a: C1, C2 scored, C3 absent, C4 found but not scored (NaN); b absent."""
    rows = [("C1", 0.2, 0.15, 0.1), ("C2", 0.9, 0.8, 0.5), ("C4", np.nan, np.nan, np.nan)]
    return pd.DataFrame([{STUDY_COL: "a", "level": lv, "first_slice": 0, "last_slice": 3, "n_slices": 4,
                          "source": "locator", "n_crops": 4, "cls_max": mx, "cls_topk": tk, "cls_mean": mn}
                         for lv, mx, tk, mn in rows])


def _cfg(*overrides: str):
    return load_config("aggregation", overrides=["features.score_thresholds=[0.1, 0.5, 0.75]",
                                                 "features.patient_thresholds=[0.1, 0.5]",
                                                 "features.run_min_score=0.1", "features.min_level_weight=0.2",
                                                 *overrides])


def _row(df: pd.DataFrame, uid: str, level: str) -> pd.Series:
    sel = df[(df[STUDY_COL] == uid) & (df["level"] == level)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_length_features_match_hand_computation():
    f = build_features(_boxes(), _slices(), config=_cfg())
    c2 = _row(f, "a", "C2")
    assert c2["level_slices"] == 10 and c2["longest_run"] == 3          # slices 4, 5, 6
    assert c2["run_frac"] == pytest.approx(0.3)
    # 10 slices in 8 parts of 1.25: part b takes positions floor(1.25 b) .. ceil(1.25 (b + 1)) - 1
    profile = [c2[f"profile_bin_{i}"] for i in range(8)]
    assert profile == pytest.approx([0, 0, 0.5, 0.9, 0.6, 0, 0, 0])
    assert c2["profile_topk_mean"] == pytest.approx((0.9 + 0.6) / 2)
    assert (c2["frac_slices_ge_0.1"], c2["frac_slices_ge_0.5"], c2["frac_slices_ge_0.75"]) == pytest.approx(
        (0.3, 0.3, 0.1))
    assert c2["max_score"] == pytest.approx(0.95)                       # the detector feature still sees a6
    c1 = _row(f, "a", "C1")                                             # one slice: every part is that slice
    assert [c1[f"profile_bin_{i}"] for i in range(8)] == pytest.approx([0.7] * 8)
    assert c1["run_frac"] == 1.0 and c1["frac_slices_ge_0.75"] == 0.0 and c1["frac_slices_ge_0.5"] == 1.0
    c3 = _row(f, "a", "C3")                                             # a box (a7) but no slices
    assert c3["max_score"] == pytest.approx(0.8) and c3["level_slices"] == 0
    length = [c for c, g in level_feature_groups(_cfg()).items() if g == "length"]
    assert len(length) == 8 + 1 + 3 + 1 and c3[length].isna().all()
    c5 = _row(f, "b", "C5")                                             # present, no box: zeros, not NaN
    assert (c5[length] == 0).all()


def test_profile_bins_overlap_and_short_levels():
    cfg = _cfg("features.profile_bins=3", "features.profile_top_k=1")
    c2 = _row(build_features(_boxes(), _slices(), config=cfg), "a", "C2")
    # parts [0, 3.33), [3.33, 6.67), [6.67, 10) take positions 0-3, 3-6, 6-9: position 3 (0.5) counts in the
    # first two parts; 0.6 (position 5) is only in the middle one
    assert [c2[f"profile_bin_{i}"] for i in range(3)] == pytest.approx([0.5, 0.9, 0.0])
    assert "profile_bin_3" not in c2.index and c2["profile_topk_mean"] == pytest.approx(0.9)
    assert length_profile(np.array([0.2, 0.8]), 8) == pytest.approx([0.2] * 4 + [0.8] * 4)
    assert length_profile(np.arange(16.0), 4) == pytest.approx([3, 7, 11, 15])
    assert np.isnan(length_profile(np.zeros(0), 4)).all()


def test_classifier_features_from_a_vertebrae_table():
    cfg = _cfg()
    f = build_features(_boxes(), _slices(), config=cfg, vertebrae=_vertebrae())
    c1, c2, c3 = (_row(f, "a", lv) for lv in ("C1", "C2", "C3"))
    assert (c2["cls_max"], c2["cls_topk"], c2["cls_mean"]) == pytest.approx((0.9, 0.8, 0.5))
    assert c2["cls_above_max"] == pytest.approx(0.2) and np.isnan(c2["cls_below_max"])   # C3 absent
    assert np.isnan(c1["cls_above_max"]) and c1["cls_below_max"] == pytest.approx(0.9)
    assert np.isnan(c3["cls_max"]) and c3["cls_above_max"] == pytest.approx(0.9) and np.isnan(c3["cls_below_max"])
    assert f[f[STUDY_COL] == "b"][["cls_max", "cls_topk", "cls_mean"]].isna().all().all()
    pf = build_patient_features(f, config=cfg).set_index(STUDY_COL)
    assert pf.loc["a", "study_cls_max"] == pytest.approx(0.9)
    assert (pf.loc["a", "n_levels_cls_ge_0.1"], pf.loc["a", "n_levels_cls_ge_0.5"]) == (2, 1)
    assert pf.loc["b", ["study_cls_max", "n_levels_cls_ge_0.1", "n_levels_cls_ge_0.5"]].isna().all()
    # without a vertebrae table every cls_* feature is NaN, the others are unchanged
    g = build_features(_boxes(), _slices(), config=cfg)
    cls_cols = [c for c, grp in level_feature_groups(cfg).items() if grp == "classifier"]
    assert g[cls_cols].isna().all().all()
    pd.testing.assert_frame_equal(g.drop(columns=cls_cols), f.drop(columns=cls_cols))
    assert build_patient_features(g, config=cfg)[["study_cls_max", "n_levels_cls_ge_0.5"]].isna().all().all()


def test_groups_select_columns():
    full = build_features(_boxes(), _slices(), config=_cfg(), vertebrae=_vertebrae())
    det = load_config("aggregation", overrides=['features.groups=["detector"]'])
    assert level_feature_names(det) == OLD_LEVEL_FEATURES
    assert patient_feature_names(det) == OLD_PATIENT_FEATURES
    cls = _cfg('features.groups=["classifier"]')
    assert level_feature_names(cls) == ["level_idx", "cls_max", "cls_topk", "cls_mean", "cls_above_max",
                                        "cls_below_max", "study_n_slices"]
    assert patient_feature_names(cls) == ["study_cls_max", "n_levels_cls_ge_0.1", "n_levels_cls_ge_0.5",
                                          "study_n_slices"]
    length = _cfg('features.groups=["length"]', "features.profile_bins=2", "features.profile_top_k=1")
    assert level_feature_names(length) == ["level_idx", "profile_bin_0", "profile_bin_1", "profile_topk_mean",
                                           "frac_slices_ge_0.1", "frac_slices_ge_0.5", "frac_slices_ge_0.75",
                                           "run_frac", "study_n_slices"]
    assert patient_feature_names(length) == ["study_n_slices"]
    # a subset of groups computes the same values as the full table
    for cfg in (_cfg('features.groups=["detector"]'), cls, _cfg('features.groups=["classifier", "length"]')):
        sub = build_features(_boxes(), _slices(), config=cfg, vertebrae=_vertebrae())
        assert list(sub.columns) == [STUDY_COL, "level", *level_feature_names(cfg)]
        pd.testing.assert_frame_equal(sub, full[sub.columns])
        pf = build_patient_features(sub, config=cfg)
        assert list(pf.columns) == [STUDY_COL, *patient_feature_names(cfg)]
    # the group order in the config does not matter; the registry's order does
    assert level_feature_names(_cfg('features.groups=["length", "detector"]')) == level_feature_names(
        _cfg('features.groups=["detector", "length"]'))


def test_every_feature_has_a_group_and_a_description():
    allowed = {*F.FEATURE_GROUPS, F.STRUCTURAL}
    assert list(F.FEATURE_GROUP) == list(F.FEATURES)
    assert list(F.PATIENT_FEATURE_GROUP) == list(F.PATIENT_FEATURES)
    for registry_, groups in ((F.FEATURES, F.FEATURE_GROUP), (F.PATIENT_FEATURES, F.PATIENT_FEATURE_GROUP)):
        for name, desc in registry_.items():
            assert groups[name] in allowed, name
            assert len(desc) > 20, name
    structural = [n for n, g in F.FEATURE_GROUP.items() if g == F.STRUCTURAL]
    assert structural == ["level_idx", "study_n_slices"]
    md = F.features_markdown(_cfg('features.groups=["detector"]'))   # the docs list every group, whatever selected
    for name in [*level_feature_names(_cfg()), *patient_feature_names(_cfg())]:
        assert f"`{name}`" in md
    assert "| `profile_bin_7` | length |" in md and "| `cls_max` | classifier |" in md


def test_config_choices_and_ranges():
    from aggregation import model

    assert config_schema.FEATURE_GROUPS == F.FEATURE_GROUPS
    assert config_schema.SAMPLE_WEIGHTS == model.SAMPLE_WEIGHT_CHOICES
    defaults = load_config("aggregation")
    assert list(defaults.features.groups) == ["detector", "length", "classifier"]
    assert defaults.model.sample_weights == "metric"
    for bad, words in (('features.groups=["detectr"]', "detector"), ("features.groups=[]", "groups"),
                       ('features.groups=["length", "length"]', "twice"),
                       ("features.profile_top_k=9", "profile_top_k"), ("features.profile_bins=0", "profile_bins"),
                       ("model.sample_weights=metrics", "metric")):
        with pytest.raises(ConfigError, match=words):
            load_config("aggregation", overrides=[bad])
    with pytest.raises(ValueError, match="unknown group"):   # plain dicts (not through load_config) are checked too
        level_feature_names({**defaults.features.to_dict(), "groups": ["cls"]})


def test_vertebrae_table_reader(tmp_path):
    path = tmp_path / "vertebrae.csv"
    v = _vertebrae()
    v.assign(**{STUDY_COL: "1.2.840.10"}).to_csv(path, index=False)
    back = load_vertebrae_table(path)
    assert back[STUDY_COL].iloc[0] == "1.2.840.10"             # UIDs stay text
    assert back["cls_max"].iloc[1] == pytest.approx(0.9) and np.isnan(back["cls_max"].iloc[2])
    v.drop(columns=["n_crops"]).to_csv(path, index=False)
    with pytest.raises(InputError, match="n_crops") as err:
        load_vertebrae_table(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        load_vertebrae_table(tmp_path / "absent.csv")
    cases = [(v.assign(level=["C1", "T1", "C4"]), "row 2.*'T1'"),
             (v.assign(level=["C1", "C1", "C4"]), "row 2.*more than once"),
             (v.assign(cls_topk=["0.1", "high", ""]), "row 2, column cls_topk.*'high'")]
    for table, words in cases:
        table.to_csv(path, index=False)
        with pytest.raises(InputError, match=words) as err:
            load_vertebrae_table(path)
        assert str(path) in str(err.value)
    with pytest.raises(InputError, match="cls_mean"):           # a DataFrame given to build_features is checked too
        build_features(_boxes(), _slices(), config=_cfg(), vertebrae=v.drop(columns=["cls_mean"]))
    header_only = v.iloc[0:0]
    header_only.to_csv(path, index=False)
    f = build_features(_boxes(), _slices(), config=_cfg(), vertebrae=load_vertebrae_table(path))
    assert f["cls_max"].isna().all()
