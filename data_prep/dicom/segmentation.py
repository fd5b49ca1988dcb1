"""Segmentation NIfTI -> canonical axial stack of its study, and per-slice vertebra levels, areas and boxes.

The mapping is derived only from the NIfTI affine (RAS mm) and the DICOM geometry (LPS mm): the
voxel->voxel transform `inv(nifti_affine) @ LPS_TO_RAS @ geometry.affine()` takes a canonical
(slice_index, row, col) to a NIfTI voxel. When it is a signed axis permutation of equal-sized axes it
is applied exactly (nibabel orientation tools: transposes and flips); otherwise the mask is resampled
nearest-neighbour slice by slice from each slice's ImagePositionPatient, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, io_orientation
from scipy.ndimage import map_coordinates

from data_prep.errors import GeometryError, InputError
from data_prep.runs.registry import LEVELS, SEG_LABELS, STUDY_COL

log = logging.getLogger("data_prep")

LPS_TO_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Homogeneous matrix from DICOM patient coordinates (LPS mm) to NIfTI world coordinates (RAS mm)."""

PERMUTATION_TOL = 1e-3
"""Largest deviation of a voxel->voxel matrix entry from 0 or +-1 still treated as an exact permutation."""
ALIGN_TOL_VOX = 0.05
"""Largest offset (voxels) between the two grids still treated as exactly aligned."""
OUTSIDE_TOL_VOX = 0.5
"""A study voxel centre may fall this far (voxels) outside the mask volume before the mask is refused."""
LABEL_DTYPE_MAX = 255
NDIM = 3

TABLE_COLUMNS: tuple[str, ...] = (STUDY_COL, "slice_index", "slice_number", "level", "area_px",
                                  "x", "y", "width", "height")
"""Columns of `slice_level_table`: one row per (slice, level present); box in original pixel coordinates."""


