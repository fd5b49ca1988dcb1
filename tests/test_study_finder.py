"""The study finder on synthetic PACS exports: the right series chosen, every other one skipped with its reason."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_prep.dicom import study_finder
from data_prep.dicom.study_finder import find_dicom_studies, kernel_class, search_dicom
from data_prep.errors import InputError
from data_prep.synthetic.export import write_export

REASONS = {"sr": "not an image", "scout": "scout/localizer", "sagittal": "not axial", "derived": "derived",
           "soft": "soft-tissue kernel", "thick": "thicker"}
"""How each role of the export must be skipped (the start of its reason)."""


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One tree export of two studies, written once for the module; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("export") / "tree"
    return root, write_export(root, n_studies=2, seed=3)


def _copy(export, tmp_path: Path) -> tuple[Path, list]:
    root, studies = export
    return shutil.copytree(root, tmp_path / "tree"), studies


def _reasons(found, exported) -> dict[str, str]:
    """The skip reason of each role of an exported study."""
    role_of = {uid: role for role, uid in exported.series.items()}
    return {role_of[s.series_uid]: s.reason for s in found.skipped}


def _series_files(root: Path, series_uid: str) -> list[Path]:
    return sorted(p for p in root.rglob("IM*")
                  if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == series_uid)


def test_export_with_every_complication_chooses_the_bone_stack(export, caplog):
    root, exported = export
    with caplog.at_level(logging.INFO, logger="data_prep"):
        found = find_dicom_studies(root)
    assert [s.study_uid for s in found] == sorted(e.study_uid for e in exported)
    for study, truth in zip(found, sorted(exported, key=lambda e: e.study_uid), strict=True):
        assert study.usable and study.problem is None
        assert study.series_uid == truth.chosen
        assert study.key == truth.study_uid  # nested tree: no Kaggle folder, so the key is the UID
        assert len(study.paths) == truth.bone_slices
        assert all(p.suffix == "" for p in study.paths)
        assert {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in study.paths} == {truth.chosen}
        reasons = _reasons(study, truth)
        assert set(reasons) == set(REASONS)
        for role, start in REASONS.items():
            assert reasons[role].startswith(start), (role, reasons[role])
        for skipped in study.skipped:
            assert f"skipped series {skipped.series_uid}" in caplog.text
    assert "STANDARD" in reasons["soft"] and "sagittal" in reasons["sagittal"]


@pytest.mark.parametrize("variant", ["dicomdir", "zip"])
def test_dicomdir_and_zip_give_the_same_choice(export, tmp_path, variant):
    tree_root, _ = export
    tree = {s.study_uid: (s.series_uid, [(k.description, k.reason) for k in s.skipped])
            for s in find_dicom_studies(tree_root)}
    out = tmp_path / "in" / ("export.zip" if variant == "zip" else "fileset")
    exported = write_export(out, n_studies=2, seed=3, variant=variant)
    before = sorted(p.name for p in out.parent.iterdir())
    search = search_dicom(out, extract_to=tmp_path / "cache")
    found = {s.study_uid: (s.series_uid, [(k.description, k.reason) for k in s.skipped]) for s in search.studies}
    assert found == tree
    assert sorted(found) == sorted(e.study_uid for e in exported)
    assert {uid for uid, _ in found.values()} == {e.chosen for e in exported}
    if variant == "dicomdir":
        assert (out / "DICOMDIR").is_file()
        assert search.dicomdir == out / "DICOMDIR"
        # a DICOMDIR deeper in a tree is an index: neither a study object nor a non-DICOM file
        walked = search_dicom(out.parent)
        assert walked.dicomdir is None and walked.non_dicom == [] and walked.unreadable == []
        assert {s.study_uid: s.series_uid for s in walked.studies} == {k: v[0] for k, v in tree.items()}
    else:
        # extracted into the cache, nothing written beside the zip; a second call reuses the extraction
        assert sorted(p.name for p in out.parent.iterdir()) == before
        assert search.root.parent == tmp_path / "cache" and search.dicomdir is None
        assert search_dicom(out, extract_to=tmp_path / "cache").root == search.root


def test_dicomdir_lists_a_missing_file_which_is_counted(tmp_path):
    out = tmp_path / "fileset"
    write_export(out, variant="dicomdir")
    victim = sorted((out / "PT000000" / "ST000000").rglob("SR*"))[0]
    victim.unlink()
    search = search_dicom(out)
    assert [(p, "listed in") for p, r in search.unreadable] == [(victim, "listed in")]
    assert "but missing" in search.unreadable[0][1]
    assert search.studies[0].usable


def test_kaggle_layout_gives_the_keys_of_find_studies(tmp_path):
    from data_prep.synthetic.synth import synthesize
    from detector.detect import find_studies

    root = synthesize(tmp_path / "data", n_studies=3, seed=5, progress=False, workers=1,
                      config=_tiny_synth())
    images = root / "train_images"
    expected = [p.name for p in find_studies(images)]
    found = find_dicom_studies(images)
    assert [s.key for s in found] == sorted(expected)
    for study in found:
        assert all(p.parent.name == study.key and p.suffix == ".dcm" for p in study.paths)
        assert len(study.paths) == len(list((images / study.key).glob("*.dcm")))
        assert study.skipped == []
    # one study folder given directly: keyed by its name, as find_studies does
    one = images / expected[0]
    assert [s.key for s in find_dicom_studies(one)] == [p.name for p in find_studies(one)]
    # the dataset root: CSVs and NIfTI masks are counted as non-DICOM, the studies are the same
    search = search_dicom(root)
    assert [s.key for s in search.studies] == sorted(expected)
    assert any(p.name == "train.csv" for p in search.non_dicom)


def test_a_zipped_kaggle_study_is_keyed_by_its_folder_or_the_zip_name(tmp_path):
    import zipfile

    from data_prep.synthetic.synth import synthesize

    images = synthesize(tmp_path / "data", n_studies=2, seed=6, progress=False, workers=1,
                        config=_tiny_synth()) / "train_images"
    uids = sorted(p.name for p in images.iterdir())
    with zipfile.ZipFile(tmp_path / "all.zip", "w") as zf:
        for path in sorted(images.rglob("*.dcm")):
            zf.write(path, path.relative_to(images).as_posix())
    with zipfile.ZipFile(tmp_path / "one_study.zip", "w") as zf:
        for path in sorted((images / uids[0]).glob("*.dcm")):
            zf.write(path, path.name)  # the files at the top of the zip
    assert [s.key for s in find_dicom_studies(tmp_path / "all.zip", extract_to=tmp_path / "cache")] == uids
    assert [s.key for s in find_dicom_studies(tmp_path / "one_study.zip", extract_to=tmp_path / "cache")] == [
        "one_study"]


def test_a_folder_that_cannot_be_listed_is_counted(export, tmp_path, monkeypatch):
    root, exported = _copy(export, tmp_path)
    locked = root / "PAT002"
    real_scandir = study_finder.os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(study_finder.os, "scandir", scandir)
    search = search_dicom(root)
    assert search.unreadable == [(locked, "cannot list the folder (Permission denied)")]
    assert len(search.studies) == 1


def _tiny_synth():
    from data_prep.runs.config import load_config

    return load_config("synth", overrides=["image.size=64", "volume.slices=12"])


def test_two_studies_in_one_folder_are_keyed_by_uid(export, tmp_path):
    root, exported = export
    flat = tmp_path / "flat"
    flat.mkdir()
    for study in exported:
        for i, path in enumerate(_series_files(root, study.chosen)):
            shutil.copy(path, flat / f"{study.patient_id}_{i}")
    found = find_dicom_studies(flat)
    assert [s.key for s in found] == sorted(e.study_uid for e in exported)
    assert {s.series_uid for s in found} == {e.chosen for e in exported}


def test_unreadable_and_foreign_files_are_skipped_and_counted(export, tmp_path, caplog):
    root, exported = _copy(export, tmp_path)
    chosen_files = _series_files(root, exported[0].chosen)
    series_dir = chosen_files[0].parent
    (root / "README.TXT").write_text("exported by a PACS\n")
    (root / "PAT001" / "EMPTY").write_bytes(b"")
    good = chosen_files[0].read_bytes()
    truncated = series_dir / "IM99999"
    truncated.write_bytes(good[:200])  # the preamble and a cut header
    garbage = series_dir / "IM99998"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    ds = pydicom.dcmread(chosen_files[1])
    del ds.StudyInstanceUID
    ds.save_as(series_dir / "IM99997")
    with caplog.at_level(logging.INFO, logger="data_prep"):
        search = search_dicom(root)
    assert sorted(p.name for p in search.non_dicom) == ["EMPTY", "README.TXT"]
    reasons = {p.name: r for p, r in search.unreadable}
    assert sorted(reasons) == ["IM99997", "IM99998", "IM99999"]
    assert reasons["IM99997"] == "no StudyInstanceUID" and all(reasons.values())
    assert "3 DICOM file(s) could not be read" in caplog.text and "IM99999" in caplog.text
    chosen = {s.study_uid: s.series_uid for s in search.studies}
    assert chosen == {e.study_uid: e.chosen for e in exported}


def test_study_without_a_usable_ct_series_has_a_clear_problem(export, tmp_path, caplog):
    root, exported = _copy(export, tmp_path)
    study = exported[0]
    for role in ("bone", "soft", "thick", "derived"):
        shutil.rmtree(_series_files(root, study.series[role])[0].parent)
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        found = {s.study_uid: s for s in find_dicom_studies(root)}
    broken = found[study.study_uid]
    assert not broken.usable and broken.paths == ()
    assert broken.problem.startswith("no usable CT series among 3: ")
    for words in ("Topogram: scout/localizer", "Dose Report: not an image", "SAG MPR: not axial"):
        assert words in broken.problem
    assert broken.problem in caplog.text
    assert found[exported[1].study_uid].series_uid == exported[1].chosen  # the other study is unaffected


def test_a_study_of_another_modality_is_not_ct(export, tmp_path):
    root, exported = _copy(export, tmp_path)
    study = exported[1]
    for role in ("bone", "soft", "thick", "derived", "sagittal", "scout"):
        for path in _series_files(root, study.series[role]):
            ds = pydicom.dcmread(path)
            ds.Modality = "MR"
            ds.save_as(path)
    found = {s.study_uid: s for s in find_dicom_studies(root)}[study.study_uid]
    assert not found.usable
    assert _reasons(found, study)["bone"] == "Modality MR and SOP class CT Image Storage: not CT"


def test_a_preference_no_series_meets_does_not_decide(export, tmp_path):
    root, exported = _copy(export, tmp_path)
    study = exported[0]
    for role in ("bone", "soft", "thick"):
        shutil.rmtree(_series_files(root, study.series[role])[0].parent)
    found = {s.study_uid: s for s in find_dicom_studies(root)}[study.study_uid]
    assert found.series_uid == study.series["derived"]  # the only axial CT left, though DERIVED
    assert set(_reasons(found, study)) == {"sr", "scout", "sagittal"}


def test_a_gap_in_the_thin_stack_makes_the_complete_thick_one_win(export, tmp_path):
    root, exported = _copy(export, tmp_path)
    study = exported[0]
    files = _series_files(root, study.chosen)
    files[len(files) // 2].unlink()
    found = {s.study_uid: s for s in find_dicom_studies(root)}[study.study_uid]
    assert found.series_uid == study.series["thick"]
    reasons = _reasons(found, study)
    assert reasons["bone"].startswith("incomplete stack: 1 gap(s)")
    assert reasons["soft"].startswith("soft-tissue kernel")


@pytest.mark.parametrize(("tilt_deg", "axial"), [(20.0, True), (45.0, False)])
def test_gantry_tilt_within_tolerance_is_axial(export, tmp_path, tilt_deg, axial):
    root, exported = _copy(export, tmp_path)
    study = exported[0]
    t = np.radians(tilt_deg)
    for role in ("bone", "soft", "thick", "derived"):
        for path in _series_files(root, study.series[role]):
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))]
            ds.save_as(path)
    found = {s.study_uid: s for s in find_dicom_studies(root)}[study.study_uid]
    if axial:
        assert found.series_uid == study.chosen
    else:
        assert not found.usable
        assert _reasons(found, study)["bone"].startswith(f"not axial: slice normal [0.0, {np.sin(t):.3f}, {np.cos(t):.3f}] is 45 deg from z (> 30; oblique)")


@pytest.mark.parametrize(("kernel", "cls"), [
    ("BONE", "bone"), ("BONEPLUS", "bone"), ("b70f", "bone"), ("Br64", "bone"), ("H70h", "bone"), ("YC", "bone"),
    ("D", "bone"), ("FC30", "bone"), ("FC81", "bone"), ("STANDARD", "soft"), ("SOFT", "soft"), ("B30f", "soft"),
    ("Br40", "soft"), ("FC08", "soft"), ("B", "soft"), ("XCEPTIONAL", "unknown"), ("", "unknown")])
def test_kernel_classes(kernel, cls):
    assert kernel_class(kernel) == cls


def test_bad_inputs_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="missing.*does not exist"):
        search_dicom(tmp_path / "missing")
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(InputError, match="notes.txt: is a file, but neither a DICOMDIR nor a .zip"):
        search_dicom(text)
    bad_zip = tmp_path / "export.zip"
    bad_zip.write_bytes(b"PK not really a zip")
    with pytest.raises(InputError, match="export.zip: is not a readable zip file"):
        search_dicom(bad_zip, extract_to=tmp_path / "cache")
    good_zip = tmp_path / "good.zip"
    write_export(good_zip, variant="zip")
    monkeypatch.setattr(study_finder.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(InputError, match=r"good.zip: extracting needs \d+ MiB but .*cache has only 0 MiB free"):
        search_dicom(good_zip, extract_to=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())
    folder = tmp_path / "fs"
    folder.mkdir()
    (folder / "DICOMDIR").write_bytes(b"garbage")
    with pytest.raises(InputError, match="DICOMDIR: is not a readable DICOMDIR"):
        search_dicom(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert search_dicom(empty).studies == []


def test_synth_export_from_the_command_line(tmp_path, caplog):
    """`spinefrac synth OUT --export zip` writes an export the finder reads; a second run into OUT is refused."""
    from spinefrac.cli import main

    out = tmp_path / "export.zip"
    assert main(["synth", str(out), "--export", "zip", "--studies", "1", "--seed", "5", "-q"]) == 0
    expected = write_export(tmp_path / "same_seed", n_studies=1, seed=5)   # the same study, written directly
    found = find_dicom_studies(out, extract_to=tmp_path / "cache")
    assert [(s.study_uid, s.series_uid) for s in found] == [(e.study_uid, e.chosen) for e in expected]
    assert len(found[0].skipped) == len(REASONS)
    with caplog.at_level(logging.ERROR, logger="spinefrac"):
        assert main(["synth", str(out), "--export", "zip", "--studies", "1", "-q"]) == 2
    assert "export.zip: exists and is not empty" in caplog.text
