"""Studies on disk: reading DICOM series (headers, pixels, geometry), finding studies in folders, read-ahead, writing DICOM, inspecting inputs, segmentations."""
