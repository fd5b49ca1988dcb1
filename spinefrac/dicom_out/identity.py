"""Who made the results (the device and algorithm named in them) and the source header they copy from."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from spinefrac import __version__

log = logging.getLogger("spinefrac")

NAME = "spinefrac"
MANUFACTURER = "spinefrac (research software)"
MAX_LO = 64
"""Characters of a DICOM LO value (model name, algorithm parameters)."""
TYPE2_SOURCE_KEYWORDS: tuple[str, ...] = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName")
"""Type 2 patient/study attributes the results must hold: copied from the source, empty when it has none."""
CT_SOP_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
OTHER_MODALITY = "OT"
"""Modality of a source without one whose SOP class is not CT (PS3.3 C.7.3.1.1.1 "Other")."""
PATIENT_SEX_VALUES: tuple[str, ...] = ("M", "F", "O")
"""The values PS3.3 C.7.1.1 allows for PatientSex."""


@dataclass(frozen=True)
class Identity:
    """The observer device and algorithm of the SR (and Manufacturer of both objects)."""

    name: str
    version: str
    manufacturer: str
    model_name: str | None
    parameters: tuple[str, ...]


def make_identity(model_dir: Path | None) -> Identity:
    """spinefrac and its version; the model folder's name when one is known."""
    model = Path(model_dir).resolve().name[:MAX_LO] if model_dir is not None else None
    parameters = (f"model {model}"[:MAX_LO],) if model else ()
    return Identity(NAME, __version__, MANUFACTURER, model, parameters)


def reference_header(header: Dataset, sop_class_uid: str) -> Dataset:
    """A copy of the source header with every Type 2 patient/study attribute present (empty when absent), a
    PatientSex DICOM allows (M, F, O; anything else emptied, logged), a SOPClassUID (series.csv's if absent) and a
    Modality (the RSNA files have none: CT for a CT SOP class, else OT) for the SR's image library entry."""
    ref = copy.deepcopy(header)
    for keyword in TYPE2_SOURCE_KEYWORDS:
        if keyword not in ref:
            setattr(ref, keyword, None)
    sex = str(ref.PatientSex or "")
    if sex and sex not in PATIENT_SEX_VALUES:
        log.warning("%s: PatientSex %r is not one of %s: the results leave it empty",
                    getattr(header, "filename", "source header"), sex, "/".join(PATIENT_SEX_VALUES))
        ref.PatientSex = None
    if "SOPClassUID" not in ref:
        ref.SOPClassUID = sop_class_uid
    if not ref.get("Modality"):
        ref.Modality = "CT" if str(ref.SOPClassUID) in CT_SOP_CLASSES else OTHER_MODALITY
    return ref
