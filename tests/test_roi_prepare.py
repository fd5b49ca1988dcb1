"""prepare-detector with the spine ROI on tiny hand-made studies: every image is a crop resized to render.imgsz,
every label maps back through its index row's roi_* columns to the original box (clipped to the crop), boxes the
crop cuts or loses are counted per slice and in the sidecar, jitter stays bounded and seeded, and a locator
centres the crops exactly as detect's study_rois does. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from data_prep.dicom.writer import write_series
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.locate import Locator, study_rois
from detector.render import yolo_to_xywh
from detector.roi import ROI_COLUMNS, SpineRois, jitter_rois
from detector.yolo_dataset import LABEL_DECIMALS, LocateSpec, prepare_detector_dataset, read_index

# Two pixel spacings: rows 0.25 mm, columns 0.5 mm. The 32 mm ROI is 32 / 0.5 = 64 columns wide and
# 32 / 0.25 = 128 rows high, inside a 192 x 96 image; resized to 32 px it shrinks 2x in x and 4x in y.
ROW_MM, COL_MM = 0.25, 0.5
SIZE_MM = 32.0
ROI_W, ROI_H = 64, 128
IMGSZ = 32
ROWS, COLS = 192, 96
N = 24
THICKNESS = 1.0
AIR, BODY, BLOB = -1000.0, 0.0, 1300.0
MIN_BOX_PX = 1.0                                  # configs/detector.yaml prepare.min_box_px
# Label values are written with LABEL_DECIMALS decimals, each off by at most e = 0.5e-6 of the crop's side S, so
# x = cx * S - w * S / 2 is off by at most 1.5 e S px (and w by e S).
ROUNDING = 0.5 * 10.0 ** -LABEL_DECIMALS


def label_tol(side: float) -> float:
    return 1.5 * ROUNDING * side + 1e-9

# body rows 40..152, cols 20..76: centroid (48, 96) -> ROI corner (48 - 32, 96 - 64) = (16, 32): x 16..80, y 32..160
CENTRE_BODY = (slice(40, 153), slice(20, 77))
CENTRE_ROI = (16, 32)
# body rows 0..56, cols 0..40: centroid (20, 28) -> (-12, -36), shifted inside the image to (0, 0)
CORNER_BODY = (slice(0, 57), slice(0, 41))
CORNER_ROI = (0, 0)

# Boxes sit on slices 7, 9, 10, 11 only: the body outline is measured on slices 0, 4, 8, ... (roi.every_k 4), so a
# fracture blob touching the body never moves the measured centre. uid -> (order, body, [(slice_number, x, y, w, h)])
SPEC = {
    # head first: slice_number = index + 1. Every box inside the crop x 16..80, y 32..160.
    "2.1": ("head_first", CENTRE_BODY, [
        (10, 30.0, 50.0, 20.0, 40.0),             # in the crop (14, 18, 20, 40)
        (11, 30.0, 40.0, 10.0, 20.0),             # (14, 8, 10, 20)
        (11, 40.5, 100.25, 15.0, 30.0),           # fractional, like the Kaggle boxes: (24.5, 68.25, 15, 30)
    ]),
    # feet first: slice_number = N - index
    "2.2": ("feet_first", CENTRE_BODY, [
        (17, 0.0, 0.0, 10.0, 10.0),               # index 7: wholly outside (x < 16): lost, the slice keeps no box
        (15, 6.0, 60.0, 20.0, 20.0),              # index 9: crosses the left edge: x 16..26 kept -> (0, 28, 10, 20)
        (14, 82.0, 170.0, 10.0, 10.0),            # index 10: wholly outside (x > 80, y > 160): lost
        (14, 30.0, 100.0, 10.0, 20.0),            # index 10: inside -> (14, 68, 10, 20)
        (13, 40.0, 150.0, 10.0, 20.0),            # index 11: crosses the bottom edge: y 150..160 -> (24, 118, 10, 10)
        (13, 79.5, 60.0, 10.0, 10.0),             # index 11: 0.5 px left inside the crop < min_box_px: lost
    ]),
    "2.3": ("head_first", CENTRE_BODY, []),      # negative studies (patient_overall = 0)
    "2.4": ("feet_first", CORNER_BODY, []),
}
HAND_ROI = {"2.1": CENTRE_ROI, "2.2": CENTRE_ROI, "2.3": CENTRE_ROI, "2.4": CORNER_ROI}
# per (uid, slice_number): boxes kept in the label (crop px), n_cut, n_lost
HAND_SLICES = {
    ("2.1", 10): ([(14, 18, 20, 40)], 0, 0),
    ("2.1", 11): ([(14, 8, 10, 20), (24.5, 68.25, 15, 30)], 0, 0),
    ("2.2", 17): ([], 1, 1),
    ("2.2", 15): ([(0, 28, 10, 20)], 1, 0),
    ("2.2", 14): ([(14, 68, 10, 20)], 1, 1),
    ("2.2", 13): ([(24, 118, 10, 10)], 2, 1),
}


def write_root(tmp_path, spec=SPEC, shape=(ROWS, COLS)):
    """The Kaggle layout: one series per study (air, a body rectangle, a bright blob inside each box), the tables."""
    root = tmp_path / "data"
    train_rows, box_rows = [], []
    for uid, (order, body, boxes) in spec.items():
        hu = np.full((N, *shape), AIR, dtype=np.float32)
        hu[:, body[0], body[1]] = BODY
        for number, x, y, w, h in boxes:
            k = number - 1 if order == "head_first" else N - number
            hu[k, int(y) + 1:int(y + h) - 1, int(x) + 1:int(x + w) - 1] = BLOB
        write_series(root / "train_images" / uid, hu, study_uid=uid, pixel_spacing=(ROW_MM, COL_MM),
                     slice_thickness=THICKNESS, instance_order=order)
        fractured = int(bool(boxes))
        train_rows.append({STUDY_COL: uid, "patient_overall": fractured,
                           **{lv: int(fractured and lv == "C2") for lv in LEVELS}})
        box_rows += [{STUDY_COL: uid, "x": x, "y": y, "width": w, "height": h, "slice_number": number}
                     for number, x, y, w, h in boxes]
    pd.DataFrame(train_rows).to_csv(root / "train.csv", index=False)
    pd.DataFrame(box_rows, columns=[STUDY_COL, "x", "y", "width", "height", "slice_number"]).to_csv(
        root / "train_bounding_boxes.csv", index=False)
    return root


def roi_config(*sets):
    base = ["roi.enabled=true", f"roi.size_mm={SIZE_MM}", "roi.jitter_mm=0", "roi.fallback=body", "roi.every_k=4",
            f"render.imgsz={IMGSZ}", "render.neighbour_mm=1.0", "prepare.n_folds=2", "prepare.val_fold=0",
            "prepare.margin_slices=4", "prepare.background_ratio=2.0", f"prepare.min_box_px={MIN_BOX_PX}"]
    return load_config("detector", None, [*base, *sets])


def label_boxes(out, row):
    """The label file of an index row, mapped back to original px through the row's roi_* columns."""
    label = out / row.image.replace("images/", "labels/").replace(".png", ".txt")
    text = label.read_text()
    values = np.loadtxt(label, ndmin=2) if text else np.zeros((0, 5))
    assert (values[:, 0] == 0).all()
    in_crop = yolo_to_xywh(values[:, 1:], (row.roi_height, row.roi_width))   # normalised to the crop, not the image
    return in_crop, in_crop + np.array([row.roi_x, row.roi_y, 0.0, 0.0])


