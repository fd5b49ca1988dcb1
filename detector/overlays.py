"""Review overlays per study: the top-scoring slices with their boxes, a contact sheet, a score profile.

Written into OUT/overlays/<uid>/ by `spinefrac detect` (config `detect.overlays`):
    NN_slice<slice_number>.png   top-N slices by maximum box score, from distinct runs along z (each at least
                                 `min_gap_mm` from every better one), predicted boxes labelled with their level
                                 and score, ground-truth boxes in a second colour when labels are given; zoomed
                                 to the slice's spine ROI (slices.csv roi_*, plus `zoom_margin`, grown to hold
                                 every drawn box) with a small whole-slice inset marking the zoom
    contact_sheet.png            those slices side by side
    score_profile.png            slice position (z, mm) against the slice's maximum box score; given the
                                 study's vertebrae table, each found level's z-range is a shaded band
                                 labelled C1..C7 (with the vertebra classifier's cls_max when it ran)
Slices (or their zoom region) are shown in a display window, stretched to a square `display_size` like the
model input; all text uses OpenCV's built-in Hershey font (no font files).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd

from data_prep.runs.artifacts import atomic_path
from data_prep.runs.registry import LEVELS, STUDY_COL

log = logging.getLogger("detector")

CONTACT_SHEET = "contact_sheet.png"
SCORE_PROFILE = "score_profile.png"
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOR = (255, 255, 255)          # BGR white: captions, never a box colour
TEXT_MARGIN = 4                       # px between a box and its score text, and around captions
BOX_LINE = cv2.LINE_8                 # exact, non-blended box edges
PNG_EXT = ".png"
SLICE_PNG = "{rank:02d}_slice{slice_number}" + PNG_EXT
"""A top slice's overlay: rank from 01, then the slice_number (InstanceNumber)."""
SLICE_PNG_PATTERN = re.compile(r"^(?P<rank>\d+)_slice(?P<slice_number>-?\d+)\.png$")
"""What SLICE_PNG writes, for readers of an overlay folder (the review report, the DICOM results)."""
PNG_COMPRESSION = 1                   # zlib level of the overlay PNGs: level 1 writes faster than OpenCV's default 3
BAND_COLUMNS: tuple[str, ...] = ("level", "first_slice", "last_slice")   # vertebrae columns the bands need
BAND_NOT_FOUND = -1                   # first_slice/last_slice of a level that was not found
BAND_SHADES = ("#9ecae1", "#fdae6b")  # alternating band fills (light blue, light orange): neighbours differ
BAND_ALPHA = 0.35                     # band fill opacity: where two levels share slices the overlap looks darker
BAND_LABEL_FONTSIZE = 7               # pt: level label above its band
BAND_LABEL_ROW_PT = 9.0               # pt between the two staggered label rows (neighbouring labels never collide)
BAND_LABEL_ROWS = 2                   # label rows above the axes; band k uses row k % BAND_LABEL_ROWS
TITLE_PAD_PT = 6.0                    # pt between the axes (or its band labels) and the title (matplotlib's default)
CLS_LABEL = "{level} {cls:.2f}"       # band label when the vertebra classifier scored the level
BOX_LABEL = "{level} {score:.2f}"     # a predicted box's label when boxes.csv has its level
INSET_BORDER = (255, 255, 255)        # BGR white: the inset's frame
ZOOM_SOURCES_SKIPPED = ("full",)      # roi_source values with no spine ROI to zoom to (the whole slice)


class Region(NamedTuple):
    """A displayed part of a slice in original pixels: upper-left corner and size (may reach outside the image)."""

    x: float
    y: float
    width: float
    height: float


class LevelBand(NamedTuple):
    """One found level on the score profile: its label and its z range (mm, x0 < x1)."""

    label: str
    x0: float
    x1: float


