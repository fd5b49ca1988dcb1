"""Rendering HU slices: window maths, 2.5D neighbour choice, resizing scale, box mappings."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from data_prep.runs.config import ConfigError, load_config
from detector.render import (
    apply_window,
    clip_xywh,
    image_xyxy_to_original,
    neighbour_offset,
    render_slices,
    xywh_to_yolo,
    yolo_to_xywh,
)


class FakeChunk:
    """Slices whose HU is constant per slice: slice i has HU = 100 * i - 500."""

    def __init__(self, n: int, rows: int, cols: int) -> None:
        self.n, self.rows, self.cols = n, rows, cols
        self.asked: list[int] = []

    def get(self, index: int) -> np.ndarray:
        assert 0 <= index < self.n, f"index {index} outside the study"
        self.asked.append(index)
        return np.full((self.rows, self.cols), 100.0 * index - 500.0, dtype=np.float32)


def geometry(n: int, rows: int, cols: int, spacing: float, thickness: float | None = None):
    z = -spacing * np.arange(n, dtype=float)     # slice_index 0 is most superior: z decreases
    return SimpleNamespace(paths=[f"{i}.dcm" for i in range(n)], z_mm=z, shape=(rows, cols),
                           slice_thickness=thickness if thickness is not None else spacing)


def render_cfg(**kw):
    sets = [f"render.{k}={v}" for k, v in kw.items()]
    return load_config("detector", None, sets).render


def test_window_maths_hand_computed():
    # WL 400 / WW 1800: -500 HU -> 0, 1300 HU -> 255, 0 HU -> 500/1800*255 = 70.83 -> 71
    hu = np.array([-2000.0, -500.0, 0.0, 400.0 + 1.0, 1300.0, 3000.0])
    out = apply_window(hu, 400.0, 1800.0)
    assert out.dtype == np.uint8
    expected = [0, 0, 71, round(901 / 1800 * 255), 255, 255]
    assert out.tolist() == expected
    # a soft-tissue window: WL 40 / WW 400 -> [-160, 240]; 40 HU sits at 127.5 -> rounds to even 128
    assert apply_window(np.array([-160.0, 40.0, 240.0, 140.0]), 40.0, 400.0).tolist() == [0, 128, 255, 191]


def test_window_rejects_zero_width():
    with pytest.raises(ConfigError):
        apply_window(np.zeros(3), 0.0, 0.0)


@pytest.mark.parametrize(("neighbour_mm", "spacing", "expected"), [
    (3.0, 1.0, 3), (3.0, 0.625, 5), (3.0, 2.5, 1), (3.0, 5.0, 1), (2.0, 0.7, 3)])
def test_neighbour_offset_in_whole_slices(neighbour_mm, spacing, expected):
    # round(neighbour / spacing), never below one slice
    assert neighbour_offset(geometry(10, 4, 4, spacing), neighbour_mm) == expected


def test_25d_channels_are_superior_self_inferior_and_clamped():
    rows = cols = 8
    n, spacing = 10, 1.0
    geo = geometry(n, rows, cols, spacing)
    chunk = FakeChunk(n, rows, cols)
    cfg = render_cfg(imgsz=rows, neighbour_mm=2.0, recipe="2.5d")   # d = 2 slices
    images, scale = render_slices(chunk, [0, 1, 5, 9], geo, render=cfg)
    assert images.shape == (4, rows, cols, 3) and images.dtype == np.uint8
    assert scale == (1.0, 1.0)

    def value(i):   # slice i in the bone window WL 400 / WW 1800, by hand
        hu = 100.0 * i - 500.0
        return int(np.rint(np.clip((hu + 500.0) / 1800.0 * 255.0, 0, 255)))

    expected = {0: (0, 0, 2), 1: (0, 1, 3), 5: (3, 5, 7), 9: (7, 9, 9)}   # (i-2 clamped, i, i+2 clamped)
    for k, i in enumerate([0, 1, 5, 9]):
        got = tuple(int(images[k, 3, 3, c]) for c in range(3))
        assert got == tuple(value(j) for j in expected[i]), f"slice {i}"
    assert min(chunk.asked) >= 0 and max(chunk.asked) <= n - 1


def test_windows_recipe_three_windows_of_one_slice():
    geo = geometry(3, 6, 6, 1.0)
    cfg = render_cfg(imgsz=6, recipe="windows")
    chunk = FakeChunk(3, 6, 6)
    images, _ = render_slices(chunk, [2], geo, render=cfg)
    hu = 100.0 * 2 - 500.0                                     # -300 HU
    for c, (level, width) in enumerate(cfg.windows):
        lo = level - width / 2
        assert images[0, 0, 0, c] == int(np.rint(np.clip((hu - lo) / width * 255, 0, 255)))
    assert set(chunk.asked) == {2}                              # no neighbours read


def test_resize_keeps_exact_scale_for_non_square_and_maps_boxes_back():
    rows, cols, imgsz = 40, 80, 32
    geo = geometry(2, rows, cols, 1.0)
    images, (sx, sy) = render_slices(FakeChunk(2, rows, cols), [1], geo, render=render_cfg(imgsz=imgsz))
    assert images.shape == (1, imgsz, imgsz, 3)
    assert sx == pytest.approx(imgsz / cols) and sy == pytest.approx(imgsz / rows)
    # a box in original pixels -> image pixels by the scale -> back, exactly
    box = np.array([[10.0, 5.0, 30.0, 20.0]])                 # x, y, w, h
    xyxy = np.array([[10 * sx, 5 * sy, 40 * sx, 25 * sy]])
    np.testing.assert_allclose(image_xyxy_to_original(xyxy, (sx, sy), (rows, cols)), box, atol=1e-9)


def test_resize_area_keeps_a_bright_square_where_it_was():
    rows = cols = 64
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    hu[16:32, 32:48] = 1300.0                                  # rows 16-31, cols 32-47

    class One:
        def get(self, index):
            return hu

    images, _ = render_slices(One(), [0], geometry(1, rows, cols, 1.0), render=render_cfg(imgsz=32))
    ch = images[0, ..., 1]
    assert (ch[8:16, 16:24] == 255).all()                      # halved coordinates
    assert ch[:8].max() == 0 and ch[:, :16].max() == 0


def test_yolo_round_trip_and_clipping():
    shape = (100, 200)
    boxes = np.array([[10.5, 20.25, 30.0, 40.0], [190.0, 90.0, 30.0, 30.0]])
    clipped = clip_xywh(boxes, shape)
    np.testing.assert_allclose(clipped[1], [190.0, 90.0, 10.0, 10.0])
    yolo = xywh_to_yolo(clipped, shape)
    np.testing.assert_allclose(yolo[0], [(10.5 + 15) / 200, (20.25 + 20) / 100, 30 / 200, 40 / 100])
    np.testing.assert_allclose(yolo_to_xywh(yolo, shape), clipped, atol=1e-9)


def test_unknown_recipe_is_an_error_with_a_suggestion():
    cfg = {**render_cfg().to_dict(), "recipe": "window"}   # load_config itself refuses it; the renderer checks too
    with pytest.raises(ConfigError, match="did you mean 'windows'"):
        render_slices(FakeChunk(1, 4, 4), [0], geometry(1, 4, 4, 1.0), render=cfg)


def test_neighbour_offset_uses_slice_positions_over_thickness():
    # overlapping reconstruction: 2 mm thick slices every 1 mm -> 3 mm is 3 slices, not 1.5
    assert neighbour_offset(geometry(10, 4, 4, 1.0, thickness=2.0), 3.0) == 3
    # a single slice has no positions to compare: the thickness is used
    assert neighbour_offset(geometry(1, 4, 4, 1.0, thickness=1.5), 3.0) == 2


class CrackedSlices:
    """Slice i: soft tissue (45 HU) with a bone block (cortex 1200 HU, 10 px thick) that a 2-pixel crack (45 HU)
    crosses at column 20 + i, so every slice's crack channel differs."""

    def __init__(self, n: int, rows: int, cols: int) -> None:
        self.n, self.rows, self.cols = n, rows, cols
        self.asked: list[int] = []

    def get(self, index: int) -> np.ndarray:
        self.asked.append(index)
        hu = np.full((self.rows, self.cols), 45.0, dtype=np.float32)
        hu[20:30, 5:-5] = 1200.0
        hu[20:30, 20 + index:22 + index] = 45.0
        return hu


