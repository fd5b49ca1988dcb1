"""Per-vertebra crops: which slices of each level C1..C7, which square around it, and the images (classifier input).

Pure geometry and rendering; the only I/O is the slice source handed in. One common table of per-slice level boxes
(`LEVEL_BOX_COLUMNS`: slice_index, level, x, y, width, height in original px, source) comes either from a segmentation
(`level_slice_boxes_from_segmentation`) or from the vertebra locator (`level_slice_boxes_from_locator`: the
decoded level boxes on the slices where p_L > crops.presence_threshold). `crop_plan` turns it into the crops:
per level its z-range (first..last slice with a box), `crops.slices_per_level` evenly spaced slices over that
range, and on each a square of side max(box width, box height, crops.min_size_mm) + 2 x crops.margin_mm (mm),
centred on the level's box on that slice (the nearest slice with a box where the chosen one has none), in
pixels per axis from the pixel spacing. Crops may reach outside the image; they are padded with crops.pad_hu.
docs/contracts.md "Vertebra crops".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from data_prep.runs.config import ConfigError
from data_prep.runs.registry import LEVELS

CROP_SOURCES: tuple[str, ...] = ("auto", "locator")
"""crops.source values (configs/schema.py reads the same tuple)."""
SOURCE_SEGMENTATION = "segmentation"   # level boxes from the study's segmentation
SOURCE_LOCATOR = "locator"             # level boxes from the vertebra locator (decoded levels)
SOURCE_EXTRAPOLATED = "extrapolated"   # level boxes of a level the locator never found (detector/levels.py)
SOURCE_NONE = "none"                   # vertebra_extents: a level not found
LEVEL_BOX_COLUMNS: tuple[str, ...] = ("slice_index", "level", "x", "y", "width", "height", "source")
"""The common per-slice, per-level box table (original px; x, y = upper-left corner; source of the boxes)."""
PLAN_COLUMNS: tuple[str, ...] = ("level", "slice_index", "crop_x", "crop_y", "crop_width", "crop_height",
                                 "first_slice", "last_slice", "n_slices", "source")
"""`crop_plan` columns: crop corner and size in original px (may reach outside the image)."""
EXTENT_COLUMNS: tuple[str, ...] = ("level", "first_slice", "last_slice", "n_slices", "source")
NOT_FOUND = -1
LABEL_STUDY, LABEL_BOXES = "study", "boxes"
LABEL_CHOICES = (LABEL_STUDY, "boxes_where_known")
"""crops.label: "study" = every crop of a level gets the level's study label (weak); "boxes_where_known" = in a
study with fracture boxes, a fractured level's crop is 1 only near a slice where a box lies on it, and that
level's boxed slices are cropped too (the study label elsewhere)."""
"""first_slice / last_slice of a level that was not found (n_slices 0, source "none")."""
BOX_VALUES: tuple[str, ...] = ("x", "y", "width", "height")


def level_slice_boxes_from_segmentation(table: pd.DataFrame) -> pd.DataFrame:
    """Per-slice level boxes from data_prep.dicom.segmentation.slice_level_table (cervical levels only)."""
    missing = [c for c in ("slice_index", "level", *BOX_VALUES) if c not in table.columns]
    if missing:
        raise ValueError(f"segmentation level table lacks columns {missing}")
    return _common(table[table["level"].isin(LEVELS)], SOURCE_SEGMENTATION)


