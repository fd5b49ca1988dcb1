"""The Comprehensive 3D SR of one study: a TID 1500 Measurement Report of fracture findings (highdicom).

Content (docs/contracts.md "DICOM results"), in this order:
- one measurement group (TID 1501) per level C1..C7: finding type Fracture, finding site the vertebra, the level's
  probability (NUM "Probability", unit UCUM "1");
- one group for the patient: finding site Cervical spine, patient_overall as a probability and, with an operating
  point, the threshold (NUM "Threshold Value") and the flag (Finding = Positive / Negative);
- one planar-ROI group (TID 1410) per reported box: a closed POLYLINE of the box's corners in the source image's
  pixel coordinates (column, row; 0,0 = the upper-left corner of the upper-left pixel), SELECTED FROM the source
  slice (its SOP class and SOPInstanceUID), finding site its level when known, its detector score (NUM "Score").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from highdicom import UID
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from data_prep.runs import registry
from spinefrac.dicom_out import codes as sf_codes
from spinefrac.dicom_out.identity import Identity
from spinefrac.dicom_out.inputs import SOP_UID_COL, StudyInputs

SR_SERIES_NUMBER = 9901
"""SeriesNumber of the SR series (high, so it sorts after the scanner's series)."""
SR_DESCRIPTION = "spinefrac fracture findings (research use, not for diagnosis)"
PATIENT_TRACKING = "patient_overall"


def build_sr(study: StudyInputs, reference: Dataset, identity: Identity, *, threshold: float | None) -> Dataset:
    """Return the study's Comprehensive 3D SR; `reference` is the source header with the patient/study modules."""
    algorithm = AlgorithmIdentification(name=identity.name, version=identity.version,
                                        parameters=list(identity.parameters) or None)
    groups: list = [_level_group(level, study.probabilities[level], algorithm) for level in registry.LEVELS]
    groups.append(_patient_group(study.probabilities[registry.PATIENT], threshold, algorithm))
    groups.extend(_box_group(rank, box, study, algorithm)
                  for rank, box in enumerate(study.boxes.itertuples(index=False), start=1))
    device = DeviceObserverIdentifyingAttributes(uid=UID(), name=identity.name, manufacturer_name=identity.manufacturer,
                                                 model_name=identity.model_name)
    context = ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = MeasurementReport(observation_context=context, procedure_reported=sf_codes.IMAGING_PROCEDURE,
                               imaging_measurements=groups, referenced_images=[reference])
    sr = Comprehensive3DSR(evidence=[reference, *_evidence(study)], content=report[0],
                           series_instance_uid=UID(), series_number=SR_SERIES_NUMBER, sop_instance_uid=UID(),
                           instance_number=1, manufacturer=identity.manufacturer, is_complete=True)
    sr.SeriesDescription = SR_DESCRIPTION
    sr.SoftwareVersions = identity.version
    return sr


def _probability(value: float) -> Measurement:
    return Measurement(name=sf_codes.PROBABILITY, value=float(value), unit=sf_codes.NO_UNITS)


def _level_group(level: str, probability: float, algorithm: AlgorithmIdentification
                 ) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: fracture of one vertebra and its probability."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=UID(), identifier=level), finding_type=sf_codes.FRACTURE,
        algorithm_id=algorithm, finding_sites=[FindingSite(sf_codes.VERTEBRA_CODES[level])],
        measurements=[_probability(probability)])


def _patient_group(probability: float, threshold: float | None, algorithm: AlgorithmIdentification
                   ) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: a fracture anywhere in the cervical spine; with a threshold, flagged or not."""
    measurements = [_probability(probability)]
    evaluations = None
    if threshold is not None:
        measurements.append(Measurement(name=sf_codes.THRESHOLD_VALUE, value=float(threshold),
                                        unit=sf_codes.NO_UNITS))
        flag = sf_codes.FLAGGED if probability >= threshold else sf_codes.NOT_FLAGGED
        evaluations = [QualitativeEvaluation(name=sf_codes.FLAG, value=flag)]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=UID(), identifier=PATIENT_TRACKING),
        finding_type=sf_codes.FRACTURE, algorithm_id=algorithm, finding_sites=[FindingSite(sf_codes.CERVICAL_SPINE)],
        measurements=measurements, qualitative_evaluations=evaluations)


def box_polyline(x: float, y: float, width: float, height: float) -> np.ndarray:
    """The closed POLYLINE (5 x 2, column/row) of a box: upper-left, upper-right, lower-right, lower-left, upper-left."""
    x0, y0, x1, y1 = float(x), float(y), float(x) + float(width), float(y) + float(height)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _box_group(rank: int, box: tuple, study: StudyInputs, algorithm: AlgorithmIdentification
               ) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: one box as an image region on its source slice, with its level and detector score."""
    row = box._asdict()  # type: ignore[attr-defined]
    region = ImageRegion(graphic_type=GraphicTypeValues.POLYLINE,
                         graphic_data=box_polyline(row["x"], row["y"], row["width"], row["height"]),
                         source_image=SourceImageForRegion(referenced_sop_class_uid=study.source.sop_class_uid,
                                                           referenced_sop_instance_uid=row[SOP_UID_COL]))
    level = row["level"]
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=UID(), identifier=f"box {rank}, slice_index {row['slice_index']}"),
        referenced_region=region, finding_type=sf_codes.FRACTURE, algorithm_id=algorithm,
        finding_sites=[FindingSite(sf_codes.VERTEBRA_CODES[level])] if level else None,
        measurements=[Measurement(name=sf_codes.DETECTION_SCORE, value=float(row["score"]),
                                  unit=sf_codes.NO_UNITS)])


def _evidence(study: StudyInputs) -> list[Dataset]:
    """The source instances the boxes reference (UIDs only: the SR's evidence sequence needs no more)."""
    out = []
    for uid in pd.unique(study.boxes[SOP_UID_COL]):
        ds = Dataset()
        ds.StudyInstanceUID = study.source.dicom_study_uid
        ds.SeriesInstanceUID = study.source.series_uid
        ds.SOPClassUID = study.source.sop_class_uid
        ds.SOPInstanceUID = str(uid)
        out.append(ds)
    return out