def crack_geometry(n: int, rows: int, cols: int, spacing: float = 1.0, pixel: float = 0.35):
    geo = geometry(n, rows, cols, spacing)
    geo.pixel_spacing = (pixel, pixel)
    return geo


@pytest.mark.parametrize("recipe", ["2.5d", "windows"])
def test_crack_channel_replaces_channel_two_and_keeps_the_others(recipe):
    from detector.crack_filter import crack_channel

    n, rows, cols = 9, 48, 64
    geo = crack_geometry(n, rows, cols)
    plain = render_cfg(imgsz=32, recipe=recipe, neighbour_mm=2.0)
    cracked = render_cfg(imgsz=32, recipe=recipe, neighbour_mm=2.0, crack_channel=2)
    before, _ = render_slices(CrackedSlices(n, rows, cols), [4], geo, render=plain)
    chunk = CrackedSlices(n, rows, cols)
    after, _ = render_slices(chunk, [4], geo, render=cracked)
    assert np.array_equal(after[..., :2], before[..., :2])
    expected = crack_channel(chunk.get(4), (0.35, 0.35), cracked, 32)
    assert np.array_equal(after[0, ..., 2], expected)
    assert expected.max() == 255 and expected[:8].max() == 0     # the crack is white, soft tissue black
    assert not np.array_equal(after[..., 2], before[..., 2])
    if recipe == "2.5d":                                          # the inferior neighbour (4 + 2) is never read
        assert 6 not in chunk.asked and 2 in chunk.asked