def expected_in_crop(boxes, crop, shape=(ROWS, COLS)):
    """Clip original boxes to the image, then to the crop, by hand.

    Returns (kept boxes in original px, the kept boxes the crop did not cut, n_cut, n_lost)."""
    x0, y0, w, h = crop
    kept, whole, n_cut, n_lost = [], [], 0, 0
    for bx, by, bw, bh in boxes:
        x1, y1 = max(bx, 0.0), max(by, 0.0)
        x2, y2 = min(bx + bw, shape[1]), min(by + bh, shape[0])
        cut = not (x1 >= x0 and y1 >= y0 and x2 <= x0 + w and y2 <= y0 + h)
        n_cut += cut
        x1, y1, x2, y2 = max(x1, x0), max(y1, y0), min(x2, x0 + w), min(y2, y0 + h)
        if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
            n_lost += 1
            continue
        kept.append((x1, y1, x2 - x1, y2 - y1))
        if not cut:
            whole.append(kept[-1])
    return (np.array(kept, dtype=float).reshape(-1, 4), np.array(whole, dtype=float).reshape(-1, 4), n_cut,
            n_lost)


def by_rows(a):
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    return a[np.lexsort(a.T[::-1])]


def check_every_label(root, out, index, shape=(ROWS, COLS)):
    """Every image is imgsz x imgsz; every boxed slice's label maps back to its CSV boxes clipped to its crop."""
    truth = pd.read_csv(root / "train_bounding_boxes.csv", dtype={STUDY_COL: str})
    for row in index.itertuples(index=False):
        image = cv2.imread(str(out / row.image), cv2.IMREAD_UNCHANGED)
        assert image.shape == (IMGSZ, IMGSZ, 3), row.image
        assert row.scale_x == pytest.approx(IMGSZ / row.roi_width)
        assert row.scale_y == pytest.approx(IMGSZ / row.roi_height)
        _, back = label_boxes(out, row)
        csv = truth[(truth[STUDY_COL] == row.StudyInstanceUID) & (truth["slice_number"] == row.slice_number)]
        want, whole, n_cut, n_lost = expected_in_crop(csv[["x", "y", "width", "height"]].to_numpy(float),
                                                      (row.roi_x, row.roi_y, row.roi_width, row.roi_height), shape)
        np.testing.assert_allclose(by_rows(back), by_rows(want), atol=label_tol(max(row.roi_width, row.roi_height)),
                                   rtol=0)
        assert (row.n_boxes, row.n_cut, row.n_lost) == (len(want), n_cut, n_lost), row.image
        # the crop image shows each uncut box's blob at the box centre (original -> crop px -> / (2, 4) image px)
        for cx, cy in whole[:, :2] + whole[:, 2:] / 2 - np.array([row.roi_x, row.roi_y]):
            assert image[int(cy * IMGSZ / row.roi_height), int(cx * IMGSZ / row.roi_width), 1] == 255, row.image


