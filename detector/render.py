"""HU slices -> the uint8 3-channel images YOLO sees, and the exact box mapping back to original pixels.

Recipes (config `render.recipe`):
- "2.5d": channels = the slice `d` slices above (superior, lower slice_index), the slice itself, and the
  slice `d` below, all in one bone window; `d` = `render.neighbour_mm` in whole slices (at least 1),
  clamped at the study ends.
- "windows": one slice in three windows (`render.windows`, (level, width) per channel).

`render.crack_channel` (null, or 0..2) replaces that channel of either recipe with the crack response of the
slice (detector.crack_filter: thin lucent lines crossing the cortex, computed on the slice's or crop's own pixels
at the study's pixel spacing, then resized like the other channels); docs/crack_channel.md. Channel 2 is the
recommended one: the inferior neighbour of "2.5d" (the superior one keeps the z context) or the widest window of
"windows" (700/3200, nearly a rescaled copy of the 400/1800 bone window).

Channel order is the order of the last axis of the array, which is what `cv2.imwrite` stores and
`cv2.imread` returns, so an image written for training and the same array fed in memory at inference
are identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import cv2
import numpy as np

from data_prep.runs.config import ConfigError

RECIPES: tuple[str, ...] = ("2.5d", "windows")
N_CHANNELS: int = 3
UINT8_MAX: float = 255.0
MIN_NEIGHBOUR_SLICES: int = 1


class SliceSource(Protocol):
    """Anything with `get(index) -> HU slice (rows, cols)` for canonical indices (a reader chunk)."""

    def get(self, index: int) -> np.ndarray: ...


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU to uint8 through a window: level - width/2 -> 0, level + width/2 -> 255, rounded, clipped."""
    if width <= 0:
        raise ConfigError(f"window width must be > 0, found {width}")
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(UINT8_MAX / width)
    return np.rint(np.clip(scaled, 0.0, UINT8_MAX)).astype(np.uint8)


def slice_spacing(geometry: Any) -> float:
    """Return the distance between neighbouring slices (mm): median |diff z_mm|, else the slice thickness."""
    z = np.asarray(getattr(geometry, "z_mm", ()), dtype=np.float64)
    if z.size > 1:
        steps = np.abs(np.diff(z))
        steps = steps[steps > 0]
        if steps.size:
            return float(np.median(steps))
    thickness = getattr(geometry, "slice_thickness", None)
    if thickness is not None and float(thickness) > 0:
        return float(thickness)
    return 1.0


def neighbour_offset(geometry: Any, neighbour_mm: float) -> int:
    """Return the 2.5D neighbour distance in whole slices: round(neighbour_mm / spacing), at least 1."""
    return max(MIN_NEIGHBOUR_SLICES, int(round(float(neighbour_mm) / slice_spacing(geometry))))


def context_slices(geometry: Any, render: Mapping[str, Any]) -> int:
    """Return how many neighbour slices a chunk needs on each side for this recipe (0 for "windows")."""
    _check_recipe(render)
    return neighbour_offset(geometry, render["neighbour_mm"]) if render["recipe"] == "2.5d" else 0


def crack_channel_index(render: Mapping[str, Any]) -> int | None:
    """Return the channel the crack response replaces (`render.crack_channel`), or None without one."""
    value = render.get("crack_channel")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < N_CHANNELS:
        raise ConfigError(f"render.crack_channel must be null or a channel 0..{N_CHANNELS - 1}, found {value!r}")
    return value


def scale_for(shape: Sequence[int], imgsz: int) -> tuple[float, float]:
    """Return (scale_x, scale_y) = (imgsz / cols, imgsz / rows): original pixels -> image pixels."""
    rows, cols = int(shape[0]), int(shape[1])
    return imgsz / cols, imgsz / rows


