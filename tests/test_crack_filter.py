"""The crack channel (detector/crack_filter.py): a crack across the cortex outshines intact cortex, a vascular channel
of the same width and the core of a thin bony band, at any pixel spacing (lengths in mm)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_prep.runs.config import ConfigError
from detector.crack_filter import (
    crack_response,
    direction_step_mm,
    line_element,
    line_half_steps,
    line_length_px,
    shrink_peaks,
    to_uint8,
)

# HU of the constructed scenes (the synthetic phantom's values, configs/synth.yaml hu:)
SOFT_HU = 45.0          # soft tissue around the bone, and the haematoma filling a fracture gap
CORTEX_HU = 1200.0      # cortical shell
CANCELLOUS_HU = 280.0   # cancellous interior
VESSEL_HU = 60.0        # blood in a vascular channel
CORTEX_MM = 1.2         # cortical shell thickness
VESSEL_MARGIN_MM = 1.0  # a vascular channel stops this far inside the cortex (data_prep.synthetic.phantom VASC_MARGIN_MM)
NOISE_HU, BLUR_PX = 20.0, 0.6   # image noise (std) and in-plane blur, added like the phantom's
SCENE_MM = 40.0
WIDTH_MM, BONE_HU = 2.0, 200.0   # configs/detector.yaml render defaults
MARGIN = 2.0            # "stronger" means at least twice the competitor's strongest response


def _grid(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    n = int(round(SCENE_MM / spacing))
    c = (np.arange(n) + 0.5) * spacing - SCENE_MM / 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def _cover(distance: np.ndarray, spacing: float) -> np.ndarray:
    """Anti-aliased share of a pixel inside a shape, from the signed distance (mm, negative inside)."""
    return np.clip(0.5 - distance / spacing, 0.0, 1.0)


def _finish(hu: np.ndarray, seed: int) -> np.ndarray:
    hu = hu + np.random.default_rng(seed).normal(0.0, NOISE_HU, hu.shape)
    return cv2.GaussianBlur(hu.astype(np.float32), (0, 0), BLUR_PX)


def body_scene(spacing: float, gap_mm: float, *, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A vertebral body (ellipse 18 x 16 mm, cortex + cancellous) with a crack of `gap_mm` through it at 60 degrees,
    and a vascular channel of the same width inside it that stops VESSEL_MARGIN_MM short of the cortex."""
    x, y = _grid(spacing)
    outline = (np.hypot(x / 9.0, y / 8.0) - 1.0) * 8.0            # approximate signed distance (mm)
    bone, inner = _cover(outline, spacing), _cover(outline + CORTEX_MM, spacing)
    hu = SOFT_HU + bone * (CORTEX_HU - SOFT_HU) + inner * (CANCELLOUS_HU - CORTEX_HU)
    angle = np.deg2rad(60.0)
    to_crack = np.abs((x - 2.0) * np.cos(angle) + y * np.sin(angle))
    to_vessel = np.abs(y - 4.0)
    deep = _cover(outline + CORTEX_MM + VESSEL_MARGIN_MM, spacing)
    crack = _cover(to_crack - gap_mm / 2, spacing) * bone
    vessel = _cover(to_vessel - gap_mm / 2, spacing) * deep
    hu = hu + crack * (SOFT_HU - hu)
    hu = hu + vessel * (VESSEL_HU - hu)
    half = max(gap_mm / 2, spacing / 2)                            # centre line at least one pixel wide
    ring = (bone > 0.5) & (inner < 0.5)
    masks = {"crack_in_cortex": (to_crack <= half) & ring,
             "vessel": (to_vessel <= half) & (deep > 0.5),
             "intact_cortex": ring & (to_crack > 3.0) & (to_vessel > 3.0)}
    return _finish(hu, seed), masks