def level_slice_boxes_from_locator(level_boxes: pd.DataFrame | None, slice_levels: pd.DataFrame | None,
                                   crops_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Per-slice level boxes from the locator's decoded levels: level L's boxes on the slices where p_L > threshold.

    threshold = crops_cfg["presence_threshold"]; level_boxes / slice_levels: detector.levels.locate_study's tables.
    A decoded level with no slice above the threshold keeps every box of its decoded run. `source` is `locator`,
    or `extrapolated` for a level the locator never found (its boxes are held from the nearest located level).
    """
    presence_threshold = float(crops_cfg["presence_threshold"])
    if level_boxes is None or slice_levels is None or len(level_boxes) == 0:
        return _common(pd.DataFrame(columns=["slice_index", "level", *BOX_VALUES]), SOURCE_LOCATOR)
    p = slice_levels.set_index("slice_index")[[f"p_{lv}" for lv in LEVELS]]
    p.columns = list(LEVELS)
    presence = p.stack()     # (slice_index, level) -> p_L
    keys = pd.MultiIndex.from_arrays([level_boxes["slice_index"].astype(int), level_boxes["level"].astype(str)])
    p_box = presence.reindex(keys).to_numpy(dtype=float)
    keep = np.nan_to_num(p_box, nan=0.0) > presence_threshold
    levels = level_boxes["level"].astype(str)
    keep |= ~levels.isin(set(levels[keep])).to_numpy()        # a level without any confident slice: its whole run
    extrapolated = (level_boxes["source"].astype(str) == SOURCE_EXTRAPOLATED).to_numpy() \
        if "source" in level_boxes.columns else np.zeros(len(level_boxes), dtype=bool)
    kept = level_boxes[keep]
    return _common(kept, np.where(extrapolated[keep], SOURCE_EXTRAPOLATED, SOURCE_LOCATOR))


def crop_plan(level_slice_boxes: pd.DataFrame, geometry: Any, crops_cfg: Mapping[str, Any], *,
              source: str | None = None, extra_slices: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Plan the crops of every level found (module doc): one row per (level, chosen slice), PLAN_COLUMNS.

    source: the plan's `source` value; None = the box table's `source` column (its first value).
    extra_slices: level -> slice indices cropped besides the evenly spaced ones (those inside the level's range;
    prepare-classifier adds a fractured level's boxed slices this way).
    """
    k = int(crops_cfg["slices_per_level"])
    margin, min_size = float(crops_cfg["margin_mm"]), float(crops_cfg["min_size_mm"])
    if k < 1 or margin < 0 or min_size <= 0:
        raise ConfigError(f"crops: slices_per_level must be >= 1, margin_mm >= 0 and min_size_mm > 0; found {k}, "
                          f"{margin}, {min_size}")
    row_mm, col_mm = (float(v) for v in geometry.pixel_spacing[:2])
    if row_mm <= 0 or col_mm <= 0:
        raise ValueError(f"pixel spacing must be > 0, found {tuple(geometry.pixel_spacing)}")
    if source is None:
        if "source" not in level_slice_boxes.columns:
            raise ValueError("crop_plan: the level box table has no 'source' column and no source was given")
        boxes = _common(level_slice_boxes, level_slice_boxes["source"].fillna(SOURCE_NONE).astype(str).to_numpy())
    else:
        boxes = _common(level_slice_boxes, source)
    frames = []
    for level in LEVELS:
        lb = boxes[boxes["level"] == level]
        if not len(lb):
            continue
        level_source = str(lb["source"].iloc[0])
        lb = lb.assign(_x2=lb["x"] + lb["width"], _y2=lb["y"] + lb["height"])
        g = lb.groupby("slice_index", sort=True).agg(x1=("x", "min"), y1=("y", "min"), x2=("_x2", "max"),
                                                     y2=("_y2", "max"))   # one box per slice (union if several)
        have = g.index.to_numpy(dtype=int)
        first, last = int(have[0]), int(have[-1])
        chosen = np.rint(np.linspace(first, last, k)).astype(int)
        extra = np.asarray(list((extra_slices or {}).get(level, ())), dtype=int)
        chosen = np.unique(np.concatenate([chosen, extra[(extra >= first) & (extra <= last)]]))
        nearest = have[np.abs(have[None, :] - chosen[:, None]).argmin(axis=1)]
        b = g.loc[nearest]
        w_mm = (b["x2"] - b["x1"]).to_numpy(float) * col_mm
        h_mm = (b["y2"] - b["y1"]).to_numpy(float) * row_mm
        side = np.maximum(np.maximum(w_mm, h_mm), min_size) + 2.0 * margin
        width = np.maximum(1, np.rint(side / col_mm)).astype(np.int64)
        height = np.maximum(1, np.rint(side / row_mm)).astype(np.int64)
        cx = ((b["x1"] + b["x2"]) / 2.0).to_numpy(float)
        cy = ((b["y1"] + b["y2"]) / 2.0).to_numpy(float)
        frames.append(pd.DataFrame({
            "level": level, "slice_index": chosen, "crop_x": np.rint(cx - width / 2.0).astype(np.int64),
            "crop_y": np.rint(cy - height / 2.0).astype(np.int64), "crop_width": width, "crop_height": height,
            "first_slice": first, "last_slice": last, "n_slices": last - first + 1, "source": level_source}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("level", "source") else np.int64)
                             for c in PLAN_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(PLAN_COLUMNS)]


def boxed_level_slices(level_slice_boxes: pd.DataFrame, fracture_boxes: pd.DataFrame) -> dict[str, set[int]]:
    """Level -> slice indices where a fracture box (slice_index, x, y, width, height) overlaps the level's box."""
    out: dict[str, set[int]] = {}
    if not len(fracture_boxes) or not len(level_slice_boxes):
        return out
    pairs = level_slice_boxes.merge(fracture_boxes, on="slice_index", suffixes=("", "_f"))
    overlap = ((pairs["x"] < pairs["x_f"] + pairs["width_f"]) & (pairs["x_f"] < pairs["x"] + pairs["width"])
               & (pairs["y"] < pairs["y_f"] + pairs["height_f"]) & (pairs["y_f"] < pairs["y"] + pairs["height"]))
    for level, group in pairs[overlap].groupby("level"):
        out[str(level)] = set(group["slice_index"].astype(int))
    return out


def crop_labels(plan: pd.DataFrame, level_labels: Mapping[str, int], boxed: Mapping[str, set[int]] | None, *,
                near_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Each crop's label and its source: the level's study label ("study"), or, when the study has fracture
    boxes (`boxed` not None), 1 only within `near_slices` of a slice where a box lies on that level ("boxes")."""
    study = np.array([int(level_labels[lv]) for lv in plan["level"]], dtype=int)
    if boxed is None:
        return study, np.full(len(plan), LABEL_STUDY, dtype=object)
    near = np.array([any(abs(int(s) - b) <= near_slices for b in boxed.get(lv, ()))
                     for lv, s in zip(plan["level"], plan["slice_index"], strict=True)], dtype=bool)
    return (study.astype(bool) & near).astype(int), np.full(len(plan), LABEL_BOXES, dtype=object)


def vertebra_extents(plan: pd.DataFrame) -> pd.DataFrame:
    """Per level C1..C7: first_slice, last_slice, n_slices and source (a level not found: -1, -1, 0, "none")."""
    found = plan.drop_duplicates("level").set_index("level")
    rows = []
    for level in LEVELS:
        if level in found.index:
            r = found.loc[level]
            rows.append((level, int(r["first_slice"]), int(r["last_slice"]), int(r["n_slices"]), str(r["source"])))
        else:
            rows.append((level, NOT_FOUND, NOT_FOUND, 0, SOURCE_NONE))
    return pd.DataFrame(rows, columns=list(EXTENT_COLUMNS))


def render_vertebra_crops(source: Any, geometry: Any, plan: pd.DataFrame, config: Mapping[str, Any]) -> np.ndarray:
    """Render the plan's crops to uint8 (n, imgsz, imgsz, 3) in the config's render recipe (configs/classifier.yaml)."""
    from detector.render import render_crops

    crops = plan[["crop_x", "crop_y", "crop_width", "crop_height"]].to_numpy(dtype=np.int64)
    return render_crops(source, plan["slice_index"].to_numpy(dtype=int).tolist(), geometry, crops,
                        render=config["render"], pad_hu=float(config["crops"]["pad_hu"]))


def _common(table: pd.DataFrame, source: Any) -> pd.DataFrame:
    """The LEVEL_BOX_COLUMNS of a table, typed (int slice_index, str level, float box), sorted by slice and level.

    source: one value for every row, or one per row."""
    out = pd.DataFrame({"slice_index": table["slice_index"].to_numpy(dtype=np.int64),
                        "level": table["level"].astype(str).to_numpy(),
                        **{c: table[c].to_numpy(dtype=float) for c in BOX_VALUES}, "source": source})
    order = out["level"].map({lv: i for i, lv in enumerate(LEVELS)})
    return out.assign(_o=order).sort_values(["slice_index", "_o"], kind="stable").drop(columns="_o").reset_index(
        drop=True)
