"""Writing an axial CT series as one DICOM file per slice, in the layout and variety of the RSNA files."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, CTImageStorage, generate_uid

from data_prep.errors import SpinefracError
from data_prep.runs import registry
from data_prep.runs.artifacts import atomic_path

log = logging.getLogger("data_prep")

INSTANCE_ORDERS: tuple[str, ...] = ("head_first", "feet_first")
"""head_first: InstanceNumber 1 is the most superior slice; feet_first: 1 is the most inferior."""

WRITABLE_SYNTAXES: tuple[str, ...] = (
    registry.TS_EXPLICIT_LE, registry.TS_JPEG_LOSSLESS_SV1, registry.TS_RLE, registry.TS_JPEG2000_LOSSLESS)
"""Transfer syntaxes `write_series` can produce (all lossless, so HU survive exactly)."""

AXIAL_ORIENTATION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
"""ImageOrientationPatient of an axial slice: rows along +x (L), columns along +y (P)."""

BITS_ALLOCATED = 16
UNSIGNED_DEFAULT_INTERCEPT = -1024.0
"""RescaleIntercept used with PixelRepresentation 0 (uint16 stored values), as many CT scanners do."""
SIGNED_DEFAULT_INTERCEPT = 0.0
"""RescaleIntercept used with PixelRepresentation 1 (int16 stored values), as in the real test1.dcm."""
RESCALE_SLOPE = 1.0
MAX_UID_LENGTH = 64
DISPLAY_WINDOW = (500.0, 2500.0)
"""WindowCenter/WindowWidth written for viewers (the values of the real RSNA files)."""
IMPLEMENTATION_VERSION = "SPINEFRAC_WRITE"
FLOAT32_MAX_INTERCEPT = 2 ** 16
"""`_to_stored` converts float32 HU in float32 when the intercept is an even integer up to this size."""
JPEG_FRAGMENTS = 1
"""gdcm encodes a slice as one JPEG fragment."""


class DicomWriteError(SpinefracError):
    """A series that cannot be written as asked (bad arguments or a missing encoder)."""


def write_series(out_dir: Path, hu: np.ndarray, *, study_uid: str, pixel_spacing: tuple[float, float],
                 slice_thickness: float, z_top_mm: float = 0.0,
                 origin_xy_mm: tuple[float, float] = (0.0, 0.0), instance_order: str = "head_first",
                 transfer_syntax: str = registry.TS_EXPLICIT_LE, pixel_representation: int = 1,
                 rescale_intercept: float | None = None, bits_stored: int = BITS_ALLOCATED,
                 series_uid: str | None = None, modality: str | None = None) -> list[Path]:
    """Write `hu` (n, rows, cols; index 0 most superior) as `<InstanceNumber>.dcm` files; return their paths."""
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise DicomWriteError(f"{out_dir}: expected a non-empty (slices, rows, cols) array, got shape {hu.shape}")
    if instance_order not in INSTANCE_ORDERS:
        raise DicomWriteError(f"{out_dir}: instance_order {instance_order!r} is not one of {INSTANCE_ORDERS}")
    if transfer_syntax not in WRITABLE_SYNTAXES:
        raise DicomWriteError(f"{out_dir}: cannot write transfer syntax {transfer_syntax}; "
                              f"choose one of {', '.join(WRITABLE_SYNTAXES)}")
    if pixel_representation not in (0, 1):
        raise DicomWriteError(f"{out_dir}: pixel_representation must be 0 (unsigned) or 1 (signed)")
    if not 8 < bits_stored <= BITS_ALLOCATED:
        raise DicomWriteError(f"{out_dir}: bits_stored must be in 9..{BITS_ALLOCATED}, got {bits_stored}")
    if rescale_intercept is None:
        rescale_intercept = SIGNED_DEFAULT_INTERCEPT if pixel_representation else UNSIGNED_DEFAULT_INTERCEPT
    series_uid = series_uid or _derived_uid(study_uid, "1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = hu.shape[0]
    paths = []
    for k in range(n):
        instance = k + 1 if instance_order == "head_first" else n - k
        z = z_top_mm - k * slice_thickness
        # slice by slice: the same element-wise conversion without whole-volume float64 temporaries
        stored = _to_stored(hu[k], pixel_representation, rescale_intercept, bits_stored)
        ds = _slice_dataset(stored, study_uid=study_uid, series_uid=series_uid, instance=instance,
                            position=(origin_xy_mm[0], origin_xy_mm[1], z), pixel_spacing=pixel_spacing,
                            slice_thickness=slice_thickness, pixel_representation=pixel_representation,
                            rescale_intercept=rescale_intercept, bits_stored=bits_stored, modality=modality)
        path = out_dir / f"{instance}.dcm"
        _save(ds, path, transfer_syntax)
        paths.append(path)
    log.debug("wrote %d slices of %s to %s (%s)", n, study_uid, out_dir, transfer_syntax)
    return paths


def _to_stored(hu: np.ndarray, pixel_representation: int, intercept: float, bits_stored: int) -> np.ndarray:
    """Round HU to integers, subtract the intercept and clip to what the stored bits can hold."""
    if pixel_representation:
        lo, hi, dtype = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, np.int16
    else:
        lo, hi, dtype = 0, 2 ** bits_stored - 1, np.uint16
    if (hu.dtype == np.float32 and RESCALE_SLOPE == 1.0 and float(intercept).is_integer()
            and intercept % 2 == 0 and abs(intercept) <= FLOAT32_MAX_INTERCEPT):
        # float32 shortcut giving the same values as the float64 formula below for every float32 input:
        # rint(x - c) == rint(x) - c for an even integer c (round half to even keeps the parity); x - c in
        # float64 lands on the same side of every half-integer as the exact difference (a float32 x is
        # never within 2**-29 of a half-integer it is not equal to); and after clipping rint(x) to
        # [lo + c, hi + c] the float32 subtraction of c is exact (integers below 2**24).
        values = np.rint(hu)
        np.clip(values, lo + intercept, hi + intercept, out=values)
        values -= np.float32(intercept)
        return values.astype(dtype)
    values = np.rint((hu.astype(np.float64) - intercept) / RESCALE_SLOPE)
    return np.clip(values, lo, hi).astype(dtype)


def _derived_uid(study_uid: str, *parts: str) -> str:
    """Return a UID derived deterministically from the study UID (dotted suffix, or hashed when too long)."""
    uid = ".".join((study_uid, *parts))
    if len(uid) <= MAX_UID_LENGTH and UID(uid).is_valid:
        return uid
    return generate_uid(entropy_srcs=[study_uid, *parts])   # pydicom's prefix: prefix=None ignores the entropy


def _slice_dataset(pixels: np.ndarray, *, study_uid: str, series_uid: str, instance: int,
                   position: tuple[float, float, float], pixel_spacing: tuple[float, float],
                   slice_thickness: float, pixel_representation: int, rescale_intercept: float,
                   bits_stored: int, modality: str | None) -> Dataset:
    sop_uid = _derived_uid(series_uid, str(instance))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = registry.TS_EXPLICIT_LE
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    if modality is not None:
        ds.Modality = modality
    patient = study_uid.rsplit(".", 1)[-1]
    ds.PatientName = patient
    ds.PatientID = patient
    ds.SliceThickness = _ds(slice_thickness)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in AXIAL_ORIENTATION]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.BitsAllocated = BITS_ALLOCATED
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.WindowCenter = _ds(DISPLAY_WINDOW[0])
    ds.WindowWidth = _ds(DISPLAY_WINDOW[1])
    ds.RescaleIntercept = _ds(rescale_intercept)
    ds.RescaleSlope = _ds(RESCALE_SLOPE)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def _ds(value: float) -> str:
    """Format a number for a DS element (at most 16 characters, no float noise)."""
    text = f"{float(value):.6g}"
    return text if len(text) <= 16 else f"{float(value):.10g}"[:16]


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    """Encode the pixel data in `transfer_syntax` and write `ds` to `path` atomically."""
    if transfer_syntax == registry.TS_JPEG_LOSSLESS_SV1:
        _encode_jpeg_lossless(ds, path)
    elif transfer_syntax != registry.TS_EXPLICIT_LE:
        try:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        except (RuntimeError, ValueError) as exc:
            hint = " (install pylibjpeg-openjpeg)" if "2.4.9" in transfer_syntax else ""
            raise DicomWriteError(f"{path}: cannot encode {transfer_syntax}{hint}: {exc}") from None
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def _encode_jpeg_lossless(ds: Dataset, path: Path) -> None:
    """Replace the pixel data of `ds` by JPEG Lossless SV1 (.70) encoded in memory with python-gdcm."""
    try:
        import gdcm
    except ImportError:
        raise DicomWriteError(f"{path}: writing JPEG Lossless (.70) needs python-gdcm "
                              "(pip install python-gdcm); pydicom cannot encode it") from None
    # a gdcm.Image built from the dataset's pixel module (as pydicom's own gdcm RLE encoder does)
    writer = gdcm.ImageWriter()  # owns the image; must outlive it
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((int(ds.Columns), int(ds.Rows), 1))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
        gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation))))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    image.SetPixelFormat(gdcm.PixelFormat(int(ds.SamplesPerPixel), int(ds.BitsAllocated), int(ds.BitsStored),
                                          int(ds.HighBit), int(ds.PixelRepresentation)))
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(ds.PixelData)
    image.SetDataElement(element)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments() if change.Change() else None
    if fragments is None or fragments.GetNumberOfFragments() != JPEG_FRAGMENTS:
        raise DicomWriteError(f"{path}: python-gdcm failed to encode JPEG Lossless")
    frame = _fragment_bytes(fragments.GetFragment(0).GetByteValue())
    # an empty basic offset table and one fragment: the bytes gdcm's own writer puts in the file
    ds.PixelData = encapsulate([frame], has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = registry.TS_JPEG_LOSSLESS_SV1


def _fragment_bytes(value: Any) -> bytes:
    """The bytes of a gdcm.ByteValue, copied straight from its buffer.

    `GetBuffer()` hands the bytes over as a str that must be re-encoded (surrogateescape), which costs more
    than the JPEG encoding's bookkeeping; the buffer's address and length give the same bytes in one copy.
    """
    size = int(str(value.GetLength()))  # a gdcm.VL converts to a number only through its decimal text
    address = int(value.GetVoidPointer()) if size else 0
    if not address:
        return value.GetBuffer().encode("utf-8", "surrogateescape")
    return ctypes.string_at(address, size)
