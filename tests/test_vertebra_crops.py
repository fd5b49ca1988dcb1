"""Per-vertebra crop geometry on hand-built geometries: square sides in mm from the box, margins and minimum,
pixels per axis from the spacing, evenly spaced slices over each vertebra's range, the locator's boxes kept only
where its level is present, and the rendered crops matching a hand-cut reference. Expected values by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from data_prep.runs.config import load_config
from detector.render import apply_window
from detector.vertebra_crops import (
    NOT_FOUND,
    PLAN_COLUMNS,
    SOURCE_LOCATOR,
    crop_plan,
    level_slice_boxes_from_locator,
    level_slice_boxes_from_segmentation,
    render_vertebra_crops,
    vertebra_extents,
)

CROPS = {"slices_per_level": 6, "margin_mm": 8.0, "min_size_mm": 30.0, "pad_hu": -1000.0,
         "presence_threshold": 0.5, "source": "auto"}


def geometry(row_mm=0.5, col_mm=0.5, n=60, shape=(200, 200)):
    return SimpleNamespace(pixel_spacing=(row_mm, col_mm), shape=shape, paths=[f"{i}.dcm" for i in range(n)],
                           z_mm=np.arange(n, dtype=float) * -1.0, slice_thickness=1.0)


def boxes(level, slices, x=50.0, y=60.0, w=40.0, h=60.0):
    return pd.DataFrame({"slice_index": list(slices), "level": level, "x": x, "y": y, "width": w, "height": h,
                         "source": "segmentation"})


def test_a_20_by_30_mm_box_with_8_mm_margins_gives_a_46_mm_square_of_92_px():
    # 0.5 mm pixels: the box is 40 x 60 px = 20 x 30 mm; side = max(20, 30, 30) + 2 x 8 = 46 mm = 92 px
    plan = crop_plan(boxes("C3", range(10, 20)), geometry(), CROPS)
    assert list(plan.columns) == list(PLAN_COLUMNS)
    assert plan["crop_width"].eq(92).all() and plan["crop_height"].eq(92).all()
    # centred on the box centre (70, 90): corner (70 - 46, 90 - 46)
    assert plan["crop_x"].eq(24).all() and plan["crop_y"].eq(44).all()
    assert set(plan["source"]) == {"segmentation"} and set(plan["level"]) == {"C3"}


def test_a_small_box_is_raised_to_min_size_and_a_large_one_keeps_its_largest_side():
    small = crop_plan(boxes("C1", [5], w=10.0, h=10.0), geometry(), CROPS)       # 5 x 5 mm -> 30 + 16 = 46 mm
    assert small[["crop_width", "crop_height"]].iloc[0].tolist() == [92, 92]
    large = crop_plan(boxes("C1", [5], w=100.0, h=80.0), geometry(), CROPS)      # 50 x 40 mm -> 50 + 16 = 66 mm
    assert large[["crop_width", "crop_height"]].iloc[0].tolist() == [132, 132]


def test_anisotropic_spacing_gives_a_square_in_mm_not_in_pixels():
    # rows 0.25 mm, columns 0.5 mm: box 40 cols x 120 rows = 20 x 30 mm; 46 mm = 92 columns, 184 rows
    plan = crop_plan(boxes("C5", [7], w=40.0, h=120.0), geometry(row_mm=0.25, col_mm=0.5), CROPS)
    r = plan.iloc[0]
    assert (r["crop_width"], r["crop_height"]) == (92, 184)
    assert (r["crop_x"], r["crop_y"]) == (50 + 20 - 46, 60 + 60 - 92)
    # the same box in mm on a swapped grid gives the swapped pixel sizes
    plan = crop_plan(boxes("C5", [7], w=80.0, h=60.0), geometry(row_mm=0.5, col_mm=0.25), CROPS)
    assert tuple(plan.iloc[0][["crop_width", "crop_height"]]) == (184, 92)


def test_slices_are_evenly_spaced_over_the_range_and_a_short_vertebra_gives_fewer():
    table = pd.concat([boxes("C2", range(10, 31)), boxes("C7", [40, 41, 42])])
    plan = crop_plan(table, geometry(), CROPS)
    c2 = plan[plan["level"] == "C2"]
    # 10..30 in 6 steps: 10, 14, 18, 22, 26, 30
    assert c2["slice_index"].tolist() == [10, 14, 18, 22, 26, 30]
    assert c2[["first_slice", "last_slice", "n_slices"]].drop_duplicates().values.tolist() == [[10, 30, 21]]
    c7 = plan[plan["level"] == "C7"]
    assert c7["slice_index"].tolist() == [40, 41, 42]            # 3 slices, no duplicates
    ext = vertebra_extents(plan).set_index("level")
    assert ext.loc["C2"].tolist() == [10, 30, 21, "segmentation"]
    assert ext.loc["C1"].tolist() == [NOT_FOUND, NOT_FOUND, 0, "none"]


def test_a_chosen_slice_without_a_box_uses_the_nearest_boxed_slice():
    # C1 boxed on 10 and 20 only (a gap): 6 slices over 10..20 -> 10, 12, 14, 16, 18, 20
    table = pd.concat([boxes("C1", [10], x=0.0), boxes("C1", [20], x=100.0)])
    plan = crop_plan(table, geometry(), {**CROPS, "slices_per_level": 6})
    assert plan["slice_index"].tolist() == [10, 12, 14, 16, 18, 20]
    # 12, 14 nearest to 10 (box x 0..40, centre 20 -> corner -26); 16, 18 nearest to 20 (centre 120 -> 74)
    assert plan["crop_x"].tolist() == [-26, -26, -26, 74, 74, 74]


def test_two_boxes_of_one_level_on_a_slice_are_cropped_as_their_union():
    table = pd.concat([boxes("C4", [3], x=10.0, w=20.0, h=20.0), boxes("C4", [3], x=70.0, w=20.0, h=20.0)])
    r = crop_plan(table, geometry(), CROPS).iloc[0]
    # union x 10..90 (40 mm) x y 60..80: side 40 + 16 = 56 mm = 112 px at centre (50, 70)
    assert (r["crop_x"], r["crop_y"], r["crop_width"], r["crop_height"]) == (50 - 56, 70 - 56, 112, 112)


def test_segmentation_table_keeps_cervical_levels_only():
    table = pd.DataFrame({"StudyInstanceUID": "1", "slice_index": [1, 1, 2], "slice_number": [2, 2, 3],
                          "level": ["C7", "T1", "C7"], "area_px": 5, "x": 1.0, "y": 2.0, "width": 3.0,
                          "height": 4.0})
    out = level_slice_boxes_from_segmentation(table)
    assert out["level"].tolist() == ["C7", "C7"] and out["slice_index"].tolist() == [1, 2]
    assert set(out["source"]) == {"segmentation"}
    assert set(crop_plan(out, geometry(), CROPS)["source"]) == {"segmentation"}      # the plan takes the table's


def test_locator_boxes_are_kept_only_where_the_level_is_present():
    n = 6
    slice_levels = pd.DataFrame({"slice_index": np.arange(n), **{f"p_C{i}": 0.0 for i in range(1, 8)}})
    slice_levels.loc[[1, 2, 3], "p_C2"] = [0.9, 0.51, 0.5]       # 0.5 is not > 0.5
    slice_levels.loc[[3, 4], "p_C3"] = 0.8
    level_boxes = pd.DataFrame({"slice_index": [1, 2, 3, 4, 3, 4, 5], "level": ["C2"] * 4 + ["C3"] * 3,
                                "x": 1.0, "y": 1.0, "width": 2.0, "height": 2.0, "conf": 0.9, "source": "detected"})
    out = level_slice_boxes_from_locator(level_boxes, slice_levels, CROPS)          # presence_threshold 0.5
    assert sorted(zip(out["level"], out["slice_index"], strict=True)) == [("C2", 1), ("C2", 2), ("C3", 3),
                                                                           ("C3", 4)]
    plan = crop_plan(out, geometry(n=n), CROPS)
    assert set(plan["source"]) == {SOURCE_LOCATOR}
    assert level_slice_boxes_from_locator(level_boxes.iloc[:0], slice_levels, CROPS).empty
    assert level_slice_boxes_from_locator(None, None, CROPS).empty


def test_bad_crops_config_is_refused_naming_the_keys():
    from data_prep.runs.config import ConfigError

    with pytest.raises(ConfigError, match="slices_per_level"):
        crop_plan(boxes("C1", [1]), geometry(), {**CROPS, "slices_per_level": 0})
    with pytest.raises(ValueError, match="source"):
        crop_plan(boxes("C1", [1]).drop(columns="source"), geometry(), CROPS)


def test_crop_sources_match_the_config_schema():
    from configs.schema import CROP_SOURCES as SCHEMA_SOURCES
    from detector.vertebra_crops import CROP_SOURCES

    assert CROP_SOURCES == SCHEMA_SOURCES


class Volume:
    def __init__(self, hu):
        self.hu = hu

    def get(self, i):
        return self.hu[min(max(int(i), 0), len(self.hu) - 1)]


def test_rendered_crops_are_the_padded_cut_resized_and_windowed():
    # "windows" recipe, imgsz = crop size (92): the image is the windowed cut itself, pad_hu outside the slice
    n, rows, cols = 12, 100, 100
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 2000, (n, rows, cols)).astype(np.float32)
    geo = geometry(n=n, shape=(rows, cols))
    plan = crop_plan(boxes("C2", [3, 8], x=0.0, y=10.0), geo, CROPS)   # centre (20, 40): corner (-26, -6), 92 px
    cfg = load_config("classifier", None, ["render.recipe=windows", "render.imgsz=92"])
    images = render_vertebra_crops(Volume(hu), geo, plan, cfg)
    assert images.shape == (len(plan), 92, 92, 3) and images.dtype == np.uint8
    for k, r in enumerate(plan.itertuples()):
        ref = np.full((92, 92), -1000.0, dtype=np.float32)
        ref[6:6 + 86, 26:26 + 66] = hu[r.slice_index, 0:86, 0:66]
        for c, (level, width) in enumerate(cfg["render"]["windows"]):
            np.testing.assert_array_equal(images[k, ..., c], apply_window(ref, level, width))
