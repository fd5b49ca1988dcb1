"""Results as DICOM (issue 16): per finished study a Comprehensive 3D SR (TID 1500) and a Secondary Capture series.

Reads only the documented files of a prediction folder (docs/contracts.md "DICOM results (`--dicom-out`)");
needs the optional extra `spinefrac[dicom]` (highdicom), imported only when results are written.
"""

from spinefrac.dicom_out.writer import (
    MissingExtraError,
    require_dicom_extra,
    study_folder,
    write_dicom_results,
)

__all__ = ["MissingExtraError", "require_dicom_extra", "study_folder", "write_dicom_results"]
