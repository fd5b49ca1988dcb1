"""Prediction inside `spinefrac serve`: the model folder loaded once, one study at a time into the output folder.

The output folder gets what `spinefrac predict` writes (boxes.csv, slices.csv, errors.csv, predictions.csv,
submission.csv, evidence.csv, features.csv, worklist.csv, report/, overlays/), over every study the node has
predicted into it, plus the SR and SC results of each study under dicom/ (spinefrac.dicom_out).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from data_prep.errors import AllStudiesFailedError, InputError
from data_prep.resume import SettingsChangedError

log = logging.getLogger("spinefrac")

DICOM_DIR = "dicom"
SERVE_MODULES = ("pynetdicom", "highdicom")
"""What the node needs beyond the core install (the `dicom` extra)."""


class StudyPredictor:
    """The detector, locator, classifiers and aggregator of a model folder, loaded once; predicts one study."""

    def __init__(self, model_dir: str | os.PathLike, out: str | os.PathLike, *, workers: int = 2,
                 device: str | None = None) -> None:
        from aggregation.model import StudyAggregator
        from detector.detect import StudyRunner
        from spinefrac.pipeline import open_model
        from spinefrac.ray_runner import runner_kwargs

        self.write_dicom = require_dicom_out()      # a missing extra is named before any model loads
        self.out = Path(out)
        self.model = open_model(model_dir)
        self.aggregator = StudyAggregator.load(self.model.root / "aggregator")
        self.runner = StudyRunner(self.out, **runner_kwargs(self.model, labels=None, workers=workers, device=device))
        try:
            self.runner.markers.plan(self.studies(), overwrite=False)
        except SettingsChangedError as exc:    # never mix two models' results in one output folder
            raise InputError(self.out, f"paths.out holds studies predicted with another model or other settings "
                                       f"({exc.reason.split('. Results')[0]}); choose a new paths.out") from None

    def studies(self) -> list[str]:
        """Every study predicted into the output folder: finished (done markers) or failed (failure records)."""
        from detector.detect import ERRORS_DIR

        done = set(self.runner.markers.done_uids())
        failed = {p.stem for p in (self.out / ERRORS_DIR).glob("*.json")} if (self.out / ERRORS_DIR).is_dir() else set()
        return sorted(done | failed)

    def predict(self, study_dir: Path) -> bool:
        """Detect one study folder, then rebuild the tables, predictions and report of every study; True if it finished."""
        from detector.detect import rebuild_outputs
        from spinefrac.pipeline import aggregate_detections

        t0 = time.perf_counter()
        outcome = self.runner.run(choose_series(study_dir))
        rebuild_outputs(self.out, config=self.runner.config, extra=self.runner.describe())
        with contextlib.suppress(AllStudiesFailedError):   # every study so far failed: the tables hold the prior
            aggregate_detections(self.out, model=self.model, aggregator=self.aggregator, uids=self.studies(),
                                 test=None, started=t0, extra={"serve": {"last_study": study_dir.name}})
        return outcome.finished

    def failure(self, uid: str) -> str:
        """The recorded reason a study failed in detect (errors/<uid>.json), or a placeholder."""
        from detector.detect import ERRORS_DIR

        try:
            record = json.loads((self.out / ERRORS_DIR / f"{uid}.json").read_text(encoding="utf-8"))
            return f"{record.get('stage')}: {record.get('error')}"
        except (OSError, ValueError):
            return "detect failed (no failure record)"

    def write_results(self, uid: str) -> list[Path]:
        """Write the study's SR and SC into OUT/dicom/; return the files."""
        files = self.write_dicom(self.out, self.out / DICOM_DIR, studies=[uid], model_dir=self.model.root,
                                 progress=False)
        return [Path(p) for p in (files or {}).get(uid, [])]


def choose_series(study_dir: Path) -> Any:
    """The spool folder of one study as detect reads it: the series chosen by the study finder's rules (CT, axial,
    original, bone kernel, thinnest complete stack), the others logged; the folder itself when it holds no study."""
    from data_prep.study_finder import search_dicom

    found = [s for s in search_dicom(study_dir).studies if s.key == study_dir.name]
    if len(found) != 1:
        return study_dir                # no DICOM study in it: detect records the failure naming the folder
    return found[0]


def require_dicom_out() -> Any:
    """Return spinefrac.dicom_out.write_dicom_results, or raise MissingExtraError naming the extra to install."""
    from spinefrac.dicom_out.writer import INSTALL_HINT, MissingExtraError, write_dicom_results

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"spinefrac serve needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}")
    return write_dicom_results
