"""Reading one CT study into a canonical axial volume in HU (index 0 = most superior).

A study is a folder (the Kaggle layout: its files, the largest series) or a study the finder chose a series of
(data_prep.dicom.study_finder.FoundStudy: its `key` names the study, its `paths` are the chosen series' files).

`scan_study` reads headers only and fixes the canonical order from ImagePositionPatient projected on
the slice normal; `read_volume` and `iter_chunks` decode the pixels (optionally in parallel) and apply
RescaleSlope/RescaleIntercept. Every problem names the file and the reason (see docs/contracts.md).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import multiprocessing
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from data_prep.errors import DicomReadError, GeometryError, InputError, MissingDecoderError
from data_prep.runs import registry
from data_prep.runs.workers import dies_with_parent

log = logging.getLogger("data_prep")

# --- named constants -------------------------------------------------------------------------------
POSITION_TOLERANCE_MM = 1e-3
"""Two slices closer than this along the normal are duplicates."""
GAP_FACTOR = 1.5
"""A step between neighbouring slices larger than GAP_FACTOR x the median step is reported as missing slices."""
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between two slices' ImageOrientationPatient values still counted as the same."""
SPACING_TOLERANCE_MM = 1e-3
"""Largest difference between two slices' PixelSpacing values still counted as the same."""
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
EXECUTORS = ("process", "thread")
DEFAULT_EXECUTOR = "thread"
"""Threads: no pool start-up and no copying of decoded slices between processes. Measured with
benchmarks/bench_decode.py on the shared 2-core machine, 2 threads were as fast as or faster than
2 processes for uncompressed, RLE and JPEG 2000 (processes pay ~1 MB of IPC per 512x512 slice);
re-measure on a quiet machine before changing this."""
SCAN_PROCESSES = 1
"""Worker processes of scan_study_async: the read-ahead scans one study at a time, ahead of the decoders."""
FAST_JPEG_LOSSLESS = (registry.TS_JPEG_LOSSLESS_SV1, "1.2.840.10008.1.2.4.57")
"""Decoded by imagecodecs' libjpeg-turbo when installed: bit-identical to GDCM and about 4x faster (300 slices of
512 px: 1.2 vs 4.8 ms per slice on one core; tests/test_dicom_io.py checks the identity, signed and unsigned)."""
JPEG_LOSSLESS_BITS = 16
"""BitsAllocated of the JPEG Lossless images the fast path takes (CT)."""
PREFETCH_CHUNKS = 1
"""iter_chunks decodes this many chunks ahead of the one being consumed (bounded memory)."""
MAX_DECODED_BYTES = 64 * 2**20
"""Largest pixel data a file may claim (Rows x Columns x NumberOfFrames x SamplesPerPixel x bytes per
sample) before it is decoded: 64 MiB admits a 4096x4096 16-bit slice or 32 frames of 1024x1024 (a CT slice
is 512x512x2 = 0.5 MiB), and stops a tiny file that claims 60000x60000 from making the decoder allocate GiBs.
Pass `max_bytes=` to read_header/read_slice_hu/check_study/scan_study, or set this constant to change it."""
DEFAULT_BITS_ALLOCATED = 16
"""BitsAllocated assumed when a header lacks it (CT)."""
MIN_POSITIONED_SHARE = 0.5
"""When some files lack ImagePositionPatient they are left out; if fewer than this share of the files have
one, the study cannot be ordered and fails instead (a handful of slices would not be the study)."""
LISTED_FILES = 20
"""How many excluded file names a warning spells out (StudyGeometry.excluded holds them all)."""
MIN_CERVICAL_SPAN_MM = 80.0
"""A study covering less than this along its slice normal cannot hold C1-C7: from the top of C1 to the bottom of C7
the adult cervical spine measures about 100-130 mm (the synthetic studies place 100-150 mm of it inside 200 mm);
80 mm leaves room for small patients and steep lordosis. Such a study is flagged (`short_coverage`: a warning in
`spinefrac inspect`, the `warning` column of worklist.csv), not refused."""
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


# --- specific errors (all DicomReadError/GeometryError subclasses, so they name the file) ----------
class NotDicomError(DicomReadError):
    """A file that is not DICOM at all (a stray file in a study folder)."""


