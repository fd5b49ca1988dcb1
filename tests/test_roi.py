"""Spine ROI: mm -> px geometry, clipping at the image borders, interpolation and fallbacks along z, padding,
and the exact box round trip through detect on crops (expected values worked out by hand in the comments)."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

from data_prep.dicom.writer import write_series
from data_prep.runs.config import ConfigError, load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.detect import detect_studies, detect_study
from detector.locate import Locator, study_rois
from detector.render import render_crops
from detector.roi import (
    ROI_COLUMNS,
    ROI_SOURCES,
    body_centre,
    boxes_to_crop,
    check_roi_config,
    crop_padded,
    crop_xyxy_to_original,
    jitter_rois,
    spine_rois,
    square_at,
)

# Two pixel spacings: rows 0.25 mm, columns 0.5 mm. A 32 mm square is 32 / 0.5 = 64 columns wide and
# 32 / 0.25 = 128 rows high; resized to 32 x 32 it shrinks by exactly 2 in x and 4 in y.
ROW_MM, COL_MM = 0.25, 0.5
SIZE_MM = 32.0
ROI_W, ROI_H = 64, 128
IMGSZ = 32
SX, SY = ROI_W // IMGSZ, ROI_H // IMGSZ          # 2, 4 original px per image px
ROWS, COLS = 192, 96                              # a non-square image larger than the ROI
N = 12
THICKNESS = 2.0
AIR, BODY, MARKER = -1000.0, 0.0, 1500.0
MARKED = range(3, 9)                              # canonical slices holding the bright marker
MARKER_THRESHOLD = 200                            # uint8 bone window: marker 255, body 71, air 0


def roi_section(**over):
    roi = {"enabled": True, "size_mm": SIZE_MM, "smooth_mm": 0.0, "jitter_mm": 0.0, "fallback": "body",
           "every_k": 4, "body_hu": -500.0, "pad_hu": AIR}
    roi.update(over)
    return roi


# ---------------------------------------------------------------- mm -> px, borders, padding
def test_square_at_converts_mm_per_axis_and_centres_the_square():
    x, y, w, h = square_at(np.array([48.0]), np.array([96.0]), (ROWS, COLS), (ROW_MM, COL_MM), SIZE_MM)
    assert (w[0], h[0]) == (ROI_W, ROI_H)                 # 128 rows x 64 columns, not the other way round
    assert (x[0], y[0]) == (48 - 32, 96 - 64)
    # a non-integer size in px rounds: 32 mm / 0.3 mm = 106.67 -> 107
    _, _, w, h = square_at(np.array([200.0]), np.array([200.0]), (400, 400), (0.3, 0.4), SIZE_MM)
    assert (w[0], h[0]) == (80, 107)


def test_square_near_each_border_is_shifted_inside_keeping_its_size():
    cx = np.array([5.0, 90.0, 48.0, 48.0])            # left, right, centre, centre
    cy = np.array([96.0, 96.0, 10.0, 185.0])          # centre, centre, top, bottom
    x, y, w, h = square_at(cx, cy, (ROWS, COLS), (ROW_MM, COL_MM), SIZE_MM)
    # left: 5 - 32 < 0 -> 0; right: 90 - 32 = 58 > 96 - 64 = 32 -> 32; top: 10 - 64 < 0 -> 0;
    # bottom: 185 - 64 = 121 > 192 - 128 = 64 -> 64
    assert x.tolist() == [0, 32, 16, 16]
    assert y.tolist() == [32, 32, 0, 64]
    assert w.tolist() == [ROI_W] * 4 and h.tolist() == [ROI_H] * 4
    assert ((x >= 0) & (x + w <= COLS) & (y >= 0) & (y + h <= ROWS)).all()


def test_square_larger_than_the_image_is_centred_with_a_negative_corner():
    # 51 columns < 64: 13 px of padding, 6 on the left; 101 rows < 128: 27 px, 13 above. The centre is ignored.
    x, y, w, h = square_at(np.array([0.0, 50.0]), np.array([0.0, 100.0]), (101, 51), (ROW_MM, COL_MM), SIZE_MM)
    assert x.tolist() == [-6, -6] and y.tolist() == [-13, -13]
    assert w.tolist() == [ROI_W, ROI_W] and h.tolist() == [ROI_H, ROI_H]
    # mixed: wide enough in x (shifted inside), too short in y (centred)
    x, y, _, _ = square_at(np.array([90.0]), np.array([0.0]), (100, 96), (ROW_MM, COL_MM), SIZE_MM)
    assert (x[0], y[0]) == (32, -14)


def test_square_at_rejects_a_zero_spacing():
    with pytest.raises(ValueError, match="pixel spacing"):
        square_at(np.array([1.0]), np.array([1.0]), (10, 10), (0.0, 0.5), SIZE_MM)


# ---------------------------------------------------------------- along z: interpolation, held, smoothing, fallbacks
SHAPE = (400, 400)
SQUARE_MM = (0.5, 0.5)                                # 32 mm -> 64 x 64 px, half side 32


def test_spine_rois_interpolates_between_located_slices_and_holds_outside():
    # located on slices 2 and 8 (given out of order): centres (100, 200) and (160, 140)
    located = (np.array([8, 2]), np.array([160.0, 100.0]), np.array([140.0, 200.0]))
    rois = spine_rois(11, SHAPE, SQUARE_MM, 1.0, roi=roi_section(), located=located)
    # halfway (slice 5): the mean centre (130, 170) -> corner (98, 138); slice 3: (110, 190) -> (78, 158)
    assert (rois.x[5], rois.y[5]) == (98, 138)
    assert (rois.x[3], rois.y[3]) == (78, 158)
    # above the first located slice: slice 2's centre held; below the last: slice 8's
    assert rois.x[:3].tolist() == [68] * 3 and rois.y[:3].tolist() == [168] * 3
    assert rois.x[8:].tolist() == [128] * 3 and rois.y[8:].tolist() == [108] * 3
    assert rois.source.tolist() == ["held"] * 2 + ["locator"] * 7 + ["held"] * 2
    assert set(rois.width) == {64} and set(rois.height) == {64}


def test_smoothing_keeps_a_constant_centre_and_works_in_mm():
    constant = (np.array([0, 5, 10]), np.full(3, 150.0), np.full(3, 120.0))
    rois = spine_rois(11, SHAPE, SQUARE_MM, 1.0, roi=roi_section(smooth_mm=10.0), located=constant)
    assert rois.x.tolist() == [118] * 11 and rois.y.tolist() == [88] * 11
    # a step 100 -> 200 between slices 4 and 5
    step = (np.arange(10), np.r_[np.full(5, 100.0), np.full(5, 200.0)], np.full(10, 120.0))
    # sigma = smooth_mm / slice spacing: 10 mm over 1000 mm slices is no smoothing at all
    sharp = spine_rois(10, SHAPE, SQUARE_MM, 1000.0, roi=roi_section(smooth_mm=10.0), located=step)
    assert sharp.x.tolist() == [68] * 5 + [168] * 5
    # over 1 mm slices (sigma 10 slices) the step is smoothed: monotone, strictly between the two sides at the step
    smooth = spine_rois(10, SHAPE, SQUARE_MM, 1.0, roi=roi_section(smooth_mm=10.0), located=step)
    assert (np.diff(smooth.x) >= 0).all() and 68 < smooth.x[4] <= smooth.x[5] < 168
    assert smooth.y.tolist() == [88] * 10


def test_body_fallback_when_nothing_is_located():
    body = (np.array([0, 4, 8]), np.array([100.0, 112.0, 124.0]), np.array([200.0, 200.0, 200.0]))
    for located in (None, (np.zeros(0, int), np.zeros(0), np.zeros(0))):
        rois = spine_rois(9, SHAPE, SQUARE_MM, 1.0, roi=roi_section(), located=located, body=body)
        assert rois.source.tolist() == ["body"] * 9
        assert rois.x.tolist() == [68 + 3 * k for k in range(9)]      # centre 100 + 3 k, minus half the side
        assert rois.y.tolist() == [168] * 9


def test_located_slices_win_over_the_body_and_over_fallback_full():
    located = (np.array([4]), np.array([200.0]), np.array([220.0]))
    body = (np.array([0, 4]), np.array([50.0, 50.0]), np.array([50.0, 50.0]))
    for fallback in ("body", "full"):
        rois = spine_rois(9, SHAPE, SQUARE_MM, 1.0, roi=roi_section(fallback=fallback), located=located, body=body)
        assert rois.x.tolist() == [168] * 9 and rois.y.tolist() == [188] * 9
        assert rois.source[4] == "locator" and set(rois.source[:4]) == set(rois.source[5:]) == {"held"}


@pytest.mark.parametrize("fallback, body", [
    ("full", (np.array([0]), np.array([50.0]), np.array([50.0]))),     # a body, but fallback "full"
    ("body", None),                                                    # fallback "body", but no body found
    ("body", (np.zeros(0, int), np.zeros(0), np.zeros(0))),
])
def test_full_slice_when_fallback_is_full_or_there_is_nothing(fallback, body):
    rois = spine_rois(3, (100, 120), SQUARE_MM, 1.0, roi=roi_section(fallback=fallback), located=None, body=body)
    assert rois.boxes().tolist() == [[0, 0, 120, 100]] * 3
    assert rois.source.tolist() == ["full"] * 3


@pytest.mark.parametrize("over, words", [
    ({"size_mm": 0.0}, "roi.size_mm"),
    ({"size_mm": -5.0}, "roi.size_mm"),
    ({"smooth_mm": -1.0}, "roi.smooth_mm"),
    ({"jitter_mm": -0.5}, "roi.jitter_mm"),
    ({"fallback": "bodyy"}, "roi.fallback"),
])
def test_check_roi_config_names_the_bad_key(over, words):
    with pytest.raises(ConfigError, match=words):
        check_roi_config(roi_section(**over))
    with pytest.raises(ConfigError, match=words):                 # spine_rois checks before any work
        spine_rois(3, SHAPE, SQUARE_MM, 1.0, roi=roi_section(**over))


def test_spine_rois_needs_a_slice():
    with pytest.raises(ValueError, match="at least one slice"):
        spine_rois(0, SHAPE, SQUARE_MM, 1.0, roi=roi_section())


def test_roi_table_round_trips():
    located = (np.array([1, 3]), np.array([100.0, 120.0]), np.array([100.0, 100.0]))
    rois = spine_rois(5, SHAPE, SQUARE_MM, 1.0, roi=roi_section(), located=located)
    table = rois.table()
    assert tuple(table.columns) == ROI_COLUMNS
    back = type(rois).from_table(table)
    np.testing.assert_array_equal(back.boxes(), rois.boxes())
    assert back.source.tolist() == rois.source.tolist()


# ---------------------------------------------------------------- body outline
def test_body_centre_is_the_centroid_of_the_largest_region_not_the_table():
    yy, xx = np.mgrid[:64, :64]
    hu = np.full((64, 64), AIR, dtype=np.float32)
    hu[(xx - 40) ** 2 + (yy - 34) ** 2 <= 15 ** 2] = 50.0     # the body: a disc centred at x 40, y 34
    hu[58:62, 4:60] = 300.0                                   # the table: brighter, separate, smaller (224 px)
    cx, cy = body_centre(hu, -500.0)
    assert cx == pytest.approx(40.0) and cy == pytest.approx(34.0)
    # the same slice upside down: the table now comes first in raster order; the disc centre is at y 63 - 34
    cx, cy = body_centre(hu[::-1], -500.0)
    assert cx == pytest.approx(40.0) and cy == pytest.approx(29.0)
    assert body_centre(np.full((8, 8), AIR, dtype=np.float32), -500.0) is None


# ---------------------------------------------------------------- crops and boxes inside them
def test_crop_padded_fills_outside_the_image_with_the_pad_value():
    hu = np.arange(20, dtype=np.int16).reshape(4, 5)          # hu[r, c] = 5 r + c
    assert crop_padded(hu, (1, 1, 3, 2), -1000).tolist() == [[6, 7, 8], [11, 12, 13]]
    # x -2..1, y -1..1: only hu[0:2, 0:2] is inside, at out[1:3, 2:4]
    out = crop_padded(hu, (-2, -1, 4, 3), -1000)
    assert out.dtype == np.int16
    assert out.tolist() == [[-1000, -1000, -1000, -1000], [-1000, -1000, 0, 1], [-1000, -1000, 5, 6]]
    # a crop larger than the image on every side holds the whole image once
    big = crop_padded(hu, (-1, -2, 7, 8), -1)
    assert big.shape == (8, 7) and (big[2:6, 1:6] == hu).all() and (big == -1).sum() == 56 - 20
    assert (crop_padded(hu, (10, 10, 2, 2), -7) == -7).all()    # wholly outside


def test_boxes_to_crop_clips_and_flags_the_boxes_the_crop_cuts():
    crop = (10, 20, 30, 40)                                    # x 10..40, y 20..60
    boxes = np.array([[15, 25, 5, 5],          # inside
                      [10, 20, 30, 40],        # exactly the crop: not cut
                      [5, 30, 10, 4],          # crosses the left edge
                      [9.5, 30, 5, 4],         # crosses it by half a pixel
                      [35, 55, 10, 10],        # crosses the right and bottom edges
                      [100, 100, 5, 5]])       # wholly outside
    inside, cut = boxes_to_crop(boxes, crop)
    np.testing.assert_array_equal(inside, [[5, 5, 5, 5], [0, 0, 30, 40], [0, 10, 5, 4], [0, 10, 4.5, 4],
                                           [25, 35, 5, 5], [30, 40, 0, 0]])
    assert cut.tolist() == [False, False, True, True, True, True]


def test_crop_xyxy_to_original_scales_each_axis_and_clips_to_the_image():
    got = crop_xyxy_to_original(np.array([[10.0, 8.0, 18.0, 16.0]]), (16, 32, ROI_W, ROI_H), IMGSZ)
    np.testing.assert_array_equal(got, [[16 + 10 * SX, 32 + 8 * SY, 8 * SX, 8 * SY]])
    # a padded crop with a negative corner: the part outside the image is clipped away
    got = crop_xyxy_to_original(np.array([[0.0, 0.0, 4.0, 4.0]]), (-7, -14, ROI_W, ROI_H), IMGSZ, (100, 50))
    np.testing.assert_array_equal(got, [[0, 0, -7 + 4 * SX, -14 + 4 * SY]])   # x2 = 1, y2 = 2


def test_jitter_moves_each_axis_by_at_most_jitter_mm_in_its_own_pixels():
    n = 400
    centre = (np.arange(n), np.full(n, 200.0), np.full(n, 200.0))
    rois = spine_rois(n, (400, 400), (ROW_MM, COL_MM), 1.0, roi=roi_section(), located=centre)
    assert set(rois.x) == {200 - 32} and set(rois.y) == {200 - 64}
    moved = jitter_rois(rois, (400, 400), (ROW_MM, COL_MM), 5.0, np.random.default_rng(0))
    dx, dy = moved.x - rois.x, moved.y - rois.y
    # 5 mm is 10 columns (0.5 mm) but 20 rows (0.25 mm)
    assert np.abs(dx).max() <= 10 and np.abs(dx).max() >= 9
    assert np.abs(dy).max() <= 20 and np.abs(dy).max() >= 18
    np.testing.assert_array_equal(moved.width, rois.width)
    np.testing.assert_array_equal(moved.height, rois.height)
    assert moved.source.tolist() == rois.source.tolist()
    # near a border the jittered crop stays inside; a crop larger than the image (padded) does not move
    edge = spine_rois(n, (400, 400), (ROW_MM, COL_MM), 1.0, roi=roi_section(), located=(centre[0], centre[1] * 0,
                                                                                          centre[2] * 0))
    shifted = jitter_rois(edge, (400, 400), (ROW_MM, COL_MM), 5.0, np.random.default_rng(1))
    assert shifted.x.min() == 0 and shifted.y.min() == 0 and shifted.x.max() > 0
    padded = spine_rois(5, (100, 50), (ROW_MM, COL_MM), 1.0, roi=roi_section(), located=centre)
    same = jitter_rois(padded, (100, 50), (ROW_MM, COL_MM), 5.0, np.random.default_rng(2))
    np.testing.assert_array_equal(same.boxes(), padded.boxes())


class _Slices:
    def __init__(self, volume):
        self.volume = volume

    def get(self, index):
        return self.volume[index]


def test_render_crops_pads_and_cuts_neighbour_channels_with_the_centre_crop():
    # three slices of constant HU -500, 400, 1300 (bone window 0, 128, 255 by hand: (hu + 500) / 1800 * 255)
    values = [-500.0, 400.0, 1300.0]
    volume = np.stack([np.full((8, 8), v, dtype=np.float32) for v in values])
    geometry = SimpleNamespace(paths=[None] * 3, z_mm=[4.0, 2.0, 0.0], shape=(8, 8), slice_thickness=2.0)
    render = {"recipe": "2.5d", "imgsz": 8, "neighbour_mm": 2.0, "window_level": 400.0, "window_width": 1800.0}
    # slice 1 with a crop half outside on the left (x -4..3), all inside in y; padding 400 HU -> 128
    images = render_crops(_Slices(volume), [1], geometry, np.array([[-4, 0, 8, 8]]), render=render, pad_hu=400.0)
    assert images.shape == (1, 8, 8, 3)
    assert (images[0, :, :4] == 128).all()                     # padding in every channel
    assert images[0, :, 4:].reshape(-1, 3).tolist() == [[0, 128, 255]] * 32   # above, itself, below
    with pytest.raises(ValueError, match="crop boxes"):
        render_crops(_Slices(volume), [0, 1], geometry, np.array([[0, 0, 8, 8]]), render=render, pad_hu=-1000.0)


# ---------------------------------------------------------------- the exact box round trip through detect
class MarkerPredictor:
    """A detector that finds the bright marker in the image it receives: threshold, then its bounding box."""

    backend = "fake"

    def __init__(self):
        self.calls = 0

    def predict(self, images):
        self.calls += 1
        assert images.dtype == np.uint8 and images.shape[1:] == (IMGSZ, IMGSZ, 3)
        out = []
        for im in images:
            ys, xs = np.nonzero(im[..., 1] > MARKER_THRESHOLD)      # the slice itself (2.5D centre channel)
            if len(xs):
                out.append(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9, 0]], dtype=np.float32))
            else:
                out.append(np.zeros((0, 6), dtype=np.float32))
        return out


def write_marker_study(folder, uid, *, shape, body, marker, order="head_first"):
    """Air, a body rectangle (rows, cols slices; or k -> them) and on MARKED slices a marker block (x, y, w, h)."""
    hu = np.full((N, *shape), AIR, dtype=np.float32)
    for k in range(N):
        rows, cols = body(k) if callable(body) else body
        hu[k, rows, cols] = BODY
    x, y, w, h = marker
    for k in MARKED:
        hu[k, y:y + h, x:x + w] = MARKER
    write_series(folder / uid, hu, study_uid=uid, pixel_spacing=(ROW_MM, COL_MM), slice_thickness=THICKNESS,
                 z_top_mm=50.0, instance_order=order)
    return folder / uid


# Every case: body rectangle, marker (x, y, w, h) in original px, and the ROI (x, y) worked out by hand.
# The marker's offsets inside the ROI are multiples of 2 in x and 4 in y, so the 2 x 4 area resize keeps it
# a sharp block of whole image pixels, and mapping its bounding box back must give the marker exactly.
CASES = {
    # body cols 20..76, rows 40..152: centroid (48, 96) -> ROI (48 - 32, 96 - 64) = (16, 32), inside the image
    "centre": dict(shape=(ROWS, COLS), body=(slice(40, 153), slice(20, 77)), marker=(36, 64, 16, 32), roi=(16, 32)),
    # body cols 59..95, rows 139..191: centroid (77, 165) -> (45, 101), shifted inside to (96 - 64, 192 - 128)
    "border": dict(shape=(ROWS, COLS), body=(slice(139, 192), slice(59, 96)), marker=(70, 148, 16, 32),
                   roi=(32, 64)),
    # body cols 0..40, rows 0..56: centroid (20, 28) -> (-12, -36), shifted inside to (0, 0)
    "corner": dict(shape=(ROWS, COLS), body=(slice(0, 57), slice(0, 41)), marker=(4, 8, 16, 32), roi=(0, 0)),
    # image 96 rows x 48 columns, smaller than the ROI: centred, corner (-(64 - 48) / 2, -(128 - 96) / 2)
    "padded": dict(shape=(96, 48), body=(slice(10, 90), slice(5, 45)), marker=(10, 20, 16, 32), roi=(-8, -16)),
}


@pytest.fixture
def roi_config():
    return load_config("detector", None, ["roi.enabled=true", f"roi.size_mm={SIZE_MM}", "roi.fallback=body",
                                          f"render.imgsz={IMGSZ}", "detect.batch=5", "overlays.display_size=64",
                                          # whole-slice overlays: the outline check below is in whole-slice pixels
                                          # (the zoom is tested in test_overlays.py)
                                          "overlays.top_n=2", "overlays.zoom=false"])


def check_marker_boxes(found, case, order):
    x, y, w, h = case["marker"]
    assert found.boxes["slice_index"].tolist() == list(MARKED)            # one box on each marked slice
    np.testing.assert_array_equal(found.boxes[["x", "y", "width", "height"]].to_numpy(),
                                  np.tile([x, y, w, h], (len(MARKED), 1)))
    numbers = [N - k if order == "feet_first" else k + 1 for k in MARKED]
    assert found.boxes["slice_number"].tolist() == numbers
    np.testing.assert_allclose(found.boxes["z_mm"], [50.0 - THICKNESS * k for k in MARKED])


@pytest.mark.parametrize("order", ["head_first", "feet_first"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_detect_on_crops_maps_the_marker_back_exactly(tmp_path, roi_config, name, order):
    case = CASES[name]
    study = write_marker_study(tmp_path, f"4.{len(name)}", shape=case["shape"], body=case["body"],
                               marker=case["marker"], order=order)
    found = detect_study(study, MarkerPredictor(), config=roi_config, workers=1)
    check_marker_boxes(found, case, order)
    s = found.slices
    assert s["roi_x"].tolist() == [case["roi"][0]] * N and s["roi_y"].tolist() == [case["roi"][1]] * N
    assert (s["roi_width"] == ROI_W).all() and (s["roi_height"] == ROI_H).all()
    assert (s["roi_source"] == "body").all()


def moving_body(k):
    """A body that moves 2 px right and 4 px down per slice down to slice 8, then stays: centroid (48 + 2 k', 96 + 4 k')."""
    m = min(k, 8)
    return slice(40 + 4 * m, 153 + 4 * m), slice(20 + 2 * m, 77 + 2 * m)


def test_detect_uses_each_slices_own_crop(tmp_path):
    """The ROI moves along z; every slice's boxes map back through its own crop (no smoothing: exact values)."""
    config = load_config("detector", None, ["roi.enabled=true", f"roi.size_mm={SIZE_MM}", "roi.smooth_mm=0",
                                            "roi.every_k=4", f"render.imgsz={IMGSZ}", "detect.batch=5"])
    # body measured on slices 0, 4, 8: centroids (48, 96), (56, 112), (64, 128); interpolated in between, slice 8's
    # held below it -> ROI corner (16 + 2 k', 32 + 4 k'), k' = min(k, 8). The marker's offsets in the crop,
    # 20 - 2 k' and 68 - 4 k', stay multiples of 2 and 4.
    marker = (36, 100, 16, 32)
    study = write_marker_study(tmp_path, "4.9", shape=(ROWS, COLS), body=moving_body, marker=marker,
                               order="feet_first")
    found = detect_study(study, MarkerPredictor(), config=config, workers=1)
    kk = np.minimum(np.arange(N), 8)
    assert found.slices["roi_x"].tolist() == (16 + 2 * kk).tolist()
    assert found.slices["roi_y"].tolist() == (32 + 4 * kk).tolist()
    check_marker_boxes(found, {"marker": marker}, "feet_first")


