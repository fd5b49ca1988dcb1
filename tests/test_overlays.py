"""Overlays: boxes drawn at the right display place, ground truth in its own colour, sheet and profile."""

from __future__ import annotations

import cv2
import matplotlib.colors
import numpy as np
import pandas as pd
import pytest

from data_prep.dicom.geometry import scan_study
from data_prep.dicom.writer import write_series
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.overlays import (
    BAND_ALPHA,
    BAND_SHADES,
    CONTACT_SHEET,
    SCORE_PROFILE,
    LevelBand,
    Region,
    level_bands,
    write_overlays,
    zoom_region,
)

ROWS, COLS, N = 40, 80, 12
SIZE = 160                      # display: x scale 2, y scale 4
UID = "5.5.5"


@pytest.fixture
def study(tmp_path):
    hu = np.full((N, ROWS, COLS), -1000.0, dtype=np.float32)    # black: never a box colour
    write_series(tmp_path / UID, hu, study_uid=UID, pixel_spacing=(0.5, 0.5), slice_thickness=2.0,
                 instance_order="feet_first")
    return scan_study(tmp_path / UID)


def cfg(**kw):
    sets = [f"overlays.display_size={SIZE}", "overlays.line_thickness=1", "overlays.top_n=2",
            "overlays.min_score=0.1", *[f"overlays.{k}={v}" for k, v in kw.items()]]
    return load_config("detector", None, sets).overlays


def box_rows(geometry, rows):
    return pd.DataFrame([{STUDY_COL: UID, "slice_index": i, "slice_number": int(geometry.instance_numbers[i]),
                          "z_mm": float(geometry.z_mm[i]), "x": x, "y": y, "width": w, "height": h, "score": s}
                         for i, x, y, w, h, s in rows])


def edge_fraction(image, color, x1, y1, x2, y2):
    """Fraction of the rectangle's perimeter pixels that have exactly `color`."""
    hit = np.all(image == np.array(color, dtype=np.uint8), axis=2)
    edge = np.zeros_like(hit)
    edge[y1, x1:x2 + 1] = edge[y2, x1:x2 + 1] = True
    edge[y1:y2 + 1, x1] = edge[y1:y2 + 1, x2] = True
    return hit[edge].mean(), hit


def test_boxes_land_on_their_display_edges(study, tmp_path):
    boxes = box_rows(study, [(3, 10.0, 5.0, 20.0, 8.0, 0.9),     # best slice
                             (7, 40.0, 20.0, 10.0, 5.0, 0.6),
                             (9, 1.0, 1.0, 5.0, 5.0, 0.05)])     # below min_score: no overlay
    labels = pd.DataFrame([{STUDY_COL: UID, "slice_number": int(study.instance_numbers[3]),
                            "x": 50.0, "y": 25.0, "width": 12.0, "height": 6.0}])
    config = cfg(min_gap_mm=0)          # slices 3 and 7 are 8 mm apart: both shown only without the z gap
    paths = write_overlays(study, boxes, tmp_path / "ov", labels=labels, config=config)
    names = [p.name for p in paths]
    n3, n7 = int(study.instance_numbers[3]), int(study.instance_numbers[7])
    assert names == [f"01_slice{n3}.png", f"02_slice{n7}.png", CONTACT_SHEET, SCORE_PROFILE]
    image = cv2.imread(str(paths[0]))
    assert image.shape == (SIZE, SIZE, 3)
    # predicted box (10, 5, 20, 8) -> display x 20..60, y 20..52 (scale 2, 4); last pixel is end - 1
    red = tuple(config.box_color)
    frac, hit = edge_fraction(image, red, 20, 20, 59, 51)
    assert frac > 0.95
    assert not hit[22:50, 22:58].any()                      # nothing drawn inside the box
    # ground truth (50, 25, 12, 6) -> x 100..123, y 100..123 in the truth colour
    frac, hit = edge_fraction(image, tuple(config.truth_color), 100, 100, 123, 123)
    assert frac > 0.95
    second = cv2.imread(str(paths[1]))
    frac, _ = edge_fraction(second, red, 80, 80, 99, 99)     # (40, 20, 10, 5) on slice 7
    assert frac > 0.95
    assert not np.all(second == np.array(tuple(config.truth_color), np.uint8), axis=2).any()   # no truth there
    sheet = cv2.imread(str(tmp_path / "ov" / CONTACT_SHEET))
    assert sheet.shape == (config.sheet_tile, 2 * config.sheet_tile, 3)
    profile = cv2.imread(str(tmp_path / "ov" / SCORE_PROFILE))
    assert profile.shape[:2] == (int(config.profile_size[1] * config.profile_dpi),
                                 int(config.profile_size[0] * config.profile_dpi))