def assert_index_matches_study_rois(root, index, config, locator=None):
    """The index's roi_* of every slice are the ROI detect would use (study_rois: the same source as inference)."""
    for uid, group in index.groupby(STUDY_COL):
        rois = study_rois(root / "train_images" / uid, config=config, locator=locator).table()
        want = rois.iloc[group["slice_index"].to_numpy()].reset_index(drop=True)
        pd.testing.assert_frame_equal(group[list(ROI_COLUMNS)].reset_index(drop=True), want, check_dtype=False)


# ---------------------------------------------------------------- no jitter, body fallback: exact crops and labels
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roi_prepare")
    root = write_root(tmp)
    config = roi_config()
    prepare_detector_dataset(root, tmp / "ds", config=config, workers=1, progress=False)
    return root, tmp / "ds", config


def test_crops_are_the_study_rois_and_labels_map_back_exactly(prepared):
    root, out, config = prepared
    index = read_index(out)
    assert set(index[STUDY_COL]) == set(SPEC)
    for col in ROI_COLUMNS[:4] + ("n_cut", "n_lost"):
        assert pd.api.types.is_integer_dtype(index[col]), col
    # the hand-derived crops: 64 x 128 original px from the body centre, the same on every slice
    for uid, (x, y) in HAND_ROI.items():
        s = index[index[STUDY_COL] == uid]
        assert s[list(ROI_COLUMNS)].drop_duplicates().to_numpy().tolist() == [[x, y, ROI_W, ROI_H, "body"]], uid
    assert_index_matches_study_rois(root, index, config)
    check_every_label(root, out, index)
    boxed = index[index["kind"] == "boxed"]
    assert {(r.StudyInstanceUID, r.slice_number) for r in boxed.itertuples()} == set(HAND_SLICES)
    for (uid, number), (boxes, n_cut, n_lost) in HAND_SLICES.items():
        row = next(boxed[(boxed[STUDY_COL] == uid) & (boxed["slice_number"] == number)].itertuples(index=False))
        in_crop, _ = label_boxes(out, row)
        np.testing.assert_allclose(by_rows(in_crop), by_rows(boxes), atol=label_tol(ROI_H), rtol=0)
        assert (row.n_boxes, row.n_cut, row.n_lost) == (len(boxes), n_cut, n_lost), (uid, number)