def load_axial_mask(nii_path: Path, geometry: Any) -> np.ndarray:
    """Return the segmentation as uint8 labels (n, rows, cols) on the study's canonical axial stack."""
    nii_path = Path(nii_path)
    study = _study_dir(geometry)
    try:
        img = nib.load(str(nii_path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise InputError(nii_path, f"cannot read as NIfTI ({exc})") from None
    data = np.asanyarray(img.dataobj)
    if data.ndim > NDIM and all(s == 1 for s in data.shape[NDIM:]):
        data = data.reshape(data.shape[:NDIM])
    if data.ndim != NDIM:
        raise GeometryError(nii_path, f"segmentation has shape {data.shape}; expected a 3-D volume for study {study}")
    labels = _as_labels(data, nii_path)

    n_slices = len(geometry.positions)
    target_shape = (n_slices, int(geometry.shape[0]), int(geometry.shape[1]))
    vox = np.linalg.inv(img.affine) @ LPS_TO_RAS @ np.asarray(geometry.affine(), dtype=float)
    exact = _exact_orientation(vox, labels.shape, target_shape, geometry, img.affine, nii_path, study)
    if exact is not None:
        out = apply_orientation(labels, exact)
        log.debug("%s: mapped onto %s by axis permutation/flips %s", nii_path.name, study, exact.tolist())
        return np.ascontiguousarray(out, dtype=np.uint8)
    log.warning("%s: NIfTI grid is not an axis permutation of study %s; resampling nearest-neighbour",
                nii_path, study)
    return _resample_nearest(labels, img.affine, geometry, target_shape, nii_path, study)


def slice_level_table(mask: np.ndarray, geometry: Any) -> pd.DataFrame:
    """Return one row per (slice, cervical level present): area and bounding box in pixel coordinates.

    Labels 1-7 (C1-C7) are reported; thoracic labels 8-19 (T1-T12) and any other value are ignored.
    Boxes follow train_bounding_boxes.csv: x = first column, y = first row, width/height in pixels
    counting whole pixels (a single pixel at column c gives x = c, width = 1).
    """
    mask = np.asarray(mask)
    n = mask.shape[0]
    numbers = np.asarray(geometry.instance_numbers)
    if len(numbers) != n:
        raise GeometryError(_study_dir(geometry), f"mask has {n} slices but the study has {len(numbers)}")
    uid = _study_uid(geometry)
    frames = []
    for label, name in SEG_LABELS.items():
        if name not in LEVELS:
            continue
        present = mask == label
        area = present.sum(axis=(1, 2))
        slices = np.nonzero(area)[0]
        if len(slices) == 0:
            continue
        rows_any = present[slices].any(axis=2)
        cols_any = present[slices].any(axis=1)
        y0 = rows_any.argmax(axis=1)
        y1 = rows_any.shape[1] - 1 - rows_any[:, ::-1].argmax(axis=1)
        x0 = cols_any.argmax(axis=1)
        x1 = cols_any.shape[1] - 1 - cols_any[:, ::-1].argmax(axis=1)
        frames.append(pd.DataFrame({
            STUDY_COL: uid, "slice_index": slices, "slice_number": numbers[slices], "level": name,
            "area_px": area[slices], "x": x0.astype(float), "y": y0.astype(float),
            "width": (x1 - x0 + 1).astype(float), "height": (y1 - y0 + 1).astype(float)}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object if c in (STUDY_COL, "level") else float)
                             for c in TABLE_COLUMNS})
    table = pd.concat(frames, ignore_index=True)
    table["_order"] = table["level"].map(LEVELS.index)
    table = table.sort_values(["slice_index", "_order"]).drop(columns="_order").reset_index(drop=True)
    return table[list(TABLE_COLUMNS)]


def slice_presence(table: pd.DataFrame, n_slices: int, *, slice_numbers: Any = None) -> pd.DataFrame:
    """Return one row per slice: slice_index, slice_number, C1..C7 (0/1) from a `slice_level_table`.

    `slice_numbers` (InstanceNumber per canonical slice) fills slices without levels; without it they
    are taken from the table where known and left missing (<NA>) elsewhere.
    """
    out = pd.DataFrame({"slice_index": np.arange(n_slices)})
    if slice_numbers is not None:
        numbers = np.asarray(slice_numbers)
        if len(numbers) != n_slices:
            raise ValueError(f"slice_numbers has {len(numbers)} entries for {n_slices} slices")
        out["slice_number"] = pd.array(numbers, dtype="Int64")
    else:
        known = table.drop_duplicates("slice_index").set_index("slice_index")["slice_number"]
        out["slice_number"] = pd.array(out["slice_index"].map(known), dtype="Int64")
    if STUDY_COL in table.columns and table[STUDY_COL].nunique() == 1:
        out.insert(0, STUDY_COL, table[STUDY_COL].iloc[0])
    for name in LEVELS:
        rows = table.loc[table["level"] == name, "slice_index"].to_numpy(dtype=int)
        bits = np.zeros(n_slices, dtype=np.int64)
        bits[rows[(rows >= 0) & (rows < n_slices)]] = 1
        out[name] = bits
    return out


# ---------------------------------------------------------------- internals
def _study_dir(geometry: Any) -> Path:
    for attr in ("study_dir", "folder", "path"):
        value = getattr(geometry, attr, None)
        if value is not None:
            return Path(value)
    paths = getattr(geometry, "paths", None)
    return Path(paths[0]).parent if paths else Path("<study>")


def _study_uid(geometry: Any) -> str:
    uid = getattr(geometry, "study_uid", None)
    return str(uid) if uid else _study_dir(geometry).name


def _as_labels(data: np.ndarray, nii_path: Path) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer):
        if data.min(initial=0) < 0 or data.max(initial=0) > LABEL_DTYPE_MAX:
            raise InputError(nii_path, f"label values {data.min()}..{data.max()} outside 0..{LABEL_DTYPE_MAX}")
        return data.astype(np.uint8, copy=False)
    rounded = np.rint(data)
    if rounded.min(initial=0) < 0 or rounded.max(initial=0) > LABEL_DTYPE_MAX:
        raise InputError(nii_path, f"label values {data.min()}..{data.max()} outside 0..{LABEL_DTYPE_MAX}")
    return rounded.astype(np.uint8)