def test_no_boxes_still_writes_sheet_and_profile_and_clears_old_pngs(study, tmp_path):
    out = tmp_path / "ov"
    write_overlays(study, box_rows(study, [(2, 5.0, 5.0, 5.0, 5.0, 0.8)]), out, config=cfg())
    assert len(list(out.glob("01_slice*.png"))) == 1
    paths = write_overlays(study.study_dir, box_rows(study, []).reindex(columns=[
        STUDY_COL, "slice_index", "slice_number", "z_mm", "x", "y", "width", "height", "score"]), out, config=cfg())
    assert [p.name for p in paths] == [CONTACT_SHEET, SCORE_PROFILE]
    assert not list(out.glob("01_slice*.png"))


# --- level bands on the score profile (issue 12) ---

def vertebrae_rows(found, cls=None, uid=UID):
    """A vertebrae table C1..C7: `found` maps level -> (first_slice, last_slice); the rest are not found."""
    cls = cls or {}
    rows = []
    for level in LEVELS:
        first, last = found.get(level, (-1, -1))
        rows.append({STUDY_COL: uid, "level": level, "first_slice": first, "last_slice": last,
                     "n_slices": 0 if first < 0 else last - first + 1, "source": "locator" if first >= 0 else "",
                     "n_crops": 0, "cls_max": cls.get(level, np.nan), "cls_topk": np.nan, "cls_mean": np.nan})
    return pd.DataFrame(rows)


def test_level_bands_map_slice_index_to_z_not_slice_number(study):
    numbers = np.asarray(study.instance_numbers)
    assert numbers[0] > numbers[-1]                   # feet_first: slice_number runs against slice_index
    z = np.asarray(study.z_mm)                        # 0 = most superior = largest z, 2 mm apart
    table = vertebrae_rows({"C1": (0, 2), "C2": (2, 5), "C4": (7, 7)}, cls={"C1": 0.8249})
    bands = level_bands(table.iloc[::-1], study.z_mm, study=UID)     # row order does not matter
    assert [b.label for b in bands] == ["C1 0.82", "C2", "C4"]       # C3 not found: skipped; NaN cls: no number
    half = 1.0                                                       # half the 2 mm spacing on each side
    assert bands[0] == LevelBand("C1 0.82", z[2] - half, z[0] + half)
    assert bands[1][1:] == pytest.approx((z[5] - half, z[2] + half))
    assert bands[2][1:] == pytest.approx((z[7] - half, z[7] + half))   # one slice: still 2 mm wide
    assert all(b.x0 < b.x1 for b in bands)


def test_level_bands_on_plain_arrays_either_direction():
    rows = pd.DataFrame({"level": ["C3", "C5"], "first_slice": [1, -1], "last_slice": [2, -1]})
    assert level_bands(rows, [10.0, 8.0, 6.0, 4.0]) == [("C3", 5.0, 9.0)]
    assert level_bands(rows, [4.0, 6.0, 8.0, 10.0]) == [("C3", 5.0, 9.0)]   # z rising with slice_index too
    assert level_bands(rows.iloc[:0], [1.0, 2.0]) == []
    assert level_bands(rows, [10.0, 8.0, 6.0])[0][1:] == (5.0, 9.0)          # no cls_max column: bare level


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="last_slice"), "missing column(s) last_slice"),
    (lambda t: t.assign(level=["C1", "C8", *LEVELS[2:]]), "row 1: unknown level 'C8'"),
    (lambda t: t.assign(level=["C1", "C1", *LEVELS[2:]]), "row 1: level C1 appears twice"),
    (lambda t: t.assign(first_slice=[3, *t.first_slice[1:]]), "row 0 (C1): first_slice 3, last_slice 2"),
    (lambda t: t.assign(last_slice=[N, *t.last_slice[1:]]), f"< {N} (the study's slice count)"),
    (lambda t: t.assign(first_slice=[np.nan, *t.first_slice[1:]]), "row 0: first_slice must be a slice_index"),
    (lambda t: t.assign(first_slice=[1.5, *t.first_slice[1:]]), "found 1.5"),
    (lambda t: t.assign(first_slice=[-1, *t.first_slice[1:]], n_slices=[3, *t.n_slices[1:]]), "row 0 (C1)"),
    (lambda t: t.assign(cls_max=["high", *t.cls_max[1:]]), "row 0 (C1): cls_max must be a number or NaN"),
])
def test_level_bands_reject_bad_tables_naming_study_and_row(study, change, message):
    table = change(vertebrae_rows({"C1": (0, 2)}))
    with pytest.raises(ValueError, match="vertebrae table of study 5.5.5") as err:
        level_bands(table, study.z_mm, study=UID)
    assert message in str(err.value)


