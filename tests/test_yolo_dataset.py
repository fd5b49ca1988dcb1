"""prepare-detector / prepare-locator on tiny hand-made studies whose truth is known by construction."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from data_prep.dicom.writer import write_series
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.render import apply_window, yolo_to_xywh
from detector.yolo_dataset import make_folds, prepare_detector_dataset, prepare_locator_dataset, read_index

ROWS, COLS, N = 48, 64, 24          # non-square on purpose: x and y scales differ
IMGSZ = 32
WL, WW = 400.0, 1800.0
BLOB_HU = 1300.0


def slice_hu(k: int) -> float:
    """Background HU of canonical slice k: identifies the slice in the rendered image."""
    return -480.0 + 40.0 * k


def write_study(root, uid, *, boxes=(), order="head_first", n=N):
    """A study whose slice k is uniform slice_hu(k), with a bright blob inside each (slice_number, box)."""
    hu = np.stack([np.full((ROWS, COLS), slice_hu(k), dtype=np.float32) for k in range(n)])
    number_to_index = {(k + 1 if order == "head_first" else n - k): k for k in range(n)}
    for number, x, y, w, h in boxes:
        k = number_to_index.get(number)
        if k is not None:
            hu[k, int(y) + 1:int(y + h) - 1, int(x) + 1:int(x + w) - 1] = BLOB_HU
    write_series(root / "train_images" / uid, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=1.0,
                 instance_order=order)
    return number_to_index


def make_root(tmp_path, spec):
    """spec: uid -> dict(patient_overall, levels, boxes=[(slice_number, x, y, w, h)], order)."""
    root = tmp_path / "data"
    train_rows, box_rows, maps = [], [], {}
    for uid, s in spec.items():
        maps[uid] = write_study(root, uid, boxes=s.get("boxes", ()), order=s.get("order", "head_first"))
        train_rows.append({STUDY_COL: uid, "patient_overall": s["patient_overall"],
                           **{lv: int(lv in s.get("levels", ())) for lv in LEVELS}})
        for number, x, y, w, h in s.get("csv_boxes", s.get("boxes", ())):
            box_rows.append({STUDY_COL: uid, "x": x, "y": y, "width": w, "height": h, "slice_number": number})
    pd.DataFrame(train_rows).to_csv(root / "train.csv", index=False)
    pd.DataFrame(box_rows, columns=[STUDY_COL, "x", "y", "width", "height", "slice_number"]).to_csv(
        root / "train_bounding_boxes.csv", index=False)
    return root, maps


def cfg(*sets):
    base = ["roi.enabled=false",      # whole slices here; the ROI crop has its own tests (tests/test_roi*.py)
            f"render.imgsz={IMGSZ}", "render.neighbour_mm=1.0", "prepare.n_folds=2", "prepare.val_fold=0"]
    return load_config("detector", None, [*base, *sets])


def run_boxes(numbers):
    """(slice_number, x, y, w, h) boxes: one 20x14 px box at a fixed place on each listed slice."""
    return [(m, 20.5, 10.25, 20.0, 14.0) for m in numbers]


BASE_SPEC = {
    "1.2.3.1": {"patient_overall": 1, "levels": ["C2"], "boxes": run_boxes([10, 11, 12])},
    "1.2.3.2": {"patient_overall": 1, "levels": ["C5"], "boxes": run_boxes([5, 6]), "order": "feet_first"},
    "1.2.3.3": {"patient_overall": 0},
    "1.2.3.4": {"patient_overall": 0},
    "1.2.3.5": {"patient_overall": 1, "levels": ["C7"]},          # fractured, no boxes: must be left out
}


@pytest.fixture
def prepared(tmp_path):
    root, maps = make_root(tmp_path, BASE_SPEC)
    out = tmp_path / "ds"
    config = cfg("prepare.margin_slices=4", "prepare.background_ratio=2.0", "prepare.negative_share=0.5")
    data_yaml = prepare_detector_dataset(root, out, config=config, workers=1, progress=False)
    return root, maps, out, data_yaml, config


def test_label_round_trip_and_slice_mapping(prepared):
    root, maps, out, _, _ = prepared
    index = read_index(out)
    boxes = pd.read_csv(root / "train_bounding_boxes.csv", dtype={STUDY_COL: str})
    assert len(boxes) == 5
    for r in boxes.itertuples(index=False):
        row = index[(index[STUDY_COL] == r.StudyInstanceUID) & (index["slice_number"] == r.slice_number)]
        assert len(row) == 1 and row["kind"].iloc[0] == "boxed"
        k = maps[r.StudyInstanceUID][r.slice_number]
        assert row["slice_index"].iloc[0] == k               # InstanceNumber -> canonical slice via the reader
        label = out / "labels" / row["split"].iloc[0] / f"{r.StudyInstanceUID}_{r.slice_number}.txt"
        values = np.loadtxt(label, ndmin=2)
        assert values.shape == (1, 5) and values[0, 0] == 0
        back = yolo_to_xywh(values[:, 1:], (ROWS, COLS))[0]
        np.testing.assert_allclose(back, [r.x, r.y, r.width, r.height], atol=1e-3)
        assert row["scale_x"].iloc[0] == pytest.approx(IMGSZ / COLS)
        assert row["scale_y"].iloc[0] == pytest.approx(IMGSZ / ROWS)
        # the image is the right slice: centre channel = slice k in the bone window, blob inside the box
        import cv2

        img = cv2.imread(str(out / row["image"].iloc[0]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (IMGSZ, IMGSZ, 3)
        assert img[1, 1, 1] == apply_window(np.array([slice_hu(k)]), WL, WW)[0]
        cx, cy = (r.x + r.width / 2) * IMGSZ / COLS, (r.y + r.height / 2) * IMGSZ / ROWS
        assert img[int(cy), int(cx), 1] == 255


def test_background_rules(prepared):
    root, maps, out, _, config = prepared
    index = read_index(out)
    margin = config.prepare.margin_slices
    assert "1.2.3.5" not in set(index[STUDY_COL])            # fractured without boxes: neither boxes nor background
    negatives = index[index["kind"] == "negative"]
    assert set(negatives[STUDY_COL]) <= {"1.2.3.3", "1.2.3.4"}
    far = index[index["kind"] == "far"]
    assert len(far) > 0 and set(far[STUDY_COL]) <= {"1.2.3.1", "1.2.3.2"}
    for uid, group in far.groupby(STUDY_COL):
        boxed = index[(index[STUDY_COL] == uid) & (index["kind"] == "boxed")]["slice_index"].to_numpy()
        for k in group["slice_index"]:
            assert np.abs(boxed - k).min() > margin, f"{uid} slice {k} within {margin} of a boxed run"
    # 5 boxed slices, ratio 2 -> 10 background slices, half from negative studies
    assert len(negatives) == 5
    # every background label file exists and is empty
    for r in index[index["n_boxes"] == 0].itertuples(index=False):
        label = out / r.image.replace("images/", "labels/").replace(".png", ".txt")
        assert label.read_text() == ""


def test_matched_negatives_lie_where_boxes_lie(tmp_path):
    """Matched sampling (no smoothing, no uniform floor) draws negatives only at the boxed slices' heights."""
    root, maps = make_root(tmp_path, BASE_SPEC)
    out = tmp_path / "ds"
    config = cfg("prepare.background_ratio=2.0", "prepare.negative_share=0.5", f"prepare.matched_bins={N}",
                 "prepare.matched_smooth_bins=0", "prepare.matched_floor=0.0", "prepare.negative_sampling=matched")
    prepare_detector_dataset(root, out, config=config, workers=1, progress=False)
    index = read_index(out)
    boxed_heights = set(index[index["kind"] == "boxed"]["slice_index"])
    assert boxed_heights == {9, 10, 11, 18, 19}     # slice_numbers 10-12 head-first, 5-6 feet-first of 24
    negatives = index[index["kind"] == "negative"]
    assert len(negatives) == 5 and set(negatives["slice_index"]) <= boxed_heights


