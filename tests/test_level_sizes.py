"""Levels decoded with physical sizes (detector/level_sizes.py) and the prior learned from segmentations.

The geometry comes from synthetic studies (the phantom's anatomy, `data_prep.synthetic.synth`): their truth/slice_levels.csv
and spacing, never from the decoder under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.dicom.geometry import scan_study
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.level_prior import (
    learn_from_segmentations,
    learn_level_prior,
    prior_overrides,
    read_level_prior,
)
from detector.level_sizes import decode_sizes, size_prior
from detector.levels import (
    SOURCE_EXTRAPOLATED,
    column_evidence,
    decode_sampled,
    level_summary,
    locate_study,
)
from detector.render import slice_spacing
from detector.vertebra_crops import crop_plan, level_slice_boxes_from_locator

SYNTH = ["image.size=48", "volume.slices=120", "labels.segmentation_fraction=1.0"]
"""Small full-neck studies (about 1.2 mm slices) with a segmentation each."""
EVERY_K = 4
"""The locator's stride, as configs/locator.yaml."""
FOUND, NOT_FOUND, NEVER = 0.8, 0.1, 0.02
"""Oracle presence scores: a level the locator sees, a slice where it sees it absent, a level it never finds."""
EXTRAPOLATION_TOL_MM = 15.0
"""C4-C7 placed without any evidence of their own: each first / last slice within this of the truth. The four
levels span about 75 mm below C3; the learned run lengths vary by 5-10% (SD of log length) and the size factor
co-varies them, so 15 mm is about 2 SD of the error accumulated at C7's lower end."""
MIN_RUN_SLICES = 5
"""Runs are compared where their median is at least this many slices: a shorter one is mostly discretisation."""
LENGTH_TOL = 0.10
"""Learned run length vs the truth's median run length: each study's size factor (synth size_scale 0.92-1.08) is
divided out before pooling, which moves a median by at most a few percent; the truth's rare one-slice flickers
(which the learning closes as gaps) barely move a median."""


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(train root, test root): 8 segmented training studies and 4 held-out ones, with their truth."""
    from data_prep.synthetic.synth import synthesize

    cfg = load_config("synth", overrides=SYNTH)
    root = tmp_path_factory.mktemp("level_sizes")
    train = synthesize(root / "train", n_studies=8, seed=31, split="train", config=cfg, progress=False, workers=1)
    test = synthesize(root / "test", n_studies=4, seed=32, split="test", config=cfg, progress=False, workers=1)
    return train, test


def truth_studies(root: Path) -> list[tuple[str, np.ndarray, float]]:
    """(uid, (n, 7) truth presence, slice spacing mm) of every study of a synthetic set."""
    table = pd.read_csv(root / "truth" / "slice_levels.csv", dtype={STUDY_COL: str})
    out = []
    for uid, g in table.groupby(STUDY_COL, sort=True):
        folder = next(root.glob(f"*_images/{uid}"))
        out.append((uid, g.sort_values("slice_index")[list(LEVELS)].to_numpy().astype(bool),
                    slice_spacing(scan_study(folder))))
    return out


@pytest.fixture(scope="module")
def learned(worlds):
    """The levels config with the prior learned from the training set's segmentations (as spinefrac train does)."""
    train, _ = worlds
    base = load_config("levels")
    uids = [u for u, *_ in truth_studies(train)]
    record = learn_from_segmentations(train, uids, train, config=base, progress=False)
    assert record is not None and len(record["studies"]) == 8
    return load_config("levels", overrides=prior_overrides(record["prior"]))