def band_scene(spacing: float, core_mm: float, *, gap_mm: float = 0.6, seed: int = 0
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A thin bony band (a lamina: two cortices around a cancellous core `core_mm` wide, 30 mm long, at 20 degrees)
    broken across by a crack of `gap_mm`: the core is a dark line between bright cortex, like a crack, but it runs
    along the bone instead of across it."""
    x, y = _grid(spacing)
    angle = np.deg2rad(20.0)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle)
    half_band = core_mm / 2 + CORTEX_MM
    bone = _cover(np.maximum(np.abs(across) - half_band, np.abs(along) - 15.0), spacing)
    core = _cover(np.maximum(np.abs(across) - core_mm / 2, np.abs(along) - 15.0 + CORTEX_MM), spacing)
    hu = SOFT_HU + bone * (CORTEX_HU - SOFT_HU) + core * (CANCELLOUS_HU - CORTEX_HU)
    crack = _cover(np.abs(along - 5.0) - gap_mm / 2, spacing) * bone
    hu = hu + crack * (SOFT_HU - hu)
    masks = {"crack": (np.abs(along - 5.0) <= max(gap_mm / 2, spacing / 2)) & (np.abs(across) <= half_band),
             "core": (np.abs(across) <= max(core_mm / 2, spacing / 2)) & (np.abs(along) < 12.0)
             & (np.abs(along - 5.0) > 3.0)}
    return _finish(hu, seed), masks


def response(hu: np.ndarray, spacing: float) -> np.ndarray:
    return crack_response(hu, (spacing, spacing), width_mm=WIDTH_MM, bone_hu=BONE_HU)


@pytest.mark.parametrize("spacing", [0.3, 0.45])
@pytest.mark.parametrize("gap_mm", [0.4, 0.7, 1.0])
def test_crack_outshines_intact_cortex_and_a_vascular_channel_of_the_same_width(spacing, gap_mm):
    hu, m = body_scene(spacing, gap_mm)
    r = response(hu, spacing)
    crack = r[m["crack_in_cortex"]].max()
    assert crack > MARGIN * r[m["vessel"]].max()
    assert crack > MARGIN * r[m["intact_cortex"]].max()
    # the crack's break of the cortex is hundreds of HU of missing bone; the channel's is below the cancellous HU
    assert crack > 300.0 and r[m["vessel"]].max() < CANCELLOUS_HU


@pytest.mark.parametrize("spacing", [0.25, 0.5])
def test_lengths_are_millimetres_at_any_pixel_spacing(spacing):
    # a 1.5 mm break is bridged by the 2 mm element, a 3 mm gap is not, whether that is 3-6 or 6-12 pixels
    # (a fixed 5-pixel element would span 1.25 mm at 0.25 mm/px and miss the 1.5 mm break)
    hu, m = body_scene(spacing, 1.5)
    narrow = response(hu, spacing)[m["crack_in_cortex"]].max()
    hu, m = body_scene(spacing, 3.0)
    wide = response(hu, spacing)[m["crack_in_cortex"]].max()
    assert narrow > 300.0
    assert wide < narrow / 3


@pytest.mark.parametrize("spacing", [0.3, 0.45])
@pytest.mark.parametrize("core_mm", [0.6, 1.0, 1.4])
def test_the_core_of_a_thin_band_is_not_a_crack(spacing, core_mm):
    hu, m = band_scene(spacing, core_mm)
    r = response(hu, spacing)
    assert r[m["crack"]].max() > 2.0 * r[m["core"]].max()
    # the scene is a real trap: a plain black top-hat with a disc of the same size sees the core like the crack
    length = line_length_px(WIDTH_MM, spacing)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (length, length))
    tophat = cv2.morphologyEx(np.clip(hu, -100.0, 2000.0), cv2.MORPH_BLACKHAT, disc)
    assert tophat[m["core"]].max() > 0.7 * tophat[m["crack"]].max()


def test_response_is_deterministic_non_negative_and_zero_outside_bone():
    hu, _ = body_scene(0.35, 0.6)
    a, b = response(hu, 0.35), response(hu.copy(), 0.35)
    assert a.dtype == np.float32 and a.shape == hu.shape
    assert np.array_equal(a, b) and a.min() >= 0.0
    soft = np.full((64, 64), SOFT_HU, dtype=np.float32)
    soft[30:33, :] = -100.0                                 # a dark line in soft tissue: nothing to bridge as bone
    assert response(soft, 0.35).max() == 0.0


def test_line_lengths_and_elements():
    assert line_length_px(2.0, 0.35) == 7          # 2 mm / 0.35 = 5.7 px -> 3 steps each side -> 7
    assert line_length_px(2.0, 0.5) == 5
    assert line_length_px(0.1, 1.0) == 3           # never below one step each side
    horizontal = line_element(3, 0.0)
    assert horizontal.shape == (7, 7) and horizontal.sum() == 7 and horizontal[3].tolist() == [1] * 7
    vertical = line_element(3, np.pi / 2)
    assert vertical[:, 3].tolist() == [1] * 7 and vertical.sum() == 7
    diagonal = line_element(2, np.pi / 4)           # corner to corner of its 5 x 5 box
    assert [diagonal[i, i] for i in range(5)] == [1] * 5 and diagonal.sum() == 5
    # a diagonal step is sqrt(2) pixels: 2 mm at 0.35 mm/px is 2 diagonal steps each side, not 3
    assert direction_step_mm(np.pi / 4, (0.35, 0.35)) == pytest.approx(0.35 * np.sqrt(2))
    assert line_half_steps(2.0, direction_step_mm(np.pi / 4, (0.35, 0.35))) == 2
    assert direction_step_mm(0.0, (0.5, 0.35)) == pytest.approx(0.35)   # along x: the column spacing


def test_to_uint8_is_linear_to_full_hu_and_clipped():
    out = to_uint8(np.array([0.0, 400.0, 799.0, 800.0, 5000.0]), 800.0)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 128, 255, 255, 255]      # 400 / 800 * 255 = 127.5 -> 128; 799 -> 254.7 -> 255
    with pytest.raises(ConfigError, match="crack_full_hu"):
        to_uint8(np.zeros(3), 0.0)


def test_shrinking_keeps_a_one_pixel_line():
    image = np.zeros((300, 300), dtype=np.float32)
    image[:, 151] = 600.0                             # a 1-pixel line
    small = shrink_peaks(image, 100)
    plain = cv2.resize(image, (100, 100), interpolation=cv2.INTER_AREA)
    assert small.shape == (100, 100)
    assert small.max() == pytest.approx(600.0) and plain.max() < 250.0
    assert shrink_peaks(image, 300) is image


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2D"):
        response(np.zeros((2, 8, 8), dtype=np.float32), 0.35)
    with pytest.raises(ValueError, match="spacing"):
        crack_response(np.zeros((8, 8)), (0.0, 0.35), width_mm=2.0, bone_hu=200.0)


def test_the_crack_channel_and_its_constants_change_every_settings_key(tmp_path):
    # a model trained with the crack channel must not reuse detections, datasets or crops made without it
    from data_prep.runs.config import load_config
    from data_prep.runs.resume import settings_key
    from detector.classifier_dataset import classifier_settings
    from detector.detect import detect_settings
    from detector.yolo_dataset import prepare_settings

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"weights")

    def keys(*sets: str) -> tuple[str, str, str]:
        det = load_config("detector", None, list(sets))
        cls = load_config("classifier", None, list(sets))
        return (settings_key(detect_settings(det, weights=weights, classifier=[weights], classifier_config=cls)),
                settings_key(prepare_settings(det, kind="detector")), settings_key(classifier_settings(cls)))

    plain = keys()
    on = keys("render.crack_channel=2")
    assert all(a != b for a, b in zip(plain, on, strict=True))
    assert all(a != b for a, b in zip(on, keys("render.crack_channel=2", "render.crack_full_hu=500"), strict=True))
