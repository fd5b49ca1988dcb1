"""prepare-classifier on tiny synthetic studies: crops come from the segmentation where a study has one and from
the locator elsewhere (each exactly the crop plan of its source), labels are the study's level labels, every
crop is written once and linked into fold folders with no study on both sides, a corrupt study is recorded and
skipped, and a rerun skips finished studies or refuses other settings. A fake locator stands in for the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import TINY_SYNTH

from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from data_prep.runs.resume import SettingsChangedError
from detector.classifier_dataset import (
    DATASET_JSON,
    INDEX_COLUMNS,
    SKIPPED_CSV,
    fold_studies,
    prepare_classifier_dataset,
    read_classifier_index,
    split_validation,
)
from detector.locate import Locator, locate_levels
from detector.yolo_dataset import LocateSpec

N_STUDIES = 6
IMGSZ = 32
SETS = [f"render.imgsz={IMGSZ}", "crops.slices_per_level=3", "crops.label=study"]   # weak labels: the layout tests


class C3Locator:
    """A locator that sees C3 at the same box (in its own 32 px image) on every sampled slice."""

    backend = "fake"
    box = (8.0, 10.0, 16.0, 18.0)

    def predict(self, images):
        return [np.array([[*self.box, 0.95, LEVELS.index("C3")]], dtype=np.float32) for _ in images]


def fake_locator():
    return Locator(C3Locator(), load_config("locator", None, ["render.imgsz=32"]), load_config("levels"))


def use_fake_locator(monkeypatch, tmp_path):
    spec = LocateSpec(tmp_path / "loc.pt", {}, {})
    monkeypatch.setattr("detector.yolo_dataset._locate_spec", lambda *a, **k: spec)
    monkeypatch.setattr("detector.yolo_dataset._worker_locator", lambda s: fake_locator() if s else None)
    monkeypatch.setattr("detector.classifier_dataset.weights_id", lambda path: "fake")
    return tmp_path / "loc.pt"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Six tiny studies, some segmented; train.csv rewritten so the first segmented study is positive at C3 only."""
    from data_prep.synthetic.synth import synthesize

    out = tmp_path_factory.mktemp("cls") / "data"
    synthesize(out, n_studies=N_STUDIES, seed=5, config=load_config("synth", None, TINY_SYNTH), progress=False,
               workers=1)
    segmented = sorted(p.name.split(".nii")[0] for p in (out / "segmentations").iterdir())
    assert 0 < len(segmented) < N_STUDIES
    train = pd.read_csv(out / "train.csv", dtype={STUDY_COL: str})
    c3 = segmented[0]
    train.loc[train[STUDY_COL] == c3, [*LEVELS, PATIENT]] = [0, 0, 1, 0, 0, 0, 0, 1]
    train.to_csv(out / "train.csv", index=False)
    return out