def resize_to(image: np.ndarray, imgsz: int) -> np.ndarray:
    """Resize a 2D array to imgsz x imgsz with OpenCV (area averaging down, linear up; identity if equal)."""
    rows, cols = image.shape[:2]
    if rows == imgsz and cols == imgsz:
        return image
    interp = cv2.INTER_AREA if imgsz <= min(rows, cols) else cv2.INTER_LINEAR
    return cv2.resize(image, (imgsz, imgsz), interpolation=interp)


def render_slices(chunk: SliceSource, indices: Sequence[int], geometry: Any, *,
                  render: Mapping[str, Any]) -> tuple[np.ndarray, tuple[float, float]]:
    """Render canonical slices `indices` to uint8 (m, imgsz, imgsz, 3) images; return them and (scale_x, scale_y)."""
    images = _render(chunk, indices, geometry, render=render, crops=None, pad_hu=0.0)
    return images, scale_for(geometry.shape, int(render["imgsz"]))


def render_crops(chunk: SliceSource, indices: Sequence[int], geometry: Any, crops: np.ndarray, *,
                 render: Mapping[str, Any], pad_hu: float) -> np.ndarray:
    """Render the int crop boxes (m, 4: x, y, width, height; original px) of slices `indices` to imgsz images.

    Every channel of an image (2.5D neighbours included) is cut with the crop of its centre slice; parts of a
    crop outside the image are `pad_hu`. Map boxes back with detector.roi.crop_xyxy_to_original.
    """
    crops = np.asarray(crops, dtype=np.int64).reshape(-1, 4)
    if len(crops) != len(indices):
        raise ValueError(f"{len(indices)} slices but {len(crops)} crop boxes")
    return _render(chunk, indices, geometry, render=render, crops=crops, pad_hu=pad_hu)


def _render(chunk: SliceSource, indices: Sequence[int], geometry: Any, *, render: Mapping[str, Any],
            crops: np.ndarray | None, pad_hu: float) -> np.ndarray:
    """Render slices (whole, or cut to `crops`) to uint8 (m, imgsz, imgsz, 3) in the configured recipe."""
    from detector.roi import crop_padded

    _check_recipe(render)
    crack = crack_channel_index(render)
    imgsz = int(render["imgsz"])
    n_slices = len(geometry.paths)
    indices = [int(i) for i in indices]
    images = np.empty((len(indices), imgsz, imgsz, N_CHANNELS), dtype=np.uint8)
    window_channels = [c for c in range(N_CHANNELS) if c != crack]

    def native(j: int, k: int) -> np.ndarray:
        """Slice j (clamped to the study), cut to image k's crop when there are crops, at its own pixels."""
        hu = _hu(chunk, min(max(j, 0), n_slices - 1))
        return hu if crops is None else crop_padded(hu, crops[k], pad_hu)

    if render["recipe"] == "2.5d":
        off = neighbour_offset(geometry, render["neighbour_mm"])
        level, width = float(render["window_level"]), float(render["window_width"])
        slot: dict[tuple[int, tuple[int, ...] | None], int] = {}   # neighbours are shared between images
        sources: list[np.ndarray] = []
        picks = np.empty((len(indices), len(window_channels)), dtype=np.intp)
        for k, i in enumerate(indices):
            crop = None if crops is None else tuple(int(v) for v in crops[k])
            # superior neighbour (z + d), the slice, inferior neighbour (z - d); the crack channel's is skipped
            slices = (i - off, i, i + off)
            for p, c in enumerate(window_channels):
                j = slices[c]
                key = (min(max(j, 0), n_slices - 1), crop)
                if key not in slot:
                    slot[key] = len(sources)
                    sources.append(resize_to(native(j, k), imgsz))
                picks[k, p] = slot[key]
        if sources:
            windowed = apply_window(np.stack(sources), level, width)   # one vectorised pass per batch
            images[..., window_channels] = windowed[picks].transpose(0, 2, 3, 1)
    elif indices:
        windows = _windows(render)
        resized = np.stack([resize_to(native(i, k), imgsz) for k, i in enumerate(indices)])
        for c in window_channels:
            images[..., c] = apply_window(resized, *windows[c])
    if crack is not None:
        from detector.crack_filter import crack_channel

        for k, i in enumerate(indices):
            images[k, :, :, crack] = crack_channel(native(i, k), geometry.pixel_spacing, render, imgsz)
    return images


