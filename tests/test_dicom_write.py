"""The series writer, checked with pydicom itself (and GDCM / pylibjpeg for decoding) as the reference."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from data_prep.dicom.writer import DicomWriteError, write_series
from data_prep.runs import registry

STUDY = "1.2.826.0.1.3680043.4242"
N, ROWS, COLS = 6, 48, 40


@pytest.fixture
def hu() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1024, 3071, size=(N, ROWS, COLS)).astype(np.float32)


@pytest.mark.parametrize("ts", [registry.TS_EXPLICIT_LE, registry.TS_JPEG_LOSSLESS_SV1, registry.TS_RLE,
                                registry.TS_JPEG2000_LOSSLESS])
@pytest.mark.parametrize("pixel_representation", [0, 1])
@pytest.mark.parametrize("order", ["head_first", "feet_first"])
def test_round_trip_with_pydicom(tmp_path, hu, ts, pixel_representation, order):
    paths = write_series(tmp_path, hu, study_uid=STUDY, pixel_spacing=(0.5, 0.7), slice_thickness=1.25,
                         z_top_mm=30.0, origin_xy_mm=(-40.0, -35.5), instance_order=order,
                         transfer_syntax=ts, pixel_representation=pixel_representation)
    assert sorted(p.name for p in paths) == sorted(f"{i}.dcm" for i in range(1, N + 1))
    sop_uids = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        n = int(ds.InstanceNumber)
        assert path.stem == str(n)
        k = n - 1 if order == "head_first" else N - n  # canonical index: 0 = most superior
        assert ds.file_meta.TransferSyntaxUID == ts
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == STUDY
        assert "Modality" not in ds
        assert int(ds.PixelRepresentation) == pixel_representation
        assert ds.pixel_array.dtype == (np.int16 if pixel_representation else np.uint16)
        assert float(ds.RescaleIntercept) == (0.0 if pixel_representation else -1024.0)
        assert [float(v) for v in ds.ImagePositionPatient] == [-40.0, -35.5, 30.0 - 1.25 * k]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.7]
        assert float(ds.SliceThickness) == 1.25
        assert (ds.Rows, ds.Columns) == (ROWS, COLS)
        np.testing.assert_array_equal(apply_rescale(ds.pixel_array, ds), hu[k])
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == N


def test_uids_are_deterministic(tmp_path, hu):
    a = write_series(tmp_path / "a", hu, study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1)
    b = write_series(tmp_path / "b", hu, study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in a] == [pydicom.dcmread(p).SOPInstanceUID for p in b]


def test_long_study_uid_gives_valid_uids(tmp_path, hu):
    study = "1.2.3." + "9" * 56
    paths = write_series(tmp_path, hu[:2], study_uid=study, pixel_spacing=(1, 1), slice_thickness=1)
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.SOPInstanceUID.is_valid and ds.SeriesInstanceUID.is_valid
        assert ds.StudyInstanceUID == study


def test_jpeg_lossless_decodes_with_gdcm_and_pylibjpeg(tmp_path, hu):
    pytest.importorskip("gdcm")
    pytest.importorskip("libjpeg")
    (path,) = write_series(tmp_path, hu[:1], study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1,
                           transfer_syntax=registry.TS_JPEG_LOSSLESS_SV1)
    ds = pydicom.dcmread(path)
    for plugin in ("gdcm", "pylibjpeg"):
        stored = pydicom.pixels.pixel_array(path, decoding_plugin=plugin)
        np.testing.assert_array_equal(apply_rescale(stored, ds), hu[0])


def test_values_are_rounded_and_clipped(tmp_path):
    hu = np.array([[[-50000.0, -1024.4, 0.6, 100000.0]]], dtype=np.float32)
    (signed,) = write_series(tmp_path / "s", hu, study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1,
                             pixel_representation=1)
    (unsigned,) = write_series(tmp_path / "u", hu, study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1,
                               pixel_representation=0)
    ds = pydicom.dcmread(signed)
    np.testing.assert_array_equal(apply_rescale(ds.pixel_array, ds)[0], [-32768, -1024, 1, 32767])
    ds = pydicom.dcmread(unsigned)
    np.testing.assert_array_equal(apply_rescale(ds.pixel_array, ds)[0], [-1024, -1024, 1, 65535 - 1024])


def test_modality_and_series_uid_when_asked(tmp_path, hu):
    (path,) = write_series(tmp_path, hu[:1], study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1,
                           modality="CT", series_uid="1.2.3.4")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and ds.SeriesInstanceUID == "1.2.3.4"


def test_no_temp_files_left(tmp_path, hu):
    write_series(tmp_path, hu, study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1,
                 transfer_syntax=registry.TS_JPEG_LOSSLESS_SV1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.dcm" for i in range(1, N + 1))


@pytest.mark.parametrize("kwargs", [{"instance_order": "sideways"}, {"transfer_syntax": "1.2.3"},
                                    {"pixel_representation": 2}])
def test_bad_arguments(tmp_path, hu, kwargs):
    with pytest.raises(DicomWriteError):
        write_series(tmp_path, hu, study_uid=STUDY, pixel_spacing=(1, 1), slice_thickness=1, **kwargs)


@pytest.mark.parametrize("ts", [registry.TS_RLE, registry.TS_JPEG_LOSSLESS_SV1, registry.TS_EXPLICIT_LE])
def test_same_volume_gives_the_same_bytes_in_every_syntax(tmp_path, hu, ts):
    """A rerun of synth must reproduce its files: pydicom's compress() used to give RLE slices a random SOP UID."""
    for run in ("a", "b"):
        write_series(tmp_path / run, hu, study_uid="1.2.3.4", pixel_spacing=(0.5, 0.5), slice_thickness=2.0,
                     z_top_mm=10.0, transfer_syntax=ts)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
