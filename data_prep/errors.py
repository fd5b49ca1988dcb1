"""Exceptions that name the file and the problem; the CLI turns them into a message and exit code 2."""

from __future__ import annotations

from pathlib import Path


class SpinefracError(Exception):
    """Base of every error the CLI reports without a traceback."""


class InputError(SpinefracError):
    """An input file or folder that is missing or not what the stage expects."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = Path(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)

    def __reduce__(self):
        """Pickle with (path, reason) so the error survives a process pool."""
        return (type(self), (self.path, self.reason))


class DicomReadError(InputError):
    """A DICOM file or study that cannot be read as a CT slice/volume."""


class MissingDecoderError(DicomReadError):
    """Compressed pixel data and no installed decoder; the message names the packages to add."""


class GeometryError(InputError):
    """Slices or masks whose geometry does not fit together (size, orientation, spacing, positions)."""
