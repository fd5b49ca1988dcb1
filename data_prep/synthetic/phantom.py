"""A numpy phantom of the neck on CT: HU volume, vertebra label volume and the fracture truth it knows.

Every bone is a union of a few analytic shapes (ellipsoids, elliptic columns, capsules, arches) given by
an approximate signed distance (mm, negative inside) in the local frame of its part. A part's frame maps
local (u, v, w) = (patient left, posterior, superior along the spine axis) to patient LPS mm. Shapes are
evaluated only inside their own bounding box on the voxel grid, so a 512 x 512 x 300 study takes seconds.

Fractures are planes through a vertebral element: a thin lucent gap where the plane cuts the bone, and the
bone on one side shifted by a small vector over a window of the element's height. Lines narrower than a pixel
are drawn with their exact pixel coverage (partial volume), so a 0.3 mm crack at 0.4 mm pixels darkens its
pixels by three quarters instead of vanishing or widening to a pixel. Distractors are not fractures:
vascular channels (lucent lines inside the cancellous bone, cortex intact), basivertebral foramina (a lucent
channel through the posterior cortex of the body, in the midline, as wide as a hairline crack), osteophytes
(bony bumps at body margins) and low bone density (darker cancellous bone).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

log = logging.getLogger("data_prep")

# ---------------------------------------------------------------- anatomy constants (mm, adult means)
CERVICAL: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
THORACIC: tuple[str, ...] = ("T1", "T2", "T3", "T4")
VERTEBRA_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(CERVICAL + THORACIC)}
"""Segmentation label of each rendered vertebra (1-7 = C1-C7, 8+ = T1..)."""

TYPICAL_DIMS: dict[str, dict[str, float]] = {
    # body_hw/body_hd: half width (left-right) / half depth (antero-posterior) of the body; body_h: height;
    # canal_hw/canal_hd: half axes of the vertebral canal; sp_len/sp_r/sp_deg: spinous process length,
    # radius and downward angle; disc: height of the disc below the body.
    "C2": dict(body_hw=8.5, body_hd=8.0, body_h=22.0, canal_hw=12.5, canal_hd=8.0, sp_len=16.0, sp_r=4.5,
               sp_deg=20.0, disc=4.5),
    "C3": dict(body_hw=8.0, body_hd=7.5, body_h=14.0, canal_hw=12.0, canal_hd=7.0, sp_len=11.0, sp_r=3.0,
               sp_deg=35.0, disc=4.5),
    "C4": dict(body_hw=8.5, body_hd=7.5, body_h=14.0, canal_hw=12.0, canal_hd=7.0, sp_len=11.0, sp_r=3.0,
               sp_deg=35.0, disc=4.5),
    "C5": dict(body_hw=9.0, body_hd=8.0, body_h=14.5, canal_hw=12.0, canal_hd=7.0, sp_len=13.0, sp_r=3.0,
               sp_deg=38.0, disc=4.5),
    "C6": dict(body_hw=10.0, body_hd=8.0, body_h=15.0, canal_hw=12.0, canal_hd=7.0, sp_len=17.0, sp_r=3.5,
               sp_deg=40.0, disc=5.0),
    "C7": dict(body_hw=11.0, body_hd=8.5, body_h=16.0, canal_hw=11.5, canal_hd=7.0, sp_len=24.0, sp_r=4.0,
               sp_deg=40.0, disc=5.0),
    "T1": dict(body_hw=12.0, body_hd=9.0, body_h=17.0, canal_hw=9.5, canal_hd=7.5, sp_len=26.0, sp_r=4.0,
               sp_deg=45.0, disc=4.0),
    "T2": dict(body_hw=12.5, body_hd=10.0, body_h=18.0, canal_hw=9.0, canal_hd=7.5, sp_len=27.0, sp_r=4.0,
               sp_deg=55.0, disc=4.0),
    "T3": dict(body_hw=13.0, body_hd=11.0, body_h=19.0, canal_hw=8.5, canal_hd=7.5, sp_len=27.0, sp_r=4.0,
               sp_deg=60.0, disc=4.0),
    "T4": dict(body_hw=13.5, body_hd=12.0, body_h=19.5, canal_hw=8.5, canal_hd=7.5, sp_len=27.0, sp_r=4.0,
               sp_deg=60.0, disc=4.0),
}
ARCH_THICKNESS = 4.0            # pedicle/lamina thickness around the canal
ARCH_HEIGHT_FRAC = 0.75         # arch height / body height
ARCH_DROP_FRAC = 0.30           # arch centre below body centre, / body height
PILLAR_RADII = (5.5, 6.5)       # articular pillar half axes (lateral, AP)
PILLAR_UP, PILLAR_DOWN = 5.0, 9.0   # pillar extension above / below the body (facets overlap neighbours)
TP_OFFSET, TP_RADII = 6.5, (6.5, 4.0, 3.5)    # cervical transverse process: lateral offset from body, half axes
FORAMEN_OFFSET, FORAMEN_R = 4.5, 2.3          # foramen transversarium (C1-C6) offset from body edge, radius
THORACIC_TP_RADII = (9.0, 5.0, 5.0)
DENS_RADIUS, DENS_LENGTH, DENS_BASE_DROP = 5.0, 12.0, 3.0
C1_INNER = (14.5, 15.0)         # C1 ring inner half axes (lateral, AP)
C1_ANT_THICK, C1_POST_THICK = 4.5, 4.0
C1_ANT_HALF_H, C1_POST_HALF_H = 5.0, 4.0
C1_ABOVE_C2_TOP = 11.0          # C1 ring centre above the top of the C2 body (along C2's axis)
ATLANTO_DENTAL_GAP = 2.0        # gap between the dens and the anterior arch of C1
C1_LATERAL_MASS = ((13.5, -5.0, -1.0), (6.5, 8.5, 10.0))   # centre (|u|, v, w) and half axes
C1_TP = ((25.0, -4.0, 0.0), (7.0, 4.5, 4.5))
C2_PILLAR = ((13.0, 1.5, -1.0), (6.0, 7.0))
SKULL_RADII, SKULL_THICK, SKULL_GAP_ABOVE_C1 = (62.0, 70.0, 45.0), 6.0, 6.0
FORAMEN_MAGNUM_R = 17.0
MANDIBLE_R, MANDIBLE_HALF_WIDTH, MANDIBLE_FRONT = 5.0, 45.0, 62.0
RIB_R = 4.0
PREVERTEBRAL_MM = 7.0           # soft tissue between the body front and the airway
NECK_CENTRE_AHEAD = -12.0       # neck outline centre anterior of the body centre (negative: behind it)
HEAD_MARGIN = 8.0               # scalp outside the skull
SHOULDER_WIDEN = (1.7, 1.15)    # neck outline growth below C7 (lateral, AP)
AIRWAY_AXES = {"pharynx": (13.0, 7.0), "larynx": (8.0, 6.5), "trachea": (9.0, 8.0)}
VASC_MARGIN_MM = 1.0            # vascular channels stay this far inside the cortex
FORAMEN_OUTSIDE_MM = 1.0        # a basivertebral foramen starts this far behind the body's posterior surface (in the canal)
FORAMEN_MIDLINE = 0.15          # its lateral offset from the midline, / body half width (uniform +-)
FORAMEN_TILT = 0.3              # its in-plane angle from the sagittal plane, radians (uniform +-)
SEEN_SHARE = 0.5
"""A slice shows a break where the gap covers at least this share of its peak pixel coverage (1 for lines at
least a pixel wide, width / spacing for thinner ones), or where the moved fragment changes the bone."""
TAPER_MM = 1.5                  # fragment shift fades in over this distance at the window ends
CV_SHIFT = 4                    # sub-pixel bits for cv2 drawing
NOISE_POOL, NOISE_PAD = 8, 32   # noise images drawn per study, and their extra size for random crops


# ---------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Grid:
    """The voxel grid in patient mm: slice k at z = z_top - k*thickness, pixel (r, c) at origin + (c, r)*spacing."""

    n: int
    rows: int
    cols: int
    spacing: float
    thickness: float
    origin_xy: tuple[float, float]
    z_top: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, cols)."""
        return self.n, self.rows, self.cols

    def index_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel index slices (k, row, col) covering the world box [lo, hi] (x, y, z mm), or None if outside."""
        ox, oy = self.origin_xy
        k0 = max(0, math.floor((self.z_top - hi[2]) / self.thickness))
        k1 = min(self.n, math.ceil((self.z_top - lo[2]) / self.thickness) + 1)
        r0 = max(0, math.floor((lo[1] - oy) / self.spacing))
        r1 = min(self.rows, math.ceil((hi[1] - oy) / self.spacing) + 1)
        c0 = max(0, math.floor((lo[0] - ox) / self.spacing))
        c1 = min(self.cols, math.ceil((hi[0] - ox) / self.spacing) + 1)
        if k0 >= k1 or r0 >= r1 or c0 >= c1:
            return None
        return slice(k0, k1), slice(r0, r1), slice(c0, c1)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World x (1,1,nc), y (1,nr,1), z (nk,1,1) of the voxel centres in an index box."""
        ks, rs, cs = box
        ox, oy = self.origin_xy
        x = (ox + np.arange(cs.start, cs.stop) * self.spacing).reshape(1, 1, -1)
        y = (oy + np.arange(rs.start, rs.stop) * self.spacing).reshape(1, -1, 1)
        z = (self.z_top - np.arange(ks.start, ks.stop) * self.thickness).reshape(-1, 1, 1)
        return x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)