def profile_bytes(study, out, **kw):
    boxes = box_rows(study, [(3, 10.0, 5.0, 20.0, 8.0, 0.9), (7, 40.0, 20.0, 10.0, 5.0, 0.6)])
    write_overlays(study, boxes, out, config=cfg(), **kw)
    return (out / SCORE_PROFILE).read_bytes()


def shade_columns(png, shade):
    """Image columns filled top to bottom by a band shade (blended over white); line antialiasing is too short."""
    rgb = np.array(matplotlib.colors.to_rgb(shade)) * BAND_ALPHA + (1 - BAND_ALPHA)
    bgr = np.round(rgb[::-1] * 255)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(float)
    tall = (np.abs(image - bgr).max(axis=2) <= 2).sum(axis=0) >= image.shape[0] / 3   # fills the axes' height
    return np.nonzero(tall)[0], image.shape[1]


def test_bands_change_the_profile_deterministically_and_on_the_right_side(study, tmp_path):
    plain = profile_bytes(study, tmp_path / "plain")
    top = vertebrae_rows({"C1": (0, 2)}, cls={"C1": 0.5})          # superior slices: right of the plot
    banded = profile_bytes(study, tmp_path / "a", vertebrae=top)
    assert banded != plain
    assert profile_bytes(study, tmp_path / "b", vertebrae=top) == banded
    assert len(shade_columns(plain, BAND_SHADES[0])[0]) == 0
    cols, width = shade_columns(banded, BAND_SHADES[0])
    assert len(cols) and cols.min() > width / 2
    bottom = profile_bytes(study, tmp_path / "c", vertebrae=vertebrae_rows({"C7": (9, 11)}))   # inferior: left
    cols, width = shade_columns(bottom, BAND_SHADES[0])
    assert len(cols) and cols.max() < width / 2
    two = profile_bytes(study, tmp_path / "d", vertebrae=vertebrae_rows({"C1": (0, 2), "C2": (3, 6)}))
    assert len(shade_columns(two, BAND_SHADES[1])[0])                # the neighbour gets the second shade


def test_no_found_level_keeps_the_profile_byte_identical(study, tmp_path):
    plain = profile_bytes(study, tmp_path / "plain")
    assert profile_bytes(study, tmp_path / "none", vertebrae=None) == plain
    assert profile_bytes(study, tmp_path / "missing", vertebrae=vertebrae_rows({})) == plain
    other = vertebrae_rows({"C1": (0, 2)}, uid="other.study")
    assert profile_bytes(study, tmp_path / "other", vertebrae=other) == plain       # not this study's rows


def test_bad_vertebrae_table_fails_naming_the_study(study, tmp_path):
    bad = vertebrae_rows({"C1": (0, N + 3)})
    with pytest.raises(ValueError, match=r"study 5\.5\.5, row 0 \(C1\)"):
        profile_bytes(study, tmp_path / "bad", vertebrae=bad)


# --- overlays worth looking at (issue 14): distinct runs, zoom to the spine ROI with an inset, level labels ---

def roi_slices(geometry, roi=(20, 10, 20, 10), source="body"):
    """slices.csv rows of the study with one ROI on every slice."""
    return pd.DataFrame([{STUDY_COL: UID, "slice_index": i, "slice_number": int(geometry.instance_numbers[i]),
                          "roi_x": roi[0], "roi_y": roi[1], "roi_width": roi[2], "roi_height": roi[3],
                          "roi_source": source} for i in range(N)])