STRONG_LEVELS = ["decode.evidence_weight=4"]
"""levels.yaml overrides for these 24 mm studies: with every 4th slice sampled, a few nats of C3 evidence are less
than what the size decode's prior asks of a field that ends inside the column at both ends (real: 2 and 3 of 87
studies); weight 4 counts each sampled slice as if every slice had been."""


class C3Locator:
    """A locator that sees C3 at the same box (in its own image pixels) on every sampled slice."""

    backend = "fake"
    box = (8.0, 10.0, 16.0, 18.0)

    def __init__(self):
        self.sizes = []

    def predict(self, images):
        self.sizes.append(images.shape[1])
        return [np.array([[*self.box, 0.95, LEVELS.index("C3")]], dtype=np.float32) for _ in images]


def test_roi_is_centred_on_the_located_vertebra(tmp_path, roi_config):
    case = CASES["centre"]                                        # the body alone would give ROI (16, 32)
    study = write_marker_study(tmp_path, "5.1", shape=case["shape"], body=case["body"], marker=case["marker"])
    fake = C3Locator()
    locator = Locator(fake, load_config("locator", None, ["render.imgsz=32"]), load_config("levels", None,
                                                                                          STRONG_LEVELS))
    found = detect_study(study, MarkerPredictor(), config=roi_config, locator=locator, workers=1)
    assert set(fake.sizes) == {32}
    # the locator sees the whole 192 x 96 slice at 32 px: x * 96 / 32, y * 192 / 32 -> box x 24..48, y 60..108,
    # centre (36, 84) -> ROI corner (36 - 32, 84 - 64) = (4, 20); neighbours decoded without a detection of their
    # own hold C3's box (source extrapolated) and do not move the ROI
    lb = found.level_boxes[found.level_boxes["source"] != "extrapolated"]
    assert len(lb) and set(lb["level"]) == {"C3"}
    np.testing.assert_allclose(lb[["x", "y", "width", "height"]].to_numpy(float),
                               np.tile([24.0, 60.0, 24.0, 48.0], (len(lb), 1)), atol=1e-6)
    s = found.slices
    assert s["roi_x"].tolist() == [4] * N and s["roi_y"].tolist() == [20] * N
    assert (s["roi_width"] == ROI_W).all() and (s["roi_height"] == ROI_H).all()
    first, last = lb["slice_index"].min(), lb["slice_index"].max()
    inside = (s["slice_index"] >= first) & (s["slice_index"] <= last)
    assert (s.loc[inside, "roi_source"] == "locator").all() and inside.sum() >= 1
    assert (s.loc[~inside, "roi_source"] == "held").all()
    # and the marker still maps back exactly through the locator's crop (offsets 32 and 44: multiples of 2, 4)
    check_marker_boxes(found, case, "head_first")
    # every box lies on C3; where C3 shares slices with a neighbour (decoded by its size) the box gets both
    assert found.boxes["w_C3"].gt(0).all() and set(found.boxes["level"]) <= {"C2", "C3", "C4"}


