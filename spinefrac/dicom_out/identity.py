"""Who made the results (the device and algorithm named in them) and the source header they copy from."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from spinefrac import __version__

NAME = "spinefrac"
MANUFACTURER = "spinefrac (research software)"
MAX_LO = 64
"""Characters of a DICOM LO value (model name, algorithm parameters)."""
TYPE2_SOURCE_KEYWORDS: tuple[str, ...] = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName")
"""Type 2 patient/study attributes the results must hold: copied from the source, empty when it has none."""


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


def reference_header(header: Dataset) -> Dataset:
    """A copy of the source header with every Type 2 patient/study attribute present (empty when absent)."""
    ref = copy.deepcopy(header)
    for keyword in TYPE2_SOURCE_KEYWORDS:
        if keyword not in ref:
            setattr(ref, keyword, None)
    return ref