@dataclass(frozen=True)
class Frame:
    """A rigid frame: `origin` (LPS mm) and `axes` (rows = local u, v, w unit vectors in LPS)."""

    origin: np.ndarray
    axes: np.ndarray

    def to_local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """Local (u, v, w) arrays of broadcastable world coordinates."""
        o = self.origin.astype(np.float32)
        dx, dy, dz = x - o[0], y - o[1], z - o[2]
        a = [[float(c) for c in row] for row in self.axes]
        return tuple(a[i][0] * dx + a[i][1] * dy + a[i][2] * dz for i in range(3))

    def to_world(self, pts: np.ndarray) -> np.ndarray:
        """World coordinates of local points (..., 3)."""
        return self.origin + np.asarray(pts) @ self.axes


def sagittal_axes(phi: float, rotation: np.ndarray) -> np.ndarray:
    """Axes of a frame whose w axis leans anteriorly by `phi` radians, then turned by `rotation` (3x3)."""
    u = np.array([1.0, 0.0, 0.0])
    v = np.array([0.0, math.cos(phi), math.sin(phi)])
    w = np.array([0.0, -math.sin(phi), math.cos(phi)])
    return np.stack([u, v, w]) @ rotation.T


def rotation_matrix(yaw: float, roll: float) -> np.ndarray:
    """Rotation about z (in-plane, `yaw` rad) after a rotation about y (coronal tilt, `roll` rad)."""
    cz, sz, cy, sy = math.cos(yaw), math.sin(yaw), math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return rz @ ry


