"""Fault injection, issue 23: names and paths from inputs never decide where spinefrac reads or writes.

Each case is one of the issue's findings, played as a hostile or careless user would: a StudyInstanceUID of
`../../../EVIL` in a nested tree, a train.csv UID that climbs out of train_images/, DICOMDIR records and zip
members that point outside the input, symbolic links that leave an input folder. Each asserts that no file
appears outside the output folder, that nothing outside the input is read, and that the message names the
record, row or link. (Model-folder entries: test_faults_models.py; the "held, but poor outcome" cases: the
other test_faults_*.py files.)
"""

from __future__ import annotations

import copy
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import use_fixed_boxes, use_stand_in_model

from data_prep.dicom.study_finder import search_dicom
from data_prep.dicom.writer import write_series
from data_prep.runs.registry import STUDY_COL, TARGETS
from data_prep.safe_paths import safe_name
from data_prep.synthetic.export import write_export
from spinefrac.cli import main

N, SIZE, THICKNESS = 6, 32, 2.0
IMGSZ = 32
DETECT_SETS = ["--set", f"render.imgsz={IMGSZ}", "--set", "overlays.display_size=64", "--set", "overlays.top_n=1"]


# ---------------------------------------------------------------- helpers
def write_study(folder: Path, uid: str, *, n: int = N, series_uid: str | None = None) -> list[Path]:
    hu = np.stack([np.full((SIZE, SIZE), -900.0 + 100.0 * k, dtype=np.float32) for k in range(n)])
    return write_series(folder, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=THICKNESS,
                        z_top_mm=100.0, series_uid=series_uid)


