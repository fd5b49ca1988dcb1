"""MODEL_CARD.md: written by `spinefrac train` with the folder's facts, named by `spinefrac predict`."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import yaml

from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from spinefrac.cli import main
from spinefrac.model_card import MODEL_CARD


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.slow
def test_train_writes_a_model_card_with_the_folders_facts(trained):
    model, data = trained / "model", trained / "data"
    text = (model / MODEL_CARD).read_text(encoding="utf-8")
    meta = _front_matter(text)
    assert meta["license"] == "agpl-3.0" and meta["library_name"] == "spinefrac"
    assert meta["datasets"] == ["spinefrac-synthetic"]        # trained on `spinefrac synth` studies
    for heading in ("## Intended use and limits", "## Training data", "## Settings", "## Evaluation",
                    "## Operating point", "## How to use"):
        assert heading in text
    assert "not a medical device" in text.lower() or "Not a medical device" in text
    labels = pd.read_csv(data / "train.csv")
    boxes = pd.read_csv(data / "train_bounding_boxes.csv")
    assert f"| labelled studies (`train.csv`) | {len(labels)} |" in text
    assert f"| with a fracture (`patient_overall = 1`) | {int(labels[PATIENT].sum())} |" in text
    assert f"{boxes[STUDY_COL].nunique()} studies, {len(boxes)} boxes" in text
    assert f"| with segmentations (`segmentations/`) | {len(list((data / 'segmentations').glob('*.nii*')))} |" in text
    assert ", ".join(f"{lv} {int(labels[lv].sum())}" for lv in LEVELS) in text
    roles = json.loads((model / "splits.json").read_text())["roles"]
    n_det = sum(r == "detector" for r in roles.values())
    n_agg = sum(r == "aggregator" for r in roles.values())
    assert f"| {n_det} / {n_agg} (split scheme" in text
    stages = json.loads((model / "model.json").read_text())["stages"]
    for name in stages:
        assert f"| {name} |" in text
    op = json.loads((model / "aggregator" / "operating_point.json").read_text())
    if op["threshold"] is not None:
        assert f"patient_overall >= {op['threshold']:.4f}" in text
    else:
        assert "No operating point" in text
    # the card is in the manifest: an edit is detected like any other file's
    assert MODEL_CARD in json.loads((model / "model.json").read_text())["files"]


@pytest.mark.slow
def test_predict_names_the_model_card(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    studies = sorted((trained / "test" / "test_images").iterdir())[:1]
    assert main(["predict", *map(str, studies), "--model", str(trained / "model"), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    assert str(trained / "model" / MODEL_CARD) in caplog.text