def level_bands(vertebrae: pd.DataFrame, z_mm: Sequence[float], *, study: str = "") -> list[LevelBand]:
    """The profile bands of one study's vertebrae table, in level order; levels not found are skipped.

    `z_mm[i]` is the z of canonical slice_index i (the profile's x axis). A band spans its first..last
    slice's z, widened by half the median slice spacing on each side so it covers the slices' thickness
    (a one-slice level stays visible). The label is the level, plus cls_max when that is not NaN.
    """
    where = f"vertebrae table of study {study}" if study else "vertebrae table"
    missing = [c for c in BAND_COLUMNS if c not in vertebrae.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, vertebrae.columns))}")
    z = np.asarray(z_mm, dtype=float)
    pad = float(np.median(np.abs(np.diff(z)))) / 2 if len(z) > 1 else 0.0
    seen: set[str] = set()
    bands: dict[str, LevelBand] = {}
    for k, r in enumerate(vertebrae.to_dict("records")):
        level = str(r["level"])
        if level not in LEVELS:
            raise ValueError(f"{where}, row {k}: unknown level {level!r}; expected one of {', '.join(LEVELS)}")
        if level in seen:
            raise ValueError(f"{where}, row {k}: level {level} appears twice")
        seen.add(level)
        first, last = _slice_of(r["first_slice"], where, k, "first_slice"), _slice_of(r["last_slice"], where, k,
                                                                                        "last_slice")
        n_slices = r.get("n_slices")
        if (first, last) == (BAND_NOT_FOUND, BAND_NOT_FOUND) or (n_slices is not None and n_slices == 0):
            continue
        if not 0 <= first <= last < len(z):
            raise ValueError(f"{where}, row {k} ({level}): first_slice {first}, last_slice {last} must satisfy "
                             f"0 <= first_slice <= last_slice < {len(z)} (the study's slice count)")
        lo, hi = sorted((float(z[first]), float(z[last])))
        cls = pd.to_numeric(pd.Series([r.get("cls_max")]), errors="coerce").iloc[0]
        if pd.isna(cls) and pd.notna(r.get("cls_max")):
            raise ValueError(f"{where}, row {k} ({level}): cls_max must be a number or NaN; found {r['cls_max']!r}")
        cls = float(cls)
        label = level if np.isnan(cls) else CLS_LABEL.format(level=level, cls=cls)
        bands[level] = LevelBand(label, lo - pad, hi + pad)
    return [bands[level] for level in LEVELS if level in bands]


