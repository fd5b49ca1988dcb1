"""Segmentation NIfTI -> canonical axial stack: orientation from affines, refusal of mismatched masks, tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep.dicom.segmentation import load_axial_mask, slice_level_table, slice_presence
from data_prep.errors import GeometryError
from data_prep.runs.registry import LEVELS

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class FakeGeometry:
    """A stand-in with the StudyGeometry fields the mapping uses (docs/contracts.md)."""

    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    instance_numbers: np.ndarray
    paths: list[Path] = field(default_factory=list)

    def affine(self) -> np.ndarray:
        row_dir = np.asarray(self.orientation[:3])
        col_dir = np.asarray(self.orientation[3:])
        a = np.eye(4)
        a[:3, 0] = self.positions[1] - self.positions[0]
        a[:3, 1] = col_dir * self.pixel_spacing[0]
        a[:3, 2] = row_dir * self.pixel_spacing[1]
        a[:3, 3] = self.positions[0]
        return a


def make_geometry(tmp_path: Path, n: int = 6, rows: int = 5, cols: int = 4, *, feet_first: bool = False,
                  spacing: tuple[float, float] = (1.0, 1.0), step: float = 1.0,
                  origin: tuple[float, float, float] = (-3.0, 2.0, 40.0)) -> FakeGeometry:
    """An axial study (rows along +x, columns along +y), canonical order = head to feet."""
    positions = np.array([[origin[0], origin[1], origin[2] - k * step] for k in range(n)])
    numbers = np.arange(n, 0, -1) if feet_first else np.arange(1, n + 1)
    folder = tmp_path / "1.2.3.4"
    return FakeGeometry(positions, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), spacing, (rows, cols), numbers,
                        [folder / f"{k}.dcm" for k in numbers])


def lps_of_voxels(geo: FakeGeometry) -> np.ndarray:
    """LPS mm of every canonical voxel (n, rows, cols, 3), straight from IPP/IOP/PixelSpacing."""
    rows, cols = geo.shape
    row_dir, col_dir = np.asarray(geo.orientation[:3]), np.asarray(geo.orientation[3:])
    r = np.arange(rows)[None, :, None, None]
    c = np.arange(cols)[None, None, :, None]
    return (geo.positions[:, None, None, :] + r * geo.pixel_spacing[0] * col_dir
            + c * geo.pixel_spacing[1] * row_dir)


def code_of(lps: np.ndarray) -> np.ndarray:
    """A label unique per integer-mm position in the small test volumes (values < 256)."""
    x, y, z = (np.rint(lps[..., k]).astype(int) for k in range(3))
    return ((x + 5) + 8 * (y + 1) + 64 * ((z - 30) % 4)).astype(np.uint8)


def write_kaggle_style_nifti(path: Path, canon: np.ndarray, geo: FakeGeometry) -> None:
    """Store canonical labels the way the RSNA files are stored: m.transpose(1,0,2)[::-1,:,::-1] = (r, c, head->feet).

    The affine is built like a DICOM->NIfTI converter does, from the most inferior slice's IPP.
    """
    n, rows, cols = canon.shape
    m = canon.transpose(2, 1, 0)[:, ::-1, ::-1].copy()  # m[c, rows-1-r, n-1-i] = canon[i, r, c]
    ps_r, ps_c = geo.pixel_spacing
    bottom = geo.positions[-1]  # NIfTI slice 0 is the most inferior one
    # voxel (a, b, k) -> LPS: bottom + a*ps_c*x_hat + (rows-1-b)*ps_r*y_hat + k*step*z_hat
    step = geo.positions[0][2] - geo.positions[1][2]
    lps = np.array([[ps_c, 0, 0, bottom[0]],
                    [0, -ps_r, 0, bottom[1] + (rows - 1) * ps_r],
                    [0, 0, step, bottom[2]],
                    [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(m, LPS_TO_RAS @ lps), str(path))


@pytest.mark.parametrize("feet_first", [False, True])
def test_exact_mapping_matches_positions(tmp_path, feet_first):
    geo = make_geometry(tmp_path, feet_first=feet_first)
    truth = code_of(lps_of_voxels(geo))
    write_kaggle_style_nifti(tmp_path / "s.nii", truth, geo)
    got = load_axial_mask(tmp_path / "s.nii", geo)
    assert got.dtype == np.uint8 and got.shape == truth.shape
    np.testing.assert_array_equal(got, truth)


def test_nifti_with_other_axis_order_and_ras_storage(tmp_path):
    geo = make_geometry(tmp_path, n=5, rows=4, cols=6)
    lps = lps_of_voxels(geo)
    truth = code_of(lps)
    # store as RAS+ (x = R, y = A, z = S) on the same 1 mm grid, axes in x, y, z order
    ras = lps.copy()
    ras[..., :2] *= -1
    lo = ras.reshape(-1, 3).min(axis=0)
    idx = np.rint(ras - lo).astype(int)
    size = idx.reshape(-1, 3).max(axis=0) + 1
    vol = np.zeros(size, dtype=np.uint8)
    vol[idx[..., 0], idx[..., 1], idx[..., 2]] = truth
    aff = np.eye(4)
    aff[:3, 3] = lo
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "ras.nii.gz"))
    np.testing.assert_array_equal(load_axial_mask(tmp_path / "ras.nii.gz", geo), truth)


def test_coarser_mask_is_resampled_nearest_with_warning(tmp_path, caplog):
    geo = make_geometry(tmp_path, n=6, rows=7, cols=7, spacing=(0.5, 0.5), origin=(0.25, 0.25, 40.0))
    lps = lps_of_voxels(geo)
    # a 1 mm mask over the same region (study pixels at 0.25, 0.75, ... mm; mask voxels at 0, 1, 2, 3 mm)
    truth_fn = lambda p: (np.floor(p[..., 0] + 0.5) + 10 * np.floor(p[..., 1] + 0.5)).astype(np.uint8)  # noqa: E731
    xs, ys, zs = np.arange(4.0), np.arange(4.0), geo.positions[::-1, 2]
    grid = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1)  # LPS, axes x, y, z (up)
    vol = truth_fn(grid)
    aff = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, zs[0]], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, LPS_TO_RAS @ aff), str(tmp_path / "coarse.nii"))
    with caplog.at_level("WARNING", logger="data_prep"):
        got = load_axial_mask(tmp_path / "coarse.nii", geo)
    assert "resampling" in caplog.text
    # nearest neighbour: the study pixel at p takes the mask voxel nearest p (no ties on this grid)
    near = np.clip(np.rint(lps[..., :2]), 0, 3)
    expected = (near[..., 0] + 10 * near[..., 1]).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_wrong_slice_count_is_refused_naming_both(tmp_path):
    geo = make_geometry(tmp_path, n=6)
    truth = code_of(lps_of_voxels(geo))
    bigger = make_geometry(tmp_path, n=8)
    write_kaggle_style_nifti(tmp_path / "other.nii", np.zeros((8, 5, 4), np.uint8), bigger)
    with pytest.raises(GeometryError) as err:
        load_axial_mask(tmp_path / "other.nii", geo)
    msg = str(err.value)
    assert "other.nii" in msg and "1.2.3.4" in msg and "8" in msg and "6" in msg
    assert truth.shape[0] == 6


def test_shifted_mask_is_refused(tmp_path):
    geo = make_geometry(tmp_path, n=6)
    shifted = make_geometry(tmp_path, n=6, origin=(-3.0, 2.0, 43.0))  # 3 slices higher
    write_kaggle_style_nifti(tmp_path / "shift.nii", np.zeros((6, 5, 4), np.uint8), shifted)
    with pytest.raises(GeometryError, match="shift.nii.*1.2.3.4"):
        load_axial_mask(tmp_path / "shift.nii", geo)


def test_slice_level_table_boxes_and_presence(tmp_path):
    geo = make_geometry(tmp_path, n=4, rows=10, cols=12, feet_first=True)
    mask = np.zeros((4, 10, 12), np.uint8)
    mask[0, 2:5, 3:9] = 1        # C1: rows 2-4, cols 3-8
    mask[1, 2:5, 3:9] = 1
    mask[1, 6, 7] = 2            # C2 single pixel on slice 1
    mask[2, :, :] = 8            # T1 only: ignored
    mask[3, 0, 0] = 7            # C7
    table = slice_level_table(mask, geo)
    assert list(table["level"]) == ["C1", "C1", "C2", "C7"]
    c1 = table.iloc[0]
    assert (c1.x, c1.y, c1.width, c1.height, c1.area_px) == (3, 2, 6, 3, 18)
    c2 = table.iloc[2]
    assert (c2.x, c2.y, c2.width, c2.height, c2.area_px) == (7, 6, 1, 1, 1)
    assert list(table["slice_number"]) == [4, 3, 3, 1]  # feet_first: canonical 0 is InstanceNumber n
    assert set(table["StudyInstanceUID"]) == {"1.2.3.4"}
    pres = slice_presence(table, 4, slice_numbers=geo.instance_numbers)
    assert pres[list(LEVELS)].to_numpy().tolist() == [
        [1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0] * 7, [0, 0, 0, 0, 0, 0, 1]]
    assert list(pres["slice_number"]) == [4, 3, 2, 1]
    partial = slice_presence(table, 4)
    assert partial["slice_number"].isna().tolist() == [False, False, True, False]
    assert isinstance(partial, pd.DataFrame)


# ---------------------------------------------------------------- with the real reader on written series
def write_study(tmp_path: Path, labels: np.ndarray, order: str, syntax: str):
    """Write a tiny DICOM series (HU = 100 * label) and return its scanned StudyGeometry."""
    from data_prep.dicom.geometry import scan_study
    from data_prep.dicom.writer import INSTANCE_ORDERS, write_series

    folder = tmp_path / f"1.2.826.0.1.3680043.77{INSTANCE_ORDERS.index(order) + 1}"
    write_series(folder, labels.astype(np.float32) * 100, study_uid=folder.name, pixel_spacing=(0.8, 0.8),
                 slice_thickness=1.25, z_top_mm=30.0, origin_xy_mm=(-12.0, -10.0), instance_order=order,
                 transfer_syntax=syntax)
    return scan_study(folder)


def kaggle_convention(nii_path: Path, geometry) -> np.ndarray:
    """The competitors' reading: mask.transpose(1,0,2)[::-1,:,::-1], slices in InstanceNumber order -> canonical."""
    k = np.asanyarray(nib.load(str(nii_path)).dataobj).transpose(1, 0, 2)[::-1, :, ::-1]
    by_instance = np.argsort(np.argsort(geometry.instance_numbers))  # rank of each canonical slice's number
    return np.ascontiguousarray(k[:, :, by_instance].transpose(2, 0, 1)).astype(np.uint8)