# ---------------------------------------------------------------- shapes (approximate signed distances, mm)
@dataclass(frozen=True)
class Shape:
    """Base of the analytic shapes; `element` names the vertebral element a fracture may target."""

    element: str

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (negative inside)."""
        raise NotImplementedError

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Local axis-aligned bounding box (lo, hi)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Ellipsoid(Shape):
    """An ellipsoid with `centre` and half axes `radii` (u, v, w); optional `holes` subtracted."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radii: tuple[float, float, float] = (1.0, 1.0, 1.0)
    holes: tuple[Shape, ...] = ()

    def sdf(self, u, v, w):
        c, r = self.centre, self.radii
        q = np.sqrt(((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2)
        return _subtract((q - 1.0) * min(r), self.holes, u, v, w)

    def bounds(self):
        c, r = np.array(self.centre), np.array(self.radii)
        return c - r, c + r


@dataclass(frozen=True)
class Column(Shape):
    """An upright superelliptic column: cross-section half axes `radii` (u, v), exponent `power`, half height."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radii: tuple[float, float] = (1.0, 1.0)
    half_height: float = 1.0
    power: float = 2.0
    holes: tuple[Shape, ...] = ()

    def sdf(self, u, v, w):
        c, r, p = self.centre, self.radii, self.power
        q = (np.abs((u - c[0]) / r[0]) ** p + np.abs((v - c[1]) / r[1]) ** p) ** (1.0 / p)
        d = np.maximum((q - 1.0) * min(r), np.abs(w - c[2]) - self.half_height)
        return _subtract(d, self.holes, u, v, w)

    def bounds(self):
        c = np.array(self.centre)
        ext = np.array([self.radii[0], self.radii[1], self.half_height])
        return c - ext, c + ext


@dataclass(frozen=True)
class Capsule(Shape):
    """All points within `radius` of the segment p0-p1."""

    p0: tuple[float, float, float] = (0.0, 0.0, 0.0)
    p1: tuple[float, float, float] = (0.0, 0.0, 1.0)
    radius: float = 1.0

    def sdf(self, u, v, w):
        a, b = np.array(self.p0), np.array(self.p1)
        ab = b - a
        t = ((u - a[0]) * ab[0] + (v - a[1]) * ab[1] + (w - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        d2 = (u - a[0] - t * ab[0]) ** 2 + (v - a[1] - t * ab[1]) ** 2 + (w - a[2] - t * ab[2]) ** 2
        return np.sqrt(d2) - self.radius

    def bounds(self):
        a, b = np.array(self.p0), np.array(self.p1)
        return np.minimum(a, b) - self.radius, np.maximum(a, b) + self.radius


@dataclass(frozen=True)
class Arch(Shape):
    """A band of `thickness` around an elliptic hole (canal), cut to side (sign of u) and a v range."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    inner: tuple[float, float] = (1.0, 1.0)
    thickness: float = 1.0
    half_height: float = 1.0
    side: int = 0
    v_range: tuple[float, float] = (-math.inf, math.inf)

    def sdf(self, u, v, w):
        c, a, t = self.centre, self.inner, self.thickness
        du, dv = u - c[0], v - c[1]
        qi = np.sqrt((du / a[0]) ** 2 + (dv / a[1]) ** 2)
        qo = np.sqrt((du / (a[0] + t)) ** 2 + (dv / (a[1] + t)) ** 2)
        d = np.maximum((qo - 1.0) * (min(a) + t), (1.0 - qi) * min(a))
        d = np.maximum(d, np.abs(w - c[2]) - self.half_height)
        if self.side:
            d = np.maximum(d, -self.side * du)
        lo, hi = self.v_range
        if math.isfinite(lo):
            d = np.maximum(d, lo - v)
        if math.isfinite(hi):
            d = np.maximum(d, v - hi)
        return d

    def bounds(self):
        c, a, t = self.centre, self.inner, self.thickness
        lo = np.array([c[0] - a[0] - t, c[1] - a[1] - t, c[2] - self.half_height])
        hi = np.array([c[0] + a[0] + t, c[1] + a[1] + t, c[2] + self.half_height])
        if self.side > 0:
            lo[0] = c[0]
        elif self.side < 0:
            hi[0] = c[0]
        lo[1] = max(lo[1], self.v_range[0]) if math.isfinite(self.v_range[0]) else lo[1]
        hi[1] = min(hi[1], self.v_range[1]) if math.isfinite(self.v_range[1]) else hi[1]
        return lo, hi


@dataclass(frozen=True)
class Shell(Shape):
    """The wall of an ellipsoid (`thickness` inwards) with upright cylindrical holes (e.g. foramen magnum)."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radii: tuple[float, float, float] = (1.0, 1.0, 1.0)
    thickness: float = 1.0
    holes: tuple[Shape, ...] = ()

    def sdf(self, u, v, w):
        c, r = self.centre, self.radii
        q = np.sqrt(((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2)
        outer = (q - 1.0) * min(r)
        d = np.maximum(outer, -outer - self.thickness)
        return _subtract(d, self.holes, u, v, w)

    def bounds(self):
        c, r = np.array(self.centre), np.array(self.radii)
        return c - r, c + r


def _subtract(d: np.ndarray, holes: Sequence[Shape], u, v, w) -> np.ndarray:
    for hole in holes:
        d = np.maximum(d, -hole.sdf(u, v, w))
    return d


# ---------------------------------------------------------------- parts, fractures, distractors
@dataclass
class Part:
    """A bone (or group of bones) in one frame: label (0 = not a vertebra), shapes, HU of its cancellous bone."""

    name: str
    label: int
    frame: Frame
    shapes: list[Shape]
    cancellous_hu: float
    dims: dict[str, float] = field(default_factory=dict)
    vascular: list[tuple[np.ndarray, np.ndarray, float, tuple[float, float]]] = field(default_factory=list)
    """Vascular channels: (unit normal, point, width mm, (w_lo, w_hi)) in local coordinates."""
    foramina: list[Foramen] = field(default_factory=list)
    """Lucent channels through the cortex that are not fractures (basivertebral foramina)."""


@dataclass(frozen=True)
class Foramen:
    """A lucent sheet of `width` mm (plane `normal` through `point`, local coordinates) that removes bone between
    `reach` (mm along `inward` from `point`) and inside `window` (local w, mm): a channel through the cortex."""

    normal: np.ndarray
    point: np.ndarray
    inward: np.ndarray
    width: float
    reach: tuple[float, float]
    window: tuple[float, float]


@dataclass(frozen=True)
class Fracture:
    """A cortical break: a plane (local normal, point) through `elements`, a lucent gap and a shifted fragment."""

    level: str
    kind: str
    elements: frozenset[str]
    normal: np.ndarray
    point: np.ndarray
    window: tuple[float, float]
    gap_mm: float
    shift: np.ndarray

    def describe(self) -> str:
        """One line for truth/fractures.csv."""
        parts = "+".join(sorted(self.elements))
        return (f"{self.kind} ({parts}): lucent line {self.gap_mm:.1f} mm, fragment shifted "
                f"{float(np.linalg.norm(self.shift)):.1f} mm over {self.window[1] - self.window[0]:.0f} mm")


@dataclass
class Anatomy:
    """Everything needed to render one study: the parts, the discs and the soft-tissue keypoints."""

    parts: list[Part]
    discs: list[tuple[Frame, Column]]
    vertebrae: dict[str, Part]
    yaw: float
    top_z: float
    bottom_z: float
    tissue: dict[str, Any]


@dataclass
class Rendered:
    """The rendered study: HU (float32, canonical order), labels (uint8) and per-fracture box truth."""

    hu: np.ndarray
    labels: np.ndarray
    fracture_boxes: list[dict[int, tuple[int, int, int, int]]]
    """Per fracture: slice_index -> (row0, row1, col0, col1) inclusive box of the fractured elements, on
    every slice where the lucent line cuts bone or the shifted fragment moves bone."""


# ---------------------------------------------------------------- building the anatomy
def _u(rng: np.random.Generator, lohi: Sequence[float]) -> float:
    return float(rng.uniform(lohi[0], lohi[1]))


def build_anatomy(rng: np.random.Generator, cfg: Mapping[str, Any]) -> Anatomy:
    """Sample one patient's neck (vertebrae C1-T4, skull base, mandible, ribs) in body mm (C2 body centre = 0)."""
    scale = _u(rng, cfg["size_scale"])
    lord = math.radians(_u(rng, cfg["lordosis_deg"]))
    flex = math.radians(_u(rng, cfg["flexion_deg"]))
    rot = rotation_matrix(math.radians(_u(rng, cfg["yaw_deg"])) * rng.choice([-1, 1]),
                          math.radians(_u(rng, cfg["roll_deg"])) * rng.choice([-1, 1]))
    yaw = math.atan2(rot[1, 0], rot[0, 0])
    density = _u(rng, cfg["cancellous_hu"])
    if rng.random() < cfg["low_density_prob"]:
        density *= _u(rng, cfg["low_density_factor"])
    jitter = cfg["vertebra_jitter"]

    names = CERVICAL[1:] + THORACIC
    n_cerv = len(CERVICAL) - 1
    # lean of the spine axis (radians, + = going up it moves anteriorly): -lord at C2 .. +lord at C7, then kyphosis
    phis = [flex + lord * (2.0 * min(i, n_cerv - 1) / (n_cerv - 1) - 1.0) - (max(0, i - n_cerv + 1)
            * lord * 0.3) for i in range(len(names))]
    dims = {name: {k: v * (scale if k != "sp_deg" else 1.0) * (1.0 + jitter * rng.uniform(-1, 1))
                   for k, v in TYPICAL_DIMS[name].items()} for name in names}
    centres = {"C2": np.zeros(3)}
    axes = {"C2": sagittal_axes(phis[0], rot)}
    for i in range(1, len(names)):
        prev, name = names[i - 1], names[i]
        axes[name] = sagittal_axes(phis[i], rot)
        centres[name] = (centres[prev] - axes[prev][2] * (dims[prev]["body_h"] / 2 + dims[prev]["disc"] / 2)
                         - axes[name][2] * (dims[prev]["disc"] / 2 + dims[name]["body_h"] / 2))

    parts: list[Part] = []
    vertebrae: dict[str, Part] = {}
    discs: list[tuple[Frame, Column]] = []
    # C1 sits on C2 around the dens
    d2 = dims["C2"]
    dens_v = -0.15 * d2["body_hd"]
    c1_v = dens_v - DENS_RADIUS * scale - ATLANTO_DENTAL_GAP * scale + C1_INNER[1] * scale
    c1_phi = phis[0] + math.radians(_u(rng, cfg["c1_extra_tilt_deg"]))
    c1_frame = Frame(centres["C2"] + axes["C2"] @ np.zeros(3)
                     + axes["C2"][2] * (d2["body_h"] / 2 + C1_ABOVE_C2_TOP * scale) + axes["C2"][1] * c1_v,
                     sagittal_axes(c1_phi, rot))
    c1 = Part("C1", VERTEBRA_LABEL["C1"], c1_frame, _c1_shapes(scale), density * _vary(rng, cfg),
              dims={"canal_hd": C1_INNER[1] * scale, "canal_hw": C1_INNER[0] * scale})
    parts.append(c1)
    vertebrae["C1"] = c1
    for name in names:
        d = dims[name]
        frame = Frame(centres[name], axes[name])
        part = Part(name, VERTEBRA_LABEL[name], frame, _vertebra_shapes(name, d, dens_v, scale),
                    density * _vary(rng, cfg), dims=d)
        _add_distractors(rng, part, cfg)
        parts.append(part)
        vertebrae[name] = part
        disc = Column("disc", centre=(0.0, 0.0, -d["body_h"] / 2 - d["disc"] / 2),
                      radii=(d["body_hw"] * 1.03, d["body_hd"] * 1.03), half_height=d["disc"] / 2 + 0.5, power=2.5)
        discs.append((frame, disc))
        if name in THORACIC:
            parts.append(Part(f"ribs_{name}", 0, frame, _rib_shapes(d, scale), density))

    # skull base: a bowl above C1 with the foramen magnum; mandible in front of C2-C3 (not labelled)
    skull_r = tuple(r * scale for r in SKULL_RADII)
    c1_top = c1_frame.origin[2] + C1_LATERAL_MASS[1][2] * scale
    skull_centre = np.array([c1_frame.origin[0], c1_frame.origin[1] - 5.0 * scale,
                             c1_top + SKULL_GAP_ABOVE_C1 * scale + skull_r[2]])
    head_frame = Frame(skull_centre, rot.T)
    fm = Column("hole", centre=(0.0, 5.0 * scale, -skull_r[2]), radii=(FORAMEN_MAGNUM_R * scale,) * 2,
                half_height=skull_r[2] * 0.6)
    parts.append(Part("skull", 0, head_frame, [Shell("skull", radii=skull_r, thickness=SKULL_THICK * scale,
                                                       holes=(fm,))], density))
    parts.append(Part("mandible", 0, Frame(centres["C2"], rot.T), _mandible_shapes(scale, d2), density))

    top_z = c1_top + _u(rng, cfg["above_c1_mm"])
    c7 = vertebrae["C7"]
    bottom_z = c7.frame.origin[2] - c7.dims["body_h"] / 2 - _u(rng, cfg["below_c7_mm"])
    tissue = _tissue_keypoints(rng, cfg, vertebrae, skull_centre, skull_r, c1_top)
    return Anatomy(parts, discs, vertebrae, yaw, top_z, bottom_z, tissue)


def _vary(rng: np.random.Generator, cfg: Mapping[str, Any]) -> float:
    return 1.0 + cfg["density_jitter"] * rng.uniform(-1, 1)


def _c1_shapes(s: float) -> list[Shape]:
    a, b = C1_INNER[0] * s, C1_INNER[1] * s
    shapes: list[Shape] = [
        Arch("ant_arch", inner=(a, b), thickness=C1_ANT_THICK * s, half_height=C1_ANT_HALF_H * s,
             v_range=(-math.inf, -b * 0.55)),
    ]
    for side, tag in ((1, "L"), (-1, "R")):
        shapes.append(Arch(f"post_arch_{tag}", inner=(a, b), thickness=C1_POST_THICK * s,
                           half_height=C1_POST_HALF_H * s, side=side, v_range=(b * 0.2, math.inf)))
        (cu, cv, cw), radii = C1_LATERAL_MASS
        shapes.append(Ellipsoid(f"lateral_mass_{tag}", centre=(side * cu * s, cv * s, cw * s),
                                radii=tuple(r * s for r in radii)))
        (tu, tv, tw), tr = C1_TP
        hole = Column("hole", centre=(side * (tu - 4.0) * s, tv * s, 0.0), radii=(FORAMEN_R * s,) * 2,
                      half_height=10.0 * s)
        shapes.append(Ellipsoid(f"tp_{tag}", centre=(side * tu * s, tv * s, tw * s),
                                radii=tuple(r * s for r in tr), holes=(hole,)))
    shapes.append(Ellipsoid("post_arch_L", centre=(0.0, b + C1_POST_THICK * s + 1.0 * s, 0.0),
                            radii=(4.0 * s, 3.0 * s, 4.5 * s)))
    return shapes


def _vertebra_shapes(name: str, d: Mapping[str, float], dens_v: float, s: float) -> list[Shape]:
    hw, hd, h = d["body_hw"], d["body_hd"], d["body_h"]
    chw, chd = d["canal_hw"], d["canal_hd"]
    t = ARCH_THICKNESS * s
    cv = hd + chd - 0.5 * s
    w_arch = -ARCH_DROP_FRAC * h
    shapes: list[Shape] = [Column("body", radii=(hw, hd), half_height=h / 2, power=2.5)]
    if name == "C2":
        shapes.append(Capsule("dens", p0=(0.0, dens_v, h / 2 - DENS_BASE_DROP * s),
                              p1=(0.0, dens_v, h / 2 + DENS_LENGTH * s), radius=DENS_RADIUS * s))
    thoracic = name in THORACIC
    for side, tag in ((1, "L"), (-1, "R")):
        shapes.append(Arch(f"arch_{tag}", centre=(0.0, cv, w_arch), inner=(chw, chd), thickness=t,
                           half_height=ARCH_HEIGHT_FRAC * h / 2, side=side, v_range=(hd * 0.5, math.inf)))
        if name == "C2":
            (pu, pv, pw), pr = C2_PILLAR
            shapes.append(Column(f"pillar_{tag}", centre=(side * pu * s, pv * s, pw * s),
                                 radii=(pr[0] * s, pr[1] * s), half_height=h / 2 + 0.5 * s))
        else:
            top, bottom = h / 2 + PILLAR_UP * s, -h / 2 - PILLAR_DOWN * s
            shapes.append(Column(f"pillar_{tag}", centre=(side * (chw + t * 0.6), cv, (top + bottom) / 2),
                                 radii=(PILLAR_RADII[0] * s, PILLAR_RADII[1] * s), half_height=(top - bottom) / 2))
        if thoracic:
            shapes.append(Ellipsoid(f"tp_{tag}", centre=(side * (chw + 9.0 * s), cv + 2.0 * s, w_arch),
                                    radii=tuple(r * s for r in THORACIC_TP_RADII)))
        else:
            holes: tuple[Shape, ...] = ()
            if name != "C7":
                holes = (Column("hole", centre=(side * (hw + FORAMEN_OFFSET * s), 0.1 * hd, 0.0),
                                radii=(FORAMEN_R * s,) * 2, half_height=h),)
            shapes.append(Ellipsoid(f"tp_{tag}", centre=(side * (hw + TP_OFFSET * s), 0.1 * hd, 0.0),
                                    radii=tuple(r * s for r in TP_RADII), holes=holes))
    a = math.radians(d["sp_deg"])
    p0 = (0.0, cv + chd + t * 0.5, w_arch)
    p1 = (0.0, p0[1] + d["sp_len"] * math.cos(a), w_arch - d["sp_len"] * math.sin(a))
    shapes.append(Capsule("spinous", p0=p0, p1=p1, radius=d["sp_r"]))
    return shapes


def _rib_shapes(d: Mapping[str, float], s: float) -> list[Shape]:
    shapes: list[Shape] = []
    cv = d["body_hd"] + d["canal_hd"]
    for side in (1, -1):
        p0 = np.array([side * (d["canal_hw"] + 14.0 * s), cv + 2.0 * s, -ARCH_DROP_FRAC * d["body_h"]])
        p1 = p0 + np.array([side * 22.0, 8.0, -10.0]) * s
        p2 = p1 + np.array([side * 18.0, -30.0, -12.0]) * s
        for a, b in ((p0, p1), (p1, p2)):
            shapes.append(Capsule("rib", p0=tuple(a), p1=tuple(b), radius=RIB_R * s))
    return shapes


def _mandible_shapes(s: float, d2: Mapping[str, float]) -> list[Shape]:
    shapes: list[Shape] = []
    chin = np.array([0.0, -MANDIBLE_FRONT * s, -10.0 * s])
    for side in (1, -1):
        angle = np.array([side * MANDIBLE_HALF_WIDTH * s, -14.0 * s, -2.0 * s])
        condyle = np.array([side * (MANDIBLE_HALF_WIDTH + 3.0) * s, -8.0 * s, 32.0 * s])
        for dz in (0.0, -9.0 * s):
            shapes.append(Capsule("mandible", p0=tuple(angle + [0, 0, dz]), p1=tuple(chin + [0, 0, dz]),
                                  radius=MANDIBLE_R * s))
        shapes.append(Capsule("mandible", p0=tuple(angle), p1=tuple(condyle), radius=MANDIBLE_R * s * 0.9))
    return shapes


def _add_distractors(rng: np.random.Generator, part: Part, cfg: Mapping[str, Any]) -> None:
    """Vascular channels and osteophytes: present in negative and positive studies alike."""
    d = part.dims
    hw, hd, h = d["body_hw"], d["body_hd"], d["body_h"]
    if rng.random() < cfg["vascular_channel_prob"]:
        ang = rng.uniform(-0.4, 0.4)
        normal = np.array([math.sin(ang), math.cos(ang), 0.0])
        point = np.array([0.0, rng.uniform(0.0, 0.45) * hd, 0.0])
        half = rng.uniform(0.15, 0.35) * h
        part.vascular.append((normal, point, _u(rng, cfg["vascular_width_mm"]), (-half, half)))
    for end in (1, -1):
        if rng.random() < cfg["osteophyte_prob"]:
            r = _u(rng, cfg["osteophyte_mm"])
            centre = (rng.uniform(-0.5, 0.5) * hw, -hd * rng.uniform(0.85, 1.0), end * (h / 2 - r * 0.3))
            part.shapes.append(Ellipsoid("osteophyte", centre=centre, radii=(r * 1.5, r, r * 0.8)))
    # drawn only when enabled, so worlds without foramina keep their random stream (and their bytes)
    if cfg["foramen_prob"] > 0 and rng.random() < cfg["foramen_prob"]:
        part.foramina.append(basivertebral_foramen(rng, d, cfg))


def basivertebral_foramen(rng: np.random.Generator, d: Mapping[str, float], cfg: Mapping[str, Any]) -> Foramen:
    """A basivertebral foramen: a sagittal lucent sheet from the canal through the posterior cortex into the body."""
    hw, hd, h = d["body_hw"], d["body_hd"], d["body_h"]
    ang = rng.uniform(-FORAMEN_TILT, FORAMEN_TILT)
    normal = np.array([math.cos(ang), math.sin(ang), 0.0])      # the sheet is near-sagittal
    inward = np.array([math.sin(ang), -math.cos(ang), 0.0])     # in the sheet, pointing anteriorly
    point = np.array([rng.uniform(-FORAMEN_MIDLINE, FORAMEN_MIDLINE) * hw, hd + FORAMEN_OUTSIDE_MM, 0.0])
    half = _u(rng, cfg["foramen_height_mm"]) / 2
    centre = rng.uniform(-0.25, 0.25) * h
    return Foramen(normal, point, inward, _u(rng, cfg["foramen_width_mm"]),
                   (0.0, FORAMEN_OUTSIDE_MM + _u(rng, cfg["foramen_depth_mm"])), (centre - half, centre + half))


def _tissue_keypoints(rng: np.random.Generator, cfg: Mapping[str, Any], vertebrae: Mapping[str, Part],
                      skull_centre: np.ndarray, skull_r: tuple[float, ...], c1_top: float) -> dict[str, Any]:
    """Neck outline, fat and airway as functions of z (keypoints for np.interp)."""
    habitus = _u(rng, cfg["habitus"])
    neck = np.array(cfg["neck_axes_mm"], dtype=float) * habitus
    names = [n for n in CERVICAL[1:] + THORACIC]
    zs, ys, fronts, xs = [], [], [], []
    for name in names:
        p = vertebrae[name]
        zs.append(p.frame.origin[2])
        ys.append(p.frame.origin[1])
        xs.append(p.frame.origin[0])
        fronts.append(p.frame.origin[1] - p.dims["body_hd"])
    order = np.argsort(zs)
    z = np.array(zs)[order]
    y = np.array(ys)[order]
    x = np.array(xs)[order]
    front = np.array(fronts)[order]
    # outline keypoints, bottom to top: shoulders, neck, head
    c7z = vertebrae["C7"].frame.origin[2]
    t1z = vertebrae["T1"].frame.origin[2]
    head_z = c1_top + HEAD_MARGIN
    oz = np.array([t1z - 10.0, t1z, c7z, c1_top - 5.0, head_z, skull_centre[2]])
    ax = np.array([neck[0] * SHOULDER_WIDEN[0], neck[0] * (1 + SHOULDER_WIDEN[0]) / 2, neck[0], neck[0],
                   skull_r[0] + HEAD_MARGIN, skull_r[0] + HEAD_MARGIN])
    ay = np.array([neck[1] * SHOULDER_WIDEN[1], neck[1] * (1 + SHOULDER_WIDEN[1]) / 2, neck[1], neck[1],
                   skull_r[1] + HEAD_MARGIN, skull_r[1] + HEAD_MARGIN])
    spine_y = lambda q: np.interp(q, z, y)  # noqa: E731
    cy = np.array([spine_y(q) - NECK_CENTRE_AHEAD for q in oz[:4]] + [skull_centre[1]] * 2)
    cx = np.array([np.interp(q, z, x) for q in oz[:4]] + [skull_centre[0]] * 2)
    # airway: pharynx behind the mouth, larynx, trachea
    c4z = vertebrae["C4"].frame.origin[2]
    c6z = vertebrae["C6"].frame.origin[2]
    az = np.array([z[0], c6z, c4z, c1_top])
    aw = np.array([AIRWAY_AXES["trachea"], AIRWAY_AXES["larynx"], AIRWAY_AXES["larynx"],
                   AIRWAY_AXES["pharynx"]]) * habitus
    return dict(z=z, front=front, spine_x=x, oz=oz, ax=ax, ay=ay, cx=cx, cy=cy, az=az, aw=aw,
                fat_mm=_u(rng, cfg["fat_mm"]), airway_top=c1_top + HEAD_MARGIN)


# ---------------------------------------------------------------- fractures
def make_fracture(rng: np.random.Generator, part: Part, kind: str, cfg: Mapping[str, Any],
                  thickness: float, spacing: float) -> list[Fracture]:
    """Sample the fracture(s) of one `kind` on a vertebra (a bilateral kind gives two planes)."""
    d, name = part.dims, part.name
    gap = max(_u(rng, cfg["gap_mm"]), cfg["min_gap_px"] * spacing)
    mag = max(_u(rng, cfg["shift_mm"]), cfg["min_shift_px"] * spacing)
    if cfg["no_shift_prob"] > 0 and rng.random() < cfg["no_shift_prob"]:   # drawn only when enabled (same bytes)
        mag = 0.0
    side = int(rng.choice([1, -1]))
    tag = "L" if side > 0 else "R"
    min_len = cfg["min_window_slices"] * thickness

    def inplane(angle: float, tilt: float = 0.0) -> np.ndarray:
        n = np.array([math.cos(angle), math.sin(angle), tilt])
        return n / np.linalg.norm(n)

    def window(lo: float, hi: float) -> tuple[float, float]:
        full = hi - lo
        length = min(full, max(_u(rng, cfg["extent_frac"]) * full, min_len))
        start = lo + rng.uniform(0.0, full - length)
        return start, start + length

    def fracture(elements: set[str], normal: np.ndarray, point: Sequence[float], win: tuple[float, float],
                 label: str) -> Fracture:
        # the fragment moves mostly along the plane normal (distraction), partly along it (step-off)
        along = np.cross(normal, rng.normal(size=3))
        along /= np.linalg.norm(along) + 1e-9
        shift = mag * (0.7 * normal + 0.7 * along)
        return Fracture(name, label, frozenset(elements), normal, np.asarray(point, dtype=float), win, gap, shift)

    if name == "C1":
        chd, chw = d["canal_hd"], d["canal_hw"]
        if kind == "c1_anterior":
            return [fracture({"ant_arch"}, inplane(rng.uniform(-0.5, 0.5)), (rng.uniform(-0.4, 0.4) * chw,
                             -chd - 2.0, 0.0), window(-6.0, 6.0), kind)]
        if kind == "c1_posterior":
            return [fracture({f"post_arch_{tag}"}, inplane(rng.uniform(-0.6, 0.6) + side * 0.4),
                             (side * rng.uniform(0.3, 0.7) * chw, chd * 0.8, 0.0), window(-5.0, 5.0), kind)]
        if kind == "c1_jefferson":  # burst of the ring: anterior arch and both posterior arches
            win = window(-5.0, 5.0)
            out = [fracture({"ant_arch"}, inplane(rng.uniform(-0.5, 0.5)),
                            (rng.uniform(-0.4, 0.4) * chw, -chd - 2.0, 0.0), win, kind)]
            for sd, t in ((1, "L"), (-1, "R")):
                out.append(fracture({f"post_arch_{t}", f"lateral_mass_{t}"}, inplane(rng.uniform(-0.6, 0.6)),
                                    (sd * rng.uniform(0.3, 0.7) * chw, chd * 0.8, 0.0), win, kind))
            return out
        return [fracture({f"lateral_mass_{tag}"}, inplane(rng.uniform(0.0, math.pi), rng.uniform(-0.3, 0.3)),
                         (side * C1_LATERAL_MASS[0][0] * 0.9, C1_LATERAL_MASS[0][1], 0.0), window(-9.0, 9.0), kind)]

    hw, hd, h = d["body_hw"], d["body_hd"], d["body_h"]
    cv = hd + d["canal_hd"]
    w_arch = -ARCH_DROP_FRAC * h
    arch_half = ARCH_HEIGHT_FRAC * h / 2
    if kind == "body":
        return [fracture({"body"}, inplane(rng.uniform(0.0, math.pi), rng.uniform(-0.3, 0.3)),
                         (rng.uniform(-0.4, 0.4) * hw, rng.uniform(-0.4, 0.4) * hd, 0.0),
                         window(-h / 2, h / 2), kind)]
    if kind == "teardrop":
        n = np.array([0.0, -1.0, -rng.uniform(0.6, 1.4)])
        return [fracture({"body"}, n / np.linalg.norm(n), (0.0, -0.45 * hd, -0.25 * h), window(-h / 2, 0.1 * h),
                         kind)]
    if kind == "dens":
        n = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.9, 0.9), 1.0])
        top = h / 2 + DENS_LENGTH + DENS_RADIUS
        return [fracture({"dens"}, n / np.linalg.norm(n), (0.0, -0.15 * hd, h / 2 + rng.uniform(-1.0, 5.0)),
                         window(h / 2 - DENS_BASE_DROP - DENS_RADIUS, top), kind)]
    if kind in ("arch", "hangman", "complex"):
        # arch: one side's pedicle/lamina (often with its pillar or transverse process); hangman: both
        # sides; complex: both sides and the body (burst / flexion-distraction)
        sides = (side,) if kind == "arch" else (1, -1)
        win = window(w_arch - arch_half - 2.0, w_arch + arch_half)
        out = []
        if kind == "complex":
            out.append(fracture({"body"}, inplane(rng.uniform(0.0, math.pi), rng.uniform(-0.3, 0.3)),
                                (rng.uniform(-0.4, 0.4) * hw, rng.uniform(-0.4, 0.4) * hd, 0.0), win, kind))
        for sd in sides:
            t = "L" if sd > 0 else "R"
            ang = rng.uniform(0.2, 1.3)
            point = (sd * (d["canal_hw"] + ARCH_THICKNESS / 2) * math.sin(ang), cv - d["canal_hd"] * math.cos(ang)
                     + rng.uniform(-1.0, 1.0), w_arch)
            elements = {f"arch_{t}"}
            if rng.random() < cfg["pillar_share"]:
                elements.add(f"pillar_{t}")
            if rng.random() < cfg["tp_share"]:
                elements.add(f"tp_{t}")
            out.append(fracture(elements, inplane(rng.uniform(0.0, math.pi)), point, win, kind))
        return out
    if kind == "spinous":
        sp = next(s for s in part.shapes if s.element == "spinous")
        f = rng.uniform(0.35, 0.8)
        p = np.array(sp.p0) + f * (np.array(sp.p1) - np.array(sp.p0))
        axis = np.array(sp.p1) - np.array(sp.p0)
        n = axis / np.linalg.norm(axis) + rng.normal(scale=0.25, size=3)
        lo = min(sp.p0[2], sp.p1[2]) - sp.radius
        return [fracture({"spinous"}, n / np.linalg.norm(n), p, window(lo, max(sp.p0[2], sp.p1[2]) + sp.radius),
                         kind)]
    if kind == "tp":
        tp = next(s for s in part.shapes if s.element == f"tp_{tag}")
        c = np.array(tp.centre) + np.array([side * rng.uniform(-2.0, 2.0), 0.0, 0.0])
        n = np.array([1.0, rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)])
        return [fracture({f"tp_{tag}"}, n / np.linalg.norm(n), c, window(c[2] - tp.radii[2], c[2] + tp.radii[2]),
                         kind)]
    raise ValueError(f"unknown fracture kind {kind!r} for {name}")


