"""The coded concepts of spinefrac's DICOM results, each with where in the DICOM standard it comes from.

Codes are pydicom `Code`s (scheme designator, value, meaning) so this module imports without highdicom. Sources:
PS3.16 (DICOM Content Mapping Resource) context groups, as shipped in pydicom's `pydicom.sr` concept tables
(`pydicom.sr.codedict.codes`), and SNOMED CT concept 72704001 from SNOMED International's fracture templates.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

SCT = "SCT"
DCM = "DCM"
UCUM = "UCUM"

VERTEBRA_CODES: dict[str, Code] = {
    "C1": Code("14806007", SCT, "C1 vertebra"),
    "C2": Code("39976000", SCT, "C2 vertebra"),
    "C3": Code("113205007", SCT, "C3 vertebra"),
    "C4": Code("5329002", SCT, "C4 vertebra"),
    "C5": Code("36978003", SCT, "C5 vertebra"),
    "C6": Code("36054005", SCT, "C6 vertebra"),
    "C7": Code("87391001", SCT, "C7 vertebra"),
}
"""Finding site of each level: SNOMED CT, PS3.16 CID 7603 "Vertebra" (also CID 7602 "Vertebral Anatomic
Structure", CID 7151 "Segmentation Property Types")."""

CERVICAL_SPINE = Code("122494005", SCT, "Cervical spine")
"""Finding site of the patient-level result: PS3.16 CID 4030 "CT, MR and PET Anatomy Imaged" (and CID 4, 7304)."""

FRACTURE = Code("72704001", SCT, "Fracture")
"""Finding type: SNOMED CT 72704001 |Fracture (morphologic abnormality)|, the morphology of every SNOMED CT
"Fracture of [bone structure]" disorder; with the finding site it reads "fracture of C3 vertebra"."""

PROBABILITY = Code("122157", DCM, "Probability")
"""Concept name of a fracture probability (C1..C7, patient_overall): PS3.16 Annex D, DCM 122157."""

DETECTION_SCORE = Code("246262008", SCT, "Score")
"""Concept name of a box's detector score (YOLO confidence, not a calibrated probability): SNOMED CT 246262008."""

THRESHOLD_VALUE = Code("122411", DCM, "Threshold Value")
"""The operating threshold patient_overall is compared with: PS3.16 Annex D, DCM 122411."""

NO_UNITS = Code("1", UCUM, "no units")
"""Unit of probabilities, scores and thresholds (dimensionless, 0..1): UCUM "1", PS3.16 CID 7181."""

FLAG = Code("121052", DCM, "Presence of property")
"""Name of the qualitative evaluation that says flagged / not flagged at the operating threshold (PS3.16 Annex D;
not "Finding", which TID 1501 uses for the finding type)."""

FLAGGED = Code("121053", DCM, "Present")
NOT_FLAGGED = Code("121054", DCM, "Absent")
"""Values of the flag (PS3.16 Annex D): Present when patient_overall >= the threshold, Absent below it."""

IMAGING_PROCEDURE = Code("363679005", SCT, "Imaging procedure")
"""Procedure reported of the TID 1500 report: PS3.16 CID 100 "Quantitative Diagnostic Imaging Procedures"."""