def test_label_values_are_normalised_to_the_crop(prepared):
    _, out, _ = prepared
    index = read_index(out)
    row = index[(index[STUDY_COL] == "2.1") & (index["slice_number"] == 10)].iloc[0]
    label = out / row["image"].replace("images/", "labels/").replace(".png", ".txt")
    # box (30, 50, 20, 40) in the crop at (16, 32) of 64 x 128: cx (30 + 10 - 16) / 64, cy (50 + 20 - 32) / 128
    assert label.read_text() == "0 0.375000 0.296875 0.312500 0.312500\n"


def test_cut_and_lost_boxes_are_counted_and_the_slice_is_kept(prepared):
    _, out, _ = prepared
    index = read_index(out)
    lone = index[(index[STUDY_COL] == "2.2") & (index["slice_number"] == 17)]
    # its only box lies wholly outside the crop: the image and an empty label are still written
    assert lone["kind"].tolist() == ["boxed"] and lone["n_boxes"].tolist() == [0]
    assert (out / lone["image"].iloc[0]).is_file()
    assert (out / lone["image"].iloc[0].replace("images/", "labels/").replace(".png", ".txt")).read_text() == ""
    meta = json.loads((out / "index.csv.meta.json").read_text())["counts"]
    # 9 CSV boxes, all inside the image; the crop cuts 5 of them (2.2's every box but the inner one on slice 14)
    # and 3 of those keep less than 1 px: 6 boxes reach the labels
    assert meta["boxes_before_roi"] == 9 and meta["boxes_cut_by_roi"] == 5 and meta["boxes_lost_to_roi"] == 3
    assert meta["boxes"] == 6 == int(index["n_boxes"].sum())
    assert meta["roi_cut_share"] == pytest.approx(round(5 / 9, 5))
    assert meta["roi_source_body"] == len(index) and meta["images"] == len(index)
    assert int(index["n_cut"].sum()) == 5 and int(index["n_lost"].sum()) == 3
    assert (index.loc[index["kind"] != "boxed", ["n_boxes", "n_cut", "n_lost"]] == 0).all().all()


def test_a_crop_larger_than_the_image_is_padded_and_labels_use_its_negative_corner(tmp_path):
    # a 96 x 48 image is smaller than the 128 x 64 crop: centred, corner (-(64 - 48) / 2, -(128 - 96) / 2) = (-8, -16)
    whole = (slice(0, 96), slice(0, 48))
    spec = {"3.1": ("head_first", whole, [(10, 10.0, 20.0, 16.0, 32.0)]), "3.2": ("feet_first", whole, [])}
    root = write_root(tmp_path, spec, shape=(96, 48))
    out = tmp_path / "ds"
    prepare_detector_dataset(root, out, config=roi_config("roi.jitter_mm=5"), workers=1, progress=False)
    index = read_index(out)
    # jitter never moves a padded crop
    assert index[list(ROI_COLUMNS)].drop_duplicates().to_numpy().tolist() == [[-8, -16, ROI_W, ROI_H, "body"]]
    check_every_label(root, out, index, shape=(96, 48))
    row = index[index["kind"] == "boxed"].iloc[0]
    label = out / row["image"].replace("images/", "labels/").replace(".png", ".txt")
    # box (10, 20, 16, 32): cx (10 + 8 + 8) / 64, cy (20 + 16 + 16) / 128
    assert label.read_text() == "0 0.406250 0.406250 0.250000 0.250000\n"
    image = cv2.imread(str(out / row["image"]), cv2.IMREAD_UNCHANGED)
    # 8 padded columns on each side are 4 image columns, 16 padded rows are 4 image rows: roi.pad_hu (air) -> 0;
    # the body (0 HU) inside is (0 + 500) / 1800 * 255 = 70.8 -> 71 in the bone window
    pad = np.ones((IMGSZ, IMGSZ), dtype=bool)
    pad[4:28, 4:28] = False
    assert (image[pad] == 0).all()
    inside = image[4:28, 4:28, 1]                      # body 71, the blob 255, its edges averaged in between
    assert inside.min() == 71 and inside.max() == 255