def _slice_of(value: Any, where: str, row: int, column: str) -> int:
    """A whole-number slice index from a vertebrae cell, or a ValueError naming the row and column."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = np.nan
    if not np.isfinite(number) or number != int(number) or number < BAND_NOT_FOUND:
        raise ValueError(f"{where}, row {row}: {column} must be a slice_index >= 0 or {BAND_NOT_FOUND} "
                         f"(not found); found {value!r}")
    return int(number)


def display_box(xywh: Sequence[float], shape: Sequence[int], size: int,
                region: Region | None = None) -> tuple[int, int, int, int]:
    """Map an original-pixel [x, y, width, height] box to integer display corners (x1, y1, x2, y2).

    The display shows `region` of the slice (default: the whole slice, `shape` = rows, cols) on `size` x `size` px.
    """
    region = region or Region(0.0, 0.0, float(shape[1]), float(shape[0]))
    sx, sy = size / region.width, size / region.height
    x, y, w, h = (float(v) for v in xywh)
    x, y = x - region.x, y - region.y
    x1, y1 = int(round(x * sx)), int(round(y * sy))
    x2, y2 = int(round((x + w) * sx)) - 1, int(round((y + h) * sy)) - 1
    clip = size - 1
    return min(max(x1, 0), clip), min(max(y1, 0), clip), min(max(x2, 0), clip), min(max(y2, 0), clip)


def write_overlays(study: str | os.PathLike | Any, boxes: pd.DataFrame, out_dir: str | os.PathLike, *,
                   labels: pd.DataFrame | None = None, config: Mapping[str, Any],
                   slices: pd.DataFrame | None = None, vertebrae: pd.DataFrame | None = None) -> list[Path]:
    """Write the top-N slice PNGs, a contact sheet and a score profile for one study; return the paths.

    With `slices` holding the roi_* columns (slices.csv), each slice's spine ROI is outlined (overlays.roi_color).
    With `vertebrae` (one row per level: level, first_slice, last_slice as slice_index, -1 when not found, and
    optionally n_slices, cls_max), the score profile shades each found level's z-range (`level_bands`).
    """
    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.slice_file import read_slice_hu
    from detector.render import apply_window, resize_to

    cfg = config.get("overlays", config)   # the overlays section, or a whole detector config
    geometry = scan_study(study) if isinstance(study, (str, os.PathLike)) else study
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"*{PNG_EXT}"):      # a redo must not leave slices of an earlier run behind
        old.unlink()
    shape = (int(geometry.shape[0]), int(geometry.shape[1]))
    size = int(cfg["display_size"])
    n = len(geometry.paths)
    numbers = np.asarray(geometry.instance_numbers)
    shown = boxes[boxes["score"] >= float(cfg["min_score"])] if len(boxes) else boxes
    top = _top_slices(shown, int(cfg["top_n"]), z_mm=geometry.z_mm, min_gap_mm=float(cfg["min_gap_mm"]))
    truth = _truth_by_index(labels, geometry) if labels is not None else {}
    written: list[Path] = []
    tiles: list[np.ndarray] = []
    window = float(cfg["window_level"]), float(cfg["window_width"])
    for rank, index in enumerate(top, start=1):
        hu = read_slice_hu(geometry.paths[index])
        roi = _roi_of(slices, index)
        slice_boxes = shown[shown["slice_index"] == index].nlargest(int(cfg["max_boxes"]), "score")
        xywhs = [(r.x, r.y, r.width, r.height) for r in slice_boxes.itertuples(index=False)]
        region = zoom_region(roi, [*xywhs, *truth.get(index, [])], float(cfg["zoom_margin"])) \
            if bool(cfg["zoom"]) else None
        view = _crop(hu, region) if region is not None else hu
        image = cv2.cvtColor(apply_window(resize_to(view, size), *window), cv2.COLOR_GRAY2BGR)
        if roi is not None:
            _draw_box(image, display_box(roi, shape, size, region), tuple(cfg["roi_color"]), None, cfg)
        for xywh in truth.get(index, []):
            _draw_box(image, display_box(xywh, shape, size, region), tuple(cfg["truth_color"]), None, cfg)
        for xywh, r in zip(xywhs, slice_boxes.to_dict("records"), strict=True):
            level = r.get("level")
            label = BOX_LABEL.format(level=level, score=float(r["score"])) \
                if isinstance(level, str) and level in LEVELS else f"{float(r['score']):.2f}"
            _draw_box(image, display_box(xywh, shape, size, region), tuple(cfg["box_color"]), label, cfg)
        if region is not None and int(cfg["inset_size"]) > 0:
            _inset(image, hu, region, cfg)
        caption = f"slice {int(numbers[index])} (#{index}) z {float(geometry.z_mm[index]):.1f} mm"
        _caption(image, caption, cfg)
        path = out_dir / SLICE_PNG.format(rank=rank, slice_number=int(numbers[index]))
        _imwrite(path, image)
        written.append(path)
        tiles.append(image)
    uid = getattr(geometry, "study_uid", None) or Path(geometry.paths[0]).parent.name
    bands = level_bands(_rows_of(vertebrae, uid), geometry.z_mm, study=uid) if vertebrae is not None else []
    written.append(_contact_sheet(tiles, out_dir / CONTACT_SHEET, cfg, empty_text=f"{uid}: no box >= "
                                  f"{float(cfg['min_score']):.2f}"))
    written.append(_score_profile(boxes, geometry, n, top, truth, out_dir / SCORE_PROFILE, cfg, uid, bands))
    return written


def _rows_of(vertebrae: pd.DataFrame, uid: str) -> pd.DataFrame:
    """This study's rows of a vertebrae table (all rows when it has no StudyInstanceUID column)."""
    if STUDY_COL not in vertebrae.columns:
        return vertebrae
    rows = vertebrae[vertebrae[STUDY_COL].astype(str) == str(uid)]
    if len(vertebrae) and not len(rows):
        log.warning("vertebrae: no row for study %s; score profile drawn without level bands", uid)
    return rows


def _roi_of(slices: pd.DataFrame | None, index: int) -> tuple[float, float, float, float] | None:
    """The slice's ROI crop (x, y, width, height; original px) from slices.csv columns, or None (none or whole slice)."""
    if slices is None or "roi_source" not in slices.columns:
        return None
    row = slices[slices["slice_index"] == index]
    if not len(row) or str(row["roi_source"].iloc[0]) == "full":
        return None
    r = row.iloc[0]
    return float(r["roi_x"]), float(r["roi_y"]), float(r["roi_width"]), float(r["roi_height"])


def _top_slices(boxes: pd.DataFrame, top_n: int, *, z_mm: Sequence[float] | None = None,
                min_gap_mm: float = 0.0) -> list[int]:
    """Slice indices of the top-N maximum box scores, best first, each at least `min_gap_mm` (in z) from every
    better one: the peaks of distinct runs along z, not neighbours of one run (0: plain top-N)."""
    if not len(boxes) or top_n <= 0:
        return []
    best = boxes.groupby("slice_index")["score"].max().sort_values(ascending=False, kind="stable")
    if z_mm is None or min_gap_mm <= 0:
        return [int(i) for i in best.index[:top_n]]
    z = np.asarray(z_mm, dtype=float)
    chosen: list[int] = []
    for index in best.index:
        if all(abs(z[int(index)] - z[c]) >= min_gap_mm for c in chosen):
            chosen.append(int(index))
            if len(chosen) == top_n:
                break
    return chosen