def files_outside(root: Path, inside: Path, before: set[Path]) -> list[Path]:
    """Files under `root` that are new since `before` and not under `inside`."""
    now = {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    return sorted(p for p in now - before if inside not in p.parents)


def snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    use_fixed_boxes(monkeypatch, tmp_path / "home")     # the inputs, not the model, are under test


def detect_cli(studies, out, *extra):
    return main(["detect", *[str(s) for s in ([studies] if isinstance(studies, Path) else studies)],
                 "--weights", str(out.parent / "w.pt"), "--out", str(out), "--no-progress", "--workers", "1",
                 *DETECT_SETS, *extra])


@pytest.fixture
def fake_predict(monkeypatch, tmp_path, fake_model):
    """`spinefrac predict` with a stand-in model folder (fixed boxes, every probability 0.5)."""
    use_stand_in_model(monkeypatch, tmp_path, IMGSZ)

    def run(studies, out, *extra):
        return main(["predict", str(studies), "--model", str(tmp_path / "model"), "--out", str(out),
                     "--no-progress", "--workers", "1", *extra])

    return run


# ---------------------------------------------------------------- 1. a StudyInstanceUID that climbs out
def test_hostile_study_uid_in_a_nested_tree_writes_only_inside_out(tmp_path, fake_predict, caplog):
    evil = "../../../EVIL"
    tree = tmp_path / "in" / "export"
    paths = write_study(tree / "a", evil)
    (tree / "b").mkdir()
    for k, p in enumerate(paths):                    # as a PACS exports it: IMnnnnn files without an extension,
        p.rename(tree / ("b" if k >= N // 2 else "a") / f"IM{k:05d}")   # the series over two folders: keyed by UID
    out = tmp_path / "work" / "deep" / "pred"
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert fake_predict(tree, out) == 0
    assert files_outside(tmp_path, out, before) == []
    key = safe_name(evil)
    assert "'../../../EVIL' is not a valid DICOM UID" in caplog.text and key in caplog.text
    pred = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str})
    assert pred[STUDY_COL].tolist() == [key] and pred["failed"].tolist() == [0]
    series = pd.read_csv(out / "series.csv", dtype=str)
    assert series["dicom_study_uid"].tolist() == [evil]           # the header's value is kept, as data
    assert (out / "done" / f"{key}.json").is_file() and (out / "overlays" / key).is_dir()


# ---------------------------------------------------------------- 2. a train.csv UID that climbs out
@pytest.mark.parametrize("hostile", ["./../../../X", "../../../X", "ABSOLUTE"])
def test_train_csv_uid_that_leaves_train_images_is_refused_naming_the_row(tmp_path, caplog, hostile):
    data = tmp_path / "sandbox" / "a" / "b" / "data"
    write_study(data / "train_images" / "1.2.3.1", "1.2.3.1")
    outside = data.parent.parent / "X"                  # where train_images/./../../../X leads
    write_study(outside, "1.2.3.2")
    uid = str(outside) if hostile == "ABSOLUTE" else hostile
    levels = {t: 0 for t in TARGETS}
    pd.DataFrame([{STUDY_COL: "1.2.3.1", **levels}, {STUDY_COL: uid, **{**levels, "C2": 1, "patient_overall": 1}}]
                 ).to_csv(data / "train.csv", index=False)
    pd.DataFrame([{STUDY_COL: uid, "x": 4.0, "y": 4.0, "width": 8.0, "height": 8.0, "slice_number": 2}]
                 ).to_csv(data / "train_bounding_boxes.csv", index=False)
    out = tmp_path / "sandbox" / "a" / "b" / "out"
    before = snapshot(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert main(["prepare-detector", str(data), "--out", str(out), "--imgsz", "32", "--no-progress",
                     "--workers", "1", "--set", "prepare.n_folds=2", "--set", "roi.enabled=false"]) == 2
    assert "train.csv" in caplog.text and "row 2 (line 3), column StudyInstanceUID" in caplog.text
    assert "must name one study folder" in caplog.text
    assert files_outside(tmp_path, out, before) == [] and not out.exists()


# ---------------------------------------------------------------- 3. DICOMDIR records that point outside
def test_dicomdir_records_leading_outside_are_refused_and_not_read(tmp_path, fake_model, caplog, monkeypatch):
    fileset = tmp_path / "cd"
    write_export(fileset, variant="dicomdir", size=32, slices=8)
    other = write_study(tmp_path / "outside" / "patient2", "1.2.3.999")   # another patient's study, beside it
    ds = pydicom.dcmread(fileset / "DICOMDIR")
    image = next(r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE")
    for file_id in (["..", "outside", "patient2", other[0].name], [str(other[1])]):
        record = copy.deepcopy(image)
        record.ReferencedFileID = file_id
        ds.DirectoryRecordSequence.append(record)
    ds.save_as(fileset / "DICOMDIR")
    read: list[Path] = []
    real = pydicom.dcmread

    def spy(fp, *args, **kwargs):
        read.append(Path(fp).resolve() if isinstance(fp, (str, os.PathLike)) else None)
        return real(fp, *args, **kwargs)

    monkeypatch.setattr("data_prep.dicom.study_finder.pydicom.dcmread", spy)
    with caplog.at_level(logging.WARNING):
        search = search_dicom(fileset)
    assert not any(p is not None and (tmp_path / "outside") in p.parents for p in read)
    assert [s.study_uid for s in search.studies] != [] and "1.2.3.999" not in {s.study_uid for s in search.studies}
    assert len(search.refused) == 2
    assert "'..\\\\outside\\\\patient2\\\\1.dcm'" in search.refused[0][0] and "'..'" in search.refused[0][1]
    assert str(other[1]) in search.refused[1][0] and "path separator" in search.refused[1][1]
    assert "lead outside the input and were not read" in caplog.text and "ReferencedFileID" in caplog.text
    out = tmp_path / "det"
    assert detect_cli(fileset, out) == 0
    assert "1.2.3.999" not in set(pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})[STUDY_COL])


# ---------------------------------------------------------------- 4. zip members that point outside
def test_zip_members_leading_outside_are_refused_naming_the_member(tmp_path, caplog):
    source = write_study(tmp_path / "src", "1.2.3.5")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in source:
            zf.write(p, f"study/{p.name}")
        for name, p in (("../../escaped.dcm", source[0]), ("/abs/escaped2.dcm", source[1]),
                        ("..\\..\\escaped3.dcm", source[2])):
            zf.writestr(zipfile.ZipInfo(name), p.read_bytes())     # as a hostile tool writes them, unnormalised
    cache = tmp_path / "cache"
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        search = search_dicom(archive, extract_to=cache)
    assert sorted(name for name, _ in [(r[0].split("member ")[1], r[1]) for r in search.refused]) == sorted(
        ["'../../escaped.dcm'", "'/abs/escaped2.dcm'", "'..\\\\..\\\\escaped3.dcm'"])
    assert "escaped.dcm" in caplog.text and "not extracted" in caplog.text
    assert files_outside(tmp_path, cache, before) == []
    assert not [p for p in cache.rglob("*escaped*")]                   # refused, not renamed into the cache
    assert [s.key for s in search.studies] == ["study"] and len(search.studies[0].paths) == N


# ---------------------------------------------------------------- 5. symbolic links leaving the input
def test_a_study_folder_linked_from_outside_fails_unless_follow_symlinks(tmp_path, fake_model):
    images = tmp_path / "images"
    write_study(images / "1.2.3.1", "1.2.3.1")
    write_study(tmp_path / "elsewhere" / "1.2.3.2", "1.2.3.2")
    (images / "1.2.3.2").symlink_to(tmp_path / "elsewhere" / "1.2.3.2", target_is_directory=True)
    out = tmp_path / "det"
    assert detect_cli(images, out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["1.2.3.2"]
    assert "symbolic link" in errors["error"].iloc[0] and "--follow-symlinks" in errors["error"].iloc[0]
    assert set(pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})[STUDY_COL]) == {"1.2.3.1"}
    assert detect_cli(images, tmp_path / "det2", "--follow-symlinks") == 0
    assert set(pd.read_csv(tmp_path / "det2" / "slices.csv", dtype={STUDY_COL: str})[STUDY_COL]) == {"1.2.3.1",
                                                                                                   "1.2.3.2"}


