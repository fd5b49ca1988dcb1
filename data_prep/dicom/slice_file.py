"""One DICOM file: its header and its pixels in HU, the decoder chosen per transfer syntax, every kind of damage named with the file."""

from __future__ import annotations

import errno
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from data_prep.errors import DicomReadError, MissingDecoderError
from data_prep.runs import registry

log = logging.getLogger("data_prep")
EXPECTED_MODALITY = "CT"
PIXEL_DATA_TAG = 0x7FE00010
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
"""(FFFE,E0DD) with length 0: ends encapsulated (compressed) pixel data; a file without it is cut short."""
DELIMITER_SEARCH_BYTES = 4096
"""How far from the end of a compressed file the sequence delimiter is looked for."""
UNDEFINED_LENGTH = 0xFFFFFFFF
PREAMBLE_BYTES = 128 + 4 + 12
"""Preamble, 'DICM' and the (0002,0000) group-length element that precede the rest of the file meta."""
LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR")
FAST_JPEG_LOSSLESS = (registry.TS_JPEG_LOSSLESS_SV1, "1.2.840.10008.1.2.4.57")
"""Decoded by imagecodecs' libjpeg-turbo when installed: bit-identical to GDCM and about 4x faster (300 slices of
512 px: 1.2 vs 4.8 ms per slice on one core; tests/test_dicom_io.py checks the identity, signed and unsigned)."""
JPEG_LOSSLESS_BITS = 16
"""BitsAllocated of the JPEG Lossless images the fast path takes (CT)."""
MAX_DECODED_BYTES = 64 * 2**20
"""Largest pixel data a file may claim (Rows x Columns x NumberOfFrames x SamplesPerPixel x bytes per
sample) before it is decoded: 64 MiB admits a 4096x4096 16-bit slice or 32 frames of 1024x1024 (a CT slice
is 512x512x2 = 0.5 MiB), and stops a tiny file that claims 60000x60000 from making the decoder allocate GiBs.
Pass `max_bytes=` to read_header/read_slice_hu/check_study/scan_study, or set this constant to change it."""
DEFAULT_BITS_ALLOCATED = 16
"""BitsAllocated assumed when a header lacks it (CT)."""
READ_DENIED_ERRNOS = (errno.EACCES, errno.EPERM)
"""OS errors that mean the file could not be opened for reading (reported as such, never as a damaged file)."""
PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    registry.TS_JPEG_LOSSLESS_SV1: ("gdcm", "pylibjpeg"),  # gdcm measured faster (shared/MEASURED.md)
    "1.2.840.10008.1.2.4.57": ("gdcm", "pylibjpeg"),  # JPEG Lossless (process 14)
    registry.TS_RLE: ("pylibjpeg", "gdcm", "pydicom"),
    registry.TS_JPEG2000_LOSSLESS: ("pylibjpeg", "gdcm", "pillow"),
    registry.TS_JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
}
"""Decoding plugins to try per transfer syntax, fastest first; others use pydicom's default choice."""
INSTALL_HINTS: dict[str, str] = {
    registry.TS_JPEG_LOSSLESS_SV1: "pip install imagecodecs  (fastest; or: pip install pylibjpeg pylibjpeg-libjpeg, "
                                   "or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.57": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.50": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.51": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    registry.TS_JPEG2000_LOSSLESS: "pip install pylibjpeg pylibjpeg-openjpeg  (or: pip install python-gdcm)",
    registry.TS_JPEG2000: "pip install pylibjpeg pylibjpeg-openjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pip install pyjpegls  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pip install pyjpegls  (or: pip install python-gdcm)",
    registry.TS_RLE: "pip install pylibjpeg pylibjpeg-rle",
}


class NotDicomError(DicomReadError):
    """A file that is not DICOM at all (a stray file in a study folder)."""


class TruncatedDicomError(DicomReadError):
    """A DICOM file cut short (interrupted copy or download)."""


class NoPixelDataError(DicomReadError):
    """A DICOM file without a Pixel Data element (not an image)."""


class OversizedImageError(DicomReadError):
    """A file whose header claims more pixel data than MAX_DECODED_BYTES (refused before decoding)."""


