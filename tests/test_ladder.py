"""benchmarks/bench_ladder.py: its scores on hand-made tables, its config merge, its table, its refusal of mixed cells."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.bench_ladder import (
    CELL_JSON,
    classifier_auc,
    ensure_studies,
    format_table,
    ladder_config,
    level_accuracy,
    run_cell,
    split_overrides,
    summarise_cells,
    synth_settings,
)
from data_prep.errors import InputError
from data_prep.runs.registry import LEVELS, STUDY_COL


def _labels(rows):
    return pd.DataFrame([{STUDY_COL: u, "patient_overall": int(any(lv)), **dict(zip(LEVELS, lv, strict=True))}
                         for u, lv in rows])


def test_classifier_auc_over_study_and_level_counts_unscored_levels_as_zero():
    labels = _labels([("a", [0, 1, 0, 0, 0, 0, 0]), ("b", [0, 0, 0, 0, 0, 0, 1])])
    # a perfect ranking where scored: fractured levels 0.9, the others 0.1
    rows = [{STUDY_COL: u, "level": lv, "cls_max": 0.9 if labels.set_index(STUDY_COL).loc[u, lv] else 0.1}
            for u in ("a", "b") for lv in LEVELS]
    auc, coverage = classifier_auc(pd.DataFrame(rows), labels)
    assert auc == 1.0 and coverage == 1.0
    # b's C7 not located (NaN): it counts as 0, below every scored negative
    rows[-1]["cls_max"] = np.nan
    auc, coverage = classifier_auc(pd.DataFrame(rows), labels)
    assert coverage == pytest.approx(13 / 14)
    assert auc == pytest.approx(0.5)        # positives 0.9 and 0: one above all 12 negatives, one below all


def test_level_accuracy_is_the_share_of_slices_with_exactly_the_true_levels():
    n = 10
    truth = pd.DataFrame({STUDY_COL: "a", "slice_number": np.arange(1, n + 1), "slice_index": np.arange(n),
                          **{lv: 0 for lv in LEVELS}})
    truth.loc[0:4, "C1"] = 1
    truth.loc[5:9, "C2"] = 1
    pred = truth.copy()
    assert level_accuracy(pred, truth) == 1.0
    pred.loc[4, ["C1", "C2"]] = [0, 1]          # one boundary slice wrong
    pred.loc[9, "C3"] = 1                       # one slice with an extra level
    assert level_accuracy(pred, truth) == pytest.approx(0.8)


def test_stage_lists_of_set_are_appended_to_the_ladders_own():
    lists, rest = split_overrides(['detector.set=["render.imgsz=288"]', "locator.enabled=false",
                                   'detector.set=["train.mosaic=0.5"]'])
    assert lists["detector"] == ["render.imgsz=288", "train.mosaic=0.5"] and rest == ["locator.enabled=false"]
    cfg = ladder_config(2, ['detector.set=["render.imgsz=288"]'])
    det = list(cfg.detector.set)
    # the demo's detector settings, then the seed, then the run's own (last wins)
    assert det.index("render.imgsz=160") < det.index("train.seed=2") < det.index("render.imgsz=288")
    assert "model.random_state=2" in cfg.aggregation.set and "splits.seed=2" in cfg.aggregation.set
    with pytest.raises(InputError, match="list of key=value"):
        split_overrides(["detector.set=render.imgsz=288"])


def test_table_gives_mean_and_sample_sd_per_world():
    cells = pd.DataFrame([{"world": "subtle", "seed": s, "loss_model": v, "cell_min": 10.0}
                          for s, v in enumerate([0.5, 0.6, 0.7])]
                         + [{"world": "coarse", "seed": 0, "loss_model": 0.4, "cell_min": 12.0}])
    summary = summarise_cells(cells)
    subtle = summary.set_index("world").loc["subtle"]
    assert subtle["loss_model_mean"] == pytest.approx(0.6) and subtle["loss_model_sd"] == pytest.approx(0.1)
    assert subtle["wall_min_total"] == 30.0
    table = format_table(summary, "header")
    assert "| subtle (n=3) | coarse (n=1) |" in table
    assert "| loss per study: model | 0.600 ± 0.100 | 0.400 |" in table


def test_cached_studies_of_other_settings_are_refused_and_kept(tmp_path):
    root = tmp_path / "data"
    settings = synth_settings("subtle", 0, "train", 2, ["image.size=48", "volume.slices=12"])
    seconds = ensure_studies(root, settings, workers=1)
    assert seconds > 0 and (root / "train.csv").is_file()
    meta = json.loads((root / "synth.meta.json").read_text())
    assert meta["extra"]["world"] == "subtle"
    assert ensure_studies(root, settings, workers=1) == pytest.approx(meta["runtime_s"])   # reused, not redone
    other = synth_settings("coarse", 0, "train", 2, ["image.size=48", "volume.slices=12"])
    with pytest.raises(InputError, match="other settings .*fracture.gap_mm"):
        ensure_studies(root, other, workers=1)
    assert (root / "train.csv").is_file()


def test_a_finished_cell_is_skipped_and_one_of_other_settings_refused(tmp_path):
    args = argparse.Namespace(set=[], synth_set=[], train_studies=4, test_studies=2, budget="1m", omp_wait="passive",
                              workers=1, overwrite=False, locator="cell")
    cell = tmp_path / "runs" / "base" / "subtle" / "seed0"
    # a cell recorded as finished with these settings: returned without any work
    from benchmarks import bench_ladder

    seen = {}

    def fake_key(settings):
        seen["settings"] = settings
        return "k1"

    mp = pytest.MonkeyPatch()
    mp.setattr(bench_ladder, "settings_key", fake_key)
    try:
        cell.mkdir(parents=True)
        (cell / CELL_JSON).write_text(json.dumps({"key": "k1", "loss_model": 0.5, "settings": {}}))
        assert run_cell(tmp_path, "base", "subtle", 0, args)["loss_model"] == 0.5
        (cell / CELL_JSON).write_text(json.dumps({"key": "k0", "settings": {"budget": "2m"}}))
        with pytest.raises(InputError, match=r"other settings \(budget: 2m -> 1m"):
            run_cell(tmp_path, "base", "subtle", 0, args)
    finally:
        mp.undo()
    assert seen["settings"]["budget"] == "1m" and seen["settings"]["world"] == "subtle"