def test_crack_channel_of_a_crop_is_computed_on_the_crop_pixels():
    from detector.crack_filter import crack_channel
    from detector.render import render_crops
    from detector.roi import crop_padded

    n, rows, cols = 3, 48, 64
    geo = crack_geometry(n, rows, cols, pixel=0.5)
    cfg = render_cfg(imgsz=16, recipe="2.5d", crack_channel=2)
    box = np.array([[10, 8, 40, 40]])                              # x, y, w, h: 40 px shrunk to 16
    images = render_crops(CrackedSlices(n, rows, cols), [1], geo, box, render=cfg, pad_hu=-1000.0)
    hu = CrackedSlices(n, rows, cols).get(1)
    expected = crack_channel(crop_padded(hu, box[0], -1000.0), (0.5, 0.5), cfg, 16)
    assert np.array_equal(images[0, ..., 2], expected)
    assert expected.max() == 255                                  # a 2-px crack survives a 2.5x shrink


def test_render_summary_names_the_crack_keys_only_when_on():
    from detector.render import render_summary

    assert "crack_width_mm" not in render_summary(render_cfg())
    summary = render_summary(render_cfg(crack_channel=2))
    assert {k: summary[k] for k in ("crack_channel", "crack_width_mm", "crack_bone_hu", "crack_full_hu")} == {
        "crack_channel": 2, "crack_width_mm": 2.0, "crack_bone_hu": 200.0, "crack_full_hu": 600.0}


@pytest.mark.parametrize("bad", [3, -1, True, 1.0, "2"])
def test_crack_channel_must_be_a_channel(bad):
    cfg = {**render_cfg().to_dict(), "crack_channel": bad}      # load_config refuses it too; the renderer checks
    with pytest.raises(ConfigError, match="crack_channel"):
        render_slices(CrackedSlices(1, 8, 8), [0], crack_geometry(1, 8, 8), render=cfg)
