"""Fault injection on the inputs: hostile DICOM headers, mixed series, missing positions, bad tables, empty folders.

Each case asserts the exit status (through `spinefrac.cli.main` where it is a CLI path), that the message
names the file, row or study, and that nothing wrong was written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import use_fixed_boxes, use_stand_in_model

from data_prep.dicom import geometry, slice_file
from data_prep.dicom import volume as dicom_volume
from data_prep.dicom.inspect import inspect_path
from data_prep.dicom.writer import write_series
from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.registry import STUDY_COL, TARGETS
from data_prep.runs.tables import TableError, read_table
from spinefrac.cli import main

N, SIZE, THICKNESS, Z_TOP = 10, 32, 2.0, 100.0
HUGE = 60000
IMGSZ = 32


# ---------------------------------------------------------------- builders
def slice_value(k: int) -> float:
    """HU of canonical slice k (k = 0 most superior): every slice is told apart by its value."""
    return -900.0 + 100.0 * k


def write_study(root, uid, *, order="head_first", ts=registry.TS_EXPLICIT_LE, series_uid=None, n=N,
                z_top=Z_TOP):
    hu = np.stack([np.full((SIZE, SIZE), slice_value(k), dtype=np.float32) for k in range(n)])
    write_series(root / uid, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=THICKNESS,
                 z_top_mm=z_top, instance_order=order, transfer_syntax=ts, series_uid=series_uid)
    return root / uid


def edit_header(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def no_huge_decoding(monkeypatch):
    """Fail the test if a file claiming HUGE rows reaches the decoder; others decode as usual."""
    original = pydicom.Dataset.pixel_array

    def guarded(self):
        if int(self.Rows) >= HUGE:
            pytest.fail("a file claiming 60000 x 60000 reached the decoder")
        return original.fget(self)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(guarded))


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    use_fixed_boxes(monkeypatch, tmp_path / "home")     # the inputs, not the model, are under test


DETECT_SETS = ["--set", f"render.imgsz={IMGSZ}", "--set", "overlays.display_size=64", "--set", "overlays.top_n=1"]


def detect_cli(studies, out, *extra):
    return main(["detect", str(studies), "--weights", str(out.parent / "w.pt"), "--out", str(out),
                 "--no-progress", "--workers", "1", *DETECT_SETS, *extra])


# ---------------------------------------------------------------- 1. claimed size bounded before decoding
@pytest.mark.parametrize("ts", [registry.TS_RLE, registry.TS_JPEG_LOSSLESS_SV1])
def test_huge_claimed_size_never_reaches_the_decoder(tmp_path, monkeypatch, capsys, ts):
    study = write_study(tmp_path / "images", "1.2.3.40", ts=ts)
    victim = study / "4.dcm"
    edit_header(victim, Rows=HUGE, Columns=HUGE)
    assert victim.stat().st_size < 40_000                   # a tiny file claiming 60000 x 60000
    no_huge_decoding(monkeypatch)
    with pytest.raises(slice_file.OversizedImageError) as err:
        slice_file.read_slice_hu(victim)
    assert "4.dcm" in str(err.value) and f"{HUGE}x{HUGE}" in str(err.value)
    with pytest.raises(slice_file.OversizedImageError, match="4.dcm"):
        geometry.scan_study(study)
    # inspect: the file is an error of its study; the other slices are still decoded and summarised
    assert main(["inspect", str(study), "--no-progress", "--strict", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "4.dcm" in out and f"{HUGE}x{HUGE}" in out
    assert f"{N - 1} x {SIZE}x{SIZE}" in out


def test_huge_claimed_size_fails_only_its_study_in_detect(tmp_path, fake_model, monkeypatch, caplog):
    images = tmp_path / "images"
    write_study(images, "1.2.3.41", ts=registry.TS_RLE)
    bad = write_study(images, "1.2.3.42", ts=registry.TS_RLE)
    edit_header(bad / "7.dcm", Rows=HUGE, Columns=HUGE)
    no_huge_decoding(monkeypatch)
    out = tmp_path / "det"
    assert detect_cli(images, out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["1.2.3.42"]
    assert "7.dcm" in errors["error"].iloc[0] and "OversizedImageError" in errors["error"].iloc[0]
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    assert slices[STUDY_COL].unique().tolist() == ["1.2.3.41"]          # nothing of the bad study written
    assert not (out / "done" / "1.2.3.42.json").exists()


def test_size_limit_is_configurable_and_admits_real_ct(tmp_path):
    study = write_study(tmp_path, "1.2.3.43")
    path = study / "1.dcm"
    assert slice_file.read_slice_hu(path).shape == (SIZE, SIZE)           # default limit
    with pytest.raises(slice_file.OversizedImageError, match="1.dcm"):
        slice_file.read_slice_hu(path, max_bytes=SIZE * SIZE)              # 16-bit slice: 2 bytes a pixel
    edit_header(path, Rows=1024, Columns=1024, NumberOfFrames=4)         # large real CT: admitted by the header check
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert slice_file.check_claimed_size(ds, path) == 1024 * 1024 * 4 * 2


# ---------------------------------------------------------------- 2. foreign series
def test_foreign_series_slice_is_excluded_and_named(tmp_path, capsys):
    study = write_study(tmp_path, "1.2.3.50")
    other = write_study(tmp_path / "other", "1.2.3.50", series_uid="1.2.3.50.99", n=2,
                        z_top=Z_TOP - THICKNESS / 2)                     # same geometry, between two slices
    stray = study / "31.dcm"
    shutil.copy(other / "1.dcm", stray)
    edit_header(stray, InstanceNumber=31)
    geom = geometry.scan_study(study)
    assert len(geom) == N and stray not in geom.paths
    assert [p for p, _ in geom.excluded] == [stray] and "1.2.3.50.99" in geom.excluded[0][1]
    assert any("31.dcm" in w and "another series" in w for w in geom.warnings)
    volume = dicom_volume.read_volume(geom)
    np.testing.assert_array_equal(volume[:, 0, 0], [slice_value(k) for k in range(N)])  # no foreign slice merged
    assert main(["inspect", str(study), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "31.dcm" in out and "another series" in out


def test_two_series_of_equal_size_are_refused(tmp_path):
    study = write_study(tmp_path, "1.2.3.51", n=4)
    write_study(tmp_path / "other", "1.2.3.51", series_uid="1.2.3.51.7", n=4, z_top=Z_TOP - 100)
    for k in range(1, 5):
        shutil.copy(tmp_path / "other" / "1.2.3.51" / f"{k}.dcm", study / f"{10 + k}.dcm")
    with pytest.raises(geometry.AmbiguousSeriesError) as err:
        geometry.scan_study(study)
    assert "1.2.3.51.7" in str(err.value) and "1.2.3.51" in str(err.value)


# ---------------------------------------------------------------- 3. a slice without position
def test_slice_without_position_is_excluded_and_order_kept(tmp_path, capsys):
    study = write_study(tmp_path, "1.2.3.60", order="feet_first")       # InstanceNumber 1 = most inferior
    victim = study / "5.dcm"                                             # canonical index N - 5
    edit_header(victim, ImagePositionPatient=None)
    geom = geometry.scan_study(study)
    assert len(geom) == N - 1 and [p for p, _ in geom.excluded] == [victim]
    kept = [k for k in range(N) if k != N - 5]
    # head first, as written: InstanceNumber runs N..1 (feet first), z strictly decreasing
    assert geom.instance_numbers.tolist() == [N - k for k in kept]
    assert (np.diff(geom.z_mm) < 0).all()
    np.testing.assert_allclose(geom.z_mm, [Z_TOP - THICKNESS * k for k in kept])
    np.testing.assert_array_equal(dicom_volume.read_volume(geom)[:, 0, 0], [slice_value(k) for k in kept])
    assert any("5.dcm" in w and "ImagePositionPatient" in w for w in geom.warnings)
    assert main(["inspect", str(study), "--no-progress", "--strict"]) == 0   # a warning, not an error
    out = capsys.readouterr().out
    assert "5.dcm" in out and "reversed (feet first)" in out


def test_too_few_positions_fail_the_study_clearly(tmp_path):
    study = write_study(tmp_path, "1.2.3.61")
    for k in range(1, N):                                                # only 1.dcm keeps a position
        edit_header(study / f"{k + 1}.dcm", ImagePositionPatient=None)
    with pytest.raises(geometry.UnorderableStudyError, match="ImagePositionPatient"):
        geometry.scan_study(study)


# ---------------------------------------------------------------- 4. inspect reports every study
def test_inspect_reports_every_study_whatever_fails(tmp_path, capsys, monkeypatch):
    images = tmp_path / "train_images"
    write_study(images, "1.2.3.71")
    odd = write_study(images, "1.2.3.72")
    edit_header(odd / "3.dcm", PixelSpacing=[0.7, 0.7])                 # inconsistent: GeometryError
    dup = write_study(images, "1.2.3.73")
    edit_header(dup / "4.dcm", ImagePositionPatient=[0.0, 0.0, Z_TOP])  # same position as 1.dcm
    write_study(images, "1.2.3.74")
    write_study(images, "1.2.3.75")
    real_check = geometry.check_study

    def exploding(study_dir, **kw):
        if study_dir.name == "1.2.3.75":
            raise RuntimeError("disk hiccup")
        return real_check(study_dir, **kw)

    monkeypatch.setattr("data_prep.dicom.inspect.check_study", exploding)
    report = inspect_path(images, workers=1, progress=False)
    assert [s.study_dir.name for s in report.studies] == ["1.2.3.71", "1.2.3.72", "1.2.3.73", "1.2.3.74",
                                                         "1.2.3.75"]
    by_name = {s.study_dir.name: s for s in report.studies}
    assert not by_name["1.2.3.71"].errors and not by_name["1.2.3.74"].errors
    assert by_name["1.2.3.74"].hu_range == (slice_value(0), slice_value(N - 1))   # studies after the bad ones read
    assert any("3.dcm" in e and "PixelSpacing" in e for e in by_name["1.2.3.72"].errors)
    assert any("same position" in e for e in by_name["1.2.3.73"].errors)
    assert any("disk hiccup" in e for e in by_name["1.2.3.75"].errors)
    assert main(["inspect", str(images), "--no-progress", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "5 studies, 3 with errors" in out
    for uid in ("1.2.3.71", "1.2.3.72", "1.2.3.73", "1.2.3.74", "1.2.3.75"):
        assert uid in out


# ---------------------------------------------------------------- 5. validated tables
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "data"
    assert main(["synth", str(root), "--studies", "4", "--seed", "3", "--no-progress", "--set", "image.size=64",
                 "--set", "volume.slices=20", "--set", "labels.box_fraction=1.0"]) == 0
    return root


@pytest.fixture
def data_root(synth_root, tmp_path):
    """A per-test copy of the synthetic dataset's tables; the images are shared (read only)."""
    root = tmp_path / "data"
    root.mkdir()
    for name in ("train.csv", "train_bounding_boxes.csv"):
        shutil.copy(synth_root / name, root / name)
    (root / "train_images").symlink_to(synth_root / "train_images")
    return root