def _exact_orientation(vox: np.ndarray, nii_shape: tuple[int, ...], target_shape: tuple[int, int, int],
                       geometry: Any, nii_affine: np.ndarray, nii_path: Path, study: Path) -> np.ndarray | None:
    """Return the nibabel orientation (nifti axes -> canonical axes) if the grids coincide exactly, else None.

    Raises GeometryError when the matrix is an exact permutation but the axis sizes or offsets differ
    (a mask made for another study, or a wrong slice count).
    """
    lin = vox[:3, :3]
    rounded = np.rint(lin)
    is_perm = (np.abs(lin - rounded).max() <= PERMUTATION_TOL
               and np.array_equal(np.abs(rounded) @ np.ones(3), np.ones(3))
               and np.array_equal(np.ones(3) @ np.abs(rounded), np.ones(3)))
    if not is_perm:
        return None
    canon_names = ("slice", "row", "column")
    for j in range(3):
        p = int(np.abs(rounded[:, j]).argmax())
        if nii_shape[p] != target_shape[j]:
            raise GeometryError(nii_path, f"does not match study {study}: NIfTI axis {p} has {nii_shape[p]} voxels "
                                f"where the study's {canon_names[j]} axis has {target_shape[j]} "
                                f"(NIfTI shape {nii_shape}, study (slices, rows, cols) {target_shape})")
    corners = np.array([[i, r, c, 1.0] for i in (0, target_shape[0] - 1) for r in (0, target_shape[1] - 1)
                        for c in (0, target_shape[2] - 1)])
    mapped = (vox @ corners.T)[:3].T
    lo = mapped.min(axis=0)
    offset = np.where(np.abs(lo) > ALIGN_TOL_VOX, lo, 0.0)
    if np.abs(offset).max() > OUTSIDE_TOL_VOX:
        raise GeometryError(nii_path, f"does not match study {study}: the study's slices fall "
                            f"{np.round(offset, 2).tolist()} voxels off the NIfTI grid (beyond half a voxel)")
    if np.any(offset):
        return None  # sub-voxel shift: let the resampler place it
    # slices must sit on the NIfTI grid one by one (uneven DICOM spacing is resampled instead)
    pos = np.c_[np.asarray(geometry.positions, dtype=float), np.ones(len(geometry.positions))]
    per_slice = (np.linalg.inv(nii_affine) @ LPS_TO_RAS @ pos.T)[:3].T
    expected = (vox @ np.c_[np.arange(target_shape[0]), np.zeros((target_shape[0], 2)),
                            np.ones(target_shape[0])].T)[:3].T
    if np.abs(per_slice - expected).max() > ALIGN_TOL_VOX:
        return None
    return io_orientation(np.linalg.inv(vox))


def _resample_nearest(labels: np.ndarray, nii_affine: np.ndarray, geometry: Any,
                      target_shape: tuple[int, int, int], nii_path: Path, study: Path) -> np.ndarray:
    """Nearest-neighbour labels at every study voxel centre, using each slice's own position."""
    n, rows, cols = target_shape
    base = np.asarray(geometry.affine(), dtype=float)
    to_vox = np.linalg.inv(nii_affine) @ LPS_TO_RAS
    positions = np.asarray(geometry.positions, dtype=float)
    upper = np.asarray(labels.shape, dtype=float) - 1
    slice_maps = []
    corners = np.array([[0, 0, 0, 1.0], [0, rows - 1, 0, 1.0], [0, 0, cols - 1, 1.0], [0, rows - 1, cols - 1, 1.0]])
    worst = 0.0
    for i in range(n):
        aff = base.copy()
        aff[:3, 3] = positions[i]
        m = to_vox @ aff
        c = (m @ corners.T)[:3]
        worst = max(worst, float(np.max(-c)), float(np.max(c - upper[:, None])))
        slice_maps.append(m)
    if worst > OUTSIDE_TOL_VOX:
        raise GeometryError(nii_path, f"does not match study {study}: study voxels fall up to {worst:.2f} voxels "
                            f"outside the NIfTI volume {labels.shape} (more than half a voxel)")
    rr, cc = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    out = np.empty(target_shape, dtype=np.uint8)
    for i, m in enumerate(slice_maps):
        coords = m[:3, 1, None, None] * rr + m[:3, 2, None, None] * cc + m[:3, 3, None, None]
        out[i] = map_coordinates(labels, coords, order=0, mode="nearest")
    return out