def zoom_region(roi: Sequence[float] | None, boxes: Sequence[Sequence[float]], margin: float) -> Region | None:
    """The part of a slice a tile shows: the spine ROI widened by `margin` x its size on each side, grown to hold
    every box; None (the whole slice) without a ROI."""
    if roi is None:
        return None
    x, y, w, h = (float(v) for v in roi)
    x0, y0, x1, y1 = x - margin * w, y - margin * h, x + w + margin * w, y + h + margin * h
    for bx, by, bw, bh in boxes:
        x0, y0 = min(x0, float(bx)), min(y0, float(by))
        x1, y1 = max(x1, float(bx) + float(bw)), max(y1, float(by) + float(bh))
    side_x, side_y = x1 - x0, y1 - y0
    if side_x * h > side_y * w:                       # keep the ROI's aspect (square in mm): grow the short side
        grow = side_x * h / w - side_y
        y0, y1 = y0 - grow / 2, y1 + grow / 2
    else:
        grow = side_y * w / h - side_x
        x0, x1 = x0 - grow / 2, x1 + grow / 2
    return Region(x0, y0, x1 - x0, y1 - y0)


def _crop(hu: np.ndarray, region: Region) -> np.ndarray:
    """The region of a slice in whole pixels; parts outside the image are the slice's lowest value (air)."""
    x0, y0 = int(np.floor(region.x)), int(np.floor(region.y))
    x1, y1 = int(np.ceil(region.x + region.width)), int(np.ceil(region.y + region.height))
    out = np.full((y1 - y0, x1 - x0), float(hu.min()), dtype=hu.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, hu.shape[1]), min(y1, hu.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = hu[sy0:sy1, sx0:sx1]
    return out


def _inset(image: np.ndarray, hu: np.ndarray, region: Region, cfg: Mapping[str, Any]) -> None:
    """Draw the whole slice, small, in the tile's upper-right corner, with the zoomed region outlined."""
    from detector.render import apply_window, resize_to

    side = min(int(cfg["inset_size"]), image.shape[0], image.shape[1])
    small = cv2.cvtColor(apply_window(resize_to(hu, side), float(cfg["window_level"]), float(cfg["window_width"])),
                         cv2.COLOR_GRAY2BGR)
    corners = display_box(region, hu.shape, side)
    cv2.rectangle(small, corners[:2], corners[2:], tuple(int(c) for c in cfg["roi_color"]), 1, lineType=BOX_LINE)
    cv2.rectangle(small, (0, 0), (side - 1, side - 1), INSET_BORDER, 1, lineType=BOX_LINE)
    image[:side, image.shape[1] - side:] = small


def _truth_by_index(labels: pd.DataFrame, geometry: Any) -> dict[int, list[tuple[float, float, float, float]]]:
    """Ground-truth boxes of this study keyed by canonical slice index (unknown slice numbers are skipped)."""
    uid = getattr(geometry, "study_uid", None)
    rows = labels[labels[STUDY_COL].astype(str) == str(uid)] if uid is not None and STUDY_COL in labels else labels
    out: dict[int, list[tuple[float, float, float, float]]] = {}
    for r in rows.itertuples(index=False):
        try:
            index = int(geometry.index_of_instance(int(r.slice_number)))
        except (KeyError, ValueError):
            log.warning("labels: study %s has no slice_number %s; ground-truth box not drawn", uid, r.slice_number)
            continue
        out.setdefault(index, []).append((float(r.x), float(r.y), float(r.width), float(r.height)))
    return out


def _draw_box(image: np.ndarray, corners: tuple[int, int, int, int], color: tuple[int, ...], label: str | None,
              cfg: Mapping[str, Any]) -> None:
    x1, y1, x2, y2 = corners
    color = tuple(int(c) for c in color)
    cv2.rectangle(image, (x1, y1), (x2, y2), color, int(cfg["line_thickness"]), lineType=BOX_LINE)
    if label is not None:
        scale = float(cfg["font_scale"])
        (_, th), _ = cv2.getTextSize(label, FONT, scale, 1)
        y_text = y1 - TEXT_MARGIN if y1 - TEXT_MARGIN - th >= 0 else y2 + TEXT_MARGIN + th
        cv2.putText(image, label, (x1, y_text), FONT, scale, color, 1, cv2.LINE_AA)


def _caption(image: np.ndarray, text: str, cfg: Mapping[str, Any]) -> None:
    scale = float(cfg["font_scale"])
    (_, th), _ = cv2.getTextSize(text, FONT, scale, 1)
    cv2.putText(image, text, (TEXT_MARGIN, image.shape[0] - TEXT_MARGIN), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)


def _contact_sheet(tiles: list[np.ndarray], path: Path, cfg: Mapping[str, Any], *, empty_text: str) -> Path:
    tile = int(cfg["sheet_tile"])
    columns = max(1, int(cfg["sheet_columns"]))
    if not tiles:
        sheet = np.zeros((tile, tile * columns, 3), dtype=np.uint8)
        cv2.putText(sheet, empty_text, (TEXT_MARGIN, tile // 2), FONT, float(cfg["font_scale"]), TEXT_COLOR, 1,
                    cv2.LINE_AA)
        _imwrite(path, sheet)
        return path
    n_rows = -(-len(tiles) // columns)
    sheet = np.zeros((n_rows * tile, min(columns, len(tiles)) * tile, 3), dtype=np.uint8)
    for k, image in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = cv2.resize(image, (tile, tile),
                                                                           interpolation=cv2.INTER_AREA)
    _imwrite(path, sheet)
    return path


def _score_profile(boxes: pd.DataFrame, geometry: Any, n: int, top: Sequence[int],
                   truth: Mapping[int, Any], path: Path, cfg: Mapping[str, Any], uid: str,
                   bands: Sequence[LevelBand] = ()) -> Path:
    """Plot slice z (mm) against the slice's maximum box score with matplotlib's Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    z = np.asarray(geometry.z_mm, dtype=float)
    best = np.zeros(n)
    if len(boxes):
        np.maximum.at(best, boxes["slice_index"].to_numpy(dtype=int), boxes["score"].to_numpy(dtype=float))
    width, height = (float(v) for v in cfg["profile_size"])
    fig = Figure(figsize=(width, height), dpi=int(cfg["profile_dpi"]))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(z, best, color="tab:blue", linewidth=1, label="max box score")
    if truth:
        idx = np.array(sorted(truth), dtype=int)
        ax.plot(z[idx], np.full(len(idx), -0.03), "|", color=_rgb(cfg["truth_color"]), markersize=8,
                label="ground-truth slices")
    if len(top):
        t = np.asarray(top, dtype=int)
        ax.plot(z[t], best[t], "o", color=_rgb(cfg["box_color"]), markersize=4, label="overlay slices")
    ax.axhline(float(cfg["min_score"]), color="grey", linewidth=0.5, linestyle="--")
    ax.set_xlabel("z (mm, superior to the right)")
    ax.set_ylabel("max box score")
    ax.set_ylim(-0.06, 1.02)
    title_pad = TITLE_PAD_PT
    if bands:
        _draw_bands(ax, fig, bands)
        title_pad += BAND_LABEL_ROWS * BAND_LABEL_ROW_PT
    ax.set_title(uid, fontsize=8, pad=title_pad)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _draw_bands(ax: Any, fig: Any, bands: Sequence[LevelBand]) -> None:
    """Shade each band behind the profile and label it above the axes, alternating shades and label rows."""
    from matplotlib.transforms import offset_copy

    for k, band in enumerate(bands):
        ax.axvspan(band.x0, band.x1, color=BAND_SHADES[k % len(BAND_SHADES)], alpha=BAND_ALPHA, linewidth=0,
                   zorder=0)
        where = offset_copy(ax.get_xaxis_transform(), fig=fig, y=(k % BAND_LABEL_ROWS) * BAND_LABEL_ROW_PT,
                            units="points")
        ax.text((band.x0 + band.x1) / 2, 1.0, band.label, transform=where, ha="center", va="bottom",
                fontsize=BAND_LABEL_FONTSIZE, clip_on=False)


def _rgb(bgr: Sequence[int]) -> tuple[float, float, float]:
    b, g, r = (float(c) / 255.0 for c in bgr)
    return r, g, b


def _imwrite(path: Path, image: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{PNG_EXT}")   # cv2 picks the format from the suffix
    if not cv2.imwrite(str(tmp), image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]):
        raise OSError(f"{tmp}: OpenCV could not write the image")
    os.replace(tmp, path)