@pytest.fixture(scope="module")
def prepared(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls_out")
    with pytest.MonkeyPatch.context() as mp:
        locator = use_fake_locator(mp, tmp)
        out = prepare_classifier_dataset(root, tmp / "ds", config=load_config("classifier", None, SETS),
                                         locator=locator, workers=1, progress=False)
    return root, out


def segmented_uids(root):
    return sorted(p.name.split(".nii")[0] for p in (root / "segmentations").iterdir())


def expected_plan(root, uid, source):
    """The crop plan of one study computed directly from its level source (what the index must hold)."""
    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.segmentation import load_axial_mask, slice_level_table
    from detector.vertebra_crops import (
        crop_plan,
        level_slice_boxes_from_locator,
        level_slice_boxes_from_segmentation,
    )

    cfg = load_config("classifier", None, SETS)
    geometry = scan_study(root / "train_images" / uid)
    if source == "segmentation":
        boxes = level_slice_boxes_from_segmentation(
            slice_level_table(load_axial_mask(root / "segmentations" / f"{uid}.nii", geometry), geometry))
    else:
        _, levels, level_boxes = locate_levels(root / "train_images" / uid, locator=fake_locator(), geometry=geometry)
        boxes = level_slice_boxes_from_locator(level_boxes, levels, cfg["crops"])
    return crop_plan(boxes, geometry, cfg["crops"])


def test_each_study_uses_its_segmentation_else_the_locator_exactly(prepared):
    root, out = prepared
    index = read_classifier_index(out)
    assert list(index.columns) == list(INDEX_COLUMNS)
    seg = set(segmented_uids(root))
    assert set(index[STUDY_COL]) == {p.name for p in (root / "train_images").iterdir()}
    cols = ["level", "slice_index", "crop_x", "crop_y", "crop_width", "crop_height", "first_slice", "last_slice",
            "n_slices"]
    for uid, got in index.groupby(STUDY_COL):
        source = "segmentation" if uid in seg else "locator"
        # the size decode places the levels the fake locator never sees: their crops are marked extrapolated
        assert set(got["source"]) <= ({source} if uid in seg else {source, "extrapolated"})
        want = expected_plan(root, uid, source)
        key = ["level", "slice_index"]
        pd.testing.assert_frame_equal(got[cols].sort_values(key).reset_index(drop=True),
                                      want[cols].sort_values(key).reset_index(drop=True), check_dtype=False)
    # the synthetic neck holds C1..C7: segmented studies get every level, 3 slices each; the fake locator only C3
    seg_rows = index[index[STUDY_COL].isin(seg)]
    assert seg_rows.groupby(STUDY_COL)["level"].nunique().eq(len(LEVELS)).all()
    assert seg_rows.groupby([STUDY_COL, "level"]).size().le(3).all()
    located = index[~index[STUDY_COL].isin(seg)]
    assert "C3" in set(located["level"]) and located["level"].nunique() > 1     # C3 found, the others placed
    meta = json.loads((out / "index.csv.meta.json").read_text())
    assert meta["counts"]["source_segmentation"] == len(seg)
    assert (meta["counts"].get("source_locator", 0) + meta["counts"].get("source_extrapolated", 0)
            == N_STUDIES - len(seg))
    assert meta["counts"]["crops"] == len(index)


def test_labels_are_the_study_level_labels(prepared):
    root, out = prepared
    index = read_classifier_index(out)
    train = pd.read_csv(root / "train.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    c3 = segmented_uids(root)[0]
    mine = index[index[STUDY_COL] == c3]
    assert mine.loc[mine["level"] == "C3", "label"].eq(1).all() and (mine["level"] == "C3").any()
    assert mine.loc[mine["level"] != "C3", "label"].eq(0).all() and (mine["level"] != "C3").any()
    for row in index.itertuples():
        assert row.label == train.at[row.StudyInstanceUID, row.level]
    meta = json.loads((out / "index.csv.meta.json").read_text())
    for lv in LEVELS:
        assert meta["counts"][f"positives_{lv}"] == int(((index["level"] == lv) & (index["label"] == 1)).sum())


def test_every_crop_is_one_png_of_the_render_size(prepared):
    _, out = prepared
    index = read_classifier_index(out)
    assert index["image"].is_unique
    for row in index.itertuples():
        assert row.image == f"images/{row.StudyInstanceUID}/{row.level}_{row.slice_index}.png"
        image = cv2.imread(str(out / row.image))
        assert image is not None and image.shape == (IMGSZ, IMGSZ, 3)
    pngs = sorted(str(p.relative_to(out)) for p in (out / "images").rglob("*.png"))
    assert pngs == sorted(index["image"])


def test_one_fold_holds_every_study_split_by_study_with_links_to_the_crops(prepared):
    _, out = prepared
    index = read_classifier_index(out)
    summary = json.loads((out / DATASET_JSON).read_text())
    assert list(summary["folds"]) == ["0"]
    seen = {"train": set(), "val": set()}
    for split in seen:
        for label in (0, 1):
            for link in (out / "fold0" / split / str(label)).iterdir():
                assert link.is_symlink() and not os.path.isabs(os.readlink(link))
                target = link.resolve()
                row = index[index["image"] == str(target.relative_to(out.resolve()))]
                assert len(row) == 1 and int(row["label"].iloc[0]) == label
                seen[split].add(row[STUDY_COL].iloc[0])
    assert not seen["train"] & seen["val"]
    assert seen["train"] | seen["val"] == set(index[STUDY_COL])
    assert summary["folds"]["0"]["val_studies"] == len(seen["val"]) == 1     # round(0.15 x 6) = 1
    n_links = sum(1 for _ in (out / "fold0").rglob("*.png"))
    assert n_links == len(index)


def test_folds_hold_only_their_studies_and_changing_them_redoes_no_crop(prepared, tmp_path, monkeypatch):
    import shutil

    import detector.classifier_dataset as cd

    root, prepared_out = prepared
    out = tmp_path / "ds"
    shutil.copytree(prepared_out, out, symlinks=True)
    locator = use_fake_locator(monkeypatch, tmp_path)
    monkeypatch.setattr(cd, "_classifier_study", lambda task: pytest.fail(f"{task.uid} redone"))
    index = read_classifier_index(out)
    uids = sorted(set(index[STUDY_COL]))
    folds = {0: uids[2:], 1: uids[:2] + uids[4:]}
    prepare_classifier_dataset(root, out, config=load_config("classifier", None, [*SETS, "prepare.val_share=0.5"]),
                               folds=folds, locator=locator, workers=1, progress=False)
    record = json.loads((out / DATASET_JSON).read_text())
    assert sorted(record["folds"]) == ["0", "1"]
    for k, members in folds.items():
        found = {"train": set(), "val": set()}
        for split in found:
            for link in (out / f"fold{k}" / split).rglob("*.png"):
                assert link.resolve().is_file()                      # the relative link reaches the crop
                found[split].add(link.name.split("_C")[0])
        assert found["train"] | found["val"] == set(members)
        assert not found["train"] & found["val"]
        assert not (found["train"] | found["val"]) & (set(uids) - set(members))
        assert record["folds"][str(k)]["val_studies"] == len(found["val"]) == 2          # 0.5 x 4
        assert set(record["folds"][str(k)]["val"]) == found["val"]
        assert fold_studies(out / f"fold{k}") == set(members)
    # back to one fold: fold1 is removed
    prepare_classifier_dataset(root, out, config=load_config("classifier", None, SETS), locator=locator,
                               workers=1, progress=False)
    assert not (out / "fold1").exists() and (out / "fold0").is_dir()


def test_validation_split_is_stratified_and_seeded():
    uids = [f"u{i}" for i in range(20)]
    patient = {u: int(i < 10) for i, u in enumerate(uids)}
    val = split_validation(uids, patient, val_share=0.2, seed=0)
    assert len(val) == 4 and sum(patient[u] for u in val) == 2
    assert val == split_validation(list(reversed(uids)), patient, val_share=0.2, seed=0)
    assert split_validation(["a"], {"a": 1}, val_share=0.5, seed=0) == set()


def test_without_a_locator_unsegmented_studies_are_skipped_with_the_reason(root, tmp_path):
    from spinefrac.cli import main

    out = tmp_path / "ds"
    assert main(["prepare-classifier", str(root), "--out", str(out), "--workers", "2", "--no-progress",
                 *(f"--set={s}" for s in SETS)]) == 0
    index = read_classifier_index(out)
    seg = set(segmented_uids(root))
    assert set(index[STUDY_COL]) == seg and set(index["source"]) == {"segmentation"}
    skipped = pd.read_csv(out / SKIPPED_CSV, dtype={STUDY_COL: str})
    assert set(skipped[STUDY_COL]) == {p.name for p in (root / "train_images").iterdir()} - seg
    assert set(skipped["reason"]) == {"no_level_source"}


def test_a_corrupt_study_is_recorded_and_skipped_and_retried(root, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad = segmented_uids(root)[1]
    for dcm in (data / "train_images" / bad).glob("*.dcm"):
        dcm.write_bytes(b"not a dicom file")
    cfg = load_config("classifier", None, SETS)
    out = prepare_classifier_dataset(data, tmp_path / "ds", config=cfg, workers=1, progress=False)
    index = read_classifier_index(out)
    assert bad not in set(index[STUDY_COL]) and len(index)
    skipped = pd.read_csv(out / SKIPPED_CSV, dtype={STUDY_COL: str}).set_index(STUDY_COL)
    assert skipped.at[bad, "reason"] == "failed" and bad in skipped.index
    assert not (out / ".done" / f"{bad}.json").exists()
    # the rerun retries only the failed study (the finished ones are skipped)
    calls = []
    import detector.classifier_dataset as cd

    real = cd._classifier_study
    monkeypatch.setattr(cd, "_classifier_study", lambda task: calls.append(task.uid) or real(task))
    prepare_classifier_dataset(data, tmp_path / "ds", config=cfg, workers=1, progress=False)
    assert calls == [bad]


class NoLocator:
    """A locator that finds nothing."""

    backend = "fake"

    def predict(self, images):
        return [np.zeros((0, 6), dtype=np.float32) for _ in images]


def test_a_bad_segmentation_fails_and_a_study_without_vertebrae_is_reported(root, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad = segmented_uids(root)[0]
    (data / "segmentations" / f"{bad}.nii").write_bytes(b"not a nifti")
    spec = LocateSpec(tmp_path / "loc.pt", {}, {})
    monkeypatch.setattr("detector.yolo_dataset._locate_spec", lambda *a, **k: spec)
    monkeypatch.setattr("detector.yolo_dataset._worker_locator", lambda s: Locator(
        NoLocator(), load_config("locator", None, ["render.imgsz=32"]), load_config("levels")))
    monkeypatch.setattr("detector.classifier_dataset.weights_id", lambda path: "fake")
    out = prepare_classifier_dataset(data, tmp_path / "ds", config=load_config("classifier", None, SETS),
                                     locator=tmp_path / "loc.pt", workers=1, progress=False)
    skipped = pd.read_csv(out / SKIPPED_CSV, dtype={STUDY_COL: str}).set_index(STUDY_COL)
    assert skipped.at[bad, "reason"] == "failed" and f"{bad}.nii" in skipped.at[bad, "detail"]
    unsegmented = {p.name for p in (root / "train_images").iterdir()} - set(segmented_uids(root))
    assert set(skipped.index[skipped["reason"] == "no_levels_found"]) == unsegmented
    assert set(read_classifier_index(out)[STUDY_COL]) == set(segmented_uids(root)) - {bad}


def test_resume_skips_finished_studies_and_refuses_other_settings(prepared, monkeypatch, tmp_path):
    root, out = prepared
    import detector.classifier_dataset as cd

    locator = use_fake_locator(monkeypatch, tmp_path)
    before = (out / "index.csv").read_text()
    monkeypatch.setattr(cd, "_classifier_study", lambda task: pytest.fail(f"{task.uid} redone"))
    prepare_classifier_dataset(root, out, config=load_config("classifier", None, SETS), locator=locator,
                               workers=1, progress=False)
    assert (out / "index.csv").read_text() == before
    with pytest.raises(SettingsChangedError, match="crops.margin_mm"):
        prepare_classifier_dataset(root, out, config=load_config("classifier", None, [*SETS, "crops.margin_mm=4"]),
                                   locator=locator, workers=1, progress=False)


def test_cli_reports_a_missing_train_csv_in_one_line(tmp_path, caplog):
    from spinefrac.cli import main

    (tmp_path / "train_images").mkdir()
    assert main(["prepare-classifier", str(tmp_path), "--out", str(tmp_path / "ds"), "--no-progress"]) == 2
    assert f"{tmp_path / 'train.csv'}: not found" in caplog.text and "Traceback" not in caplog.text


def test_cli_refuses_an_unknown_crop_source_with_a_suggestion(tmp_path, caplog):
    from spinefrac.cli import main

    assert main(["prepare-classifier", str(tmp_path), "--out", str(tmp_path / "ds"), "--no-progress",
                 "--set", "crops.source=locatr"]) == 2
    assert "crops.source" in caplog.text and "Traceback" not in caplog.text


def test_prepare_classifier_help_names_the_locator_and_the_layout(capsys):
    from spinefrac.cli import main

    with pytest.raises(SystemExit):
        main(["prepare-classifier", "-h"])
    text = capsys.readouterr().out
    assert "--locator" in text and "fold0/{train,val}/{0,1}/" in text and "example:" in text


def test_ultralytics_trains_on_a_fold_folder_of_symlinks(prepared, yolo_home, tmp_path):
    """One epoch at 32 px on fold0 (about 3 s): Ultralytics' classify trainer reads the class folders of links."""
    from ultralytics import YOLO

    _, out = prepared
    model = YOLO("yolov8n-cls.yaml")
    model.train(data=str((out / "fold0").resolve()), epochs=1, imgsz=32, device="cpu", workers=0, batch=16,
                project=str(tmp_path), name="cls", plots=False, verbose=False)
    run = tmp_path / "cls"
    assert (run / "weights" / "last.pt").is_file()
    assert model.model.names == {0: "0", 1: "1"}
    # every link was followed: the training set holds one sample per train link, with its folder's class
    links = sorted((out / "fold0" / "train").rglob("*.png"))
    samples = model.trainer.train_loader.dataset.samples
    assert len(samples) == len(links)
    assert sorted((Path(s[0]).name, int(s[1])) for s in samples) == sorted((p.name, int(p.parent.name))
                                                                        for p in links)


def test_a_narrower_selection_refuses_finished_studies_outside_it_unless_overwrite(root, tmp_path):
    from data_prep.errors import InputError

    seg = segmented_uids(root)
    cfg = load_config("classifier", None, SETS)
    out = prepare_classifier_dataset(root, tmp_path / "ds", config=cfg, studies=seg[:2], workers=1, progress=False)
    assert set(read_classifier_index(out)[STUDY_COL]) == set(seg[:2])
    with pytest.raises(InputError, match="not in the current selection"):
        prepare_classifier_dataset(root, out, config=cfg, studies=seg[:1], workers=1, progress=False)
    prepare_classifier_dataset(root, out, config=cfg, studies=seg[:1], workers=1, progress=False, overwrite=True)
    assert set(read_classifier_index(out)[STUDY_COL]) == {seg[0]}
    assert not (out / "images" / seg[1]).exists()                  # its crops went with its marker
    assert fold_studies(out / "fold0") == {seg[0]}


def test_box_labels_mark_only_the_crops_near_a_boxed_slice_of_a_fractured_level(root, tmp_path):
    """crops.label=boxes_where_known on the segmented studies: a 1 lies within box_near_slices of a truth box on
    that level (whose slices are cropped too); other crops of a fractured level are 0; unboxed studies keep the
    study label."""
    cfg = load_config("classifier", None, [f"render.imgsz={IMGSZ}", "crops.slices_per_level=3",
                                           "crops.label=boxes_where_known", "crops.box_near_slices=1"])
    out = prepare_classifier_dataset(root, tmp_path / "ds", config=cfg, workers=1, progress=False)
    index = read_classifier_index(out)
    train = pd.read_csv(root / "train.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    truth = pd.read_csv(root / "train_bounding_boxes.csv", dtype={STUDY_COL: str})
    from data_prep.dicom.geometry import scan_study

    boxed_any = False
    for uid, rows in index.groupby(STUDY_COL):
        numbers = {int(n): i for i, n in enumerate(scan_study(root / "train_images" / uid).instance_numbers)}
        boxed = {numbers[int(n)] for n in truth.loc[truth[STUDY_COL] == uid, "slice_number"]}
        if not boxed:
            assert set(rows["label_source"]) == {"study"}
            assert (rows["label"] == rows["level"].map(train.loc[uid])).all()
            continue
        assert set(rows["label_source"]) == {"boxes"}
        for r in rows.itertuples(index=False):
            near = min(abs(r.slice_index - b) for b in boxed) <= 1
            if r.label == 1:
                assert train.loc[uid, r.level] == 1 and near
            elif train.loc[uid, r.level] == 0:
                assert r.label == 0
        positive = rows[rows["label"] == 1]
        boxed_any |= len(positive) > 0
        # the boxed slices of a fractured level are cropped besides the evenly spaced ones
        assert set(positive["slice_index"]) <= boxed | {b + d for b in boxed for d in (-1, 1)}
    assert boxed_any, "no boxed fractured level among the segmented studies: the test saw nothing"


def test_boxed_level_slices_and_crop_labels_by_hand():
    from detector.vertebra_crops import boxed_level_slices, crop_labels

    levels = pd.DataFrame({"slice_index": [4, 4, 5, 9], "level": ["C2", "C3", "C3", "C3"],
                           "x": [0, 50, 50, 50], "y": [0, 0, 0, 0], "width": [40, 40, 40, 40],
                           "height": [40, 40, 40, 40]})
    fracture = pd.DataFrame({"slice_index": [4, 9], "x": [55, 10], "y": [5, 5], "width": [5, 5], "height": [5, 5]})
    boxed = boxed_level_slices(levels, fracture)
    assert boxed == {"C3": {4}}                  # slice 4: on C3's box, not C2's; slice 9: off C3's box
    plan = pd.DataFrame({"level": ["C2", "C3", "C3", "C3"], "slice_index": [4, 4, 5, 9]})
    labels, source = crop_labels(plan, {lv: int(lv in ("C2", "C3")) for lv in LEVELS}, boxed, near_slices=1)
    assert labels.tolist() == [0, 1, 1, 0] and set(source) == {"boxes"}
    weak, source = crop_labels(plan, {lv: int(lv in ("C2", "C3")) for lv in LEVELS}, None, near_slices=1)
    assert weak.tolist() == [1, 1, 1, 1] and set(source) == {"study"}
