"""Prediction inside `spinefrac serve`: the model folder loaded once, one study at a time into the output folder.

The output folder gets what `spinefrac predict` writes (boxes.csv, slices.csv, errors.csv, predictions.csv,
submission.csv, evidence.csv, features.csv, worklist.csv, report/, overlays/), over every study the node has
predicted into it, plus the SR and SC results of each study under dicom/ (spinefrac.dicom_out).

A study's own results do not wait for those tables: its detections are aggregated alone in a staging folder
(OUT/.serve-stage/<uid>/, the study's parts linked in), its SR and SC written from there. The tables, predictions
and report over every study (`refresh`) cost about 30 ms per study already in OUT, so they are rebuilt once the
studies waiting have been sent, and when the node stops; OUT/.serve-tables-stale marks them out of date meanwhile
(also across a restart).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from data_prep.errors import AllStudiesFailedError, InputError
from data_prep.runs.resume import SettingsChangedError
from data_prep.safe_paths import inside, safe_name

log = logging.getLogger("spinefrac")

DICOM_DIR = "dicom"
STAGE_DIR = ".serve-stage"
STALE_MARKER = ".serve-tables-stale"
SERVE_MODULES = ("pynetdicom", "highdicom")
"""What the node needs beyond the core install (the `dicom` extra)."""


class StudyPredictor:
    """The detector, locator, classifiers and aggregator of a model folder, loaded once; predicts one study."""

    def __init__(self, model_dir: str | os.PathLike, out: str | os.PathLike, *, workers: int = 2,
                 device: str | None = None) -> None:
        from aggregation.model import StudyAggregator
        from detector.detect import StudyRunner
        from spinefrac.model_folder import open_model
        from spinefrac.ray_runner import runner_kwargs

        self.write_dicom = require_dicom_out()      # a missing extra is named before any model loads
        self.out = Path(out)
        self.model = open_model(model_dir)
        self.aggregator = StudyAggregator.load(self.model.root / "aggregator")
        self.runner = StudyRunner(self.out, **runner_kwargs(self.model, labels=None, workers=workers, device=device))
        from data_prep.runs.artifacts import remove_stale_temps
        from detector.detect_outputs import STUDY_DIRS

        try:
            self.runner.markers.plan(self.studies(), overwrite=False)
            remove_stale_temps(self.out, STUDY_DIRS)      # the node holds paths.out's lock
        except SettingsChangedError as exc:    # never mix two models' results in one output folder
            raise InputError(self.out, f"paths.out holds studies predicted with another model or other settings "
                                       f"({exc.reason.split('. Results')[0]}); choose a new paths.out") from None

    def studies(self) -> list[str]:
        """Every study predicted into the output folder: finished (done markers) or failed (failure records)."""
        from detector.detect_outputs import detected_studies

        return detected_studies(self.out)

    def predict(self, study_dir: Path) -> bool:
        """Detect one study folder and aggregate it alone (staged for its DICOM results); True if it finished."""
        outcome = self.runner.run(choose_series(study_dir))
        (self.out / STALE_MARKER).touch()          # OUT's tables lack this study until `refresh`
        if outcome.finished:
            self._stage(outcome.uid)
        return outcome.finished

    def refresh(self) -> bool:
        """Rebuild OUT's tables, predictions and report over every study when a study came in since; True if so."""
        from detector.detect_outputs import rebuild_outputs
        from spinefrac.results import aggregate_detections

        stale = self.out / STALE_MARKER
        if not stale.exists():
            return False
        t0 = time.perf_counter()
        rebuild_outputs(self.out, config=self.runner.config, extra=self.runner.describe())
        with contextlib.suppress(AllStudiesFailedError):   # every study so far failed: the tables hold the prior
            aggregate_detections(self.out, model=self.model, aggregator=self.aggregator, uids=self.studies(),
                                 test=None, started=t0, extra={"serve": {"refreshed": True}})
        stale.unlink(missing_ok=True)
        log.info("serve: tables, predictions and report of %d studies rebuilt in %.1f s", len(self.studies()),
                 time.perf_counter() - t0)
        return True

    def _stage(self, uid: str) -> Path:
        """Aggregate one finished study alone in OUT/.serve-stage/<uid>/ (its parts and overlays linked in)."""
        from detector.detect_outputs import (
            BOXES_SUFFIX,
            DONE_DIR,
            LEVEL_BOXES_SUFFIX,
            OVERLAYS_DIR,
            PARTS_DIR,
            SERIES_SUFFIX,
            SLICES_SUFFIX,
            VERTEBRAE_SUFFIX,
            overlay_dir,
            rebuild_outputs,
        )
        from spinefrac.results import aggregate_detections

        stage = self._stage_dir(uid)
        shutil.rmtree(stage, ignore_errors=True)
        for sub in (DONE_DIR, PARTS_DIR, OVERLAYS_DIR):
            (stage / sub).mkdir(parents=True)
        markers = self.runner.markers
        for suffix in (BOXES_SUFFIX, SLICES_SUFFIX, LEVEL_BOXES_SUFFIX, VERTEBRAE_SUFFIX, SERIES_SUFFIX):
            if markers.part(uid, suffix).is_file():
                _link(markers.part(uid, suffix), stage / PARTS_DIR / markers.part(uid, suffix).name)
        _link(markers.marker(uid), stage / DONE_DIR / markers.marker(uid).name)
        overlays = overlay_dir(self.out, uid)
        if overlays.is_dir():
            overlay_dir(stage, uid).symlink_to(overlays.absolute(), target_is_directory=True)
        rebuild_outputs(stage, config=self.runner.config, extra=self.runner.describe())
        aggregate_detections(stage, model=self.model, aggregator=self.aggregator, uids=[uid], test=None,
                             started=time.perf_counter(), extra={"serve": {"staged": uid}}, report=False)
        return stage

    def _stage_dir(self, uid: str) -> Path:
        return inside(self.out / STAGE_DIR, safe_name(uid), source=f"study {uid!r}")

    def failure(self, uid: str) -> str:
        """The recorded reason a study failed in detect (errors/<uid>.json), or a placeholder."""
        from detector.detect_outputs import error_record

        try:
            record = json.loads(error_record(self.out, uid).read_text(encoding="utf-8"))
            return f"{record.get('stage')}: {record.get('error')}"
        except (OSError, ValueError):
            return "detect failed (no failure record)"

    def write_results(self, uid: str) -> list[Path]:
        """Write the study's SR and SC into OUT/dicom/ from its staged predictions; return the files."""
        stage = self._stage_dir(uid)
        if not (stage / "predictions.csv").is_file():     # staged before a restart, or never: stage it now
            stage = self._stage(uid)
        files = self.write_dicom(stage, self.out / DICOM_DIR, studies=[uid], model_dir=self.model.root,
                                 progress=False)
        shutil.rmtree(stage, ignore_errors=True)
        return [Path(p) for p in (files or {}).get(uid, [])]


def _link(source: Path, target: Path) -> None:
    """Hard-link a file (a copy across file systems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def choose_series(study_dir: Path) -> Any:
    """The spool folder of one study as detect reads it: the series chosen by the study finder's rules (CT, axial,
    original, bone kernel, thinnest complete stack), the others logged; the folder itself when it holds no study."""
    from data_prep.dicom.study_finder import search_dicom

    found = [s for s in search_dicom(study_dir).studies if safe_name(s.key) == study_dir.name]
    if len(found) != 1:
        return study_dir                # no DICOM study in it: detect records the failure naming the folder
    return found[0]


def require_dicom_out() -> Any:
    """Return spinefrac.dicom_out.write_dicom_results, or raise MissingExtraError naming the extra to install."""
    from spinefrac.dicom_out.writer import require_dicom_extra, write_dicom_results

    require_dicom_extra(SERVE_MODULES, needs="spinefrac serve needs")
    return write_dicom_results