def set_cell(path, row, column, value):
    df = pd.read_csv(path, dtype={STUDY_COL: str})
    df[column] = df[column].astype(object)
    df.loc[row, column] = value
    df.to_csv(path, index=False)


def test_synthetic_and_real_tables_pass(synth_root, realdata):
    assert read_table(synth_root / "train.csv", "train")[list(TARGETS)].dtypes.eq("int64").all()
    assert read_table(synth_root / "train_bounding_boxes.csv", "boxes")["slice_number"].dtype == "int64"
    assert len(read_table(realdata("train.csv"), "train")) == 2019
    assert len(read_table(realdata("train_bounding_boxes.csv"), "boxes")) > 7000
    assert len(read_table(realdata("test.csv"), "test")) == 3


@pytest.mark.parametrize("column", ["x", "width"])
def test_nan_box_coordinate_never_reaches_yolo_labels(data_root, tmp_path, caplog, column):
    set_cell(data_root / "train_bounding_boxes.csv", 2, column, float("nan"))
    out = tmp_path / "det_ds"
    with caplog.at_level(logging.ERROR):
        assert main(["prepare-detector", str(data_root), "--out", str(out), "--imgsz", "32", "--no-progress",
                     "--workers", "1"]) == 2
    assert "train_bounding_boxes.csv" in caplog.text and "row 3 (line 4)" in caplog.text
    assert f"column {column}" in caplog.text
    assert not out.exists()                                              # no label file, nothing at all


