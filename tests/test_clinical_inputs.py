"""detect / predict / inspect on studies as a PACS exports them: the right series read, the others recorded."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import use_fixed_boxes

from data_prep.dicom.inspect import inspect_path
from data_prep.dicom.study_finder import FoundStudy
from data_prep.dicom.study_inputs import SERIES_COLUMNS, find_inputs
from data_prep.errors import InputError
from data_prep.runs.config import load_config
from data_prep.runs.registry import STUDY_COL
from data_prep.synthetic.export import write_export
from detector.detect import detect_studies, find_studies

IMGSZ = 32
REASONS = {"sr": "not an image", "scout": "scout/localizer", "sagittal": "not axial", "derived": "derived",
           "soft": "soft-tissue kernel", "thick": "thicker"}
"""How each role of the export must be left out (the start of its reason, as the study finder gives it)."""


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    use_fixed_boxes(monkeypatch, tmp_path / "home")     # the inputs, not the model, are under test


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same two synthetic studies as a tree, a DICOMDIR set and a zip (written once for the module)."""
    root = tmp_path_factory.mktemp("exports")
    out = {variant: (root / (variant + (".zip" if variant == "zip" else "")),
                     write_export(root / (variant + (".zip" if variant == "zip" else "")), n_studies=2, seed=3,
                                  variant=variant, size=48, slices=12))
           for variant in ("tree", "dicomdir", "zip")}
    return out


def _config():
    return load_config("detector", None, ["roi.enabled=false", f"render.imgsz={IMGSZ}", "detect.batch=4",
                                          "overlays.display_size=48", "overlays.top_n=1"])


