"""The study reader: real third-party files, round trips through the writer, and every bad-input case.

References are independent of the reader: pydicom's own decoding + rescale, the array that was written,
and the slice order we chose when writing.
"""

from __future__ import annotations

import contextlib
import logging
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from data_prep.dicom import slice_file
from data_prep.dicom import volume as dicom_volume
from data_prep.dicom.geometry import (
    DuplicatePositionError,
    EmptyStudyError,
    InconsistentSlicesError,
    scan_study,
)
from data_prep.dicom.slice_file import NoPixelDataError, NotDicomError, TruncatedDicomError, read_slice_hu
from data_prep.dicom.volume import iter_chunks, read_volume
from data_prep.dicom.writer import write_series
from data_prep.errors import DicomReadError, InputError, MissingDecoderError
from data_prep.runs import registry

STUDY = "1.2.826.0.1.3680043.777"
N, ROWS, COLS = 12, 32, 40


def _pydicom_hu(path) -> np.ndarray:
    """The reference: pydicom's own decode and rescale, cast to the contract's float32."""
    ds = pydicom.dcmread(path)
    return apply_rescale(ds.pixel_array, ds).astype(np.float32)


def _testdata(name: str):
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - any failure to locate the optional data means: skip
        path = None
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline (install pydicom-data)")
    return path


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(-1024, 2500, size=(N, ROWS, COLS)).astype(np.float32)


def _write(tmp_path, volume, name="study", **kw):
    study = tmp_path / name
    kw.setdefault("pixel_spacing", (0.5, 0.6))
    kw.setdefault("slice_thickness", 1.0)
    kw.setdefault("z_top_mm", 20.0)
    write_series(study, volume, study_uid=STUDY, **kw)
    return study


# --- real files nobody on the team wrote ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["CT_small.dcm", "bad_sequence.dcm"])
def test_real_pydicom_files_match_pydicom(tmp_path, name):
    src = _testdata(name)
    hu = read_slice_hu(src)
    ref = _pydicom_hu(src)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, ref)
    ds = pydicom.dcmread(src)
    study = tmp_path / "s"
    study.mkdir()
    shutil.copy(src, study / "1.dcm")
    geom = scan_study(study)
    assert len(geom) == 1 and geom.shape == (ds.Rows, ds.Columns)
    assert geom.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    np.testing.assert_allclose(geom.positions[0], [float(v) for v in ds.ImagePositionPatient])
    assert geom.transfer_syntaxes == (str(ds.file_meta.TransferSyntaxUID),)
    np.testing.assert_array_equal(read_volume(geom)[0], ref)


def test_real_jpeg_lossless_same_with_both_decoders(monkeypatch):
    src = _testdata("bad_sequence.dcm")
    assert pydicom.dcmread(src).file_meta.TransferSyntaxUID == registry.TS_JPEG_LOSSLESS_SV1
    ref = _pydicom_hu(src)
    for plugin in ("gdcm", "pylibjpeg"):
        if plugin not in slice_file._available_plugins(pydicom.uid.UID(registry.TS_JPEG_LOSSLESS_SV1)):
            continue
        monkeypatch.setitem(slice_file.PREFERRED_PLUGINS, registry.TS_JPEG_LOSSLESS_SV1, (plugin,))
        np.testing.assert_array_equal(read_slice_hu(src), ref)


def test_real_rsna_slice(tmp_path, realdata):
    src = realdata("test1.dcm")
    hu = read_slice_hu(src)
    np.testing.assert_array_equal(hu, _pydicom_hu(src))
    assert (hu.min(), hu.max()) == (-2048, 2347)  # documented in shared/realdata/README.txt
    study = tmp_path / "1.2.826.0.1.3680043.271"
    study.mkdir()
    (study / "16.dcm").symlink_to(src)
    geom = scan_study(study)
    assert geom.index_of_instance(16) == 0
    assert geom.shape == (512, 512) and geom.pixel_spacing == (0.312, 0.312) and geom.slice_thickness == 0.5
    assert geom.warnings == ()  # no Modality tag is normal for RSNA files
    assert geom.z_mm[0] == pytest.approx(1949.0)


# --- round trips through the writer --------------------------------------------------------------------
@pytest.mark.parametrize("ts", [registry.TS_EXPLICIT_LE, registry.TS_JPEG_LOSSLESS_SV1, registry.TS_RLE,
                                registry.TS_JPEG2000_LOSSLESS])