def test_boxed_every_keeps_every_kth_boxed_slice_and_scales_background(tmp_path):
    root, _ = make_root(tmp_path, BASE_SPEC)
    out = tmp_path / "ds"
    config = cfg("prepare.boxed_every=2", "prepare.background_ratio=2.0", "prepare.negative_share=0.5",
                 "prepare.margin_slices=4")
    prepare_detector_dataset(root, out, config=config, workers=1, progress=False)
    index = read_index(out)
    boxed = index[index["kind"] == "boxed"].groupby(STUDY_COL)["slice_index"].apply(sorted).to_dict()
    assert boxed == {"1.2.3.1": [9, 11], "1.2.3.2": [18]}    # every 2nd of 9-11 and of 18-19, from the top
    # 3 boxed slices kept, ratio 2 -> 6 background slices: 3 from negatives, 2 + 1 far from the runs
    assert (index["kind"] == "negative").sum() == 3
    assert index[index["kind"] == "far"].groupby(STUDY_COL).size().to_dict() == {"1.2.3.1": 2, "1.2.3.2": 1}
    skipped = index[(index[STUDY_COL] == "1.2.3.1") & (index["slice_index"] == 10)]
    assert skipped.empty                                     # a skipped boxed slice is never background either


def test_matched_weights():
    """Weights follow the histogram by relative height, keep the uniform floor, and sum to one."""
    from detector.yolo_dataset import matched_weights

    density = [0.0, 0.0, 4.0, 0.0]                  # all boxes in the third quarter of the scan
    w = matched_weights(8, density, smooth_bins=0, floor=0.2)
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w[[4, 5]], 0.8 / 2 + 0.2 / 8)
    np.testing.assert_allclose(np.delete(w, [4, 5]), 0.2 / 8)
    smooth = matched_weights(8, density, smooth_bins=1, floor=0.0)
    assert smooth[[0, 1]].sum() == 0 and smooth[2:].min() > 0   # smoothing spreads one quarter either side