def test_bad_box_values_are_each_named(data_root):
    path = data_root / "train_bounding_boxes.csv"
    set_cell(path, 0, "height", 0)
    set_cell(path, 1, "y", float("inf"))
    set_cell(path, 2, "slice_number", 3.5)
    set_cell(path, 3, "x", "abc")
    with pytest.raises(TableError) as err:
        read_table(path, "boxes")
    problems = err.value.problems
    assert "row 1 (line 2), column height: must be > 0 (found 0.0)" in problems
    assert any(p.startswith("row 2 (line 3), column y: must be a finite number") for p in problems)
    assert any(p.startswith("row 3 (line 4), column slice_number: must be a whole number") for p in problems)
    assert "row 4 (line 5), column x: 'abc' is not a number" in problems
    assert len(problems) == 4 and str(path) in str(err.value)


@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_label_outside_0_1_stops_train_before_any_work(data_root, tmp_path, caplog, value):
    set_cell(data_root / "train.csv", 1, "C3", value)
    out = tmp_path / "model"
    with caplog.at_level(logging.ERROR):
        assert main(["train", str(data_root), "--out", str(out), "--no-progress"]) == 2
    assert "train.csv" in caplog.text and "row 2 (line 3), column C3: must be 0 or 1" in caplog.text
    assert f"found {value!r}" in caplog.text or f"found {float(value)!r}" in caplog.text
    assert not out.exists()