class TruncatedDicomError(DicomReadError):
    """A DICOM file cut short (interrupted copy or download)."""


class NoPixelDataError(DicomReadError):
    """A DICOM file without a Pixel Data element (not an image)."""


class EmptyStudyError(DicomReadError):
    """A study folder holding no readable CT slice."""


class OversizedImageError(DicomReadError):
    """A file whose header claims more pixel data than MAX_DECODED_BYTES (refused before decoding)."""


class UnreadableFileError(DicomReadError):
    """A file the operating system does not let us read (permission denied), named with the system's reason."""


class NotCTError(DicomReadError):
    """A study whose files say they are not CT (Modality present and not CT); RSNA files without Modality pass."""


class InconsistentSlicesError(GeometryError):
    """Slices of one study that differ in size, orientation or pixel spacing."""


class DuplicatePositionError(GeometryError):
    """Two slices at the same position along the slice normal."""


class AmbiguousSeriesError(GeometryError):
    """A study folder holding two or more series with the same, largest number of slices."""


class UnorderableStudyError(GeometryError):
    """Too few slices carry ImagePositionPatient to put the study in order."""


class UnknownInstanceError(InputError, KeyError):
    """An InstanceNumber (slice_number) that the study does not hold."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class SkippedSeries(NamedTuple):
    """A series of a study that was not read, and why."""

    series_uid: str
    description: str
    reason: str


# --- geometry --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StudyGeometry:
    """Headers of one study in canonical order (index 0 = most superior); no pixels."""

    study_uid: str
    study_dir: Path
    paths: tuple[Path, ...]
    instance_numbers: np.ndarray
    z_mm: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    shape: tuple[int, int]
    transfer_syntaxes: tuple[str, ...]
    instance_order_reversed: bool
    warnings: tuple[str, ...] = ()
    series_uid: str | None = None
    excluded: tuple[tuple[Path, str], ...] = ()
    sop_uids: tuple[str, ...] = ()
    """SOPInstanceUID of each slice in canonical order ("" where a file has none)."""
    sop_class_uid: str | None = None
    dicom_study_uid: str | None = None
    """StudyInstanceUID from the headers (`study_uid` is the study's key: the folder name or the finder's key)."""
    series_description: str = ""
    series_number: int | None = None
    modality: str | None = None
    skipped_series: tuple[SkippedSeries, ...] = ()
    """Series of the folder left out (another series than its main one)."""
    _index: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[int, int] = {}
        for i, n in enumerate(self.instance_numbers):
            index.setdefault(int(n), i)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.paths)

    def index_of_instance(self, instance_number: int) -> int:
        """Return the canonical slice_index of the file with this InstanceNumber (slice_number)."""
        try:
            return self._index[int(instance_number)]
        except KeyError:
            raise UnknownInstanceError(self.study_dir, f"study {self.study_uid} has no slice with InstanceNumber "
                                       f"{instance_number} (it holds {min(self._index)}..{max(self._index)})"
                                       ) from None

    def affine(self) -> np.ndarray:
        """Return the 4x4 matrix mapping canonical voxel (slice_index, row, col, 1) to LPS mm."""
        row_dir, col_dir = self.orientation[:3], self.orientation[3:]
        out = np.eye(4)
        n = len(self)
        if n > 1:
            out[:3, 0] = (self.positions[-1] - self.positions[0]) / (n - 1)
        else:
            out[:3, 0] = -slice_normal(self.orientation) * self.slice_thickness
        out[:3, 1] = col_dir * self.pixel_spacing[0]  # moving down one row
        out[:3, 2] = row_dir * self.pixel_spacing[1]  # moving right one column
        out[:3, 3] = self.positions[0]
        return out


@dataclass
class Chunk:
    """Consecutive canonical slices [start, stop) plus `context` neighbours each side, held as [lo, hi)."""

    start: int
    stop: int
    lo: int
    hi: int
    hu: np.ndarray
    n_slices: int

    def get(self, index: int) -> np.ndarray:
        """Return the HU slice at canonical `index`, clamped to the study and to what this chunk holds."""
        index = min(max(int(index), 0, self.lo), self.n_slices - 1, self.hi - 1)
        return self.hu[index - self.lo]

    def indices(self) -> range:
        """Return the canonical indices of the centre slices."""
        return range(self.start, self.stop)


@dataclass
class ScanResult:
    """Everything learnt from a study's headers: the geometry (None if unusable), errors and warnings."""

    study_dir: Path
    geometry: StudyGeometry | None
    errors: list[InputError]
    warnings: list[str]


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