# ---------------------------------------------------------------- rendering
def render(anatomy: Anatomy, fractures: Sequence[Fracture], grid: Grid, hu_cfg: Mapping[str, Any],
           rng: np.random.Generator) -> Rendered:
    """Render HU and labels on `grid`; return them with the per-slice fracture boxes."""
    hu = np.full(grid.shape, float(hu_cfg["air"]), dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    _draw_soft_tissue(hu, anatomy, grid, hu_cfg)
    for frame, disc in anatomy.discs:
        _render_disc(hu, frame, disc, grid, hu_cfg)
    cortical = _u(rng, hu_cfg["cortical"])
    cortex_mm = max(_u(rng, hu_cfg["cortex_mm"]), hu_cfg["min_cortex_px"] * grid.spacing)
    boxes: list[dict[int, tuple[int, int, int, int]]] = [{} for _ in fractures]
    for part in anatomy.parts:
        mine = [(i, f) for i, f in enumerate(fractures) if f.level == part.name]
        _render_part(hu, labels, part, mine, boxes, grid, hu_cfg, cortical, cortex_mm)
    _finish(hu, grid, hu_cfg, rng)
    return Rendered(hu, labels, boxes)


def _draw_soft_tissue(hu: np.ndarray, anatomy: Anatomy, grid: Grid, cfg: Mapping[str, Any]) -> None:
    """Per slice: body outline (fat), muscle inside, posterior fat pads, airway; drawn with cv2."""
    t = anatomy.tissue
    angle = math.degrees(anatomy.yaw)
    ox, oy = grid.origin_xy
    scale = 1 << CV_SHIFT

    def ell(img: np.ndarray, cx: float, cy: float, ax: float, ay: float, value: float) -> None:
        if ax <= 0 or ay <= 0:
            return
        centre = (round((cx - ox) / grid.spacing * scale), round((cy - oy) / grid.spacing * scale))
        axes = (round(ax / grid.spacing * scale), round(ay / grid.spacing * scale))
        cv2.ellipse(img, centre, axes, angle, 0, 360, float(value), thickness=-1, lineType=cv2.LINE_8,
                    shift=CV_SHIFT)

    fat = t["fat_mm"]
    for k in range(grid.n):
        z = grid.z_top - k * grid.thickness
        img = hu[k]
        cx, cy = np.interp(z, t["oz"], t["cx"]), np.interp(z, t["oz"], t["cy"])
        ax, ay = np.interp(z, t["oz"], t["ax"]), np.interp(z, t["oz"], t["ay"])
        ell(img, cx, cy, ax, ay, cfg["fat"])
        ell(img, cx, cy, ax - fat, ay - fat, cfg["muscle"])
        sx = np.interp(z, t["z"], t["spine_x"])
        front = np.interp(z, t["z"], t["front"])
        if z < t["airway_top"]:
            for side in (1, -1):
                ell(img, sx + side * 0.25 * ax, front + 0.62 * ay, 0.12 * ax, 0.07 * ay, cfg["fat"])
            aw = np.array([np.interp(z, t["az"], t["aw"][:, i]) for i in range(2)])
            ell(img, sx, front - PREVERTEBRAL_MM - aw[1], aw[0], aw[1], cfg["air"])


def _part_box(frame: Frame, lo: np.ndarray, hi: np.ndarray, grid: Grid, pad: float
              ) -> tuple[slice, slice, slice] | None:
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = frame.to_world(corners)
    return grid.index_box(world.min(axis=0) - pad, world.max(axis=0) + pad)


def _render_disc(hu: np.ndarray, frame: Frame, disc: Column, grid: Grid, cfg: Mapping[str, Any]) -> None:
    box = _part_box(frame, *disc.bounds(), grid, grid.spacing)
    if box is None:
        return
    u, v, w = frame.to_local(*grid.coords(box))
    f = np.clip(0.5 - disc.sdf(u, v, w) / grid.spacing, 0.0, 1.0)
    sub = hu[box]
    sub += (cfg["disc"] - sub) * f


def _render_part(hu: np.ndarray, labels: np.ndarray, part: Part, fractures: Sequence[tuple[int, Fracture]],
                 boxes: list[dict[int, tuple[int, int, int, int]]], grid: Grid, cfg: Mapping[str, Any],
                 cortical: float, cortex_mm: float) -> None:
    """Blend one part into `hu`/`labels`: anti-aliased bone, cortex by distance, fracture gaps and shifts."""
    s = grid.spacing
    pad = 2.0 * s + max((float(np.linalg.norm(f.shift)) for _, f in fractures), default=0.0)
    bounds = [sh.bounds() for sh in part.shapes]
    lo = np.min([b[0] for b in bounds], axis=0)
    hi = np.max([b[1] for b in bounds], axis=0)
    box = _part_box(part.frame, lo, hi, grid, pad)
    if box is None:
        return
    shape = tuple(sl.stop - sl.start for sl in box)
    sdf_all = np.full(shape, np.inf, dtype=np.float32)
    bone = np.zeros(shape, dtype=np.float32)
    elem_masks: dict[int, np.ndarray] = {}
    gap_seen: dict[int, np.ndarray] = {}
    fractures_by_id = dict(fractures)
    for sh, (slo, shi) in zip(part.shapes, bounds, strict=True):
        sbox = _part_box(part.frame, slo, shi, grid, pad)
        if sbox is None:
            continue
        rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sbox, box, strict=True))
        u, v, w = part.frame.to_local(*grid.coords(sbox))
        d = sh.sdf(u, v, w)
        intact = d <= 0
        hits = [(i, f) for i, f in fractures if sh.element in f.elements]
        gap = np.zeros_like(d) if hits else None
        own_gaps, own_moves = {}, {}
        for i, f in hits:
            dist = (u - f.point[0]) * f.normal[0] + (v - f.point[1]) * f.normal[1] + (w - f.point[2]) * f.normal[2]
            lo_w, hi_w = f.window
            taper = np.clip(np.minimum(w - lo_w, hi_w - w) / TAPER_MM, 0.0, 1.0)
            moved = sh.sdf(u - taper * f.shift[0], v - taper * f.shift[1], w - taper * f.shift[2])
            d = np.where(dist > 0, moved, d)
            own_moves[i] = (dist > 0) & ((moved <= 0) != intact)
            inside = (w >= lo_w) & (w <= hi_w)
            own_gaps[i] = line_coverage(dist, f.gap_mm, s) * inside
            gap = np.maximum(gap, own_gaps[i])
        f_shape = np.clip(0.5 - d / s, 0.0, 1.0)
        for i, g in own_gaps.items():
            elem = (f_shape >= 0.5) | intact
            m = elem_masks.setdefault(i, np.zeros(shape, dtype=bool))
            m[rel] |= elem
            seen = gap_seen.setdefault(i, np.zeros(shape, dtype=bool))
            seen[rel] |= (elem & (g >= SEEN_SHARE * min(1.0, fractures_by_id[i].gap_mm / s))) | own_moves[i]
        np.minimum(sdf_all[rel], d, out=sdf_all[rel])
        # without a break on this shape the gap is 0 and f_shape * (1 - gap) is f_shape itself
        np.maximum(bone[rel], f_shape if gap is None else f_shape * (1.0 - gap), out=bone[rel])

    sub_hu = hu[box]
    where = bone > 0  # a mask selects the voxels in the same (C) order as np.nonzero, with cheaper gathers
    frac = bone[where]
    sdf_in = sdf_all[where]
    interior = np.clip(0.5 + (sdf_in + cortex_mm) / s, 0.0, 1.0)  # 1 in the cortex, 0 deep inside
    bone_hu = part.cancellous_hu + (cortical - part.cancellous_hu) * interior
    if part.vascular or part.foramina:
        x, y, z = grid.coords(box)
        px, py, pz = (np.broadcast_to(c, shape)[where] for c in (x, y, z))
        u, v, w = part.frame.to_local(px, py, pz)
    if part.vascular:
        body = next(sh for sh in part.shapes if sh.element == "body")
        deep = (sdf_in < -(cortex_mm + VASC_MARGIN_MM)) & (body.sdf(u, v, w) < -(cortex_mm + VASC_MARGIN_MM))
        for normal, point, width, (w_lo, w_hi) in part.vascular:
            dist = (u - point[0]) * normal[0] + (v - point[1]) * normal[1] + (w - point[2]) * normal[2]
            width = max(width, cfg["min_channel_px"] * s)
            gv = line_coverage(dist, width, s) * deep * (w >= w_lo) * (w <= w_hi)
            bone_hu += (cfg["vascular"] - bone_hu) * gv
    for fo in part.foramina:      # not a break: the bone is removed, the labels and the fracture truth stay
        dist = (u - fo.point[0]) * fo.normal[0] + (v - fo.point[1]) * fo.normal[1] + (w - fo.point[2]) * fo.normal[2]
        t = (u - fo.point[0]) * fo.inward[0] + (v - fo.point[1]) * fo.inward[1] + (w - fo.point[2]) * fo.inward[2]
        ends = np.clip(0.5 + np.minimum(t - fo.reach[0], fo.reach[1] - t) / s, 0.0, 1.0)
        width = max(fo.width, cfg["min_channel_px"] * s)
        frac = frac * (1.0 - line_coverage(dist, width, s) * ends * (w >= fo.window[0]) * (w <= fo.window[1]))
    old = sub_hu[where]
    sub_hu[where] = old + (bone_hu - old) * frac
    if part.label:
        sub_lab = labels[box]
        sub_lab[bone >= 0.5] = part.label
    for i, mask in elem_masks.items():
        seen_k = np.nonzero(gap_seen[i].any(axis=(1, 2)))[0]
        for k in seen_k:
            # the element and the pixels the break changed (a moved fragment can leave a slice element-free)
            region = mask[k] | gap_seen[i][k]
            rows = np.nonzero(region.any(axis=1))[0]
            cols = np.nonzero(region.any(axis=0))[0]
            bbox = (rows[0] + box[1].start, rows[-1] + box[1].start, cols[0] + box[2].start, cols[-1] + box[2].start)
            kk = int(k + box[0].start)
            old = boxes[i].get(kk)
            if old is not None:
                bbox = (min(old[0], bbox[0]), max(old[1], bbox[1]), min(old[2], bbox[2]), max(old[3], bbox[3]))
            boxes[i][kk] = tuple(int(b) for b in bbox)