class UnreadableFileError(DicomReadError):
    """A file the operating system does not let us read (permission denied), named with the system's reason."""


class NotCTError(DicomReadError):
    """A study whose files say they are not CT (Modality present and not CT); RSNA files without Modality pass."""


@dataclass
class SliceHeader:
    """What one file's header says about its slice (no pixels)."""

    path: Path
    instance: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: tuple[float, float] | None
    thickness: float | None
    shape: tuple[int, int]
    ts: str
    modality: str | None
    series: str | None = None
    sop_uid: str | None = None
    sop_class: str | None = None
    study: str | None = None
    description: str = ""
    series_number: int | None = None


def read_header(path: str | os.PathLike, *, max_bytes: int | None = None) -> SliceHeader:
    """Read one file's header (no pixels); check its pixel data is present, complete and of a sane size."""
    path = Path(path)
    try:
        with open(path, "rb") as fp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
            if eof:
                raise TruncatedDicomError(path, f"file is cut short ({eof[0]})")
            _check_pixel_element(fp, ds, path)
    except InvalidDicomError:
        raise NotDicomError(path, "not a DICOM file (no 'DICM' preamble)") from None
    except DicomReadError:
        raise
    except OSError as exc:
        if exc.errno in READ_DENIED_ERRNOS:
            raise UnreadableFileError(path, f"permission denied: the file cannot be read ({exc.strerror or exc}); "
                                            "fix its permissions") from None
        raise TruncatedDicomError(path, f"file is cut short or damaged inside the header ({exc})") from None
    except (EOFError, struct.error, BytesLengthException) as exc:
        raise TruncatedDicomError(path, f"file is cut short or damaged inside the header ({exc})") from None
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise DicomReadError(path, f"cannot parse the DICOM header: {type(exc).__name__}: {exc}") from None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DicomReadError(path, "has pixel data but no Rows/Columns") from None
    check_claimed_size(ds, path, max_bytes=max_bytes)
    ts = str(ds.file_meta.get("TransferSyntaxUID", registry.TS_IMPLICIT_LE))
    return SliceHeader(
        path=path,
        instance=_int_or_none(ds.get("InstanceNumber")),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        spacing=_pair(ds.get("PixelSpacing")),
        thickness=_float_or_none(ds.get("SliceThickness")),
        shape=(rows, cols),
        ts=ts,
        modality=str(ds.Modality) if "Modality" in ds else None,
        series=_text_or_none(ds.get("SeriesInstanceUID")),
        # the RSNA files carry the SOP class only in their file meta (MediaStorageSOPClassUID)
        sop_uid=_text_or_none(ds.get("SOPInstanceUID")) or _text_or_none(ds.file_meta.get("MediaStorageSOPInstanceUID")),
        sop_class=_text_or_none(ds.get("SOPClassUID")) or _text_or_none(ds.file_meta.get("MediaStorageSOPClassUID")),
        study=_text_or_none(ds.get("StudyInstanceUID")),
        description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
    )


