"""write_dicom_results: a prediction folder's finished studies as DICOM (an SR and an SC series per study).

OUT/<slug>/SR.dcm, SC_01.dcm, SC_02.dcm, ... (slug = data_prep.safe_paths.safe_name of the key, as in the review
report). Each study is written into OUT/.<slug>.tmp-<pid>/ and renamed into place, so a rerun replaces the study's
folder whole and a failed write leaves the old one. Nothing is written anywhere else.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset
from tqdm import tqdm

from data_prep.errors import InputError, SpinefracError
from data_prep.runs.artifacts import replace_folder
from data_prep.safe_paths import inside, safe_name
from spinefrac.dicom_out.identity import Identity, make_identity, reference_header
from spinefrac.dicom_out.inputs import PredictionFolder, StudyInputs, read_prediction_folder, study_inputs
from spinefrac.report.worklist import model_dir_of, operating_point

log = logging.getLogger("spinefrac")

SR_FILE = "SR.dcm"
SC_FILE = "SC_{:02d}.dcm"
INSTALL_HINT = "pip install 'spinefrac[dicom]'"
REQUIRED_MODULES = ("highdicom",)
PERSON_NAME_WARNING = ".*unlikely to represent the intended person name"
"""highdicom warns about a one-component PatientName; the results copy the source's name as it is."""


class MissingExtraError(SpinefracError):
    """An optional dependency is not installed; the message names the extra to install."""


def require_dicom_extra(modules: Sequence[str] = REQUIRED_MODULES, *, needs: str = "DICOM results need") -> None:
    """Raise MissingExtraError naming `pip install 'spinefrac[dicom]'` when one of `modules` is not importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{needs} {', '.join(missing)}, which is not installed: {INSTALL_HINT}")


def study_folder(out_dir: str | os.PathLike, key: str) -> Path:
    """The folder of a study's DICOM results under OUT: OUT/<safe_name(key)> (never outside OUT)."""
    return inside(out_dir, safe_name(key), source=f"study {key!r}")


def write_dicom_results(pred_dir: Path, out_dir: Path, *, studies: Sequence[str] | None = None,
                        model_dir: Path | None = None, progress: bool = True) -> dict[str, list[Path]]:
    """Write a Comprehensive 3D SR and a Secondary Capture series per finished study; return the files per study."""
    require_dicom_extra()
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    folder = read_prediction_folder(pred_dir, studies)
    keys = list(folder.predictions.index) if studies is None else list(dict.fromkeys(studies))
    model_dir = Path(model_dir) if model_dir is not None else model_dir_of(pred_dir)
    point = operating_point(model_dir)
    threshold = None if point.record is None else float(point.record["threshold"])
    if threshold is None:
        log.info("DICOM results without a flag: %s", point.reason)
    inputs = _check_studies(folder, keys, out_dir)
    identity = make_identity(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Path]] = {}
    seconds = []
    for key in tqdm(keys, desc="dicom-out", unit="study", disable=not progress):
        study = inputs.get(key)
        if study is None:
            results[key] = _drop_failed(out_dir, key)
            continue
        t0 = time.perf_counter()
        results[key] = _write_study(study, out_dir, identity, threshold)
        seconds.append(time.perf_counter() - t0)
        log.info("study %s: %d DICOM file(s) in %s (%.2f s)", key, len(results[key]), study_folder(out_dir, key),
                 seconds[-1])
    return results


def _check_studies(folder: PredictionFolder, keys: list[str], out_dir: Path) -> dict[str, StudyInputs]:
    """Every finished study's inputs; all problems of all studies raised at once, before anything is written."""
    inputs, problems = {}, []
    for key in keys:
        if folder.failed(key):
            continue
        try:
            study = study_inputs(folder, key)
            _refuse_inside_source(out_dir, study)
            inputs[key] = study
        except InputError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InputError(folder.path, f"{len(problems)} studies cannot be written as DICOM (nothing was written): "
                                      + "; ".join(str(p) for p in problems))
    return inputs


def _refuse_inside_source(out_dir: Path, study: StudyInputs) -> None:
    """Nothing is written into the input: OUT must not lie in the source series' folder."""
    source_dir = study.source.example_file.resolve().parent
    if out_dir.resolve().is_relative_to(source_dir):
        raise InputError(out_dir, f"study {study.key}: lies inside the source folder {source_dir}; "
                                  "DICOM results are never written into the input (choose another --out)")


def _drop_failed(out_dir: Path, key: str) -> list[Path]:
    """A failed study gets no DICOM output; results of an earlier run for it are stale and removed."""
    stale = study_folder(out_dir, key)
    if stale.is_dir():
        log.warning("study %s failed: removing its DICOM results of an earlier run (%s)", key, stale)
        shutil.rmtree(stale)
    else:
        log.info("study %s failed: no DICOM output", key)
    return []


def _write_study(study: StudyInputs, out_dir: Path, identity: Identity, threshold: float | None) -> list[Path]:
    """Write the study's SR and SC files into a temp folder, then rename it over OUT/<slug>; return the final paths."""
    final = study_folder(out_dir, study.key)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            names = _write_files(study, tmp, identity, threshold)
        except (ValueError, KeyError, AttributeError) as exc:   # highdicom refuses the source header (a bad date,
            # a SOP class it does not know, ...): the CLI shows one line naming the file; -v shows the traceback
            raise InputError(study.source.example_file, f"study {study.key}: the source header cannot be copied into "
                                                        f"DICOM results: {exc}") from exc
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [final / name for name in names]


def _write_files(study: StudyInputs, folder: Path, identity: Identity, threshold: float | None) -> list[str]:
    """Write SR.dcm and SC_NN.dcm of one study into `folder`; return the file names."""
    from highdicom import UID

    from spinefrac.dicom_out.sc import build_sc, read_overlay
    from spinefrac.dicom_out.sr import build_sr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        reference = reference_header(study.source.header, study.source.sop_class_uid)
        names = [SR_FILE]
        _save(build_sr(study, reference, identity, threshold=threshold), folder / SR_FILE)
        series_uid = UID()
        for number, overlay in enumerate(study.overlays, start=1):
            sc = build_sc(overlay, read_overlay(overlay, study.key), reference, identity, series_uid=series_uid,
                          sop_class_uid=study.source.sop_class_uid, instance_number=number)
            names.append(SC_FILE.format(number))
            _save(sc, folder / names[-1])
    return names


def _save(ds: Dataset, path: Path) -> None:
    """Write one DICOM file (preamble, DICM, file meta)."""
    dcmwrite(path, ds, enforce_file_format=True)