class BlindLocator(C3Locator):
    """A locator that finds nothing: the ROI falls back to the body outline."""

    def predict(self, images):
        self.sizes.append(images.shape[1])
        return [np.zeros((0, 6), dtype=np.float32) for _ in images]


@pytest.mark.parametrize("with_locator", [False, True, "blind"])
def test_study_rois_for_training_equal_the_rois_detect_uses(tmp_path, with_locator):
    """prepare-detector crops with study_rois; it must give each slice the very ROI detect_study uses (also when
    the locator finds nothing and detect measures the body outline only then, from the decoded volume)."""
    config = load_config("detector", None, ["roi.enabled=true", f"roi.size_mm={SIZE_MM}", "roi.smooth_mm=3",
                                            f"render.imgsz={IMGSZ}", "detect.batch=5"])
    study = write_marker_study(tmp_path, "5.2", shape=(ROWS, COLS), body=moving_body, marker=(36, 100, 16, 32),
                               order="feet_first")
    fake = BlindLocator() if with_locator == "blind" else C3Locator()
    locator = Locator(fake, load_config("locator", None, ["render.imgsz=32"]),
                      load_config("levels", None, STRONG_LEVELS)) if with_locator else None
    found = detect_study(study, MarkerPredictor(), config=config, locator=locator, workers=1)
    rois = study_rois(study, config=config, locator=locator)
    pd.testing.assert_frame_equal(rois.table(), found.slices[list(ROI_COLUMNS)].reset_index(drop=True))
    sources = set(found.slices["roi_source"])
    located = with_locator is True
    assert ("locator" in sources and sources <= {"locator", "held"}) if located else sources == {"body"}