def test_top_slices_come_from_distinct_runs_along_z(study, tmp_path):
    # one run of three high slices (2-4) and a weaker run (9-10); slices are 2 mm apart
    boxes = box_rows(study, [(i, 10.0, 5.0, 5.0, 5.0, s) for i, s in
                             ((2, 0.9), (3, 0.95), (4, 0.92), (9, 0.6), (10, 0.5))])
    paths = write_overlays(study, boxes, tmp_path / "gap", config=cfg(top_n=3, min_gap_mm=5))
    numbers = study.instance_numbers
    assert [p.name for p in paths[:-2]] == [f"01_slice{numbers[3]}.png", f"02_slice{numbers[9]}.png"]
    plain = write_overlays(study, boxes, tmp_path / "plain", config=cfg(top_n=3, min_gap_mm=0))
    assert [p.name for p in plain[:-2]] == [f"0{k}_slice{numbers[i]}.png" for k, i in ((1, 3), (2, 4), (3, 2))]


def test_zoom_region_keeps_the_roi_aspect_and_holds_every_box():
    assert zoom_region(None, [(1, 1, 2, 2)], 0.1) is None
    assert zoom_region((20, 10, 20, 10), [], 0.0) == Region(20, 10, 20, 10)
    assert zoom_region((20, 10, 20, 10), [], 0.5) == Region(10, 5, 40, 20)
    assert zoom_region((20, 10, 20, 10), [(0, 0, 5, 5)], 0.0) == Region(0, 0, 40, 20)
    assert zoom_region((20, 10, 20, 10), [(50, 15, 5, 5)], 0.0) == Region(20, 6.25, 35, 17.5)


def test_tiles_zoom_to_the_roi_with_an_inset_and_label_boxes_with_their_level(study, tmp_path):
    config = cfg(zoom_margin=0, inset_size=32)
    slices = roi_slices(study)
    boxes = box_rows(study, [(3, 25.0, 12.0, 10.0, 5.0, 0.9)]).assign(level="C3")
    path = write_overlays(study, boxes, tmp_path / "z", config=config, slices=slices)[0]
    image = cv2.imread(str(path))
    # ROI (20, 10, 20, 10) fills the 160 px tile: x scale 8, y scale 16; the box lands at x 40..119, y 32..111
    frac, hit = edge_fraction(image, tuple(config.box_color), 40, 32, 119, 111)
    assert frac > 0.95 and not hit[36:108, 44:116].any()
    # the inset: the whole slice in the upper-right 32 px, framed, the zoom outlined in the ROI colour
    inset = image[:32, SIZE - 32:]
    assert (inset[0] == 255).all() and (inset[:, 0] == 255).all()
    cyan = np.all(inset == np.array(tuple(config.roi_color), np.uint8), axis=2)
    # the zoom (20, 10, 20, 10) on an 80 x 40 slice shown at 32 px: x 8..15, y 8..15
    assert cyan[8, 8:16].all() and cyan[8:16, 8].all() and not cyan[20:, :].any()
    # the level label: "C3 0.90" is wider than the bare score drawn without a level
    bare = cv2.imread(str(write_overlays(study, boxes.drop(columns="level"), tmp_path / "b", config=config,
                                         slices=slices)[0]))
    red = np.array(tuple(config.box_color), np.uint8)

    def text_width(img):
        cols = np.nonzero(np.all(img[:30, :SIZE - 32] == red, axis=2).any(axis=0))[0]
        return cols.max() - cols.min()

    assert text_width(image) > text_width(bare) > 0


def test_full_slice_roi_or_zoom_off_draws_the_whole_slice(study, tmp_path):
    boxes = box_rows(study, [(3, 10.0, 5.0, 20.0, 8.0, 0.9)])
    whole = write_overlays(study, boxes, tmp_path / "a", config=cfg())[0].read_bytes()
    full = write_overlays(study, boxes, tmp_path / "b", config=cfg(), slices=roi_slices(study, (0, 0, COLS, ROWS),
                                                                                          "full"))[0]
    assert full.read_bytes() == whole
    off = write_overlays(study, boxes, tmp_path / "c", config=cfg(zoom="false"), slices=roi_slices(study))[0]
    image = cv2.imread(str(off))
    frac, _ = edge_fraction(image, tuple(cfg().box_color), 20, 20, 59, 51)      # whole-slice place, as above
    assert frac > 0.95
