"""Synthetic studies written as a PACS or scanner exports them, for the study finder's tests.

Each study is one synthetic CT (`data_prep.synthetic.synth.build_study`, written by `data_prep.dicom.writer.write_series`) in a
PATIENT/STUDY/SERIES tree of extension-less files, beside the series a real export carries: a scout, the
same stack in a soft-tissue kernel, a thicker bone stack, an axial DERIVED reformat, a sagittal reformat
and a dose report (an SR object without pixels). `VARIANTS`: the tree, a DICOMDIR file set, or a zip of
the tree (docs/contracts.md, "Study finder").
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import XRayRadiationDoseSRStorage, generate_uid

from data_prep.dicom.writer import write_series
from data_prep.runs import registry
from data_prep.runs.artifacts import atomic_path
from data_prep.runs.config import load_config
from data_prep.synthetic import synth

log = logging.getLogger("data_prep")

VARIANTS: tuple[str, ...] = ("tree", "dicomdir", "zip")
ROLES: tuple[str, ...] = ("bone", "soft", "thick", "derived", "sagittal", "scout", "sr")
"""Series of every exported study; `bone` is the one the study finder must choose."""
KERNELS = {"bone": "BONE", "soft": "STANDARD"}
"""GE kernel names (data_prep.dicom.study_finder classifies them bone and soft)."""
DESCRIPTIONS = {"bone": "C-SPINE BONE", "soft": "C-SPINE SOFT", "thick": "C-SPINE BONE THICK",
                "derived": "C-SPINE AX MPR", "sagittal": "C-SPINE SAG MPR", "scout": "Topogram",
                "sr": "Dose Report"}
IMAGE_TYPES = {"bone": ("ORIGINAL", "PRIMARY", "AXIAL"), "soft": ("ORIGINAL", "PRIMARY", "AXIAL"),
               "thick": ("ORIGINAL", "PRIMARY", "AXIAL"), "derived": ("DERIVED", "SECONDARY", "AXIAL"),
               "sagittal": ("DERIVED", "SECONDARY", "REFORMATTED"), "scout": ("ORIGINAL", "PRIMARY", "LOCALIZER")}
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
THICK_FACTOR = 2
"""The thick series averages this many neighbouring slices."""
SAGITTAL_STEP = 8
"""The sagittal reformat takes every this-many-th column of the volume."""
STUDY_DATE, STUDY_TIME = "20260101", "120000"
"""Fixed dates and times: the export is deterministic."""
DOSE_REPORT_CODE = ("113701", "DCM", "X-Ray Radiation Dose Report")
DEFAULT_SIZE, DEFAULT_SLICES = 64, 20


@dataclass(frozen=True)
class ExportedStudy:
    """What one exported study holds: its UIDs, and the SeriesInstanceUID of every role in `ROLES`."""

    study_uid: str
    patient_id: str
    series: dict[str, str]
    bone_slices: int

    @property
    def chosen(self) -> str:
        """The series the study finder must choose (the thin bone-kernel axial stack)."""
        return self.series["bone"]


def write_export(out: str | os.PathLike, *, n_studies: int = 1, seed: int = 0, variant: str = "tree",
                 size: int = DEFAULT_SIZE, slices: int = DEFAULT_SLICES) -> list[ExportedStudy]:
    """Write `n_studies` synthetic studies as a PACS export: a folder tree, a DICOMDIR set, or a .zip at `out`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new path")
    config = load_config("synth", overrides=[f"image.size={size}", f"volume.slices={slices}"])
    plans = synth.plan_studies(n_studies, seed=seed, split="test", config=config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export.", dir=out.parent) as tmp:
        tree = out if variant == "tree" else Path(tmp) / "tree"
        studies = [_write_study(tree, i, synth.build_study(plan, seed=seed, split="test", config=config))
                   for i, plan in enumerate(plans)]
        if variant == "dicomdir":
            _write_fileset(tree, out)
        elif variant == "zip":
            _write_zip(tree, out)
    log.info("wrote a %s export of %d synthetic stud%s to %s", variant, n_studies,
             "y" if n_studies == 1 else "ies", out)
    return studies


def _write_study(tree: Path, index: int, built: synth.BuiltStudy) -> ExportedStudy:
    """Write every series of one study under PATnnn/STU001/SERnnn/ with extension-less file names."""
    uid = built.plan.uid
    patient = f"PAT{index + 1:03d}"
    study_dir = tree / patient / "STU001"
    series = {role: generate_uid(entropy_srcs=[uid, role]) for role in ROLES}  # deterministic
    common = {"PatientID": patient, "PatientName": f"SYNTH^{patient}", "StudyDate": STUDY_DATE,
              "StudyTime": STUDY_TIME, "StudyID": "1", "AccessionNumber": f"ACC{index + 1:05d}",
              "Modality": "CT"}
    grid, hu = built.grid, built.hu
    spacing, t = float(grid.spacing), float(grid.thickness)
    stack = {"pixel_spacing": (spacing, spacing), "origin_xy_mm": built.origin_xy}
    for number, role in enumerate(("bone", "soft", "derived"), start=2):
        _write_ct(study_dir, number, role, hu, uid, series[role], common, slice_thickness=t,
                  z_top_mm=built.z_top, **stack)
    n_thick = hu.shape[0] // THICK_FACTOR
    thick = hu[:n_thick * THICK_FACTOR].reshape(n_thick, THICK_FACTOR, *hu.shape[1:]).mean(axis=1)
    _write_ct(study_dir, 5, "thick", thick.astype(np.float32), uid, series["thick"], common,
              slice_thickness=t * THICK_FACTOR, z_top_mm=built.z_top - t * (THICK_FACTOR - 1) / 2, **stack)
    # sagittal reformat: image rows run down z, columns along +y; one image every SAGITTAL_STEP columns
    columns = np.arange(0, hu.shape[2], SAGITTAL_STEP)
    sagittal = np.ascontiguousarray(hu[:, :, columns].transpose(2, 0, 1))
    positions = [(built.origin_xy[0] + c * spacing, built.origin_xy[1], built.z_top) for c in columns]
    _write_ct(study_dir, 6, "sagittal", sagittal, uid, series["sagittal"], common, slice_thickness=spacing,
              pixel_spacing=(t, spacing), orientation=SAGITTAL, positions=positions)
    # scout: an AP and a lateral projection in one series, as a topogram pair
    ap = hu.mean(axis=1)
    lateral = hu.mean(axis=2)
    scout = np.stack([ap, lateral]).astype(np.float32)
    _write_ct(study_dir, 1, "scout", scout, uid, series["scout"], common, slice_thickness=spacing,
              pixel_spacing=(t, spacing), orientation=[CORONAL, SAGITTAL],
              positions=[(built.origin_xy[0], built.origin_xy[1], built.z_top)] * 2)
    _write_dose_report(study_dir / "SER099" / "IM00001", uid, series["sr"], common)
    return ExportedStudy(study_uid=uid, patient_id=patient, series=series, bone_slices=int(hu.shape[0]))


def _write_ct(study_dir: Path, number: int, role: str, hu: np.ndarray, study_uid: str, series_uid: str,
              common: dict[str, str], *, slice_thickness: float, pixel_spacing: tuple[float, float],
              z_top_mm: float = 0.0, origin_xy_mm: tuple[float, float] = (0.0, 0.0),
              orientation: Sequence | None = None, positions: Sequence | None = None) -> None:
    """Write one CT series with `write_series`, then give it the export's headers and extension-less names."""
    folder = study_dir / f"SER{number:03d}"
    paths = write_series(folder, hu, study_uid=study_uid, pixel_spacing=pixel_spacing,
                         slice_thickness=slice_thickness, z_top_mm=z_top_mm, origin_xy_mm=origin_xy_mm,
                         transfer_syntax=registry.TS_EXPLICIT_LE, series_uid=series_uid, modality="CT")
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        for keyword, value in common.items():
            setattr(ds, keyword, value)
        ds.SeriesNumber = number
        ds.SeriesDescription = DESCRIPTIONS[role]
        ds.ImageType = list(IMAGE_TYPES[role])
        if role in KERNELS or role in ("thick", "derived"):
            ds.ConvolutionKernel = KERNELS.get(role, KERNELS["bone"])
        if orientation is not None:
            o = orientation[k] if isinstance(orientation[0], (tuple, list)) else orientation
            ds.ImageOrientationPatient = [f"{v:g}" for v in o]
        if positions is not None:
            ds.ImagePositionPatient = [f"{v:.3f}" for v in positions[k]]
        with atomic_path(folder / f"IM{int(ds.InstanceNumber):05d}") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        path.unlink()


def _write_dose_report(path: Path, study_uid: str, series_uid: str, common: dict[str, str]) -> None:
    """An X-Ray Radiation Dose SR: an object of the study without pixels, as scanners send with every CT."""
    sop = generate_uid(entropy_srcs=[series_uid, "1"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = registry.TS_EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = XRayRadiationDoseSRStorage
    ds.SOPInstanceUID = sop
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    ds.Modality = "SR"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 99
    ds.SeriesDescription = DESCRIPTIONS["sr"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = DOSE_REPORT_CODE
    ds.ConceptNameCodeSequence = DicomSequence([code])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def _write_fileset(tree: Path, out: Path) -> None:
    """Copy every file of the tree into a DICOM File-set with its DICOMDIR at `out` (pydicom's FileSet)."""
    fs = FileSet()
    for folder, _dirs, names in os.walk(tree):
        for name in sorted(names):
            fs.add(Path(folder) / name)
    fs.write(out)


def _write_zip(tree: Path, out: Path) -> None:
    """Zip the tree (paths relative to it) into `out`, atomically."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, _dirs, names in os.walk(tree):
            for name in sorted(names):
                file = Path(folder) / name
                zf.write(file, file.relative_to(tree).as_posix())

