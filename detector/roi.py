"""The spine region of interest: one square crop of fixed physical size per slice, centred on the cervical column.

Built from the vertebra locator's boxes (level_boxes: every slice inside a located level's run), the centre
of the union of the located boxes on each slice, interpolated along z where no level was located in between,
held at the nearest located value above the first and below the last located slice, and smoothed along z
(the column is continuous). Where a study has no located slice at all (no locator in the model folder, or
the locator found nothing), the fallback is the centre of the body outline on the sampled slices (the
largest connected region above `roi.body_hu`), smoothed the same way, which still covers the spine.

The square is `roi.size_mm` on each side, so its size in pixels follows from the study's pixel spacing
(rows and columns separately); it is shifted to stay inside the image where it fits and padded with
`roi.pad_hu` where it cannot. Every crop is then resized to the detector's `render.imgsz`, so the detector
always sees the same millimetres per pixel (size_mm / imgsz). Boxes map back exactly:
original_x = roi_x + image_x * roi_width / imgsz (docs/contracts.md "Spine ROI").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from data_prep.runs.config import ConfigError

SOURCE_LOCATOR = "locator"     # inside the located range: union of located boxes (interpolated between them)
SOURCE_HELD = "held"           # above the first / below the last located slice: the nearest located centre
SOURCE_BODY = "body"           # no located slice in the study: centre of the body outline
SOURCE_FULL = "full"           # ROI off, or fallback "full": the whole slice
ROI_SOURCES: tuple[str, ...] = (SOURCE_LOCATOR, SOURCE_HELD, SOURCE_BODY, SOURCE_FULL)
FALLBACKS: tuple[str, ...] = ("body", "full")
ROI_COLUMNS: tuple[str, ...] = ("roi_x", "roi_y", "roi_width", "roi_height", "roi_source")
"""Per-slice columns of slices.csv and index.csv: the crop's upper-left corner and size (original px)."""