def check_claimed_size(ds: pydicom.Dataset, path: str | os.PathLike, *, max_bytes: int | None = None) -> int:
    """Return the decoded size the header claims; raise OversizedImageError above `max_bytes` (no decoding)."""
    limit = MAX_DECODED_BYTES if max_bytes is None else int(max_bytes)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", DEFAULT_BITS_ALLOCATED) or DEFAULT_BITS_ALLOCATED)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomReadError(path, f"unreadable image size in the header (Rows/Columns/NumberOfFrames/"
                                   f"SamplesPerPixel/BitsAllocated): {exc}") from None
    if min(rows, cols, frames, samples, bits) < 1:
        raise DicomReadError(path, f"header claims an empty image: Rows {rows}, Columns {cols}, "
                                   f"NumberOfFrames {frames}, SamplesPerPixel {samples}, BitsAllocated {bits}")
    size = rows * cols * frames * samples * -(-bits // 8)
    if size > limit:
        raise OversizedImageError(path, f"header claims {rows}x{cols} pixels x {frames} frame(s) x {samples} "
                                        f"sample(s) x {bits} bits = {size / 2**20:,.0f} MiB decoded, above the "
                                        f"limit of {limit / 2**20:,.0f} MiB (data_prep.dicom.geometry."
                                        "MAX_DECODED_BYTES); refused before decoding")
    return size


def read_slice_hu(path: str | os.PathLike, *, max_bytes: int | None = None) -> np.ndarray:
    """Decode one DICOM slice and return it in HU (RescaleSlope/Intercept applied) as float32.

    The size the header claims is checked against `max_bytes` (default MAX_DECODED_BYTES) first.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise NotDicomError(path, "not a DICOM file (no 'DICM' preamble)") from None
    except OSError as exc:
        if exc.errno in READ_DENIED_ERRNOS:
            raise UnreadableFileError(path, f"permission denied: the file cannot be read ({exc.strerror or exc}); "
                                            "fix its permissions") from None
        raise TruncatedDicomError(path, f"cannot parse the file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        raise TruncatedDicomError(path, f"cannot parse the file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        read_header(path)  # tells a cut-short file from one that never had pixels
        raise NoPixelDataError(path, "has no Pixel Data element (not an image)")
    check_claimed_size(ds, path, max_bytes=max_bytes)
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", registry.TS_IMPLICIT_LE)))
    stored = _decode_jpeg_lossless(ds) if str(ts) in FAST_JPEG_LOSSLESS else None
    if stored is not None:
        return _rescale(stored, ds)
    plugin = _choose_plugin(ts, path)
    try:
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        stored = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc) or "truncat" in str(exc).lower():
            raise TruncatedDicomError(path, f"pixel data is cut short ({exc})") from None
        raise DicomReadError(path, f"cannot decode {ts.name} pixel data: {exc}") from None
    except Exception as exc:
        raise DicomReadError(path, f"cannot decode {ts.name} pixel data"
                                   f"{' with ' + plugin if plugin else ''}: {type(exc).__name__}: {exc}"
                             ) from None
    if stored.ndim != 2:
        raise DicomReadError(path, f"expected one 2D frame, found pixel array of shape {stored.shape}")
    return _rescale(stored, ds)


def _rescale(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> HU (RescaleSlope, RescaleIntercept) as float32."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (stored * slope + intercept).astype(np.float32)


def _decode_jpeg_lossless(ds: pydicom.Dataset) -> np.ndarray | None:
    """A one-frame, one-sample JPEG Lossless image decoded by imagecodecs (libjpeg-turbo), as pydicom returns it.

    None when imagecodecs is not installed or the file is anything else or does not decode: pydicom's
    plugins then decode it, or report the file's problem in their words.
    """
    try:
        import imagecodecs
    except ImportError:
        return None
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1 \
            or int(ds.get("BitsAllocated", 0)) != JPEG_LOSSLESS_BITS:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        raw = imagecodecs.jpeg8_decode(frame)
    except Exception:   # noqa: BLE001 - pydicom's decoders try next and name the problem
        return None
    if raw.shape != (rows, cols) or raw.dtype != np.uint16:
        return None
    if int(ds.get("PixelRepresentation", 0)) != 1:
        return raw
    shift = JPEG_LOSSLESS_BITS - int(ds.get("BitsStored", JPEG_LOSSLESS_BITS))
    return (raw.view(np.int16) << shift) >> shift      # two's complement of BitsStored bits, sign-extended


def _choose_plugin(ts: UID, path: Path) -> str:
    """Return the fastest installed decoding plugin for `ts` ('' = pydicom's own choice or uncompressed)."""
    if not ts.is_compressed:
        return ""
    available = _available_plugins(ts)
    if available is None:
        raise MissingDecoderError(path, f"pydicom has no decoder at all for {ts.name} ({ts}); convert the file "
                                        "to an uncompressed syntax first (e.g. gdcmconv --raw)")
    if not available:
        hint = INSTALL_HINTS.get(str(ts), "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg python-gdcm")
        raise MissingDecoderError(path, f"compressed with {ts.name} ({ts}) and no decoder for it is installed; "
                                        f"install one: {hint}")
    for plugin in PREFERRED_PLUGINS.get(str(ts), ()):
        if plugin in available:
            return plugin
    return ""


def _available_plugins(ts: UID) -> tuple[str, ...] | None:
    """Return the installed pydicom decoding plugins for `ts`, or None when pydicom has no decoder for it."""
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError:
        return None
    return tuple(decoder.available_plugins)


def _check_pixel_element(fp, ds: pydicom.Dataset, path: Path) -> None:
    """With `fp` just before the pixel data, check the element exists and the file holds all of it."""
    start = fp.tell()
    head = fp.read(12)
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", registry.TS_IMPLICIT_LE)))
    little = ts.is_little_endian if ts.is_transfer_syntax else True
    implicit = ts.is_implicit_VR if ts.is_transfer_syntax else False
    end = "<" if little else ">"
    if 0 < len(head) < 8:
        raise TruncatedDicomError(path, f"file ends inside an element header at byte {start}")
    if not head:
        _check_header_complete(ds, path, os.fstat(fp.fileno()).st_size)
        sop_class = UID(str(ds.file_meta.get("MediaStorageSOPClassUID", ds.get("SOPClassUID", ""))))
        if sop_class.name.endswith("Image Storage"):
            raise TruncatedDicomError(path, f"{sop_class.name} file ends before its Pixel Data (cut short?)")
        raise NoPixelDataError(path, "has no Pixel Data element (not an image)")
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group << 16 | elem) != PIXEL_DATA_TAG:
        raise TruncatedDicomError(path, f"header parsing stopped at byte {start} before any Pixel Data "
                                        f"(element ({group:04X},{elem:04X}) is incomplete)")
    if implicit:
        length, header_len = struct.unpack(end + "I", head[4:8])[0], 8
    elif head[4:6] in LONG_VRS:
        if len(head) < 12:
            raise TruncatedDicomError(path, "file ends inside the Pixel Data element header")
        length, header_len = struct.unpack(end + "I", head[8:12])[0], 12
    else:
        length, header_len = struct.unpack(end + "H", head[6:8])[0], 8
    size = os.fstat(fp.fileno()).st_size
    if length == UNDEFINED_LENGTH:
        fp.seek(max(start, size - DELIMITER_SEARCH_BYTES))
        if SEQUENCE_DELIMITER not in fp.read():
            raise TruncatedDicomError(path, "compressed pixel data has no end delimiter: the file is cut short")
    elif start + header_len + length > size:
        raise TruncatedDicomError(path, f"pixel data is cut short: {size - start - header_len} of {length} bytes "
                                        "present")


def _check_header_complete(ds: pydicom.Dataset, path: Path, size: int) -> None:
    """Raise TruncatedDicomError when a header without pixel data ends inside an element (pydicom is silent)."""
    meta = ds.file_meta
    meta_len = meta.get("FileMetaInformationGroupLength")
    if "TransferSyntaxUID" not in meta or (meta_len is not None and size < PREAMBLE_BYTES + int(meta_len)):
        raise TruncatedDicomError(path, "file ends inside the file meta information")
    if len(ds) == 0:
        end = PREAMBLE_BYTES + int(meta_len) if meta_len is not None else size
        if size > end:
            raise TruncatedDicomError(path, f"file ends inside the first element header (byte {end})")
        return
    last = ds.get_item(max(ds.keys()))
    length = getattr(last, "length", None)
    value_tell = getattr(last, "value_tell", None)
    if length is None or value_tell is None or length == UNDEFINED_LENGTH:
        return
    if value_tell + length > size:
        raise TruncatedDicomError(path, f"file ends inside element {last.tag} ({size - value_tell} of {length} "
                                        "bytes present), before the Pixel Data")
    if value_tell + length < size:
        raise TruncatedDicomError(path, f"file ends inside the element header after {last.tag} "
                                        f"(byte {value_tell + length}), before the Pixel Data")


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None and str(value) != "" else None
    except (TypeError, ValueError):
        return None


def _text_or_none(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _float_or_none(value) -> float | None:
    try:
        return float(value) if value is not None and str(value) != "" else None
    except (TypeError, ValueError):
        return None


def _floats(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _pair(value) -> tuple[float, float] | None:
    arr = _floats(value, 2)
    return (float(arr[0]), float(arr[1])) if arr is not None else None