# ---------------------------------------------------------------- jitter
def test_jitter_is_bounded_inside_the_image_and_seeded(tmp_path):
    root = write_root(tmp_path)
    # 2 mm of jitter: at most 2 / 0.5 = 4 columns and 2 / 0.25 = 8 rows from the unjittered crop
    config = roi_config("roi.jitter_mm=2.0")
    prepare_detector_dataset(root, tmp_path / "a", config=config, workers=1, progress=False)
    prepare_detector_dataset(root, tmp_path / "b", config=config, workers=1, progress=False)
    index = read_index(tmp_path / "a")
    pd.testing.assert_frame_equal(index, read_index(tmp_path / "b"))           # the same seed, the same crops
    fixed = roi_config()
    dx, dy = [], []
    for uid, group in index.groupby(STUDY_COL):
        base = study_rois(root / "train_images" / uid, config=fixed, locator=None).table()
        base = base.iloc[group["slice_index"].to_numpy()].reset_index(drop=True)
        group = group.reset_index(drop=True)
        dx += (group["roi_x"] - base["roi_x"]).tolist()
        dy += (group["roi_y"] - base["roi_y"]).tolist()
        assert (group["roi_width"] == ROI_W).all() and (group["roi_height"] == ROI_H).all()
        assert (group["roi_source"] == base["roi_source"]).all()
    dx, dy = np.array(dx), np.array(dy)
    assert np.abs(dx).max() <= 4 and np.abs(dy).max() <= 8
    assert np.abs(dx).max() > 0 and np.abs(dy).max() > 0                       # it does move
    assert (index["roi_x"] >= 0).all() and (index["roi_x"] + ROI_W <= COLS).all()
    assert (index["roi_y"] >= 0).all() and (index["roi_y"] + ROI_H <= ROWS).all()
    # the corner study's crop sits at (0, 0): jitter only ever moves it inwards
    corner = index[index[STUDY_COL] == "2.4"]
    assert len(corner) and (corner["roi_x"] <= 4).all() and (corner["roi_y"] <= 8).all()
    # labels follow the jittered crop: they still map back to the CSV boxes through the index row
    check_every_label(root, tmp_path / "a", index)


def test_jitter_never_rounds_past_jitter_mm():
    """Regression: rounding the offset to whole pixels could move a crop by more than jitter_mm.

    1.8 mm is 3.6 columns (0.5 mm) and 7.2 rows (0.25 mm); rounding 3.6 gave 4 columns = 2 mm. Now at most 3 and 7.
    """
    n = 2000
    rois = SpineRois(np.full(n, 100), np.full(n, 100), np.full(n, ROI_W), np.full(n, ROI_H),
                     np.full(n, "body", dtype=object))
    moved = jitter_rois(rois, (400, 400), (ROW_MM, COL_MM), 1.8, np.random.default_rng(0))
    dx, dy = np.abs(moved.x - 100), np.abs(moved.y - 100)
    assert dx.max() == 3 and dy.max() == 7                     # reaches the bound, never past it
    assert (dx * COL_MM <= 1.8).all() and (dy * ROW_MM <= 1.8).all()
    # a whole number of pixels per jitter_mm is reached exactly: 2 mm = 4 columns, 8 rows
    moved = jitter_rois(rois, (400, 400), (ROW_MM, COL_MM), 2.0, np.random.default_rng(0))
    assert np.abs(moved.x - 100).max() == 4 and np.abs(moved.y - 100).max() == 8


# ---------------------------------------------------------------- with a (fake) locator
class C3Locator:
    """A locator that sees C3 at the same box (in its own 32 px image) on every sampled slice."""

    backend = "fake"
    box = (8.0, 10.0, 16.0, 18.0)

    def predict(self, images):
        return [np.array([[*self.box, 0.95, LEVELS.index("C3")]], dtype=np.float32) for _ in images]