# --- public API ------------------------------------------------------------------------------------
def as_study(study: Any) -> Any:
    """A study as the readers take it: a FoundStudy (anything with `key` and `paths`) as is, else its folder Path."""
    return study if hasattr(study, "paths") and hasattr(study, "key") else Path(study)


def scan_study(study_dir: Any, *, max_bytes: int | None = None) -> StudyGeometry:
    """Read the headers of one study (folder or FoundStudy) and return its canonical geometry; raise on the first error."""
    result = check_study(study_dir, max_bytes=max_bytes)
    if result.errors:
        first = result.errors[0]
        if len(result.errors) > 1:
            log.error("%s: %d problems; first: %s", result.study_dir, len(result.errors), first)
        raise first
    assert result.geometry is not None
    return result.geometry


def check_study(study_dir: Any, *, max_bytes: int | None = None) -> ScanResult:
    """Read the headers of one study (folder or FoundStudy) and collect every problem instead of stopping at the first.

    Files of another series than the folder's main one (the series with the most files) and files
    without ImagePositionPatient are left out, named in a warning and in `StudyGeometry.excluded`.
    A FoundStudy's files are its chosen series' (the finder has left the other series out already).
    """
    study = as_study(study_dir)
    errors: list[InputError] = []
    notes: list[str] = []
    if isinstance(study, Path):
        study_dir, key = study, study.name
        if not study_dir.is_dir():
            return ScanResult(study_dir, None, [EmptyStudyError(study_dir, "is not a folder")], notes)
        files = sorted((p for p in study_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=_natural_key)
    else:
        study_dir, key, files = Path(study.folder), str(study.key), list(study.paths)
        if getattr(study, "problem", None):
            return ScanResult(study_dir, None, [EmptyStudyError(study_dir, f"study {key}: {study.problem}")], notes)
    headers: list[SliceHeader] = []
    for path in files:
        try:
            headers.append(read_header(path, max_bytes=max_bytes))
        except (NotDicomError, NoPixelDataError) as exc:
            _warn(notes, f"{exc}; skipped")
        except DicomReadError as exc:
            errors.append(exc)
    if not headers:
        if not errors:
            errors.append(EmptyStudyError(study_dir, "holds no DICOM image files"))
        return ScanResult(study_dir, None, errors, notes)
    geometry = None
    try:
        headers, excluded, skipped = _main_series(study_dir, headers, notes)
        not_ct = next((h for h in headers if h.modality is not None and h.modality.strip().upper() != EXPECTED_MODALITY),
                      None)
        if not_ct is not None:   # the study finder refuses such series too; no Modality at all (RSNA) is CT
            raise NotCTError(not_ct.path, f"Modality is {not_ct.modality!r}, not {EXPECTED_MODALITY}: spinefrac reads "
                                          "CT studies only (HU values of another modality mean nothing to its models)")
        _check_uids(headers, notes)
        geometry = _build_geometry(study_dir, headers, notes, excluded, key=key, skipped=skipped)
    except InputError as exc:  # DicomReadError and GeometryError alike: reported, never a crash
        errors.append(exc)
    return ScanResult(study_dir, geometry, errors, notes)


def short_coverage(z_mm: Sequence[float] | np.ndarray) -> str | None:
    """Why a study with slices at `z_mm` cannot hold C1-C7 (None when it can): it covers < MIN_CERVICAL_SPAN_MM.

    Coverage = the distance between the first and last slice plus one median slice step (0 for one slice).
    """
    z = np.sort(np.asarray(z_mm, dtype=float))
    if z.size == 0:
        return None
    step = float(np.median(np.diff(z))) if z.size > 1 else 0.0
    span = float(z[-1] - z[0]) + step
    if span >= MIN_CERVICAL_SPAN_MM:
        return None
    return (f"too short to hold C1-C7: {z.size} slice(s) covering {span:.1f} mm along z (C1-C7 need about "
            f"{MIN_CERVICAL_SPAN_MM:g} mm or more); its prediction is unreliable")


def _check_uids(headers: Sequence[SliceHeader], notes: list[str]) -> None:
    """Warn once per kind about a StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID that is no valid DICOM UID."""
    from data_prep.safe_paths import valid_uid

    for what, attr in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"), ("SOPInstanceUID", "sop_uid")):
        bad = next((h for h in headers if getattr(h, attr) is not None and not valid_uid(getattr(h, attr))), None)
        if bad is not None:
            _warn(notes, f"{bad.path}: {what} {str(getattr(bad, attr))[:80]!r} is not a valid DICOM UID (digits and "
                         "dots, at most 64 characters); it is kept as data only, never as a file name")


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
                                        f"limit of {limit / 2**20:,.0f} MiB (data_prep.dicom.reader."
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


def scan_study_async(study_dir: Any) -> Future:
    """scan_study in a worker process (a Future of its StudyGeometry): header parsing off this process's GIL."""
    return _pool(SCAN_PROCESSES, "process").submit(scan_study, as_study(study_dir))


def read_volume(geometry: StudyGeometry, *, workers: int = 1, executor: str = DEFAULT_EXECUTOR) -> np.ndarray:
    """Decode every slice of a study into a float32 HU volume (n, rows, cols) in canonical order."""
    out = np.empty((len(geometry), *geometry.shape), dtype=np.float32)
    for i, hu in _decode_in_order(geometry, range(len(geometry)), workers, executor):
        out[i] = hu
    return out


def iter_chunks(geometry: StudyGeometry, *, chunk_size: int = 16, context: int = 0, workers: int = 1,
                executor: str = DEFAULT_EXECUTOR) -> Iterator[Chunk]:
    """Stream canonical slices in chunks of `chunk_size`, each with `context` neighbours on both sides."""
    if chunk_size < 1 or context < 0:
        raise ValueError(f"chunk_size must be >= 1 and context >= 0, got {chunk_size}, {context}")
    n = len(geometry)
    bounds = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        bounds.append((start, stop, max(0, start - context), min(n, stop + context)))
    order = [i for _, _, lo, hi in bounds for i in range(lo, hi)]
    order = list(dict.fromkeys(order))  # each slice decoded once, in the order chunks need them
    ahead = (PREFETCH_CHUNKS + 1) * (chunk_size + 2 * context)
    cache: dict[int, np.ndarray] = {}
    decoded = _decode_in_order(geometry, order, workers, executor, ahead=ahead)
    for start, stop, lo, hi in bounds:
        while any(i not in cache for i in range(lo, hi)):
            i, hu = next(decoded)
            cache[i] = hu
        for i in [i for i in cache if i < lo]:
            del cache[i]
        yield Chunk(start=start, stop=stop, lo=lo, hi=hi, hu=np.stack([cache[i] for i in range(lo, hi)]),
                    n_slices=n)


def decode_slices(paths: Sequence[Path], *, workers: int = 1, executor: str = DEFAULT_EXECUTOR
                  ) -> Iterator[tuple[Path, np.ndarray | DicomReadError]]:
    """Decode files in order and yield (path, HU slice or the DicomReadError it raised); never stops early."""
    if workers <= 1 or len(paths) <= 1:
        for path in paths:
            try:
                yield Path(path), read_slice_hu(path)
            except DicomReadError as exc:
                yield Path(path), exc
        return
    pool = _pool(workers, executor)
    futures = [pool.submit(_decode_worker, str(p)) for p in paths]
    try:
        for path, future in zip(paths, futures, strict=True):
            result = future.result()
            if isinstance(result, tuple):
                cls, where, reason = result
                yield Path(path), cls(where, reason)
            else:
                yield Path(path), result
    finally:
        for future in futures:
            future.cancel()


# --- decoding --------------------------------------------------------------------------------------
def _decode_worker(path: str) -> np.ndarray | tuple[type, str, str]:
    """Decode in a worker; return the failure as (class, path, reason) because InputError cannot be pickled."""
    try:
        return read_slice_hu(path)
    except DicomReadError as exc:
        return (type(exc), str(exc.path), exc.reason)


def _unwrap(result: np.ndarray | tuple[type, str, str]) -> np.ndarray:
    if isinstance(result, tuple):
        cls, path, reason = result
        raise cls(path, reason)
    return result


def _decode_in_order(geometry: StudyGeometry, indices: Sequence[int], workers: int, executor: str,
                     ahead: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, HU slice) in the given order, decoding up to `ahead` slices in advance in a pool."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if workers <= 1 or len(indices) <= 1:
        for i in indices:
            yield i, read_slice_hu(geometry.paths[i])
        return
    pool = _pool(workers, executor)
    ahead = ahead or len(indices)
    pending: dict[int, Future] = {}
    queue = iter(indices)
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [f.cancel() for f in pending.values()])
        submitted = []
        for i in queue:
            pending[i] = pool.submit(_decode_worker, str(geometry.paths[i]))
            submitted.append(i)
            if len(submitted) >= ahead:
                break
        pos = 0
        while pos < len(submitted):
            i = submitted[pos]
            pos += 1
            result = pending.pop(i).result()
            nxt = next(queue, None)
            if nxt is not None:
                pending[nxt] = pool.submit(_decode_worker, str(geometry.paths[nxt]))
                submitted.append(nxt)
            yield i, _unwrap(result)