def test_a_slice_linked_from_outside_is_not_read(tmp_path, fake_model, monkeypatch):
    images = tmp_path / "images"
    paths = write_study(images / "1.2.3.1", "1.2.3.1")
    secret = write_study(tmp_path / "private", "1.2.3.1", n=N + 1)[-1]      # fits the study: it would be read
    (images / "1.2.3.1" / "99.dcm").symlink_to(secret)
    tree = tmp_path / "tree"
    write_study(tree / "s", "1.2.3.7")
    (tree / "s" / "extra").symlink_to(secret)
    read = []
    real = pydicom.dcmread
    monkeypatch.setattr("data_prep.dicom.study_finder.pydicom.dcmread",
                        lambda fp, *a, **k: (read.append(os.path.realpath(fp)), real(fp, *a, **k))[1])
    search = search_dicom(tree)
    assert str(secret) not in read and [r[0] for r in search.refused] == [str(tree / "s" / "extra")]
    assert len(search.studies[0].paths) == N
    out = tmp_path / "det"
    assert detect_cli(images, out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["1.2.3.1"] and "99.dcm" in errors["error"].iloc[0]
    assert len(paths) == N


def test_prepare_leaves_out_a_study_folder_linked_from_outside(tmp_path, caplog):
    data = tmp_path / "data"
    write_study(data / "train_images" / "1.2.3.1", "1.2.3.1")
    write_study(tmp_path / "elsewhere" / "1.2.3.2", "1.2.3.2")
    (data / "train_images" / "1.2.3.2").symlink_to(tmp_path / "elsewhere" / "1.2.3.2", target_is_directory=True)
    levels = {t: 0 for t in TARGETS}
    pd.DataFrame([{STUDY_COL: u, **levels} for u in ("1.2.3.1", "1.2.3.2")]).to_csv(data / "train.csv", index=False)
    pd.DataFrame(columns=[STUDY_COL, "x", "y", "width", "height", "slice_number"]).to_csv(
        data / "train_bounding_boxes.csv", index=False)
    from detector.yolo_dataset import _available_studies

    with caplog.at_level(logging.WARNING):
        uids = _available_studies(data / "train_images", pd.Series(["1.2.3.1", "1.2.3.2"]), None)
    assert uids == ["1.2.3.1"] and "study 1.2.3.2 left out" in caplog.text and "--follow-symlinks" in caplog.text
    assert _available_studies(data / "train_images", pd.Series(["1.2.3.1", "1.2.3.2"]), None,
                              follow_symlinks=True) == ["1.2.3.1", "1.2.3.2"]


# ---------------------------------------------------------------- 6. keys shown to users vs names on disk
def test_a_weird_folder_name_keeps_its_key_and_gets_a_safe_file_name(tmp_path, fake_model):
    images = tmp_path / "images"
    weird = "CON study: ü\\C"                            # legal on POSIX, hostile elsewhere
    write_study(images / weird, "1.2.3.8")
    out = tmp_path / "det"
    assert detect_cli(images, out) == 0
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    assert set(slices[STUDY_COL]) == {weird}                          # tables keep the key as it is
    name = safe_name(weird)
    assert name != weird and (out / "done" / f"{name}.json").is_file()
    assert (out / "parts" / f"{name}.slices.csv").is_file() and (out / "overlays" / name).is_dir()