def test_duplicate_uid_in_train_csv_is_an_error(data_root, tmp_path, caplog):
    path = data_root / "train.csv"
    df = pd.read_csv(path, dtype={STUDY_COL: str})
    pd.concat([df, df.iloc[[0]]], ignore_index=True).to_csv(path, index=False)
    uid = df[STUDY_COL].iloc[0]
    out = tmp_path / "model"
    with caplog.at_level(logging.ERROR):
        assert main(["train", str(data_root), "--out", str(out), "--no-progress"]) == 2
    assert f"row 1 (line 2), column StudyInstanceUID: '{uid}' appears more than once" in caplog.text
    assert f"row {len(df) + 1} (line {len(df) + 2})" in caplog.text
    assert not out.exists()
    # evaluate takes the same labels: refused, not counted twice
    preds = tmp_path / "predictions.csv"
    pd.DataFrame({STUDY_COL: df[STUDY_COL], **{t: 0.5 for t in TARGETS}}).to_csv(preds, index=False)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["evaluate", str(preds), "--labels", str(path)]) == 2
    assert "appears more than once" in caplog.text and "train.csv" in caplog.text


def test_patient_overall_must_agree_with_the_levels(data_root):
    path = data_root / "train.csv"
    df = pd.read_csv(path, dtype={STUDY_COL: str})
    negative = int(np.flatnonzero(df["patient_overall"].to_numpy() == 0)[0])
    set_cell(path, negative, "C5", 1)                                    # a fractured level, patient_overall 0
    with pytest.raises(TableError) as err:
        read_table(path, "train")
    assert err.value.problems == (f"row {negative + 1} (line {negative + 2}): patient_overall must be 1 exactly "
                                  "when one of C1..C7 is 1",)


def test_padded_uid_is_refused(data_root):
    path = data_root / "train.csv"
    df = pd.read_csv(path, dtype={STUDY_COL: str})
    set_cell(path, 0, STUDY_COL, " " + df[STUDY_COL].iloc[0])
    with pytest.raises(TableError, match=r"row 1 \(line 2\), column StudyInstanceUID: must not start or end"):
        read_table(path, "train")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00garbage", b"StudyInstanceUID\n"])
def test_unreadable_or_empty_table_is_named(tmp_path, content, caplog):
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.csv").write_bytes(content)
    (root / "train_bounding_boxes.csv").write_text("StudyInstanceUID,x,y,width,height,slice_number\n")
    with caplog.at_level(logging.ERROR):
        assert main(["train", str(root), "--out", str(tmp_path / "model"), "--no-progress"]) == 2
    assert "train.csv" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "model").exists()


def test_missing_column_is_named(data_root, tmp_path, caplog):
    path = data_root / "train_bounding_boxes.csv"
    pd.read_csv(path).drop(columns=["height"]).to_csv(path, index=False)
    out = tmp_path / "det_ds"
    with caplog.at_level(logging.ERROR):
        assert main(["prepare-detector", str(data_root), "--out", str(out), "--no-progress"]) == 2
    assert "train_bounding_boxes.csv" in caplog.text and "missing column 'height'" in caplog.text
    assert not out.exists()
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("StudyInstanceUID,prediction_type\n1.2.3,C1\n")
    with pytest.raises(TableError, match="missing column 'row_id'"):
        read_table(test_csv, "test")


