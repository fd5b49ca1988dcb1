"""Exceptions that name the file and the problem; the CLI turns them into a message and an exit code."""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_ERROR = 2          # bad input, config or model folder; an OS error: nothing usable was written
EXIT_ALL_FAILED = 3     # every study failed: predictions.csv and submission.csv hold the training prior

OS_ERROR_HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: choose a folder you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write, or fix its permissions",
}


class SpinefracError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_code: int = EXIT_ERROR


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


class AllStudiesFailedError(SpinefracError):
    """Every study of a prediction failed; the outputs were written with the training prior (exit status 3)."""

    exit_code = EXIT_ALL_FAILED


def os_error_message(exc: OSError) -> str:
    """Return one line for an OS error: the path, the system's reason and what to do."""
    reason = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}: "
    hint = OS_ERROR_HINTS.get(exc.errno or 0)
    return f"{where}{reason}" + (f" ({hint})" if hint else "")