@pytest.mark.parametrize(("order", "syntax"), [("head_first", "1.2.840.10008.1.2.1"),
                                               ("feet_first", "1.2.840.10008.1.2.1"),
                                               ("feet_first", "1.2.840.10008.1.2.4.70")])
def test_written_series_with_reader_and_kaggle_convention(tmp_path, order, syntax):
    from data_prep.dicom.volume import read_volume

    rng = np.random.default_rng(1)
    canon = np.zeros((10, 24, 20), np.uint8)
    for j in range(7):  # levels stacked head to feet with overlaps, each at its own place in the plane
        canon[j + 1:j + 4, 3 + 2 * j:9 + 2 * j, 2 + j:7 + j] = j + 1
    canon[rng.random(canon.shape) < 0.02] = 9  # a few thoracic voxels
    geo = write_study(tmp_path, canon, order, syntax)
    assert geo.instance_order_reversed == (order == "feet_first")
    # the image itself tells where each label is: the mapped mask must sit on the same voxels
    write_kaggle_style_nifti(tmp_path / "seg.nii", canon, geo)
    mask = load_axial_mask(tmp_path / "seg.nii", geo)
    np.testing.assert_array_equal(mask, np.rint(read_volume(geo) / 100).astype(np.uint8))
    kaggle = kaggle_convention(tmp_path / "seg.nii", geo)
    if order == "head_first":
        np.testing.assert_array_equal(kaggle, mask)
    else:
        assert not np.array_equal(kaggle, mask)
        np.testing.assert_array_equal(kaggle, mask[::-1])  # upside down: levels in reverse order
    table = slice_level_table(mask, geo)
    c3 = table[table.level == "C3"]
    assert list(c3.slice_index) == [3, 4, 5]
    assert list(c3.slice_number) == [int(geo.instance_numbers[i]) for i in (3, 4, 5)]
    assert (c3.x.iloc[0], c3.y.iloc[0], c3.width.iloc[0], c3.height.iloc[0]) == (4, 7, 5, 6)