def test_folds_by_study_and_data_yaml(prepared):
    _, _, out, data_yaml, _ = prepared
    index = read_index(out)
    splits = json.loads((out / "splits.json").read_text())
    assert splits["n_folds"] == 2
    assert set(splits["folds"]) == {"1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"}
    for uid, group in index.groupby(STUDY_COL):
        assert group["split"].nunique() == 1 and group["fold"].nunique() == 1
        assert (group["split"].iloc[0] == "val") == (splits["folds"][uid] == 0)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == {0: "fracture"} and data["spinefrac"]["imgsz"] == IMGSZ
    assert data["spinefrac"]["recipe"] == "2.5d"
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert on_disk == set(index["image"])
    assert (out / "index.csv.meta.json").is_file()


def test_rerun_skips_finished_studies_and_overwrite_redoes(prepared, caplog):
    root, _, out, _, config = prepared
    index = read_index(out)
    some = out / index["image"].iloc[0]
    mtime = some.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="detector"):
        prepare_detector_dataset(root, out, config=config, workers=1, progress=False)
    assert "(boxed): 2 of 2 studies already finished" in caplog.text
    assert "(negatives): 2 of 2 studies already finished" in caplog.text
    assert some.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(read_index(out), index)
    prepare_detector_dataset(root, out, config=config, workers=1, progress=False, overwrite=True)
    assert some.stat().st_mtime_ns != mtime
    pd.testing.assert_frame_equal(read_index(out), index)   # same seed: the same slices again


def test_bad_slice_number_warns_and_clipping(tmp_path, caplog):
    spec = {"9.1": {"patient_overall": 1, "levels": ["C1"],
                    "boxes": [(3, 50.0, 40.0, 30.0, 20.0)],                  # runs past the right/bottom edges
                    "csv_boxes": [(3, 50.0, 40.0, 30.0, 20.0), (99, 1.0, 1.0, 5.0, 5.0)]},
            "9.2": {"patient_overall": 0}}
    root, _ = make_root(tmp_path, spec)
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        prepare_detector_dataset(root, tmp_path / "ds", config=cfg(), workers=1, progress=False)
    assert "9.1" in caplog.text and "slice_number 99" in caplog.text
    index = read_index(tmp_path / "ds")
    row = index[(index[STUDY_COL] == "9.1") & (index["kind"] == "boxed")]
    assert row["slice_number"].tolist() == [3]
    label = tmp_path / "ds" / row["image"].iloc[0].replace("images/", "labels/").replace(".png", ".txt")
    back = yolo_to_xywh(np.loadtxt(label, ndmin=2)[:, 1:], (ROWS, COLS))[0]
    np.testing.assert_allclose(back, [50.0, 40.0, COLS - 50.0, ROWS - 40.0], atol=1e-3)   # clipped