def test_test_csv_rows_are_checked(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("row_id,StudyInstanceUID,prediction_type\n1.2.3_C1,1.2.3,C1\n1.2.3_C9,1.2.3,C9\n"
                    "1.2.3_C2,1.2.4,C2\n1.2.3_C1,1.2.3,C1\n")
    with pytest.raises(TableError) as err:
        read_table(path, "test")
    text = str(err.value)
    assert str(path) in text and "row 2 (line 3), column row_id: must end in _C1.._C7" in text
    assert "row 3 (line 4): row_id must be <StudyInstanceUID>_<prediction_type>" in text
    assert "row 4 (line 5), column row_id: '1.2.3_C1' appears more than once" in text


def test_detect_labels_are_validated_before_detection(tmp_path, fake_model, caplog):
    images = tmp_path / "images"
    write_study(images, "1.2.3.80")
    labels = tmp_path / "train_bounding_boxes.csv"
    labels.write_text("StudyInstanceUID,x,y,width,height,slice_number\n1.2.3.80,1,2,,4,3\n")
    out = tmp_path / "det"
    with caplog.at_level(logging.ERROR):
        assert detect_cli(images, out, "--labels", str(labels)) == 2
    assert "row 1 (line 2), column width: empty value" in caplog.text
    assert not (out / "done").exists() or not any((out / "done").iterdir())


# ---------------------------------------------------------------- 6. empty study folders
def test_empty_study_folder_is_a_failed_study_in_detect(tmp_path, fake_model):
    images = tmp_path / "images"
    write_study(images, "1.2.3.90")
    (images / "1.2.3.91").mkdir()                                        # empty
    (images / "1.2.3.92").mkdir()
    (images / "1.2.3.92" / "readme.txt").write_text("no images here")   # no .dcm either
    (images / ".cache").mkdir()                                          # hidden: not a study
    out = tmp_path / "det"
    assert detect_cli(images, out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["1.2.3.91", "1.2.3.92"]
    assert all("no DICOM" in e for e in errors["error"])
    assert pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})[STUDY_COL].unique().tolist() == ["1.2.3.90"]


def test_empty_study_folder_in_predict_gets_the_prior(tmp_path, fake_model, monkeypatch):
    images = tmp_path / "test_images"
    write_study(images, "1.2.3.95")
    (images / "1.2.3.96").mkdir()
    prior = use_stand_in_model(monkeypatch, tmp_path, IMGSZ)
    test_csv = tmp_path / "test.csv"
    rows = [registry.row_id(u, t) for u in ("1.2.3.95", "1.2.3.96") for t in TARGETS]
    pd.DataFrame({"row_id": rows}).to_csv(test_csv, index=False)
    out = tmp_path / "pred"
    assert main(["predict", str(images), "--model", str(tmp_path / "model"), "--out", str(out),
                 "--test-csv", str(test_csv), "--no-progress", "--workers", "1"]) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["1.2.3.96"] and "1.2.3.96" in errors["path"].iloc[0]
    pred = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    assert pred.loc["1.2.3.96", "failed"] == 1 and pred.loc["1.2.3.95", "failed"] == 0
    np.testing.assert_allclose(pred.loc["1.2.3.96", list(TARGETS)].to_numpy(float), [prior[t] for t in TARGETS])
    sub = pd.read_csv(out / "submission.csv")
    assert sub["row_id"].tolist() == rows and np.isfinite(sub["fractured"]).all()
    assert json.loads((out / "predictions.csv.meta.json").read_text())["counts"]["failed"] == 1


def test_a_folder_of_nested_folders_is_still_an_error(tmp_path, fake_model, caplog):
    root = tmp_path / "data"                                             # a dataset root, not a folder of studies
    write_study(root / "test_images", "1.2.3.97")
    with caplog.at_level(logging.ERROR):
        assert detect_cli(root, tmp_path / "det") == 2
    assert "holds no .dcm files" in caplog.text and str(root) in caplog.text
    assert not (tmp_path / "det").exists()


def test_input_error_names_the_missing_table(tmp_path):
    with pytest.raises(InputError, match="train.csv"):
        read_table(tmp_path / "train.csv", "train")


