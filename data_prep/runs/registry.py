"""Names shared by every stage: vertebra levels, target rows, segmentation labels, metric weights."""

from __future__ import annotations

LEVELS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
"""The cervical levels, cranial to caudal; index i is YOLO locator class i."""

PATIENT: str = "patient_overall"
TARGETS: tuple[str, ...] = (*LEVELS, PATIENT)
"""The eight rows of each study in train.csv and in a submission, in competition order."""

STUDY_COL: str = "StudyInstanceUID"
"""Key column of every per-study table (as in the Kaggle CSVs)."""

SEG_LABELS: dict[int, str] = {i + 1: name for i, name in enumerate(LEVELS)} | {
    7 + t: f"T{t}" for t in range(1, 13)
}
"""Segmentation NIfTI label values: 1-7 are C1-C7, 8-19 are T1-T12, 0 is background."""

FRACTURE_CLASS: int = 0
FRACTURE_NAMES: dict[int, str] = {FRACTURE_CLASS: "fracture"}
LOCATOR_NAMES: dict[int, str] = dict(enumerate(LEVELS))

# Competition metric weights (RSNA 2022): vertebra rows 1/2, patient_overall 7/14 (negative/positive).
WEIGHT_LEVEL_NEG: float = 1.0
WEIGHT_LEVEL_POS: float = 2.0
WEIGHT_PATIENT_NEG: float = 7.0
WEIGHT_PATIENT_POS: float = 14.0
PROB_CLIP: float = 1e-15

# DICOM transfer syntaxes met in the real data and written by `spinefrac synth`.
TS_EXPLICIT_LE: str = "1.2.840.10008.1.2.1"
TS_IMPLICIT_LE: str = "1.2.840.10008.1.2"
TS_JPEG_LOSSLESS_SV1: str = "1.2.840.10008.1.2.4.70"
TS_JPEG2000_LOSSLESS: str = "1.2.840.10008.1.2.4.90"
TS_JPEG2000: str = "1.2.840.10008.1.2.4.91"
TS_RLE: str = "1.2.840.10008.1.2.5"


def level_index(name: str) -> int:
    """Return the 0-based index of a level name such as 'C3'."""
    try:
        return LEVELS.index(name)
    except ValueError:
        raise ValueError(f"unknown vertebra level {name!r}; expected one of {', '.join(LEVELS)}") from None


def row_id(study_uid: str, target: str) -> str:
    """Return the Kaggle submission row id `<StudyInstanceUID>_<target>`."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    return f"{study_uid}_{target}"


def split_row_id(rid: str) -> tuple[str, str]:
    """Split a submission row id back into (StudyInstanceUID, target)."""
    for target in TARGETS:
        suffix = "_" + target
        if rid.endswith(suffix):
            return rid[: -len(suffix)], target
    raise ValueError(f"row_id {rid!r} does not end in _C1.._C7 or _patient_overall")
