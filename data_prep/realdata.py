"""Where the optional real reference files live (never part of the project): ../shared/realdata."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SPINEFRAC_REALDATA"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def realdata_dir() -> Path:
    """Return the real-data folder: $SPINEFRAC_REALDATA, else `shared/realdata` beside the checkout."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else _REPO_ROOT.parent / "shared" / "realdata"


def realdata_file(name: str) -> Path | None:
    """Return the path of a real reference file, or None when it is absent on this machine."""
    path = realdata_dir() / name
    return path if path.is_file() else None