def _tree_hash(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("variant", ["tree", "dicomdir", "zip"])
def test_detect_reads_the_bone_stack_of_an_export_and_records_every_series(exports, variant, fake_model, tmp_path):
    source, exported = exports[variant]
    before = _tree_hash(source)
    out = tmp_path / "det"
    result = detect_studies([source], weights=tmp_path / "w.pt", out=out, config=_config(), workers=1,
                            progress=False)
    truth = {e.study_uid: e for e in exported}
    assert sorted(result.finished) == sorted(truth) and not result.failed    # keyed by StudyInstanceUID
    assert _tree_hash(source) == before                                      # nothing written into the input
    series = pd.read_csv(out / "series.csv", dtype=str, keep_default_na=False)
    assert list(series.columns) == list(SERIES_COLUMNS)
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    for uid, e in truth.items():
        rows = series[series[STUDY_COL] == uid]
        chosen = rows[rows["chosen"] == "1"]
        assert chosen["series_uid"].tolist() == [e.chosen] and chosen["n_files"].tolist() == [str(e.bone_slices)]
        role_of = {s: r for r, s in e.series.items()}
        left_out = {role_of[s]: reason for s, reason in zip(rows.loc[rows["chosen"] == "0", "series_uid"],
                                                            rows.loc[rows["chosen"] == "0", "reason"], strict=True)}
        assert set(left_out) == set(REASONS)
        assert all(left_out[role].startswith(start) for role, start in REASONS.items()), left_out
        # every slice of slices.csv is a file of the bone stack, named by its SOPInstanceUID, in canonical order
        study_slices = slices[slices[STUDY_COL] == uid].sort_values("slice_index")
        assert len(study_slices) == e.bone_slices
        example = pydicom.dcmread(chosen["example_file"].iloc[0], stop_before_pixels=True)
        assert example.SeriesInstanceUID == e.chosen and example.StudyInstanceUID == uid
        assert example.SOPInstanceUID == study_slices["sop_instance_uid"].iloc[0]
        assert chosen["sop_class_uid"].iloc[0] == example.SOPClassUID
        assert study_slices["sop_instance_uid"].is_unique
        assert (study_slices["z_mm"].diff().dropna() < 0).all()            # superior first
    if variant == "zip":   # extracted into a cache, never beside the input
        assert sorted(p.name for p in source.parent.iterdir()) == sorted(
            p.name for p in source.parent.iterdir() if p.name in {"tree", "dicomdir", "zip.zip"})


def test_a_study_without_usable_ct_fails_with_the_reason_and_others_go_on(exports, fake_model, tmp_path):
    source, exported = exports["tree"]
    tree = shutil.copytree(source, tmp_path / "tree")
    bad = sorted(exported, key=lambda e: e.study_uid)[0]
    for path in [p for p in tree.rglob("*") if p.is_file()]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.StudyInstanceUID == bad.study_uid and ds.SeriesInstanceUID in {bad.series[r] for r in
                                                                             ("bone", "soft", "thick", "derived")}:
            path.unlink()           # only the scout, the sagittal reformat and the dose report are left
    out = tmp_path / "det"
    result = detect_studies([tree], weights=tmp_path / "w.pt", out=out, config=_config(), workers=1, progress=False)
    assert result.failed == [bad.study_uid] and len(result.finished) == 1
    errors = pd.read_csv(out / "errors.csv", dtype=str)
    assert errors[STUDY_COL].tolist() == [bad.study_uid]
    assert "no usable CT series" in errors["error"].iloc[0] and "not axial" in errors["error"].iloc[0]


def test_find_inputs_keeps_the_kaggle_layout_and_sends_the_rest_to_the_finder(exports, tmp_path):
    from data_prep.dicom.writer import write_series

    images = tmp_path / "test_images"
    hu = np.zeros((4, 16, 16), dtype=np.float32)
    for uid in ("1.2.3", "1.2.4"):
        write_series(images / uid, hu, study_uid=uid, pixel_spacing=(1.0, 1.0), slice_thickness=1.0, z_top_mm=0.0)
    (images / "1.2.9").mkdir()                                     # an empty study folder: kept, fails in detect
    assert find_inputs(images) == [images / "1.2.3", images / "1.2.4", images / "1.2.9"]
    assert find_inputs(images / "1.2.3") == [images / "1.2.3"]
    # a study folder whose files have no .dcm extension is read through the finder, keyed by its folder name
    for p in (images / "1.2.4").iterdir():
        p.rename(p.with_suffix(""))
    found = find_inputs(images)
    assert [s.name for s in found] == ["1.2.3", "1.2.4", "1.2.9"]
    assert isinstance(found[1], FoundStudy) and len(found[1].paths) == 4
    with pytest.raises(InputError, match="dataset root"):          # the Kaggle root: name the folder to give
        find_inputs(tmp_path)
    mixed = find_studies([images / "1.2.3", exports["zip"][0]])
    assert [s.name for s in mixed] == ["1.2.3", *sorted(e.study_uid for e in exports["zip"][1])]
    with pytest.raises(InputError, match="study keys must be unique"):
        find_inputs([exports["tree"][0], exports["zip"][0]])


def test_inspect_lists_the_series_read_and_those_left_out(exports, caplog):
    source, exported = exports["dicomdir"]
    with caplog.at_level(logging.INFO):
        report = inspect_path(source, workers=1, progress=False)
    text = report.format()
    assert sorted(s.name for s in report.studies) == sorted(e.study_uid for e in exported)
    assert not report.has_errors
    for e in exported:
        assert f"{e.study_uid}: read series {e.chosen}" in text
        for role, start in REASONS.items():
            assert f"left out {e.series[role]}" in text
            line = next(t for t in text.splitlines() if f"left out {e.series[role]}" in t)
            assert f": {start}" in line, line


@pytest.mark.slow
def test_predict_on_a_zipped_export_with_the_trained_model(trained_pipeline, exports, tmp_path):
    from spinefrac.cli import main

    source, exported = exports["zip"]
    out = tmp_path / "pred"
    dicom = tmp_path / "dicom"
    assert main(["predict", str(source), "--model", str(trained_pipeline / "model"), "--out", str(out),
                 "--dicom-out", str(dicom), "--no-progress", "-q"]) == 0
    pred = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str})
    assert sorted(pred[STUDY_COL]) == sorted(e.study_uid for e in exported) and (pred["failed"] == 0).all()
    series = pd.read_csv(out / "series.csv", dtype=str)
    assert sorted(series.loc[series["chosen"] == "1", "series_uid"]) == sorted(e.chosen for e in exported)
    worklist = pd.read_csv(out / "worklist.csv", dtype={STUDY_COL: str})
    assert sorted(worklist[STUDY_COL]) == sorted(e.study_uid for e in exported)
    from spinefrac.dicom_out import study_folder

    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str, "sop_instance_uid": str})
    for e in exported:      # predict --dicom-out: an SR per study, in the source study, citing its read series
        sr = pydicom.dcmread(study_folder(dicom, e.study_uid) / "SR.dcm")
        assert sr.StudyInstanceUID == e.study_uid and sr.Modality == "SR"
        cited = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                 for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
        assert cited and cited <= set(slices.loc[slices[STUDY_COL] == e.study_uid, "sop_instance_uid"])
