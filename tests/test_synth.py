"""`spinefrac synth`: layout, determinism, file variety, label/box truth, NIfTI geometry (checked with
pydicom headers and nibabel, independently of the generator's own tables where possible)."""

from __future__ import annotations

import filecmp

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from data_prep.dicom.geometry import scan_study
from data_prep.dicom.volume import read_volume
from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from data_prep.synthetic import phantom
from data_prep.synthetic.synth import build_study, plan_studies, synthesize

N_STUDIES = 6
SMALL = ["image.size=96", "volume.slices=40"]
CSVS = ("train.csv", "train_bounding_boxes.csv", "truth/slice_levels.csv", "truth/level_boxes.csv",
        "truth/fractures.csv")


def small_config(*extra: str):
    """A tiny, fast configuration: 96 px images, ~40 slices."""
    return load_config("synth", None, [*SMALL, *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six small train studies, all segmented (so both instance orders have a NIfTI)."""
    out = tmp_path_factory.mktemp("synth") / "train"
    synthesize(out, n_studies=N_STUDIES, seed=3, config=small_config("labels.segmentation_fraction=1.0"),
               progress=False)
    return out


def study_dirs(root):
    return sorted(p for p in (root / "train_images").iterdir() if p.is_dir())


def headers(study_dir):
    """(InstanceNumber -> dataset without pixels) read with plain pydicom."""
    return {int(p.stem): pydicom.dcmread(p, stop_before_pixels=True) for p in study_dir.glob("*.dcm")}


def test_layout_and_schemas(dataset):
    train = pd.read_csv(dataset / "train.csv")
    assert list(train.columns) == [STUDY_COL, PATIENT, *LEVELS]
    assert len(train) == N_STUDIES and train[STUDY_COL].is_unique
    assert all(u.startswith("1.2.826.0.1.3680043.") and pydicom.uid.UID(u).is_valid for u in train[STUDY_COL])
    boxes = pd.read_csv(dataset / "train_bounding_boxes.csv")
    assert list(boxes.columns) == [STUDY_COL, "x", "y", "width", "height", "slice_number"]
    truth = dataset / "truth"
    assert list(pd.read_csv(truth / "slice_levels.csv").columns) == [STUDY_COL, "slice_number", "slice_index",
                                                                     *LEVELS]
    assert list(pd.read_csv(truth / "level_boxes.csv").columns) == [STUDY_COL, "slice_number", "slice_index",
                                                                    "level", "x", "y", "width", "height"]
    assert list(pd.read_csv(truth / "fractures.csv").columns) == [STUDY_COL, "level", "first_slice_number",
                                                                  "last_slice_number", "description"]
    assert (dataset / "synth.meta.json").is_file()
    assert {p.name for p in study_dirs(dataset)} == set(train[STUDY_COL])
    for d in study_dirs(dataset):
        numbers = sorted(int(p.stem) for p in d.glob("*.dcm"))
        assert numbers == list(range(1, len(numbers) + 1))
    assert {p.stem for p in (dataset / "segmentations").glob("*.nii")} == set(train[STUDY_COL])


def test_labels_consistent(dataset):
    train = pd.read_csv(dataset / "train.csv")
    assert (train[PATIENT] == train[list(LEVELS)].max(axis=1)).all()
    assert 0 < train[PATIENT].sum() < N_STUDIES
    boxed = set(pd.read_csv(dataset / "train_bounding_boxes.csv")[STUDY_COL])
    assert boxed, "a small set must still have boxed studies"
    assert boxed <= set(train.loc[train[PATIENT] == 1, STUDY_COL])
    fractures = pd.read_csv(dataset / "truth" / "fractures.csv")
    positive_levels = {(u, lv) for u, row in train.set_index(STUDY_COL).iterrows() for lv in LEVELS if row[lv]}
    assert set(zip(fractures[STUDY_COL], fractures["level"], strict=True)) == positive_levels


def test_plan_fractions_and_uids():
    cfg = small_config()
    plans = plan_studies(200, seed=1, split="train", config=cfg)
    pos = [p for p in plans if p.levels]
    assert len(pos) == round(200 * cfg["labels"]["positive_fraction"])
    assert sum(p.segmented for p in plans) == round(200 * cfg["labels"]["segmentation_fraction"])
    assert sum(p.boxed for p in plans) == round(len(pos) * cfg["labels"]["box_fraction"])
    assert all(p.boxed <= bool(p.levels) for p in plans)
    uids = {p.uid for p in plans}
    others = {p.uid for s, split in ((2, "train"), (1, "test"), (0, "test"))
              for p in plan_studies(200, seed=s, split=split, config=cfg)}
    assert not uids & others


def test_file_variety(dataset):
    orders, syntaxes, reps = set(), set(), set()
    for d in study_dirs(dataset):
        hdr = headers(d)
        z_of = {n: float(ds.ImagePositionPatient[2]) for n, ds in hdr.items()}
        orders.add("head_first" if z_of[1] > z_of[max(z_of)] else "feet_first")
        syntaxes |= {str(ds.file_meta.TransferSyntaxUID) for ds in hdr.values()}
        reps |= {int(ds.PixelRepresentation) for ds in hdr.values()}
        assert all("Modality" not in ds for ds in hdr.values())
    assert orders == {"head_first", "feet_first"}
    assert registry.TS_JPEG_LOSSLESS_SV1 in syntaxes and registry.TS_EXPLICIT_LE in syntaxes
    assert reps == {0, 1}


def test_determinism_and_round_trip(tmp_path):
    cfg = small_config()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed, workers in ((a, 5, 1), (b, 5, 2), (c, 6, 2)):   # the worker count must not matter
        synthesize(out, n_studies=3, seed=seed, config=cfg, progress=False, workers=workers)
    for name in CSVS:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert set(pd.read_csv(a / "train.csv")[STUDY_COL]).isdisjoint(pd.read_csv(c / "train.csv")[STUDY_COL])
    plans = plan_studies(3, seed=5, split="train", config=cfg)
    for plan in plans:
        va = read_volume(scan_study(a / "train_images" / plan.uid))
        vb = read_volume(scan_study(b / "train_images" / plan.uid))
        np.testing.assert_array_equal(va, vb)
        # the files hold exactly the rendered HU, in canonical order, whatever the order and codec
        built = build_study(plan, seed=5, split="train", config=cfg)
        np.testing.assert_array_equal(va, built.hu)


def test_boxes_on_fractured_slices_and_bony(dataset):
    boxes = pd.read_csv(dataset / "train_bounding_boxes.csv")
    fractures = pd.read_csv(dataset / "truth" / "fractures.csv")
    levels = pd.read_csv(dataset / "truth" / "slice_levels.csv")
    for uid, group in boxes.groupby(STUDY_COL):
        geo = scan_study(dataset / "train_images" / uid)
        vol = read_volume(geo)
        rows, cols = geo.shape
        assert group["slice_number"].is_unique  # one box per slice
        assert (group["x"] >= 0).all() and (group["y"] >= 0).all()
        assert (group["x"] + group["width"] <= cols + 1e-6).all() and (group["y"] + group["height"] <= rows + 1e-6).all()
        fr = fractures[fractures[STUDY_COL] == uid]
        for _, box in group.iterrows():
            n = int(box["slice_number"])
            covering = fr[(fr["first_slice_number"] <= n) & (fr["last_slice_number"] >= n)]
            assert len(covering), f"box on slice {n} of {uid} outside every fracture's slice range"
            present = levels[(levels[STUDY_COL] == uid) & (levels["slice_number"] == n)]
            assert any(present[lv].item() for lv in covering["level"]), "fractured level absent from the slice"
            img = vol[geo.index_of_instance(n)]
            inside = np.zeros(img.shape, dtype=bool)
            inside[int(box["y"]):int(np.ceil(box["y"] + box["height"])),
                   int(box["x"]):int(np.ceil(box["x"] + box["width"]))] = True
            assert img[inside].max() > 600
            assert img[inside].mean() > img[~inside].mean() + 300


def test_fracture_changes_pixels_only_inside_boxes():
    """Render one anatomy with and without its fractures (same noise): every changed pixel lies in a box."""
    cfg = small_config("image.size=128", "volume.slices=48")
    grid_rng = np.random.default_rng(11)
    anatomy = phantom.build_anatomy(grid_rng, cfg["anatomy"])
    from data_prep.synthetic.synth import _sample_fractures, make_grid

    grid = make_grid(grid_rng, anatomy, cfg)
    fractures = _sample_fractures(grid_rng, anatomy, ("C2", "C5", "C6"), grid, cfg["fracture"])
    broken = phantom.render(anatomy, fractures, grid, cfg["hu"], np.random.default_rng(0))
    intact = phantom.render(anatomy, [], grid, cfg["hu"], np.random.default_rng(0))
    assert any(broken.fracture_boxes)
    changed = np.abs(broken.hu - intact.hu) > 100
    allowed = np.zeros_like(changed)
    pad = 2  # blur and the fragment's shift reach a pixel or two past the element's mask
    for boxes in broken.fracture_boxes:
        for k, (r0, r1, c0, c1) in boxes.items():
            for kk in range(max(0, k - 1), min(grid.n, k + 2)):
                allowed[kk, max(0, r0 - pad):r1 + pad + 1, max(0, c0 - pad):c1 + pad + 1] = True
    assert changed.sum() > 20
    assert (changed & allowed).sum() >= 0.95 * changed.sum()
    labelled = intact.labels > 0
    assert intact.hu[labelled].mean() > 300 > intact.hu[~labelled].mean()


def _lps_of_dicom_pixels(hdr):
    """(instance -> (IPP, row step, col step)) from pydicom headers (axial IOP assumed, checked)."""
    out = {}
    for n, ds in hdr.items():
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        out[n] = (np.array([float(v) for v in ds.ImagePositionPatient]), float(ds.PixelSpacing[0]),
                  float(ds.PixelSpacing[1]))
    return out


def test_nifti_affine_matches_dicom_geometry(dataset):
    """Push every NIfTI voxel through its affine to LPS and look the pixel up with pydicom headers alone."""
    slice_levels = pd.read_csv(dataset / "truth" / "slice_levels.csv")
    for d in study_dirs(dataset)[:3]:
        uid = d.name
        img = nib.load(dataset / "segmentations" / f"{uid}.nii")
        assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
        np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-4)
        m = np.asanyarray(img.dataobj)
        assert m.dtype == np.uint8
        geo = _lps_of_dicom_pixels(headers(d))
        z_to_instance = {round(float(ipp[2]), 3): n for n, (ipp, _, _) in geo.items()}
        ipp0, dr, dc = next(iter(geo.values()))
        # voxel centres -> RAS -> LPS -> (instance, row, col)
        ii, jj, kk = np.meshgrid(*(np.arange(s) for s in m.shape), indexing="ij")
        vox = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
        ras = img.affine @ vox
        lps = np.stack([-ras[0], -ras[1], ras[2]])
        col = (lps[0] - ipp0[0]) / dc
        row = (lps[1] - ipp0[1]) / dr
        np.testing.assert_allclose(col, np.rint(col), atol=1e-3)
        np.testing.assert_allclose(row, np.rint(row), atol=1e-3)
        inst = np.array([z_to_instance[round(float(z), 3)] for z in lps[2]])
        # rebuild the labels per instance and compare the level presence with the truth table
        n_inst = len(geo)
        mask = np.zeros((n_inst + 1, int(np.rint(row.max())) + 1, int(np.rint(col.max())) + 1), dtype=np.uint8)
        mask[inst, np.rint(row).astype(int), np.rint(col).astype(int)] = m.ravel()
        truth = slice_levels[slice_levels[STUDY_COL] == uid].set_index("slice_number")
        for j, lv in enumerate(LEVELS):
            present = np.array([(mask[n] == j + 1).any() for n in truth.index])
            np.testing.assert_array_equal(present, truth[lv].to_numpy().astype(bool), err_msg=f"{uid} {lv}")
        # and the labelled voxels are bone in the DICOM pixels
        vol = read_volume(scan_study(d))
        geometry = scan_study(d)
        hu = np.stack([vol[geometry.index_of_instance(n)] for n in range(1, n_inst + 1)])
        assert hu[mask[1:] > 0].mean() > 300


def test_nifti_kaggle_convention_for_head_first(dataset):
    slice_levels = pd.read_csv(dataset / "truth" / "slice_levels.csv")
    checked = 0
    for d in study_dirs(dataset):
        if not scan_study(d).instance_order_reversed:
            m = nib.load(dataset / "segmentations" / f"{d.name}.nii").get_fdata()
            mask = m.transpose(1, 0, 2)[::-1, :, ::-1]  # (rows, cols, slices) in InstanceNumber order
            truth = slice_levels[slice_levels[STUDY_COL] == d.name].sort_values("slice_number")
            for j, lv in enumerate(LEVELS):
                present = (mask == j + 1).any(axis=(0, 1))
                np.testing.assert_array_equal(present, truth[lv].to_numpy().astype(bool))
            checked += 1
    assert checked


def test_test_split_hides_labels(tmp_path):
    out = tmp_path / "test"
    synthesize(out, n_studies=2, seed=3, split="test", config=small_config(), progress=False)
    assert not (out / "train.csv").exists() and not (out / "train_bounding_boxes.csv").exists()
    assert not (out / "train_images").exists() and not (out / "segmentations").exists()
    truth = pd.read_csv(out / "truth" / "train.csv")
    test = pd.read_csv(out / "test.csv")
    assert list(test.columns) == ["row_id", STUDY_COL, "prediction_type"]
    assert len(test) == 8 * len(truth) and set(test[STUDY_COL]) == set(truth[STUDY_COL])
    assert set(test["prediction_type"]) == set(registry.TARGETS)
    sub = pd.read_csv(out / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["fractured"] == 0.5).all()
    assert set(sub["row_id"]) == set(test["row_id"])
    assert {p.name for p in (out / "test_images").iterdir()} == set(truth[STUDY_COL])
    assert (out / "truth" / "train_bounding_boxes.csv").is_file()
    train_uids = {p.uid for p in plan_studies(2, seed=3, split="train", config=small_config())}
    assert train_uids.isdisjoint(truth[STUDY_COL])


def test_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        synthesize(out, n_studies=1, seed=0, config=small_config(), progress=False)
    with pytest.raises(InputError, match="refusing"):
        synthesize(out, n_studies=1, seed=0, config=small_config(), progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_maps_size_and_slices(tmp_path):
    from spinefrac.cli import main

    out = tmp_path / "cli"
    assert main(["synth", str(out), "--studies", "1", "--seed", "4", "--size", "64", "--slices", "24",
                 "--no-progress"]) == 0
    d = next((out / "train_images").iterdir())
    ds = pydicom.dcmread(next(d.glob("*.dcm")), stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (64, 64)
    assert 16 <= len(list(d.glob("*.dcm"))) <= 36
    assert main(["synth", str(out), "--studies", "1", "--size", "64", "--slices", "24", "--overwrite",
                 "--no-progress"]) == 0


def test_fragment_that_leaves_a_slice_still_gets_a_box():
    """Regression: a displaced fragment can leave a slice without element pixels; its box must still be made.

    Study 57 of the demo's training set (seed 0) crashed the renderer before the fix (IndexError).
    """
    from data_prep.synthetic.synth import study_tables

    demo_set = ["image.size=256", "volume.slices=112", "labels.box_fraction=1.0", "fracture.gap_mm=[1.5, 2.5]",
                "fracture.shift_mm=[1.5, 3.0]"]
    cfg = load_config("synth", None, demo_set)
    plan = plan_studies(64, seed=0, split="train", config=cfg)[57]
    built = build_study(plan, seed=0, split="train", config=cfg)
    tables = study_tables(built)
    size = cfg.image.size
    assert tables.fracture_boxes, "the fractured study has no fracture boxes"
    for box in tables.fracture_boxes:
        assert box["x"] >= 0 and box["y"] >= 0 and box["width"] > 0 and box["height"] > 0
        assert box["x"] + box["width"] <= size and box["y"] + box["height"] <= size