@pytest.mark.parametrize("pixel_representation", [0, 1])
@pytest.mark.parametrize("order", ["head_first", "feet_first"])
def test_round_trip_order_and_pixels(tmp_path, volume, ts, pixel_representation, order):
    study = _write(tmp_path, volume, transfer_syntax=ts, pixel_representation=pixel_representation,
                   instance_order=order)
    geom = scan_study(study)
    assert len(geom) == N and geom.study_uid == "study"
    expected_numbers = np.arange(1, N + 1) if order == "head_first" else np.arange(N, 0, -1)
    np.testing.assert_array_equal(geom.instance_numbers, expected_numbers)
    assert geom.instance_order_reversed == (order == "feet_first")
    np.testing.assert_allclose(geom.z_mm, 20.0 - np.arange(N))
    assert geom.transfer_syntaxes == (ts,)
    for k, n in enumerate(expected_numbers):
        assert geom.index_of_instance(int(n)) == k
        assert geom.paths[k].name == f"{n}.dcm"
    np.testing.assert_array_equal(read_volume(geom), volume)


def test_parallel_matches_serial(tmp_path, volume):
    study = _write(tmp_path, volume, transfer_syntax=registry.TS_JPEG_LOSSLESS_SV1, instance_order="feet_first")
    geom = scan_study(study)
    for executor in dicom_volume.EXECUTORS:
        np.testing.assert_array_equal(read_volume(geom, workers=2, executor=executor), volume)


def test_position_beats_instance_number_and_file_names(tmp_path, volume):
    study = _write(tmp_path, volume)
    rng = np.random.default_rng(0)
    new_numbers = rng.permutation(np.arange(100, 100 + N))
    for k in range(N):  # file k+1.dcm holds canonical slice k; give it a shuffled number and a random name
        path = study / f"{k + 1}.dcm"
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(new_numbers[k])
        ds.save_as(study / f"img_{rng.integers(1e9)}_{k}.dcm")
        path.unlink()
    geom = scan_study(study)
    np.testing.assert_array_equal(geom.instance_numbers, new_numbers)
    np.testing.assert_array_equal(read_volume(geom), volume)


def test_fallback_to_instance_number_without_positions(tmp_path, volume, caplog):
    study = _write(tmp_path, volume, instance_order="head_first")
    for path in study.iterdir():
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        geom = scan_study(study)
    assert any("ImagePositionPatient" in w for w in geom.warnings)
    assert "ordering by InstanceNumber" in caplog.text
    np.testing.assert_array_equal(read_volume(geom), volume)


def test_affine_maps_voxels_to_the_file_positions(tmp_path, volume):
    study = _write(tmp_path, volume, origin_xy_mm=(-12.0, 7.5), instance_order="feet_first")
    geom = scan_study(study)
    aff = geom.affine()
    for k in (0, 5, N - 1):
        ds = pydicom.dcmread(geom.paths[k], stop_before_pixels=True)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(aff @ [k, 0, 0, 1], [*ipp, 1])
        # column c moves along +x by c * column spacing, row r along +y by r * row spacing
        np.testing.assert_allclose(aff @ [k, 3, 4, 1], [*(ipp + [4 * 0.6, 3 * 0.5, 0]), 1])


# --- streaming -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_iter_chunks_covers_every_slice_with_context(tmp_path, volume, workers):
    geom = scan_study(_write(tmp_path, volume, instance_order="feet_first"))
    chunks = list(iter_chunks(geom, chunk_size=5, context=2, workers=workers))
    assert [(c.start, c.stop, c.lo, c.hi) for c in chunks] == [(0, 5, 0, 7), (5, 10, 3, 12), (10, 12, 8, 12)]
    for c in chunks:
        np.testing.assert_array_equal(c.hu, volume[c.lo:c.hi])
        for i in c.indices():
            for d in (-2, -1, 0, 1, 2):  # the 2.5D neighbours, clamped at the ends of the study
                np.testing.assert_array_equal(c.get(i + d), volume[min(max(i + d, 0), N - 1)])


def test_iter_chunks_decodes_each_slice_once(tmp_path, volume, monkeypatch):
    geom = scan_study(_write(tmp_path, volume))
    calls = []
    real = slice_file.read_slice_hu
    monkeypatch.setattr(dicom_volume, "read_slice_hu", lambda p: calls.append(p) or real(p))
    n_chunks = sum(1 for _ in iter_chunks(geom, chunk_size=3, context=2, workers=1))
    assert n_chunks == 4
    assert sorted(calls) == sorted(geom.paths)


# --- bad input ------------------------------------------------------------------------------------------
def test_truncated_file_is_named(tmp_path, volume):
    for ts in (registry.TS_EXPLICIT_LE, registry.TS_JPEG_LOSSLESS_SV1):
        study = _write(tmp_path, volume, name=f"s{ts}", transfer_syntax=ts)
        victim = study / "5.dcm"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - 100])
        with pytest.raises(TruncatedDicomError, match="5.dcm"):
            scan_study(study)
        with pytest.raises(TruncatedDicomError, match="5.dcm"):
            read_slice_hu(victim)