def line_coverage(dist: np.ndarray, width: float, spacing: float) -> np.ndarray:
    """Share of each pixel covered by a lucent line `width` mm wide whose midplane lies `dist` mm from its centre.

    The exact coverage of a pixel `spacing` mm wide (a box filter across the line). For lines at least a pixel
    wide this is the edge ramp clip(0.5 - (|dist| - width / 2) / spacing, 0, 1), computed as before so those
    studies keep their bytes; a thinner line peaks at width / spacing instead of being widened to a pixel.
    """
    if width >= spacing:
        return np.clip(0.5 - (np.abs(dist) - width / 2) / spacing, 0.0, 1.0)
    a = np.abs(dist)
    overlap = np.minimum(a + spacing / 2, width / 2) - np.maximum(a - spacing / 2, -width / 2)
    return np.clip(overlap, 0.0, None) / spacing


def _finish(hu: np.ndarray, grid: Grid, cfg: Mapping[str, Any], rng: np.random.Generator) -> None:
    """Add noise (stronger in bone: trabecular texture), then blur each slice in-plane.

    The noise comes as random crops of a small pool of noise images, which costs a fraction of drawing
    fresh normals for every voxel; adding it before the blur makes it spatially correlated like CT noise.
    """
    sigma = np.float32(_u(rng, cfg["noise_sigma"]))
    extra = np.float32(cfg["trabecular_sigma"])
    bone_hu = np.float32(cfg["trabecular_above"])
    blur = _u(rng, cfg["blur_px"])
    pool = rng.standard_normal((NOISE_POOL, grid.rows + NOISE_PAD, grid.cols + NOISE_PAD), dtype=np.float32)
    picks = rng.integers(0, [NOISE_POOL, NOISE_PAD + 1, NOISE_PAD + 1], size=(grid.n, 3))
    for k in range(grid.n):
        img = hu[k]
        j, dr, dc = picks[k]
        noise = pool[j, dr:dr + grid.rows, dc:dc + grid.cols]
        img += noise * np.where(img > bone_hu, sigma + extra, sigma)  # = sigma + extra * (img > bone_hu)
        if blur > 0:
            cv2.GaussianBlur(img, (0, 0), blur, dst=img)
