"""Overlays: boxes drawn at the right display place, ground truth in its own colour, sheet and profile."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from data_prep.config import load_config
from data_prep.dicom_io import scan_study
from data_prep.dicom_write import write_series
from data_prep.registry import STUDY_COL
from detector.overlays import CONTACT_SHEET, SCORE_PROFILE, write_overlays

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
    config = cfg()
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