# ---------------------------------------------------------------- synthetic studies with known truth
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    synth = pytest.importorskip("data_prep.synthetic.synth", reason="data_prep.synthetic.synth not written yet")
    from data_prep.runs.config import load_config

    root = tmp_path_factory.mktemp("synth") / "data"
    cfg = load_config("synth", overrides=["image.size=64", "volume.slices=24", "labels.segmentation_fraction=1.0",
                                          "files.jpeg_lossless_fraction=0.5"])
    synth.synthesize(root, n_studies=6, seed=0, split="train", config=cfg, progress=False, overwrite=False)
    return root


def test_synthetic_masks_equal_the_truth(synth_root):
    from data_prep.dicom.geometry import scan_study

    truth_slices = pd.read_csv(synth_root / "truth" / "slice_levels.csv")
    truth_boxes = pd.read_csv(synth_root / "truth" / "level_boxes.csv")
    segs = sorted((synth_root / "segmentations").glob("*.nii*"))
    assert segs, "synth wrote no segmentations"
    orders, syntaxes = set(), set()
    for nii in segs:
        uid = nii.name.split(".nii")[0]
        geo = scan_study(synth_root / "train_images" / uid)
        orders.add(bool(geo.instance_order_reversed))
        syntaxes.update(geo.transfer_syntaxes)
        mask = load_axial_mask(nii, geo)
        table = slice_level_table(mask, geo)
        pres = slice_presence(table, len(geo), slice_numbers=geo.instance_numbers)
        want = truth_slices[truth_slices.StudyInstanceUID == uid].sort_values("slice_index")
        np.testing.assert_array_equal(pres["slice_number"].to_numpy(), want["slice_number"].to_numpy())
        np.testing.assert_array_equal(pres[list(LEVELS)].to_numpy(), want[list(LEVELS)].to_numpy())
        boxes = truth_boxes[truth_boxes.StudyInstanceUID == uid]
        got = table.merge(boxes, on=["slice_index", "level"], suffixes=("", "_t"), how="outer", indicator=True)
        assert (got["_merge"] == "both").all(), f"{uid}: level boxes on different slices than the truth"
        for c in ("x", "y", "width", "height"):
            np.testing.assert_allclose(got[c], got[f"{c}_t"], atol=1e-6, err_msg=f"{uid} {c}")
        kaggle = kaggle_convention(nii, geo)
        if geo.instance_order_reversed:
            assert not np.array_equal(kaggle, mask), f"{uid}: feet-first, yet the Kaggle reading agrees"
        else:
            np.testing.assert_array_equal(kaggle, mask)
    assert orders == {False, True}, "the synthetic set should hold head-first and feet-first studies"
    assert "1.2.840.10008.1.2.4.70" in syntaxes, "the synthetic set should hold JPEG Lossless studies"