@dataclass(frozen=True)
class SpineRois:
    """Per canonical slice: the crop's upper-left corner (x, y) and size (width, height) in original pixels, and source.

    Corners may lie outside the image (the crop is then padded); sizes are whole pixels.
    """

    x: np.ndarray
    y: np.ndarray
    width: np.ndarray
    height: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def boxes(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Return int (m, 4) [x, y, width, height] rows for `indices` (all slices when None)."""
        rows = np.stack([self.x, self.y, self.width, self.height], axis=1).astype(np.int64)
        return rows if indices is None else rows[np.asarray(indices, dtype=int)]

    def table(self) -> pd.DataFrame:
        """Return the ROI as the slices.csv columns (roi_x, roi_y, roi_width, roi_height, roi_source)."""
        return pd.DataFrame({"roi_x": self.x.astype(np.int64), "roi_y": self.y.astype(np.int64),
                             "roi_width": self.width.astype(np.int64), "roi_height": self.height.astype(np.int64),
                             "roi_source": self.source.astype(str)})

    @classmethod
    def from_table(cls, df: pd.DataFrame) -> SpineRois:
        """Rebuild from a table with the ROI_COLUMNS (one row per slice, in canonical order)."""
        return cls(*(df[c].to_numpy(np.int64) for c in ROI_COLUMNS[:4]), df["roi_source"].to_numpy(str))


def roi_enabled(config: Mapping[str, Any]) -> bool:
    """Return True when the detector config crops to the spine ROI (`roi.enabled`)."""
    roi = config.get("roi") if hasattr(config, "get") else None
    return bool(roi and roi["enabled"])


def check_roi_config(roi: Mapping[str, Any]) -> None:
    """Raise ConfigError for an ROI section that cannot work (sizes <= 0, unknown fallback)."""
    if float(roi["size_mm"]) <= 0:
        raise ConfigError(f"roi.size_mm must be > 0, found {roi['size_mm']}")
    if float(roi["smooth_mm"]) < 0 or float(roi["jitter_mm"]) < 0:
        raise ConfigError(f"roi.smooth_mm and roi.jitter_mm must be >= 0, found {roi['smooth_mm']}, "
                          f"{roi['jitter_mm']}")
    if roi["fallback"] not in FALLBACKS:
        raise ConfigError(f"roi.fallback must be one of {', '.join(FALLBACKS)}, found {roi['fallback']!r}")


def full_rois(n_slices: int, shape: Sequence[int]) -> SpineRois:
    """Return the whole-slice 'ROI' for every slice (source 'full')."""
    rows, cols = int(shape[0]), int(shape[1])
    zeros = np.zeros(n_slices, dtype=np.int64)
    return SpineRois(zeros, zeros.copy(), np.full(n_slices, cols), np.full(n_slices, rows),
                     np.full(n_slices, SOURCE_FULL, dtype=object))


def body_centre(hu: np.ndarray, body_hu: float) -> tuple[float, float] | None:
    """Return the (x, y) centroid (px) of the largest connected region above `body_hu` (the body), or None."""
    import cv2

    mask = (np.asarray(hu) > body_hu).astype(np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return float(centroids[largest, 0]), float(centroids[largest, 1])


def located_centres(level_boxes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (slice_index, cx, cy): the centre of the union of each slice's located vertebra boxes (px)."""
    if level_boxes is None or len(level_boxes) == 0:
        return np.zeros(0, dtype=int), np.zeros(0), np.zeros(0)
    b = level_boxes.assign(_x2=level_boxes["x"] + level_boxes["width"], _y2=level_boxes["y"] + level_boxes["height"])
    g = b.groupby("slice_index").agg(x1=("x", "min"), y1=("y", "min"), x2=("_x2", "max"), y2=("_y2", "max"))
    return (g.index.to_numpy(dtype=int), ((g["x1"] + g["x2"]) / 2).to_numpy(float),
            ((g["y1"] + g["y2"]) / 2).to_numpy(float))


def spine_rois(n_slices: int, shape: Sequence[int], pixel_spacing: Sequence[float], slice_spacing: float, *,
               roi: Mapping[str, Any], located: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               body: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> SpineRois:
    """Build every slice's ROI from located centres (preferred) or body centres (fallback); see the module doc.

    located/body: (slice_index, cx, cy) in original px on the slices where they were measured.
    pixel_spacing: (row spacing, column spacing) in mm, as DICOM PixelSpacing.
    """
    check_roi_config(roi)
    if n_slices < 1:
        raise ValueError("a study needs at least one slice")
    source = np.full(n_slices, SOURCE_LOCATOR, dtype=object)
    if located is not None and len(located[0]):
        idx, cx, cy = located
        order = np.argsort(idx)
        idx, cx, cy = np.asarray(idx)[order], np.asarray(cx)[order], np.asarray(cy)[order]
        source[:idx[0]] = SOURCE_HELD
        source[idx[-1] + 1:] = SOURCE_HELD
    elif roi["fallback"] == "body" and body is not None and len(body[0]):
        idx, cx, cy = (np.asarray(a) for a in body)
        order = np.argsort(idx)
        idx, cx, cy = idx[order], cx[order], cy[order]
        source[:] = SOURCE_BODY
    else:
        return full_rois(n_slices, shape)
    grid = np.arange(n_slices)
    centre_x = np.interp(grid, idx, cx)      # np.interp holds the end values outside [idx[0], idx[-1]]
    centre_y = np.interp(grid, idx, cy)
    sigma = float(roi["smooth_mm"]) / max(float(slice_spacing), 1e-6)
    if sigma > 0 and n_slices > 1:
        from scipy.ndimage import gaussian_filter1d

        centre_x = gaussian_filter1d(centre_x, sigma, mode="nearest")
        centre_y = gaussian_filter1d(centre_y, sigma, mode="nearest")
    x, y, w, h = square_at(centre_x, centre_y, shape, pixel_spacing, float(roi["size_mm"]))
    return SpineRois(x, y, w, h, source)


def square_at(centre_x: np.ndarray, centre_y: np.ndarray, shape: Sequence[int], pixel_spacing: Sequence[float],
              size_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return int corners and sizes of size_mm squares at the given centres, kept inside the image where they fit.

    Width = round(size_mm / column spacing), height = round(size_mm / row spacing). A square that fits in the
    image is shifted inside it; one larger than the image is centred on the image (padded on both sides).
    """
    rows, cols = int(shape[0]), int(shape[1])
    row_mm, col_mm = float(pixel_spacing[0]), float(pixel_spacing[1])
    if row_mm <= 0 or col_mm <= 0:
        raise ValueError(f"pixel spacing must be > 0, found {tuple(pixel_spacing)}")
    w = max(1, int(round(size_mm / col_mm)))
    h = max(1, int(round(size_mm / row_mm)))
    x = np.rint(np.asarray(centre_x, dtype=float) - w / 2.0).astype(np.int64)
    y = np.rint(np.asarray(centre_y, dtype=float) - h / 2.0).astype(np.int64)
    x = np.clip(x, 0, cols - w) if w <= cols else np.full_like(x, -((w - cols) // 2))
    y = np.clip(y, 0, rows - h) if h <= rows else np.full_like(y, -((h - rows) // 2))
    n = len(x)
    return x, y, np.full(n, w, dtype=np.int64), np.full(n, h, dtype=np.int64)


def jitter_rois(rois: SpineRois, shape: Sequence[int], pixel_spacing: Sequence[float], jitter_mm: float,
                rng: np.random.Generator) -> SpineRois:
    """Shift every slice's crop by a uniform random offset of up to +/- jitter_mm per axis (training only).

    Offsets are whole pixels, never more than jitter_mm: rounding is capped at floor(jitter_mm / spacing).
    """
    if jitter_mm <= 0 or len(rois) == 0 or np.all(rois.source == SOURCE_FULL):
        return rois
    row_mm, col_mm = float(pixel_spacing[0]), float(pixel_spacing[1])
    dx = rng.uniform(-jitter_mm, jitter_mm, len(rois)) / col_mm
    dy = rng.uniform(-jitter_mm, jitter_mm, len(rois)) / row_mm
    lim_x, lim_y = np.floor(jitter_mm / col_mm), np.floor(jitter_mm / row_mm)
    rows, cols = int(shape[0]), int(shape[1])
    w, h = rois.width, rois.height
    x = rois.x + np.clip(np.rint(dx), -lim_x, lim_x).astype(np.int64)
    y = rois.y + np.clip(np.rint(dy), -lim_y, lim_y).astype(np.int64)
    x = np.where(w <= cols, np.clip(x, 0, np.maximum(cols - w, 0)), rois.x)
    y = np.where(h <= rows, np.clip(y, 0, np.maximum(rows - h, 0)), rois.y)
    return SpineRois(x, y, w.copy(), h.copy(), rois.source.copy())


def crop_padded(hu: np.ndarray, box: Sequence[int], pad_value: float) -> np.ndarray:
    """Return hu[y:y+h, x:x+w] for an int box that may reach outside the image, padded with `pad_value`."""
    x, y, w, h = (int(v) for v in box)
    rows, cols = hu.shape[:2]
    if x >= 0 and y >= 0 and x + w <= cols and y + h <= rows:
        return hu[y:y + h, x:x + w]
    out = np.full((h, w), pad_value, dtype=hu.dtype)
    sx0, sy0 = max(x, 0), max(y, 0)
    sx1, sy1 = min(x + w, cols), min(y + h, rows)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = hu[sy0:sy1, sx0:sx1]
    return out


def boxes_to_crop(xywh: np.ndarray, box: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Clip original-px [x, y, w, h] boxes to a crop; return (boxes in crop px, True where the crop cut the box)."""
    b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    x0, y0, w, h = (float(v) for v in box)
    x1 = np.clip(b[:, 0] - x0, 0, w)
    y1 = np.clip(b[:, 1] - y0, 0, h)
    x2 = np.clip(b[:, 0] + b[:, 2] - x0, 0, w)
    y2 = np.clip(b[:, 1] + b[:, 3] - y0, 0, h)
    cut = (b[:, 0] < x0) | (b[:, 1] < y0) | (b[:, 0] + b[:, 2] > x0 + w) | (b[:, 1] + b[:, 3] > y0 + h)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1), cut


def crop_xyxy_to_original(xyxy: np.ndarray, box: Sequence[int], imgsz: int,
                          shape: Sequence[int] | None = None) -> np.ndarray:
    """Map (k, 4) [x1, y1, x2, y2] in an imgsz image of crop `box` to original-pixel [x, y, width, height]."""
    x0, y0, w, h = (float(v) for v in box)
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    sx, sy = w / imgsz, h / imgsz
    x1, x2 = x0 + b[:, 0] * sx, x0 + b[:, 2] * sx
    y1, y2 = y0 + b[:, 1] * sy, y0 + b[:, 3] * sy
    if shape is not None:
        rows, cols = shape[0], shape[1]
        x1, x2 = np.clip(x1, 0, cols), np.clip(x2, 0, cols)
        y1, y2 = np.clip(y1, 0, rows), np.clip(y2, 0, rows)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