def oracle(truth: np.ndarray, *, seen: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Evidence on every EVERY_K-th slice: the truth for the `seen` levels, nothing ever for the others."""
    sampled = np.arange(0, len(truth), EVERY_K)
    ev = np.where(truth[sampled], FOUND, NOT_FOUND)
    unseen = [j for j in range(len(LEVELS)) if j not in seen]
    ev[:, unseen] = NEVER
    return sampled, ev


def assert_anatomical(bits: np.ndarray, max_levels: int = 3) -> None:
    """Each level one contiguous run, starts and ends in order C1..C7, no middle level missing, <= max per slice."""
    present = [j for j in range(bits.shape[1]) if bits[:, j].any()]
    if not present:
        return
    assert present == list(range(present[0], present[-1] + 1)), f"a middle level is missing: {present}"
    spans = []
    for j in present:
        idx = np.nonzero(bits[:, j])[0]
        assert idx[-1] - idx[0] + 1 == len(idx), f"{LEVELS[j]} is not contiguous"
        spans.append((idx[0], idx[-1]))
    for (s0, e0), (s1, e1) in zip(spans[:-1], spans[1:], strict=True):
        assert s1 >= s0 and e1 >= e0 and s1 <= e0 + 1, f"order or contiguity violated: {spans}"
    assert bits.sum(axis=1).max() <= max_levels


# ---------------------------------------------------------------- the test
def test_a_locator_finding_only_c1_to_c3_still_places_c4_to_c7(worlds, learned):
    _, test = worlds
    for uid, truth, spacing in truth_studies(test):
        sampled, ev = oracle(truth, seen=[0, 1, 2])
        present, prob = decode_sampled(ev, sampled, len(truth), config=learned, spacing_mm=spacing)
        assert_anatomical(present)
        for j in range(3, 7):
            got, want = np.nonzero(present[:, j])[0], np.nonzero(truth[:, j])[0]
            assert len(got), f"{uid}: {LEVELS[j]} missing"
            err = np.abs(np.array([got[0] - want[0], got[-1] - want[-1]])) * spacing
            assert (err <= EXTRAPOLATION_TOL_MM).all(), (uid, LEVELS[j], err)
            assert prob[(got[0] + got[-1]) // 2, j] > 0.5       # the middle of a placed level is probable


def test_the_former_decoder_squeezes_them_instead(worlds, learned):
    """The flaw the size model fixes: without sizes, C4-C7 collapse where the locator sees nothing."""
    _, test = worlds
    runs = load_config("levels", overrides=["decode.model=runs"])
    _, truth, spacing = truth_studies(test)[0]
    sampled, ev = oracle(truth, seen=[0, 1, 2])
    present, _ = decode_sampled(ev, sampled, len(truth), config=runs)
    heights = present[:, 3:].sum(axis=0)
    assert (heights < truth[:, 3:].sum(axis=0) / 2).any()


def test_truncated_fields_leave_exactly_the_levels_outside_none(worlds, learned):
    _, test = worlds
    uid, truth, spacing = truth_studies(test)[1]
    c3, c5 = np.nonzero(truth[:, 2])[0], np.nonzero(truth[:, 4])[0]
    for lo, hi in ((c3[0], len(truth)), (0, c5[-1] + 1)):           # a field starting at C3, one ending at C5
        field = truth[lo:hi]
        inside = set(np.nonzero(field.any(axis=0))[0])
        sampled, ev = oracle(field, seen=sorted(inside))
        present, _ = decode_sampled(ev, sampled, len(field), config=learned, spacing_mm=spacing)
        assert set(np.nonzero(present.any(axis=0))[0]) == inside, (uid, lo, hi)
        assert_anatomical(present)


def test_nothing_located_gives_no_levels(learned):
    sampled = np.arange(0, 100, 4)
    present, prob = decode_sampled(np.full((len(sampled), 7), NEVER), sampled, 100, config=learned, spacing_mm=1.0)
    assert not present.any() and not prob.any()


def test_the_prior_config_is_checked_when_loaded(tmp_path):
    from data_prep.runs.config import ConfigError

    with pytest.raises(ConfigError, match="C2-C9"):
        load_config("levels", overrides=['prior.segments={"C2-C9": [1.0, 0.1, 0.5]}'])
    with pytest.raises(ConfigError, match="C4-C7"):                  # 4 levels a slice: every set of 4 needs a length
        load_config("levels", overrides=["decode.max_levels_per_slice=4"])
    with pytest.raises(ConfigError, match="segments"):
        load_config("levels", overrides=["prior.segments.C3=[0.0, 0.5, 0.5]"])
    assert load_config("levels", overrides=["decode.model=runs", "decode.max_levels_per_slice=4"])


def test_sizes_needs_the_spacing(learned):
    with pytest.raises(ValueError, match="spacing"):
        decode_sampled(np.full((5, 7), FOUND), np.arange(5), 5, config=learned)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(8, 160), spacing=st.floats(0.4, 3.0), seed=st.integers(0, 10_000),
       scale=st.floats(0.0, 3.0))
def test_any_evidence_decodes_into_anatomical_order(n, spacing, seed, scale):
    llr = np.random.default_rng(seed).normal(0.0, scale, size=(n, len(LEVELS)))
    cfg = load_config("levels")
    present, prob = decode_sizes(llr, spacing, size_prior(cfg))
    assert present.shape == prob.shape == (n, len(LEVELS))
    assert_anatomical(present, int(cfg.decode.max_levels_per_slice))
    assert np.isfinite(prob).all() and (prob >= 0).all() and (prob <= 1).all()


# ---------------------------------------------------------------- column evidence and the field-cut model
MISNAMED = 0.6
"""Presence score of the one (randomly named) level a confused locator reports on a slice of the column."""
MISNAMED_TOL_MM = 25.0
"""A level placed from the column's extent, the order and the sizes only (its name is random on every slice):
each end within this of the truth. C1-C7 span about 145 mm; the column's two ends are pinned to a sampled
slice (4 slices, about 5 mm) and the seven lengths (5-10% SD each, co-varying through the size factor) share
the rest, so 25 mm is about 2 SD of the error at the middle levels."""


def misnamed(truth: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Evidence of a locator that finds the column on every EVERY_K-th slice but names a random level there."""
    rng = np.random.default_rng(seed)
    sampled = np.arange(0, len(truth), EVERY_K)
    ev = np.full((len(sampled), len(LEVELS)), NOT_FOUND)
    inside = truth[sampled].any(axis=1)
    ev[np.nonzero(inside)[0], rng.integers(0, len(LEVELS), int(inside.sum()))] = MISNAMED
    return sampled, ev


def level_end_errors(present: np.ndarray, truth: np.ndarray, spacing: float) -> np.ndarray:
    """(7,) the larger of |first - truth| and |last - truth| per level in mm (inf where a level is missing)."""
    out = np.full(len(LEVELS), np.inf)
    for j in range(len(LEVELS)):
        got, want = np.nonzero(present[:, j])[0], np.nonzero(truth[:, j])[0]
        if len(got):
            out[j] = max(abs(got[0] - want[0]), abs(got[-1] - want[-1])) * spacing
    return out


def test_misnamed_detections_still_pin_the_column(worlds, learned):
    """Names at random, the column found: the column term places every level from its extent and the sizes;
    without it (decode.column_weight 0) the random names decide and levels are lost or misplaced."""
    _, test = worlds
    errors, errors_off = [], []
    for i, (_, truth, spacing) in enumerate(truth_studies(test)):
        sampled, ev = misnamed(truth, seed=i)
        column = column_evidence(ev, config=learned)
        present, _ = decode_sampled(ev, sampled, len(truth), config=learned, spacing_mm=spacing, column=column)
        assert_anatomical(present)
        errors.append(level_end_errors(present, truth, spacing))
        present_off, _ = decode_sampled(ev, sampled, len(truth), config=learned, spacing_mm=spacing)
        errors_off.append(level_end_errors(present_off, truth, spacing))
    errors, errors_off = np.array(errors), np.array(errors_off)
    assert (errors <= MISNAMED_TOL_MM).all(), errors.round(1)
    assert (errors_off > MISNAMED_TOL_MM).any(), errors_off.round(1)


def test_finding_nothing_counts_only_against_levels_the_locator_finds():
    """The issue's locator (C1-C3 found, nothing below): its empty slices below C3 must not squeeze C4-C7 (the
    column's negative evidence counts only against runs holding a level it finds); counted against every run, they
    would (the flaw `column_levels` prevents)."""
    n = 250
    llr = np.zeros((n, len(LEVELS)))
    llr[20:40, 0], llr[30:80, 1], llr[75:100, 2] = 1.0, 1.0, 1.0          # C1-C3 found, 1 mm slices
    column = np.full(n, -0.5)
    column[20:100] = 1.0                                                  # nothing found below C3
    prior = size_prior(load_config("levels"))
    seen = np.arange(len(LEVELS)) < 3

    def ends(present: np.ndarray) -> np.ndarray:
        return np.array([np.nonzero(present[:, j])[0][-1] for j in range(3, 7)])

    free = ends(decode_sizes(llr, 1.0, prior)[0])                         # no column term at all
    masked = ends(decode_sizes(llr, 1.0, prior, column, column_levels=seen)[0])
    everywhere = ends(decode_sizes(llr, 1.0, prior, column)[0])
    assert np.abs(masked - free).max() <= 3, (masked, free)
    assert free[-1] - everywhere[-1] >= 15, (everywhere, free)            # C7 squeezed upwards by >= 15 mm


def test_a_field_inside_one_vertebra_is_that_vertebra():
    """A field shorter than its run (both ends cut) is decoded as that run, with a high probability."""
    llr = np.full((4, len(LEVELS)), -1.0)
    llr[:, 4] = 3.0
    present, prob = decode_sizes(llr, 1.0, size_prior(load_config("levels")))
    assert present[:, 4].all() and not np.delete(present, 4, axis=1).any()
    assert (prob[:, 4] > 0.9).all()


def test_a_cut_is_weighed_by_the_column_it_leaves_out():
    """Without evidence, a 300 mm field starting (ending) inside the column: far likelier at C1 (C7), where
    little is missing beyond the cut, than at C5 (C3), which leaves about 70 mm of column out (e^(-70 / cut_mm));
    a cut probability independent of the missing length would make them about equally likely."""
    cfg = load_config("levels")
    _, prob = decode_sizes(np.zeros((300, len(LEVELS))), 1.0, size_prior(cfg))
    assert prob[0, 0] > 10 * prob[0, 4] and prob[-1, 6] > 10 * prob[-1, 2], (prob[0], prob[-1])
    assert prob[0].max() <= 1 - float(cfg.prior.start_above) and prob[-1].max() <= 1 - float(cfg.prior.end_below)


# ---------------------------------------------------------------- the prior learned from segmentations
def test_learned_run_lengths_match_the_synthetic_truth(worlds, learned):
    train, _ = worlds
    pooled: dict[tuple[int, ...], list[float]] = {}
    for _, truth, spacing in truth_studies(train):
        rows = np.nonzero(truth.any(axis=1))[0]
        sets = [tuple(np.nonzero(truth[t])[0]) for t in range(rows[0], rows[-1] + 1)]
        start = 0
        for t in range(1, len(sets) + 1):                           # runs of one set, not touching the column's ends
            if t == len(sets) or sets[t] != sets[start]:
                if start > 0 and t < len(sets):
                    pooled.setdefault(sets[start], []).append((t - start) * spacing)
                start = t
    checked = 0
    for levels, lengths in pooled.items():
        if len(lengths) < 3 or np.median(lengths) < MIN_RUN_SLICES * spacing:
            continue
        name = LEVELS[levels[0]] if len(levels) == 1 else f"{LEVELS[levels[0]]}-{LEVELS[levels[-1]]}"
        median = float(learned.prior.segments[name][0])
        assert median == pytest.approx(float(np.median(lengths)), rel=LENGTH_TOL), name
        checked += 1
    assert checked >= 6


def test_learning_from_segmentations_equals_learning_from_the_truth_table(worlds, learned, tmp_path):
    train, _ = worlds
    studies = truth_studies(train)
    values, counts = learn_level_prior([(bits, s) for _, bits, s in studies], config=load_config("levels"))
    assert values["segments"] == {k: list(v) for k, v in learned.prior.segments.items()}
    assert counts["studies"] == 8
    record = json.loads((train / "level_prior.json").read_text())
    assert read_level_prior(train / "level_prior.json") == record["prior"]
    assert (train / "level_prior.json.meta.json").is_file()


def test_too_few_segmentations_keep_the_defaults(worlds, tmp_path):
    train, _ = worlds
    uids = [u for u, *_ in truth_studies(train)][:2]
    assert learn_from_segmentations(train, uids, tmp_path, config=load_config("levels"), progress=False) is None
    assert not (tmp_path / "level_prior.json").exists()


# ---------------------------------------------------------------- vertebrae rows and crops of extrapolated levels
def located_c1_to_c3(truth: np.ndarray, spacing: float, config) -> tuple[pd.DataFrame, pd.DataFrame]:
    sampled = np.arange(0, len(truth), EVERY_K)
    rows = [{"slice_index": int(s), "level": LEVELS[j], "conf": 0.8, "x": 20.0, "y": 20.0, "width": 8.0,
             "height": 8.0} for s in sampled for j in np.nonzero(truth[s])[0] if j < 3]
    return locate_study(pd.DataFrame(rows), len(truth), sampled, config=config, study_uid="u",
                        spacing_mm=spacing)


def test_vertebrae_rows_say_located_extrapolated_or_none(worlds, learned):
    _, test = worlds
    _, truth, spacing = truth_studies(test)[2]
    c5 = np.nonzero(truth[:, 4])[0]
    field = truth[:c5[0] + 3]                                        # ends in C5: C6 and C7 are outside
    slices, boxes = located_c1_to_c3(field, spacing, learned)
    summary = level_summary(slices, boxes)
    assert list(summary.columns) == ["level", "first_slice", "last_slice", "n_slices", "source", "confidence"]
    assert list(summary["level"]) == list(LEVELS)
    want = {"C1": "located", "C2": "located", "C3": "located", "C4": "extrapolated"}
    assert {lv: s for lv, s in zip(summary["level"], summary["source"], strict=True) if lv in want} == want
    assert set(summary.loc[summary["level"].isin(["C6", "C7"]), "source"]) == {"none"}
    none = summary["source"] == "none"
    assert (summary.loc[none, ["first_slice", "last_slice", "n_slices"]] == [-1, -1, 0]).all().all()
    assert (summary.loc[none, "confidence"] == 0).all()
    assert summary.loc[~none, "confidence"].between(0.5, 1.0).all()


def test_extrapolated_levels_get_classifier_crops(worlds, learned):
    _, test = worlds
    uid, truth, spacing = truth_studies(test)[0]
    slices, boxes = located_c1_to_c3(truth, spacing, learned)
    assert set(boxes.loc[boxes["source"] == SOURCE_EXTRAPOLATED, "level"]) == {"C4", "C5", "C6", "C7"}
    crops_cfg = load_config("classifier")["crops"]
    folder = next(test.glob(f"*_images/{uid}"))
    plan = crop_plan(level_slice_boxes_from_locator(boxes, slices, crops_cfg), scan_study(folder), crops_cfg)
    assert set(plan["level"]) == set(LEVELS)
    assert set(plan.loc[plan["level"].isin(["C4", "C5", "C6", "C7"]), "source"]) == {SOURCE_EXTRAPOLATED}
    assert set(plan.loc[plan["level"].isin(["C1", "C2", "C3"]), "source"]) == {"locator"}


# ---------------------------------------------------------------- spinefrac train learns it into the model folder
def test_train_learns_the_prior_into_the_model_folder(trained):
    from spinefrac.model_folder import open_model

    model = trained / "model"
    meta = json.loads((model / "model.json").read_text())
    assert "level_prior.json" in meta["files"] and "learn-level-prior" in meta["stages"]
    learned_values = read_level_prior(model / "level_prior.json")
    opened = open_model(model)
    assert {k: list(v) for k, v in opened.configs["levels"].prior.segments.items()} == learned_values["segments"]
    assert opened.configs["levels"].prior.scale_sd == learned_values["scale_sd"]
    n_segmented = len(list((trained / "data" / "segmentations").glob("*.nii*")))
    assert json.loads((model / "level_prior.json").read_text())["counts"]["studies"] == n_segmented