def test_file_cut_inside_header(tmp_path, volume):
    study = _write(tmp_path, volume)
    victim = study / "3.dcm"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DicomReadError, match="3.dcm"):
        scan_study(study)


def test_stray_files_are_skipped_with_a_warning(tmp_path, volume, caplog):
    study = _write(tmp_path, volume)
    (study / "Thumbs.db").write_bytes(b"\x00garbage" * 10)
    (study / "notes.txt").write_text("radiologist notes")
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        geom = scan_study(study)
    assert len(geom) == N
    assert "Thumbs.db" in caplog.text and "notes.txt" in caplog.text
    assert any("not a DICOM file" in w for w in geom.warnings)
    with pytest.raises(NotDicomError, match="notes.txt"):
        read_slice_hu(study / "notes.txt")


def test_dicom_without_pixel_data(tmp_path, volume, caplog):
    study = _write(tmp_path, volume)
    ds = pydicom.dcmread(study / "1.dcm")  # a dose report next to the images: a DICOM object without pixels
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.67")
    ds.save_as(study / "dose_report.dcm")
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        geom = scan_study(study)
    assert len(geom) == N and "dose_report.dcm" in caplog.text and "Pixel Data" in caplog.text
    with pytest.raises(NoPixelDataError, match="dose_report.dcm"):
        read_slice_hu(study / "dose_report.dcm")


def test_ct_image_without_pixel_data_is_an_error(tmp_path, volume):
    study = _write(tmp_path, volume)
    ds = pydicom.dcmread(study / "2.dcm")
    del ds.PixelData
    ds.save_as(study / "2.dcm")
    with pytest.raises(TruncatedDicomError, match=r"2\.dcm.*CT Image Storage"):
        scan_study(study)


def test_empty_and_missing_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptyStudyError, match="empty"):
        scan_study(empty)
    (empty / "readme.txt").write_text("nothing here")
    with pytest.raises(EmptyStudyError):
        scan_study(empty)
    with pytest.raises(EmptyStudyError, match="nope"):
        scan_study(tmp_path / "nope")


def test_slice_of_another_size(tmp_path, volume):
    study = _write(tmp_path, volume)
    other = _write(tmp_path, np.zeros((1, ROWS + 8, COLS), np.float32), name="other", z_top_mm=-50.0)
    shutil.move(other / "1.dcm", study / "99.dcm")
    with pytest.raises(InconsistentSlicesError, match=r"99\.dcm.*40x40"):
        scan_study(study)


def test_slice_of_another_orientation(tmp_path, volume):
    study = _write(tmp_path, volume)
    ds = pydicom.dcmread(study / "4.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(study / "4.dcm")
    with pytest.raises(InconsistentSlicesError, match="4.dcm"):
        scan_study(study)


def test_duplicate_positions(tmp_path, volume):
    study = _write(tmp_path, volume)
    ds = pydicom.dcmread(study / "6.dcm")
    ds.InstanceNumber = 60
    ds.save_as(study / "60.dcm")
    with pytest.raises(DuplicatePositionError, match=r"6\.dcm|60\.dcm"):
        scan_study(study)


def test_gap_in_z_is_a_warning_with_where(tmp_path, volume, caplog):
    study = _write(tmp_path, volume)
    for n in (6, 7, 8):
        (study / f"{n}.dcm").unlink()
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        geom = scan_study(study)
    assert len(geom) == N - 3
    (gap,) = [w for w in geom.warnings if "missing slices" in w]
    assert "5.dcm" in gap and "9.dcm" in gap and "about 3 slice(s)" in gap
    np.testing.assert_array_equal(read_volume(geom), volume[[0, 1, 2, 3, 4, 8, 9, 10, 11]])


def test_non_ct_modality_fails_the_study_naming_the_file(tmp_path, volume):
    # issue 23: an MR study in the Kaggle layout was read as CT; the study finder refuses it too
    study = _write(tmp_path, volume, modality="MR")
    with pytest.raises(slice_file.NotCTError, match=r"1\.dcm: Modality is 'MR', not CT"):
        scan_study(study)


def test_ct_modality_is_fine(tmp_path, volume):
    assert scan_study(_write(tmp_path, volume, modality="CT")).warnings == ()


def test_missing_decoder_names_the_packages(tmp_path, volume, monkeypatch):
    study = _write(tmp_path, volume, transfer_syntax=registry.TS_JPEG_LOSSLESS_SV1)
    monkeypatch.setattr(slice_file, "_available_plugins", lambda ts: ())
    monkeypatch.setattr(slice_file, "FAST_JPEG_LOSSLESS", ())     # as without imagecodecs
    geom = scan_study(study)
    with pytest.raises(MissingDecoderError) as info:
        read_volume(geom)
    message = str(info.value)
    assert "pylibjpeg-libjpeg" in message and "python-gdcm" in message and ".dcm" in message


def test_syntax_pydicom_cannot_decode(tmp_path, volume):
    study = _write(tmp_path, volume[:2], transfer_syntax=registry.TS_RLE)
    path = study / "1.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder at all
    ds.save_as(path)
    with pytest.raises(MissingDecoderError, match="1.dcm"):
        read_slice_hu(path)


def _scramble_fragment(path, n_bytes: int, fill: bytes) -> None:
    """Overwrite the first n_bytes of the file's one pixel-data fragment (after its item tag and length)."""
    data = bytearray(path.read_bytes())
    start = data.rindex(b"\xfe\xff\x00\xe0")
    data[start + 8:start + 8 + n_bytes] = fill * n_bytes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("workers", "executor"), [(1, "thread"), (2, "thread"), (2, "process")])