def test_studies_parameter_restricts_and_stale_studies_are_refused(tmp_path):
    root, _ = make_root(tmp_path, BASE_SPEC)
    out = tmp_path / "ds"
    prepare_detector_dataset(root, out, config=cfg(), studies=["1.2.3.1", "1.2.3.3", "1.2.3.4"], workers=2,
                             progress=False)
    assert set(read_index(out)[STUDY_COL]) <= {"1.2.3.1", "1.2.3.3", "1.2.3.4"}
    from data_prep.errors import InputError

    with pytest.raises(InputError, match="not in the current selection|not in it"):
        prepare_detector_dataset(root, out, config=cfg(), studies=["1.2.3.2", "1.2.3.3", "1.2.3.4"], workers=1,
                                 progress=False)


def test_folds_are_stratified_and_disjoint():
    strata = {f"s{i}": ("negative" if i % 2 else f"C{1 + i % 3}") for i in range(40)}
    folds = make_folds(strata, n_folds=4, seed=0)
    assert set(folds) == set(strata) and set(folds.values()) == {0, 1, 2, 3}
    for label in set(strata.values()):
        members = [u for u, s in strata.items() if s == label]
        counts = np.bincount([folds[u] for u in members], minlength=4)
        assert counts.max() - counts.min() <= 1, label


def test_locator_dataset_from_segmentation(tmp_path):
    import nibabel as nib

    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.segmentation import LPS_TO_RAS

    root, _ = make_root(tmp_path, {"7.1": {"patient_overall": 0}, "7.2": {"patient_overall": 0, "order": "feet_first"},
                                   "7.3": {"patient_overall": 0}})     # 7.3 has no segmentation
    mask = np.zeros((N, ROWS, COLS), dtype=np.uint8)
    mask[0:10, 5:25, 10:40] = 1       # C1 on slices 0-9
    mask[8:20, 20:40, 12:44] = 2      # C2 on slices 8-19 (overlaps C1 on 8, 9)
    (root / "segmentations").mkdir()
    for uid in ("7.1", "7.2"):
        geometry = scan_study(root / "train_images" / uid)
        nib.save(nib.Nifti1Image(mask, LPS_TO_RAS @ geometry.affine()), root / "segmentations" / f"{uid}.nii")
    config = load_config("locator", None, [f"render.imgsz={IMGSZ}", "prepare.every_k=4", "prepare.n_folds=2",
                                           "prepare.min_area_px=1", "prepare.keep_empty=true"])
    prepare_locator_dataset(root, tmp_path / "loc", config=config, workers=1, progress=False)
    index = read_index(tmp_path / "loc")
    assert sorted(set(index[STUDY_COL])) == ["7.1", "7.2"]
    assert index["split"].nunique() == 2
    index = index[index[STUDY_COL] == "7.2"]
    assert index["slice_index"].tolist() == [0, 4, 8, 12, 16, 20]
    assert index["slice_number"].tolist() == [N - k for k in (0, 4, 8, 12, 16, 20)]
    assert index["kind"].tolist() == ["levels"] * 5 + ["empty"]
    for r in index.itertuples(index=False):
        label = tmp_path / "loc" / r.image.replace("images/", "labels/").replace(".png", ".txt")
        values = np.loadtxt(label, ndmin=2) if label.read_text() else np.zeros((0, 5))
        boxes = yolo_to_xywh(values[:, 1:], (ROWS, COLS))
        got = {int(c): tuple(np.round(b, 3)) for c, b in zip(values[:, 0], boxes, strict=True)}
        want = {}
        if r.slice_index < 10:
            want[0] = (10.0, 5.0, 30.0, 20.0)
        if 8 <= r.slice_index < 20:
            want[1] = (12.0, 20.0, 32.0, 20.0)
        assert got == want, r.slice_index