_POOLS: dict[tuple[str, int], Executor] = {}


def _pool(workers: int, executor: str) -> Executor:
    """Return a long-lived pool (one per kind and size), so a batch of studies pays the start-up once."""
    key = (executor, workers)
    if key not in _POOLS:
        if executor == "thread":
            _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-decode")
        else:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["data_prep.dicom.reader"])
            _POOLS[key] = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **dies_with_parent())
    return _POOLS[key]


@atexit.register
def shutdown_pools() -> None:
    """Stop the decoding worker pools (called at exit; safe to call any time)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


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


# --- header helpers --------------------------------------------------------------------------------
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


def _main_series(study_dir: Path, headers: list[SliceHeader], notes: list[str]
                 ) -> tuple[list[SliceHeader], list[tuple[Path, str]], list[SkippedSeries]]:
    """Keep the series the folder is about (the most files); name and leave out the others' files.

    Files without SeriesInstanceUID count as one series of their own. Two series tied for the most
    files are an AmbiguousSeriesError: which one the folder is about cannot be told.
    """
    groups: dict[str | None, list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault(h.series, []).append(h)
    if len(groups) == 1:
        return headers, [], []
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    (main, kept), (second, rival) = ranked[0], ranked[1]
    if len(rival) == len(kept):
        raise AmbiguousSeriesError(study_dir, f"holds {len(groups)} series with the same number of files "
                                              f"({len(kept)}): {main} and {second}; keep one series per folder")
    foreign = [h for series, group in ranked[1:] for h in group]
    reason = f"another series than the study's {main}"
    _warn(notes, f"{study_dir}: {len(foreign)} file(s) belong to {reason} and are left out: "
                 f"{_names(foreign, LISTED_FILES)} (series {', '.join(str(s) for s, _ in ranked[1:])})")
    excluded = [(h.path, f"SeriesInstanceUID {h.series} is {reason}") for h in foreign]
    skipped = [SkippedSeries(series or "", group[0].description, f"{len(group)} file(s); fewer than the study's "
                             f"main series ({len(kept)} files) in the same folder") for series, group in ranked[1:]]
    return kept, excluded, skipped


def _build_geometry(study_dir: Path, headers: list[SliceHeader], notes: list[str],
                    excluded: list[tuple[Path, str]] | None = None, *, key: str | None = None,
                    skipped: Sequence[SkippedSeries] = ()) -> StudyGeometry:
    """Check that the slices fit together and sort them into canonical order (`key`: the study's key, else the folder name)."""
    excluded = list(excluded or [])
    unplaced = [h for h in headers if h.position is None]
    if unplaced and len(unplaced) < len(headers):
        placed = len(headers) - len(unplaced)
        if placed < MIN_POSITIONED_SHARE * len(headers):
            raise UnorderableStudyError(unplaced[0].path, f"{len(unplaced)} of {len(headers)} files lack "
                                                          f"ImagePositionPatient (e.g. {_names(unplaced)}): "
                                                          "too few positioned slices to order the study")
        _warn(notes, f"{study_dir}: {len(unplaced)} file(s) lack ImagePositionPatient and are left out: "
                     f"{_names(unplaced, LISTED_FILES)}; the other {placed} keep their geometric order")
        excluded += [(h.path, "no ImagePositionPatient") for h in unplaced]
        headers = [h for h in headers if h.position is not None]
    ref = _majority(headers, lambda h: h.shape)
    odd = [h for h in headers if h.shape != ref.shape]
    if odd:
        raise InconsistentSlicesError(odd[0].path, f"slice size {odd[0].shape[0]}x{odd[0].shape[1]} differs from "
                                                   f"the study's {ref.shape[0]}x{ref.shape[1]} "
                                                   f"({len(odd)} file(s) differ, e.g. {_names(odd)})")
    with_orient = [h for h in headers if h.orientation is not None]
    if with_orient:
        ref_o = _majority(with_orient, lambda h: tuple(np.round(h.orientation, 3)))
        odd = [h for h in with_orient if np.abs(h.orientation - ref_o.orientation).max() > ORIENTATION_TOLERANCE]
        if odd:
            raise InconsistentSlicesError(odd[0].path, f"ImageOrientationPatient {odd[0].orientation.tolist()} "
                                                       f"differs from the study's {ref_o.orientation.tolist()} "
                                                       f"({len(odd)} file(s), e.g. {_names(odd)})")
        orientation = ref_o.orientation
        if len(with_orient) < len(headers):
            _warn(notes, f"{study_dir}: {len(headers) - len(with_orient)} file(s) lack ImageOrientationPatient; "
                         "using the other slices' value")
    else:
        orientation = np.array([1.0, 0, 0, 0, 1.0, 0])
        _warn(notes, f"{study_dir}: no ImageOrientationPatient in any file; assuming axial [1,0,0,0,1,0]")
    with_spacing = [h for h in headers if h.spacing is not None]
    if with_spacing:
        ref_s = _majority(with_spacing, lambda h: tuple(np.round(h.spacing, 3)))
        odd = [h for h in with_spacing if max(abs(a - b) for a, b in zip(h.spacing, ref_s.spacing, strict=True))
               > SPACING_TOLERANCE_MM]
        if odd:
            raise InconsistentSlicesError(odd[0].path, f"PixelSpacing {list(odd[0].spacing)} differs from the "
                                                       f"study's {list(ref_s.spacing)} ({len(odd)} file(s))")
        spacing = ref_s.spacing
    else:
        spacing = (1.0, 1.0)
        _warn(notes, f"{study_dir}: no PixelSpacing in any file; assuming 1 x 1 mm")
    normal = slice_normal(orientation)
    if abs(normal[2]) < 0.5:
        _warn(notes, f"{study_dir}: slices are not axial (normal {np.round(normal, 3).tolist()}); "
                     "the canonical order runs along the slice normal")
    if normal[2] < 0:
        normal = -normal  # orient towards superior (+z in LPS)

    instances = [h.instance for h in headers]
    if all(h.position is not None for h in headers):
        positions = np.stack([h.position for h in headers])
        z = positions @ normal
        tie = np.array([n if n is not None else 0 for n in instances])
        order = np.lexsort((tie, -z))  # z descending (superior first), InstanceNumber breaks ties
    else:
        missing = [h for h in headers if h.position is None]
        if any(n is None for n in instances):
            raise GeometryError(missing[0].path, "neither ImagePositionPatient nor InstanceNumber: cannot order "
                                                 f"the slices ({len(missing)} file(s) without a position)")
        _warn(notes, f"{study_dir}: no file has ImagePositionPatient; ordering by InstanceNumber, "
                     "assuming 1 = most superior")
        order = np.argsort(np.array(instances), kind="stable")
        thickness0 = _majority_value([h.thickness for h in headers if h.thickness]) or 1.0
        z = np.empty(len(headers))
        z[order] = -np.arange(len(headers)) * thickness0
        positions = np.stack([h.position if h.position is not None else np.array([0.0, 0.0, zz])
                              for h, zz in zip(headers, z, strict=True)])
    headers = [headers[i] for i in order]
    positions, z = positions[order], z[order]

    steps = -np.diff(z)
    dup = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    if dup.size:
        a, b = headers[dup[0]], headers[dup[0] + 1]
        raise DuplicatePositionError(b.path, f"same position as {a.path.name} (z = {z[dup[0]]:.3f} mm along the "
                                             f"slice normal); {dup.size} duplicate pair(s) in {study_dir.name}")
    if steps.size:
        median = float(np.median(steps))
        for g in np.flatnonzero(steps > GAP_FACTOR * median):
            a, b = headers[g], headers[g + 1]
            _warn(notes, f"{study_dir}: missing slices between {a.path.name} (z={z[g]:.2f} mm) and {b.path.name} "
                         f"(z={z[g + 1]:.2f} mm): gap {steps[g]:.2f} mm, usual step {median:.2f} mm "
                         f"(about {round(steps[g] / median) - 1} slice(s) missing)")

    if any(n is None for n in instances):
        _warn(notes, f"{study_dir}: some files lack InstanceNumber; using the file name stem instead")
    numbers = np.array([h.instance if h.instance is not None else _stem_number(h.path) for h in headers])
    if len(set(numbers.tolist())) != len(numbers):
        _warn(notes, f"{study_dir}: InstanceNumber is not unique; index_of_instance uses the first match")
    thicknesses = [h.thickness for h in headers if h.thickness]
    thickness = _majority_value(thicknesses)
    if thickness is None:
        thickness = float(np.median(steps)) if steps.size else 1.0
        _warn(notes, f"{study_dir}: no SliceThickness; using the slice step {thickness:.3f} mm")
    elif any(abs(t - thickness) > SPACING_TOLERANCE_MM for t in thicknesses):
        _warn(notes, f"{study_dir}: SliceThickness varies ({min(thicknesses)}..{max(thicknesses)} mm)")
    reversed_ = bool(len(numbers) > 1 and numbers[-1] < numbers[0])
    return StudyGeometry(
        study_uid=key if key is not None else study_dir.name, study_dir=study_dir, paths=tuple(h.path for h in headers),
        instance_numbers=numbers.astype(np.int64), z_mm=z.astype(np.float64), positions=positions,
        orientation=np.asarray(orientation, dtype=np.float64), pixel_spacing=(float(spacing[0]), float(spacing[1])),
        shape=headers[0].shape, slice_thickness=float(thickness),
        transfer_syntaxes=tuple(sorted({h.ts for h in headers})), instance_order_reversed=reversed_,
        warnings=tuple(notes), series_uid=headers[0].series, excluded=tuple(excluded),
        sop_uids=tuple(h.sop_uid or "" for h in headers), sop_class_uid=headers[0].sop_class,
        dicom_study_uid=headers[0].study, series_description=headers[0].description,
        series_number=headers[0].series_number, modality=headers[0].modality, skipped_series=tuple(skipped))


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """The unit normal of slices with this ImageOrientationPatient (row x column direction; zero when degenerate)."""
    n = np.cross(orientation[:3], orientation[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _warn(notes: list[str], message: str) -> None:
    log.warning("%s", message)
    notes.append(message)


def _majority(headers: list[SliceHeader], key):
    counts: dict = {}
    for h in headers:
        counts.setdefault(key(h), []).append(h)
    return max(counts.values(), key=len)[0]


def _majority_value(values: list[float]) -> float | None:
    if not values:
        return None
    rounded = [round(v, 3) for v in values]
    return max(set(rounded), key=rounded.count)


def _names(headers: Sequence[SliceHeader], limit: int = 3) -> str:
    names = [h.path.name for h in headers[:limit]]
    return ", ".join(names) + (", ..." if len(headers) > limit else "")


def _natural_key(path: Path) -> tuple:
    stem = path.stem
    return (0, int(stem), path.name) if stem.isdigit() else (1, 0, path.name)


def _stem_number(path: Path) -> int:
    return int(path.stem) if path.stem.isdigit() else -1


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