def test_corrupt_compressed_data_is_named_even_from_workers(tmp_path, volume, workers, executor):
    study = _write(tmp_path, volume, transfer_syntax=registry.TS_RLE)
    _scramble_fragment(study / "7.dcm", 64, b"\xff")     # its RLE header
    geom = scan_study(study)
    with pytest.raises(DicomReadError, match="7.dcm"):
        read_volume(geom, workers=workers, executor=executor)


def test_unknown_instance_number(tmp_path, volume):
    geom = scan_study(_write(tmp_path, volume))
    with pytest.raises(InputError, match="no slice with InstanceNumber 999"):
        geom.index_of_instance(999)
    with pytest.raises(KeyError):
        geom.index_of_instance(0)


@pytest.mark.parametrize("pixel_representation", [0, 1])
def test_fast_jpeg_lossless_path_is_bit_identical_to_gdcm(tmp_path, volume, pixel_representation, monkeypatch):
    """imagecodecs (libjpeg-turbo) decodes JPEG Lossless to exactly GDCM's values, signed and unsigned."""
    imagecodecs = pytest.importorskip("imagecodecs")
    study = _write(tmp_path, volume, transfer_syntax=registry.TS_JPEG_LOSSLESS_SV1,
                   pixel_representation=pixel_representation)
    calls = []
    real = imagecodecs.jpeg8_decode
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", lambda data: calls.append(1) or real(data))
    geom = scan_study(study)
    fast = read_volume(geom)
    assert len(calls) == N                                   # every slice went through the fast path
    monkeypatch.setattr(slice_file, "FAST_JPEG_LOSSLESS", ())   # pydicom's plugins (GDCM first)
    np.testing.assert_array_equal(fast, read_volume(geom))
    np.testing.assert_array_equal(fast, volume)
    assert fast.min() < 0                                     # negative HU survived the sign handling


def test_fast_jpeg_lossless_path_on_real_files(realdata, monkeypatch):
    """The real RSNA slice and pydicom's real JPEG Lossless file: fast path == pydicom's GDCM decode."""
    pytest.importorskip("imagecodecs")
    sources = [_testdata("bad_sequence.dcm")]
    with contextlib.suppress(pytest.skip.Exception):      # the real slice only where ../shared/realdata is
        sources.append(realdata("test1.dcm"))
    for src in sources:
        fast = read_slice_hu(src)
        monkeypatch.setattr(slice_file, "FAST_JPEG_LOSSLESS", ())
        np.testing.assert_array_equal(fast, read_slice_hu(src))
        monkeypatch.undo()


def test_corrupt_jpeg_lossless_is_named(tmp_path, volume):
    study = _write(tmp_path, volume, transfer_syntax=registry.TS_JPEG_LOSSLESS_SV1)
    _scramble_fragment(study / "5.dcm", 32, b"\x00")     # its JPEG markers
    with pytest.raises(DicomReadError, match="5.dcm"):
        read_volume(scan_study(study))


def test_a_too_long_derived_uid_is_still_deterministic():
    """Study UIDs too long for a dotted suffix get a hashed UID: the same inputs, the same UID, valid."""
    from pydicom.uid import UID

    from data_prep.dicom.writer import _derived_uid

    long_study = "1.2.826.0.1.3680043." + "1" * 44
    first, second = _derived_uid(long_study, "1"), _derived_uid(long_study, "1")
    assert first == second and UID(first).is_valid and len(first) <= 64
    assert _derived_uid(long_study, "2") != first
