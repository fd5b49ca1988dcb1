"""The crack channel: thin lucent lines that cut across bone, as one uint8 image channel (`render.crack_channel`).

A hairline fracture is a dark line 0.3-1.5 mm wide that crosses the cortical shell; a vascular channel of the same
width stays inside the cancellous bone, and the cancellous core of a thin element (lamina, pedicle) is a dark band
that runs *along* the cortex. The response is a black top-hat with a line element laid along the local bone surface
(OpenCV morphology on HU; every length in millimetres through the pixel spacing, so it means the same at any
resolution):

1. HU clipped to [CLIP_LOW_HU, CLIP_HIGH_HU] (fat and air alike are "dark"; metal does not outshine a crack).
2. The image is closed with a disc `crack_width_mm` wide: every dark line narrower than that (cracks included) is
   filled. The structure tensor of this closed image, shrunk to ORIENT_PIXEL_MM pixels (Sobel gradients averaged
   over ORIENT_SMOOTH_MM), gives at every pixel the direction of the nearest bone surface or thin bony band, and
   its coherence (1 along one clear surface direction, near 0 at corners, blobs and flat areas).
3. The image is closed with a line segment `crack_width_mm` long in each of N_ORIENTATIONS directions; every pixel
   takes the closing whose line runs along the local surface (the tangent), capped by the disc closing. Such a
   segment bridges a dark line that crosses the cortex (the crack) but not a dark band along it (a thin element's
   core); the cap keeps it from filling the blurred steps of a straight edge a little off its direction.
4. response = (capped tangent closing - image) x coherence: the HU of bone missing along the line, weaker where
   there is no one surface direction (concave corners where two bones meet); 0 where the bridged value is below
   `crack_bone_hu` (no bone on both sides: soft tissue, a channel in soft marrow).
5. uint8 = round(255 * response / `crack_full_hu`), clipped: a break of `crack_full_hu` HU or more is white.

Computed at the slice's (or crop's) own pixels before it is resized, so a 0.3 mm line is seen at native
resolution; a shrunk response keeps its peaks (max over each output pixel's footprint, then area averaging).
Deterministic (OpenCV morphology on uint16 HU, filters on float32). Measurements: docs/crack_channel.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from data_prep.runs.config import ConfigError

CLIP_LOW_HU: float = -100.0
"""HU below this (fat, air, the ROI's padding) are raised to it: every non-bone darkness looks the same."""
CLIP_HIGH_HU: float = 2000.0
"""HU above this (dense cortex, metal) are capped: a streak artefact does not outshine a crack."""
N_ORIENTATIONS: int = 8
"""Directions of the line element, evenly spaced over 180 degrees (22.5 degrees apart)."""
ORIENT_PIXEL_MM: float = 1.0
"""The orientation field is computed on the closed image shrunk to about this pixel size (mm): it is smooth."""
ORIENT_SMOOTH_MM: float = 2.0
"""Gaussian sigma (mm) over which the structure tensor averages gradients: the scale of a cortex or a lamina."""
MIN_HALF_STEPS: int = 1
"""The line element reaches at least one pixel each side of its centre (a 1-pixel element bridges nothing)."""
UINT8_MAX: float = 255.0
COHERENCE_EPS: float = 1.0
"""Added to the structure tensor's trace before dividing (gradients are HU per pixel): flat areas get coherence 0."""
ROUND_HALF: float = 0.5
SCORE_AREA_MM2: float = 5.0
"""crack_score averages the strongest pixels over this area: a line about 10 mm long and 0.5 mm wide."""
DISC_EXTRA_PX: int = 2
"""The disc is this many pixels wider than the line (one each side): a small digital disc is narrower than its
nominal diameter off the axes, and it must fill every crack the line element bridges, at any angle."""
CRACK_KEYS: tuple[str, ...] = ("crack_width_mm", "crack_bone_hu", "crack_full_hu")
"""The render keys of the crack channel (configs/detector.yaml and classifier.yaml `render:`)."""


def line_half_steps(width_mm: float, step_mm: float) -> int:
    """Return the pixel steps on each side of the centre of a line `width_mm` long, one step being `step_mm` (>= 1)."""
    return max(MIN_HALF_STEPS, int(round(float(width_mm) / float(step_mm) / 2.0)))


def line_length_px(width_mm: float, spacing_mm: float) -> int:
    """Return the odd length (px) of an axis-aligned line spanning `width_mm` at `spacing_mm` per pixel (>= 3)."""
    return 2 * line_half_steps(width_mm, spacing_mm) + 1


def line_element(half_steps: int, angle: float) -> np.ndarray:
    """Return a square uint8 structuring element: a centred digital line at `angle` (radians; x right, y down).

    The line runs `half_steps` pixel steps each way along its major axis (the larger of |cos|, |sin|), so a
    diagonal element spans its box corner to corner: the element is 2 x `half_steps` steps long, one step being
    `direction_step_mm` along that direction.
    """
    size = 2 * half_steps + 1
    se = np.zeros((size, size), dtype=np.uint8)
    cos, sin = math.cos(angle), math.sin(angle)
    major = max(abs(cos), abs(sin))
    dx, dy = half_steps * cos / major, half_steps * sin / major
    cv2.line(se, (int(round(half_steps - dx)), int(round(half_steps - dy))),
             (int(round(half_steps + dx)), int(round(half_steps + dy))), 1, 1)
    return se


def direction_step_mm(angle: float, spacing: Sequence[float]) -> float:
    """Return the mm one major-axis pixel step covers along `angle` (pixel axes) at (row, col) `spacing`."""
    cos, sin = math.cos(angle), math.sin(angle)
    major = max(abs(cos), abs(sin))
    return math.hypot(float(spacing[1]) * cos / major, float(spacing[0]) * sin / major)


def _disc(length_y: int, length_x: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (length_x, length_y))


def surface_orientation(closed: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return per pixel the line direction (index 0..N_ORIENTATIONS-1) closest to the local bone tangent, and coherence.

    `closed` is the disc-closed image (rows, cols; any real dtype); `spacing` is (row, col) mm per pixel. The
    structure tensor is computed on a copy shrunk to about ORIENT_PIXEL_MM per pixel; the index is enlarged back
    (nearest), the coherence (float32, 0..1: (l1 - l2) / (l1 + l2) of the tensor's eigenvalues) linearly. Angles
    are in pixel axes (x right, y down), as the line elements are drawn.
    """
    rows, cols = closed.shape
    small_rows = max(1, int(round(rows * spacing[0] / ORIENT_PIXEL_MM)))
    small_cols = max(1, int(round(cols * spacing[1] / ORIENT_PIXEL_MM)))
    small = closed
    if small_rows < rows and small_cols < cols:
        small = cv2.resize(closed, (small_cols, small_rows), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32, copy=False)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3)
    sigma_x = ORIENT_SMOOTH_MM * small.shape[1] / (cols * spacing[1])   # mm -> pixels of `small`
    sigma_y = ORIENT_SMOOTH_MM * small.shape[0] / (rows * spacing[0])
    jxx = cv2.GaussianBlur(gx * gx, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    jyy = cv2.GaussianBlur(gy * gy, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    jxy = cv2.GaussianBlur(gx * gy, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    # doubled angle of the dominant gradient (the surface normal) is atan2(2 jxy, jxx - jyy); the tangent is
    # perpendicular (doubled angle + 180 degrees); line k lies at k * 180 / N degrees (doubled: k * 360 / N)
    doubled = cv2.phase(jyy - jxx, -2.0 * jxy)                       # in [0, 2 pi)
    index = np.rint(doubled * np.float32(N_ORIENTATIONS / (2.0 * math.pi))).astype(np.uint8) % N_ORIENTATIONS
    magnitude = cv2.magnitude(jxx - jyy, 2.0 * jxy)
    coherence = magnitude / (jxx + jyy + np.float32(COHERENCE_EPS))
    if index.shape != (rows, cols):
        index = cv2.resize(index, (cols, rows), interpolation=cv2.INTER_NEAREST)
        coherence = cv2.resize(coherence, (cols, rows), interpolation=cv2.INTER_LINEAR)
    return index, coherence


def crack_response(hu: np.ndarray, spacing: Sequence[float], *, width_mm: float, bone_hu: float) -> np.ndarray:
    """Return the crack response (float32 HU, >= 0) of one HU image (rows, cols) at `spacing` (row, col) mm/px.

    The HU of bone missing along a dark line that the local bone-tangent line element of `width_mm` bridges,
    where the bridged value is at least `bone_hu`; 0 elsewhere (module docstring). Morphology runs on whole HU
    in uint16 (HU - CLIP_LOW_HU), which OpenCV does several times faster than on float32.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"crack_response needs one 2D HU image, got shape {hu.shape}")
    sy, sx = float(spacing[0]), float(spacing[1])
    if not (sy > 0 and sx > 0):
        raise ValueError(f"pixel spacing must be positive, got {tuple(spacing)}")
    image = np.clip(hu.astype(np.float32, copy=False), CLIP_LOW_HU, CLIP_HIGH_HU)
    image -= np.float32(CLIP_LOW_HU - ROUND_HALF)                     # now >= 0.5: truncation rounds
    image = image.astype(np.uint16)
    ly, lx = line_length_px(width_mm, sy), line_length_px(width_mm, sx)
    disc_closed = cv2.morphologyEx(image, cv2.MORPH_CLOSE, _disc(ly + DISC_EXTRA_PX, lx + DISC_EXTRA_PX))
    index, coherence = surface_orientation(disc_closed, (sy, sx))
    bridged = np.empty_like(image)
    for k in range(N_ORIENTATIONS):
        angle = math.pi * k / N_ORIENTATIONS
        element = line_element(line_half_steps(width_mm, direction_step_mm(angle, (sy, sx))), angle)
        closed = cv2.morphologyEx(image, cv2.MORPH_CLOSE, element)
        cv2.copyTo(closed, cv2.compare(index, k, cv2.CMP_EQ), bridged)
    # never more than the disc closing: a line a little off a straight edge's direction fills its blurred
    # steps, the disc does not (in a crack or a concave corner both fill)
    bridged = cv2.min(bridged, disc_closed)
    response = cv2.subtract(bridged, image)                           # a closing never lowers a pixel
    response[cv2.compare(bridged, bone_hu - CLIP_LOW_HU, cv2.CMP_LT) > 0] = 0
    response = response.astype(np.float32)
    response *= coherence                      # a corner or a blob has no one surface direction: weaker
    return response


def to_uint8(response: np.ndarray, full_hu: float) -> np.ndarray:
    """Map a response (HU) to uint8: 0 -> 0, `full_hu` and above -> 255, rounded."""
    if full_hu <= 0:
        raise ConfigError(f"render.crack_full_hu must be > 0, found {full_hu}")
    scaled = np.asarray(response, dtype=np.float32) * np.float32(UINT8_MAX / full_hu)
    return np.rint(np.clip(scaled, 0.0, UINT8_MAX)).astype(np.uint8)


def shrink_peaks(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2D response to size x size keeping thin peaks: max over each output pixel's footprint when shrinking."""
    rows, cols = image.shape
    if rows == size and cols == size:
        return image
    fy, fx = rows / size, cols / size
    if fy > 1.0 or fx > 1.0:
        k = (max(1, int(math.ceil(fx))), max(1, int(math.ceil(fy))))
        image = cv2.dilate(image, cv2.getStructuringElement(cv2.MORPH_RECT, k))
    interp = cv2.INTER_AREA if size <= min(rows, cols) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def crack_channel(hu: np.ndarray, spacing: Sequence[float], render: Mapping[str, Any], size: int) -> np.ndarray:
    """Return the uint8 (size, size) crack channel of one HU image at `spacing` (row, col) mm/px, per `render` keys."""
    response = crack_response(hu, spacing, width_mm=float(render["crack_width_mm"]),
                              bone_hu=float(render["crack_bone_hu"]))
    return to_uint8(shrink_peaks(response, size), float(render["crack_full_hu"]))


def crack_score(hu: np.ndarray, spacing: Sequence[float], render: Mapping[str, Any]) -> float:
    """How strongly one HU image shows a crack-like line: mean response (HU) of its SCORE_AREA_MM2 strongest pixels.

    Uses the `render` section's crack_width_mm and crack_bone_hu (not crack_full_hu: no uint8 saturation); ranks
    candidate background slices for hard negatives (prepare.hard_candidates).
    """
    response = crack_response(hu, spacing, width_mm=float(render["crack_width_mm"]),
                              bone_hu=float(render["crack_bone_hu"])).ravel()
    n = min(response.size, max(1, int(round(SCORE_AREA_MM2 / (float(spacing[0]) * float(spacing[1]))))))
    return float(np.partition(response, response.size - n)[-n:].mean())