def test_a_locator_centres_the_crops_as_in_detect(tmp_path, monkeypatch):
    root = write_root(tmp_path)
    fake = Locator(C3Locator(), load_config("locator", None, ["render.imgsz=32"]), load_config("levels"))
    spec = LocateSpec(tmp_path / "loc.pt", {}, {})
    asked = []
    monkeypatch.setattr("detector.yolo_dataset._locate_spec", lambda weights, *a, **k: asked.append(weights) or spec)
    seen = []
    monkeypatch.setattr("detector.yolo_dataset._worker_locator", lambda s: seen.append(s) or (fake if s else None))
    config = roi_config()
    out = tmp_path / "ds"
    prepare_detector_dataset(root, out, config=config, workers=1, progress=False, locator=tmp_path / "loc.pt")
    assert asked == [tmp_path / "loc.pt"] and seen == [spec] * len(SPEC)       # every study got the locator
    index = read_index(out)
    # the locator sees the 192 x 96 slice at 32 px (3 columns, 6 rows per px): C3's box x 8..16, y 10..18 is
    # x 24..48, y 60..108 in the slice; centre (36, 84) -> ROI corner (36 - 32, 84 - 64) = (4, 20) on every slice
    # (held above and below the located range), not the body's (16, 32)
    assert index["roi_x"].eq(4).all() and index["roi_y"].eq(20).all()
    assert set(index["roi_source"]) <= {"locator", "held"} and "locator" in set(index["roi_source"])
    assert_index_matches_study_rois(root, index, config, locator=fake)
    check_every_label(root, out, index)
    meta = json.loads((out / "index.csv.meta.json").read_text())
    assert meta["extra"]["locator"] == str(tmp_path / "loc.pt")
    assert meta["counts"].get("roi_source_locator", 0) + meta["counts"].get("roi_source_held", 0) == len(index)


def test_without_roi_the_locator_is_not_loaded(tmp_path, monkeypatch):
    root = write_root(tmp_path, {uid: SPEC[uid] for uid in ("2.1", "2.3")})
    monkeypatch.setattr("detector.yolo_dataset._locate_spec", lambda *a, **k: pytest.fail("locator loaded"))
    out = tmp_path / "ds"
    prepare_detector_dataset(root, out, config=roi_config("roi.enabled=false"), workers=1, progress=False,
                             locator=tmp_path / "loc.pt")
    index = read_index(out)
    # whole slices: the 'ROI' is the image, labels normalised to it
    assert index[list(ROI_COLUMNS)].drop_duplicates().to_numpy().tolist() == [[0, 0, COLS, ROWS, "full"]]
    check_every_label(root, out, index)


def test_a_rerun_with_other_roi_settings_refuses_the_finished_studies(tmp_path):
    """Regression: a rerun skipped finished studies whatever the settings, so turning the ROI on over a whole-slice
    dataset (or an older one without the ROI) kept whole-slice images under a config that says they are crops."""
    from data_prep.errors import InputError

    root = write_root(tmp_path, {uid: SPEC[uid] for uid in ("2.1", "2.3")})
    out = tmp_path / "ds"
    prepare_detector_dataset(root, out, config=roi_config("roi.enabled=false"), workers=1, progress=False)
    for config in (roi_config(), roi_config("roi.size_mm=40")):
        with pytest.raises(InputError, match="other settings: .*roi.*--overwrite"):
            prepare_detector_dataset(root, out, config=config, workers=1, progress=False)
    assert set(read_index(out)["roi_source"]) == {"full"}                    # untouched
    prepare_detector_dataset(root, out, config=roi_config(), workers=1, progress=False, overwrite=True)
    index = read_index(out)
    assert index[list(ROI_COLUMNS)].drop_duplicates().to_numpy().tolist() == [[*CENTRE_ROI, ROI_W, ROI_H, "body"]]
    check_every_label(root, out, index)
    # the same settings again: skipped, not refused; a marker from before the settings were recorded: refused
    prepare_detector_dataset(root, out, config=roi_config(), workers=1, progress=False)
    marker = out / ".done" / "2.1.json"
    data = json.loads(marker.read_text())
    del data["settings"], data["settings_key"]
    marker.write_text(json.dumps(data))
    with pytest.raises(InputError, match="e.g. 2.1"):
        prepare_detector_dataset(root, out, config=roi_config(), workers=1, progress=False)


def test_prepare_detector_help_shows_the_locator(capsys):
    from spinefrac.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["prepare-detector", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--locator" in text and "roi" in text.lower()