# ---------------------------------------------------------------- 7. held, but with a poor outcome (issue 23)
def test_an_mr_study_in_the_kaggle_layout_fails_with_its_reason(tmp_path, fake_model):
    images = tmp_path / "images"
    for path in write_study(images, "1.2.3.60").iterdir():
        edit_header(path, Modality="CT")
    for path in write_study(images, "1.2.3.61").iterdir():
        edit_header(path, Modality="MR")
    write_study(images, "1.2.3.62")                      # no Modality, as the RSNA files: still read as CT
    assert "Modality" not in pydicom.dcmread(images / "1.2.3.62" / "1.dcm")
    out = tmp_path / "det"
    assert detect_cli(images, out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["1.2.3.61"]
    assert "NotCTError" in errors["error"].iloc[0] and "Modality is 'MR', not CT" in errors["error"].iloc[0]
    assert set(pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})[STUDY_COL]) == {"1.2.3.60", "1.2.3.62"}


def test_a_one_slice_study_is_flagged_in_inspect_and_the_worklist(tmp_path, capsys):
    from spinefrac.report.worklist import write_worklist

    study = write_study(tmp_path / "images", "1.2.3.63", n=1)
    assert main(["inspect", str(study), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" not in out and "too short to hold C1-C7: 1 slice(s)" in out
    pred = tmp_path / "pred"
    pred.mkdir()
    pd.DataFrame([{STUDY_COL: u, **dict.fromkeys(TARGETS, 0.2), "failed": 0} for u in ("1.2.3.63", "1.2.3.64")]
                 ).to_csv(pred / "predictions.csv", index=False)
    z = {"1.2.3.63": [100.0], "1.2.3.64": list(np.arange(0.0, 120.0, 2.0))}   # one slice; 120 mm
    pd.DataFrame([{STUDY_COL: u, "slice_index": i, "z_mm": v} for u, zs in z.items() for i, v in enumerate(zs)]
                 ).to_csv(pred / "slices.csv", index=False)
    table, _ = write_worklist(pred, model_dir=tmp_path / "no_model")
    warning = table.set_index(STUDY_COL)["warning"]
    assert "too short to hold C1-C7" in warning["1.2.3.63"] and warning["1.2.3.64"] == ""
    assert json.loads((pred / "worklist.csv.meta.json").read_text())["counts"]["warned"] == 1


def test_an_unreadable_file_says_permission_denied(tmp_path, fake_model, monkeypatch):
    import builtins
    import errno

    study = write_study(tmp_path / "images", "1.2.3.65")
    victim = study / "4.dcm"
    real_open = builtins.open

    def denying(file, *args, **kwargs):             # as a file of another user, chmod 000 (tests may run as root)
        if os.fspath(file) == os.fspath(victim):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying)
    report = inspect_path(study, workers=1, progress=False)
    (error,) = report.studies[0].errors
    assert "4.dcm" in error and "permission denied" in error and "cut short" not in error
    out = tmp_path / "det"
    assert detect_cli(tmp_path / "images", out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert "UnreadableFileError" in errors["error"].iloc[0] and "permission denied" in errors["error"].iloc[0]


def test_a_test_csv_without_rows_is_refused(tmp_path, fake_model, monkeypatch, caplog):
    from aggregation.submission import read_test_csv

    path = tmp_path / "test.csv"
    path.write_text("row_id,StudyInstanceUID,prediction_type\n")
    with pytest.raises(InputError, match="test.csv: has a header but no data rows"):
        read_test_csv(path)
    images = tmp_path / "test_images"
    write_study(images, "1.2.3.66")
    model = SimpleNamespace(root=tmp_path / "model", configs={}, detector_weights=tmp_path / "w.pt",
                            locator_weights=None, prior=dict.fromkeys(TARGETS, 0.1), meta={}, classifier_weights=[])
    monkeypatch.setattr("spinefrac.pipeline.open_model", lambda model_dir: model)
    out = tmp_path / "pred"
    with caplog.at_level(logging.ERROR):
        assert main(["predict", str(images), "--model", str(tmp_path / "model"), "--out", str(out),
                     "--test-csv", str(path), "--no-progress"]) == 2
    assert "test.csv: has a header but no data rows" in caplog.text
    assert not (out / "boxes.csv").exists() and not (out / "submission.csv").exists()   # refused before any work