# ---------------------------------------------------------------- slices.csv and overlays through detect_studies
@pytest.fixture
def fake_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINEFRAC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("detector.backends.load_predictor", lambda weights, **kw: MarkerPredictor())


def test_slices_csv_carries_the_roi_columns_and_overlays_still_work(tmp_path, roi_config, fake_loader):
    root = tmp_path / "studies"
    for uid, name, order in (("6.1", "centre", "head_first"), ("6.2", "border", "feet_first")):
        case = CASES[name]
        write_marker_study(root, uid, shape=case["shape"], body=case["body"], marker=case["marker"], order=order)
    out = tmp_path / "det"
    result = detect_studies(root, weights=tmp_path / "w.pt", out=out, config=roi_config, workers=1, progress=False)
    assert sorted(result.finished) == ["6.1", "6.2"] and not result.failed
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    assert list(slices.columns[-6:-1]) == list(ROI_COLUMNS) and slices.columns[-1] == "sop_instance_uid"
    for col in ROI_COLUMNS[:4]:
        assert pd.api.types.is_integer_dtype(slices[col]), col           # whole pixels
    assert set(slices["roi_source"]) <= set(ROI_SOURCES)
    for uid, name in (("6.1", "centre"), ("6.2", "border")):
        s = slices[slices[STUDY_COL] == uid]
        assert len(s) == N and (s["roi_source"] == "body").all()
        assert s[list(ROI_COLUMNS[:4])].drop_duplicates().to_numpy().tolist() == [[*CASES[name]["roi"], ROI_W,
                                                                                   ROI_H]]
        boxes = pd.read_csv(out / "boxes.csv", dtype={STUDY_COL: str})
        b = boxes[boxes[STUDY_COL] == uid]
        np.testing.assert_array_equal(b[["x", "y", "width", "height"]].to_numpy(),
                                      np.tile(CASES[name]["marker"], (len(MARKED), 1)))
        overlays = out / "overlays" / uid
        assert (overlays / "contact_sheet.png").is_file() and (overlays / "score_profile.png").is_file()
        assert len(list(overlays.glob("0*_slice*.png"))) == 2                   # overlays.top_n
    # the ROI outline in overlays.roi_color: study 6.1's ROI x 16..80 of 96 columns on a 64 px display starts at
    # column round(16 * 64 / 96) = 11; its left edge runs down rows round(32 * 64 / 192) = 11 .. 52
    top = cv2.imread(str(sorted((out / "overlays" / "6.1").glob("01_slice*.png"))[0]))
    assert top.shape == (64, 64, 3)
    cyan = tuple(int(c) for c in roi_config["overlays"]["roi_color"])
    assert [tuple(int(c) for c in top[r, 11]) for r in range(20, 46)] == [cyan] * 26
    assert not (top[:, :8] == cyan).all(axis=-1).any()                          # nothing left of the outline


