"""The Secondary Capture series of one study: one RGB SC image per top-slice overlay PNG (highdicom).

Each image is the PNG as detect drew it (boxes, levels, scores burnt in), 8 bits per channel, in a new series whose
description says it is spinefrac's overlay, not for diagnosis alone; it names its source slice in
SourceImageSequence and copies the patient and study modules from the source header.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from highdicom import UID
from highdicom.sc import SCImage
from pydicom.dataset import Dataset

from data_prep.errors import InputError
from spinefrac.dicom_out.identity import Identity
from spinefrac.dicom_out.inputs import Overlay

SC_SERIES_NUMBER = 9902
"""SeriesNumber of the SC series (after the SR's 9901)."""
SC_DESCRIPTION = "spinefrac overlay - research, not for diagnosis alone"
BITS_ALLOCATED = 8
BODY_PART = "CSPINE"
"""BodyPartExamined when the source has none: the PS3.16 Annex L defined term for the cervical spine."""
AXIS_LETTERS: tuple[tuple[str, str], ...] = (("L", "R"), ("P", "A"), ("H", "F"))
"""PatientOrientation letter of the +/- direction of each patient axis x, y, z (DICOM LPS)."""
AXIAL_ORIENTATION = ("L", "P")
"""Used when the source has no ImageOrientationPatient (spinefrac reads such studies as axial)."""


def patient_orientation(header: Dataset) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) of the source slice: each vector's main axis."""
    iop = header.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return AXIAL_ORIENTATION
    letters = []
    for vector in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(AXIS_LETTERS[axis][0 if vector[axis] > 0 else 1])
    return letters[0], letters[1]


def read_overlay(overlay: Overlay, key: str) -> np.ndarray:
    """The overlay PNG as RGB uint8 (rows, cols, 3); InputError naming the file and the study when unreadable."""
    image = cv2.imread(str(overlay.path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(overlay.path, f"study {key}: not a readable PNG image (overlay of the secondary capture)")
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def build_sc(overlay: Overlay, pixels: np.ndarray, reference: Dataset, identity: Identity, *, series_uid: str,
             sop_class_uid: str, instance_number: int) -> Dataset:
    """Return one SC image of an overlay, in series `series_uid`, patient and study modules from `reference`."""
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=BITS_ALLOCATED,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=UID(), instance_number=instance_number, manufacturer=identity.manufacturer,
        patient_orientation=patient_orientation(reference))
    sc.copy_patient_and_study_information(reference)
    sc.SeriesDescription = SC_DESCRIPTION
    sc.SoftwareVersions = identity.version
    sc.BurnedInAnnotation = "YES"
    # General Series: Body Part Examined tells a validator the part is unpaired, so Type 2C Laterality stays absent
    sc.BodyPartExamined = reference.get("BodyPartExamined") or BODY_PART
    if reference.get("Laterality"):
        sc.Laterality = reference.Laterality
    sc.ImageComments = (f"spinefrac overlay {overlay.rank} of slice {overlay.slice_number}: predicted fracture boxes "
                        "labelled with level and score; research software, not for diagnosis alone")
    sc.DerivationDescription = f"detector boxes drawn on source slice {overlay.slice_number} ({Path(overlay.path).name})"
    if overlay.sop_instance_uid:
        source = Dataset()
        source.ReferencedSOPClassUID = sop_class_uid
        source.ReferencedSOPInstanceUID = overlay.sop_instance_uid
        sc.SourceImageSequence = [source]
    return sc
