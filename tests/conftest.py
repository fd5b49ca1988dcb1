"""Shared fixtures. Tests write only under tmp_path; real reference files are optional."""

from __future__ import annotations

import os

import pytest

# Keep Ultralytics and matplotlib from writing under $HOME or reaching the network during tests.
os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture
def realdata():
    """Return a function name -> Path of a real file in ../shared/realdata, skipping when absent."""
    from data_prep.realdata import realdata_file

    def get(name: str):
        path = realdata_file(name)
        if path is None:
            pytest.skip(f"real reference file {name} not present (../shared/realdata)")
        return path

    return get