def test_body_fallback_on_a_real_slice_centres_on_the_patient_not_the_table(realdata):
    """On the real RSNA slice (skull base, 512 px at 0.312 mm, the table's curved shell below the head) the body
    fallback's 100 mm square is centred inside the head and leaves the table out."""
    import cv2
    import pydicom

    from data_prep.dicom.slice_file import read_slice_hu

    path = realdata("test1.dcm")
    hu = read_slice_hu(path)
    row_mm, col_mm = (float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).PixelSpacing)
    n, _, stats, _ = cv2.connectedComponentsWithStats((hu > -500.0).astype(np.uint8), connectivity=8)
    parts = sorted(range(1, n), key=lambda k: -stats[k, cv2.CC_STAT_WIDTH] * stats[k, cv2.CC_STAT_HEIGHT])
    head, others = parts[0], parts[1:]
    hx, hy, hw, hh = (int(stats[head, c]) for c in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                                      cv2.CC_STAT_HEIGHT))
    assert hw * col_mm > 100.0 and hh * row_mm > 100.0          # a head, not a table line
    tables = [k for k in others if stats[k, cv2.CC_STAT_WIDTH] * col_mm > 50.0 and stats[k, cv2.CC_STAT_TOP] > hy]
    assert tables, "the slice shows the table below the head"
    cx, cy = body_centre(hu, -500.0)
    assert hx < cx < hx + hw and hy < cy < hy + hh and hu[int(round(cy)), int(round(cx))] > -500.0
    x, y, w, h = (int(v[0]) for v in square_at(np.array([cx]), np.array([cy]), hu.shape, (row_mm, col_mm), 100.0))
    assert (w, h) == (round(100.0 / col_mm), round(100.0 / row_mm))
    assert all(y + h <= stats[k, cv2.CC_STAT_TOP] for k in tables)   # the table is not in the crop
