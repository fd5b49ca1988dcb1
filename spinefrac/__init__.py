"""spinefrac: cervical-spine fracture detection on CT (RSNA 2022 layout)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spinefrac")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