def test_round_trip_on_synthetic_studies(tmp_path):
    """On `spinefrac synth` studies: every CSV box comes back from its YOLO label within 1e-3 px."""
    from data_prep.synthetic.synth import synthesize

    root = tmp_path / "synth"
    synthesize(root, n_studies=6, seed=3, split="train",
               config=load_config("synth", None, ["image.size=128", "volume.slices=48"]), progress=False)
    out = tmp_path / "ds"
    prepare_detector_dataset(root, out, config=cfg("prepare.margin_slices=3"), workers=1, progress=False)
    index = read_index(out)
    boxes = pd.read_csv(root / "train_bounding_boxes.csv", dtype={STUDY_COL: str})
    assert len(boxes) > 0
    for (uid, number), group in boxes.groupby([STUDY_COL, "slice_number"]):
        row = index[(index[STUDY_COL] == uid) & (index["slice_number"] == number)]
        assert len(row) == 1 and row["kind"].iloc[0] == "boxed"
        label = out / row["image"].iloc[0].replace("images/", "labels/").replace(".png", ".txt")
        back = yolo_to_xywh(np.loadtxt(label, ndmin=2)[:, 1:], (128, 128))
        want = group[["x", "y", "width", "height"]].to_numpy(float)
        np.testing.assert_allclose(back[np.lexsort(back.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-3)


def write_cracked_negative(root, uid, cracked):
    """A negative study: a bone block (cortex HU) on every slice, broken across by a 1-pixel lucent line on `cracked`."""
    hu = np.stack([np.full((ROWS, COLS), 45.0, dtype=np.float32) for _ in range(N)])
    hu[:, 12:36, 10:54] = 1200.0
    for k in cracked:
        hu[k, 12:36, 30 + k % 5] = 45.0
    write_series(root / "train_images" / uid, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=1.0)


def test_hard_candidates_keep_the_slices_that_look_cracked(tmp_path):
    # one negative study whose slices 3, 8 and 17 hold a crack-like line; 3 negative slices are wanted (5 boxed
    # slices x ratio 1.2 x share 0.5) among 8 x 3 = 24 candidates (every slice): exactly the cracked ones win
    spec = {uid: s for uid, s in BASE_SPEC.items() if uid in ("1.2.3.1", "1.2.3.2")}
    root, _ = make_root(tmp_path, spec)
    cracked = {3, 8, 17}
    write_cracked_negative(root, "1.2.3.9", cracked)
    train = pd.read_csv(root / "train.csv", dtype={STUDY_COL: str})
    train.loc[len(train)] = {STUDY_COL: "1.2.3.9", "patient_overall": 0, **dict.fromkeys(LEVELS, 0)}
    train.to_csv(root / "train.csv", index=False)
    sets = ("prepare.background_ratio=1.2", "prepare.negative_share=0.5", "prepare.negative_sampling=uniform")
    hard = tmp_path / "hard"
    prepare_detector_dataset(root, hard, config=cfg(*sets, "prepare.hard_candidates=8"), workers=1, progress=False)
    negatives = read_index(hard).query("kind == 'negative'")
    assert set(negatives["slice_index"]) == cracked
    plain = tmp_path / "plain"                              # without: a plain draw, which misses some of them
    prepare_detector_dataset(root, plain, config=cfg(*sets), workers=1, progress=False)
    drawn = set(read_index(plain).query("kind == 'negative'")["slice_index"])
    assert len(drawn) == 3 and drawn != cracked


def test_crack_score_ranks_a_crack_above_intact_bone():
    from detector.crack_filter import crack_score

    render = load_config("detector").render
    block = np.full((48, 64), 45.0, dtype=np.float32)
    block[12:36, 10:54] = 1200.0
    cracked = block.copy()
    cracked[12:36, 31] = 45.0
    assert crack_score(cracked, (0.5, 0.5), render) > 10 * max(crack_score(block, (0.5, 0.5), render), 1.0)


def test_hardest_slices_look_inside_each_slices_roi(tmp_path):
    # two bone blocks on every slice; slice 2 is cracked in the left block, slice 5 in the right one. Each slice's
    # ROI holds only the left block, so slice 2 wins; on whole slices the two tie (the lower index wins)
    from data_prep.dicom.geometry import scan_study
    from detector.roi import SpineRois
    from detector.yolo_dataset import hardest_slices

    hu = np.full((8, ROWS, COLS), 45.0, dtype=np.float32)
    hu[:, 12:36, 4:28] = 1200.0
    hu[:, 12:36, 36:60] = 1200.0
    hu[2, 12:36, 16] = 45.0
    hu[5, 12:36, 48] = 45.0
    write_series(tmp_path / "s", hu, study_uid="1.2.3.77", pixel_spacing=(0.5, 0.5), slice_thickness=1.0)
    geometry = scan_study(tmp_path / "s")
    render = load_config("detector").render
    n = 8
    left = SpineRois(np.zeros(n, int), np.zeros(n, int), np.full(n, 32), np.full(n, ROWS), np.array(["body"] * n))
    assert hardest_slices(geometry, [5, 2, 0], 1, render=render, rois=left, pad_hu=-1000.0) == [2]
    assert hardest_slices(geometry, [5, 0], 1, render=render, rois=left, pad_hu=-1000.0) == [0]   # a tie
    assert hardest_slices(geometry, [5, 2, 0], 2, render=render) == [2, 5]
