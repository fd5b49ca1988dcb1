"""predict --shard i/n and merge: a deterministic partition, and merged shards equal one single-process predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from data_prep.runs.registry import STUDY_COL
from spinefrac.cli import main
from spinefrac.shards import parse_shard, select_shard, shard_of


def test_every_study_is_in_exactly_one_shard_whatever_the_order():
    uids = [f"1.2.826.0.1.3680043.{k}" for k in range(200)]
    n = 4
    parts = [select_shard([Path(u) for u in uids], i, n) for i in range(1, n + 1)]
    names = [p.name for part in parts for p in part]
    assert sorted(names) == sorted(uids)                     # complete and disjoint
    assert all(len(part) > 20 for part in parts)             # and not degenerate
    again = [p.name for p in select_shard([Path(u) for u in reversed(uids)], 2, n)]
    assert sorted(again) == sorted(p.name for p in parts[1])   # the listing order does not matter
    assert shard_of(uids[0], n) == shard_of(uids[0], n) and 1 <= shard_of(uids[0], n) <= n


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


@pytest.mark.slow
def test_merged_shards_equal_a_single_predict_and_other_settings_are_refused(trained, tmp_path, caplog):
    images, model = trained / "test" / "test_images", trained / "model"
    test_csv = trained / "test" / "test.csv"
    whole = tmp_path / "whole"
    assert main(["predict", str(images), "--model", str(model), "--out", str(whole), "--test-csv", str(test_csv),
                 "--no-progress"]) == 0
    shards = [tmp_path / f"shard{i}" for i in (1, 2)]
    for i, shard in enumerate(shards, start=1):
        assert main(["predict", str(images), "--model", str(model), "--out", str(shard), "--shard", f"{i}/2",
                     "--test-csv", str(test_csv), "--no-progress"]) == 0
    held = [set(pd.read_csv(s / "predictions.csv", dtype={STUDY_COL: str})[STUDY_COL]) for s in shards]
    assert not held[0] & held[1] and held[0] | held[1] == {p.name for p in images.iterdir()}
    merged = tmp_path / "merged"
    assert main(["merge", *map(str, shards), "--model", str(model), "--out", str(merged), "--test-csv",
                 str(test_csv), "--no-progress"]) == 0
    for name in ("predictions.csv", "submission.csv", "boxes.csv", "slices.csv", "vertebrae.csv", "evidence.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(merged / name), pd.read_csv(whole / name), obj=name)
    assert {p.name for p in (merged / "overlays").iterdir()} == {p.name for p in (whole / "overlays").iterdir()}

    # a shard made with another config is refused, naming it; nothing is merged
    other = tmp_path / "other"
    shutil.copytree(shards[1], other)
    meta = json.loads((other / "boxes.csv.meta.json").read_text())
    meta["extra"]["settings_key"] = "0" * 16
    (other / "boxes.csv.meta.json").write_text(json.dumps(meta))
    assert main(["merge", str(shards[0]), str(other), "--model", str(model), "--out", str(tmp_path / "m2"),
                 "--no-progress"]) == 2
    assert "other settings" in caplog.text and not (tmp_path / "m2" / "predictions.csv").exists()
    # overlapping shards are refused too
    assert main(["merge", str(shards[0]), str(shards[0]), "--model", str(model), "--out", str(tmp_path / "m3"),
                 "--no-progress"]) == 2
    assert "overlap" in caplog.text