def image_xyxy_to_original(xyxy: np.ndarray, scale_xy: tuple[float, float],
                           shape: Sequence[int] | None = None) -> np.ndarray:
    """Map (k, 4) image-space [x1, y1, x2, y2] to original-pixel [x, y, width, height] (clipped if shape)."""
    sx, sy = scale_xy
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    x1, x2 = b[:, 0] / sx, b[:, 2] / sx
    y1, y2 = b[:, 1] / sy, b[:, 3] / sy
    if shape is not None:
        rows, cols = shape[0], shape[1]
        x1, x2 = np.clip(x1, 0, cols), np.clip(x2, 0, cols)
        y1, y2 = np.clip(y1, 0, rows), np.clip(y2, 0, rows)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)


def clip_xywh(xywh: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Clip (k, 4) original-pixel [x, y, width, height] boxes to the image (rows, cols)."""
    b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    rows, cols = shape[0], shape[1]
    x1, y1 = np.clip(b[:, 0], 0, cols), np.clip(b[:, 1], 0, rows)
    x2, y2 = np.clip(b[:, 0] + b[:, 2], 0, cols), np.clip(b[:, 1] + b[:, 3], 0, rows)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)


def xywh_to_yolo(xywh: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Map (k, 4) original-pixel upper-left [x, y, w, h] to normalised YOLO [cx, cy, w, h] (image-size free)."""
    b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    rows, cols = float(shape[0]), float(shape[1])
    return np.stack([(b[:, 0] + b[:, 2] / 2) / cols, (b[:, 1] + b[:, 3] / 2) / rows,
                     b[:, 2] / cols, b[:, 3] / rows], axis=1)


def yolo_to_xywh(cxcywh: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Map (k, 4) normalised YOLO [cx, cy, w, h] back to original-pixel upper-left [x, y, w, h]."""
    b = np.asarray(cxcywh, dtype=np.float64).reshape(-1, 4)
    rows, cols = float(shape[0]), float(shape[1])
    w, h = b[:, 2] * cols, b[:, 3] * rows
    return np.stack([b[:, 0] * cols - w / 2, b[:, 1] * rows - h / 2, w, h], axis=1)


def render_summary(render: Mapping[str, Any]) -> dict[str, Any]:
    """Return the render settings that define the images (written into data.yaml and run records)."""
    from detector.crack_filter import CRACK_KEYS

    _check_recipe(render)
    keys = ("recipe", "imgsz", "neighbour_mm", "window_level", "window_width") if render["recipe"] == "2.5d" \
        else ("recipe", "imgsz", "windows")
    if crack_channel_index(render) is not None:
        keys += ("crack_channel", *CRACK_KEYS)
    return {k: (list(map(list, render[k])) if k == "windows" else render[k]) for k in keys}


def _hu(chunk: SliceSource, index: int) -> np.ndarray:
    hu = chunk.get(index)
    return hu if hu.dtype == np.float32 else hu.astype(np.float32)


def _windows(render: Mapping[str, Any]) -> list[tuple[float, float]]:
    windows = [(float(w[0]), float(w[1])) for w in render["windows"]]
    if len(windows) != N_CHANNELS:
        raise ConfigError(f"render.windows must hold {N_CHANNELS} (level, width) pairs, found {len(windows)}")
    return windows


def _check_recipe(render: Mapping[str, Any]) -> None:
    recipe = render["recipe"]
    if recipe not in RECIPES:
        import difflib

        close = difflib.get_close_matches(str(recipe), RECIPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"render.recipe must be one of {', '.join(RECIPES)}, found {recipe!r}{hint}")
