"""Fault injection (issue 13): bad configs, a broken model folder, failed studies and OS faults.

Each case asserts the exit status, that the message names the file, key or study, and, where a
submission is expected, that submission.csv holds every test.csv row with a finite probability in
[0, 1]. The model is the session's tiny trained pipeline (tests/conftest.py `trained_pipeline`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import TINY_SYNTH

from data_prep.errors import MissingDecoderError
from data_prep.runs import artifacts
from data_prep.runs.registry import STUDY_COL, TARGETS
from spinefrac.cli import main

EXIT_ERROR, EXIT_ALL_FAILED = 2, 3
ORPHAN_WAIT_S = 10.0     # a killed owner's decode workers must be gone well within this


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    """Three tiny test studies of this module's own (test_pipeline corrupts the shared test set)."""
    root = tmp_path_factory.mktemp("faults_test_set")
    sets = [f"--set={s}" for s in TINY_SYNTH]
    assert main(["synth", str(root), "--studies", "3", "--seed", "23", "--split", "test", "--no-progress",
                 *sets]) == 0
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Two tiny labelled studies: enough for `spinefrac train` to reach its first write (no model needed)."""
    root = tmp_path_factory.mktemp("faults_small_data")
    sets = [f"--set={s}" for s in TINY_SYNTH]
    assert main(["synth", str(root), "--studies", "2", "--seed", "24", "--no-progress", *sets]) == 0
    return root


@pytest.fixture
def model_copy(trained_pipeline, tmp_path):
    """A copy of the trained model folder (without work/) to tamper with."""
    dst = tmp_path / "model"
    shutil.copytree(trained_pipeline / "model", dst, ignore=shutil.ignore_patterns("work"))
    return dst


def _reseal(model: Path) -> None:
    """Recompute model.json's file manifest, as if the edited file had been written at training."""
    from data_prep.runs.manifest import build_manifest
    from spinefrac.model_folder import MANIFEST_EXCLUDE, MODEL_JSON

    meta = json.loads((model / MODEL_JSON).read_text())
    meta["files"] = build_manifest(model, MANIFEST_EXCLUDE)
    (model / MODEL_JSON).write_text(json.dumps(meta))


def _predict(studies: Path, model: Path, out: Path, *extra: str) -> int:
    return main(["predict", str(studies), "--model", str(model), "--out", str(out), "--no-progress",
                 "--workers", "1", *extra])


def _assert_complete_submission(out: Path, test_csv: Path) -> pd.DataFrame:
    """submission.csv holds exactly test.csv's row_ids, in order, each with a finite probability in [0, 1]."""
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission["row_id"]) == list(pd.read_csv(test_csv)["row_id"])
    values = submission["fractured"].to_numpy(dtype=float)
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    return submission


def _prior(model: Path) -> dict[str, float]:
    return json.loads((model / "prior.json").read_text())


def _error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _refuse_writes_under(monkeypatch, root: Path, code: int) -> None:
    """Make creating files and folders under `root` fail like the OS does (works as root, unlike chmod)."""
    real_open, real_mkdir = os.open, os.mkdir

    def guarded(real):
        def call(path, *args, **kwargs):
            if Path(os.fsdecode(path)).resolve().is_relative_to(root.resolve()):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", guarded(real_open))
    monkeypatch.setattr(os, "mkdir", guarded(real_mkdir))


# ---------------------------------------------------------------- failed studies: a submission whatever happens
@pytest.mark.slow
def test_every_study_fails_still_gives_a_complete_prior_submission(trained_pipeline, test_set, tmp_path,
                                                                    monkeypatch, caplog):
    """No decoder on the machine: every study fails, yet predictions.csv and submission.csv hold the prior."""
    def no_decoder(ts, path):
        raise MissingDecoderError(path, "no decoder for this syntax is installed; install pylibjpeg")

    monkeypatch.setattr("data_prep.dicom.slice_file._choose_plugin", no_decoder)
    monkeypatch.setattr("data_prep.dicom.slice_file.FAST_JPEG_LOSSLESS", ())     # no imagecodecs either
    out = tmp_path / "pred"
    rc = _predict(test_set / "test_images", trained_pipeline / "model", out, "--test-csv", str(test_set / "test.csv"))
    assert rc == EXIT_ALL_FAILED                         # documented in README "Failure handling"
    studies = sorted(p.name for p in (test_set / "test_images").iterdir())
    message = " ".join(_error_lines(caplog))
    assert "every one of the 3 studies failed" in message and "errors.csv" in message
    assert any(uid in message for uid in studies) and "submission.csv" in message
    submission = _assert_complete_submission(out, test_set / "test.csv")
    prior = _prior(trained_pipeline / "model")
    expected = [prior[r.rsplit("_", 1)[1] if not r.endswith("patient_overall") else "patient_overall"]
                for r in submission["row_id"]]
    assert submission["fractured"].tolist() == pytest.approx(expected)
    predictions = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str})
    assert sorted(predictions[STUDY_COL]) == studies and (predictions["failed"] == 1).all()
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert sorted(errors[STUDY_COL]) == studies and errors["error"].str.contains("MissingDecoderError").all()


@pytest.mark.slow
def test_a_test_csv_study_without_a_folder_gets_the_prior(trained_pipeline, test_set, tmp_path, caplog):
    test_csv = tmp_path / "test.csv"
    ghost = "1.2.826.0.1.3680043.99999"
    table = pd.read_csv(test_set / "test.csv")
    extra = pd.DataFrame({"row_id": [f"{ghost}_{t}" for t in TARGETS], STUDY_COL: ghost,
                          "prediction_type": list(TARGETS)})
    pd.concat([table, extra]).to_csv(test_csv, index=False)
    out = tmp_path / "pred"
    caplog.set_level(logging.WARNING)
    assert _predict(test_set / "test_images", trained_pipeline / "model", out, "--test-csv", str(test_csv)) == 0
    assert any(ghost in r.getMessage() and "test.csv" in r.getMessage() for r in caplog.records)
    submission = _assert_complete_submission(out, test_csv).set_index("row_id")
    prior = _prior(trained_pipeline / "model")
    assert [submission.at[f"{ghost}_{t}", "fractured"] for t in TARGETS] == pytest.approx([prior[t] for t in TARGETS])


@pytest.mark.slow
def test_a_bad_test_csv_is_refused_before_any_detection(trained_pipeline, test_set, tmp_path, caplog):
    bad = tmp_path / "test.csv"
    bad.write_text("row_id\nnot-a-row-id\n")
    out = tmp_path / "pred"
    assert _predict(test_set / "test_images", trained_pipeline / "model", out, "--test-csv", str(bad)) == EXIT_ERROR
    assert any(str(bad) in line for line in _error_lines(caplog))
    assert not (out / "boxes.csv").exists() and not (out / "done").exists()     # nothing was detected


# ---------------------------------------------------------------- a tampered model folder
@pytest.mark.slow
@pytest.mark.parametrize(("edit", "named"), [
    (lambda p: {**p, "C3": float("nan")}, "C3"),
    (lambda p: {k: v for k, v in p.items() if k != "patient_overall"}, "patient_overall"),
    (lambda p: {**p, "C1": 1.0}, "C1"),
])
def test_a_bad_prior_is_refused_naming_file_and_target(model_copy, test_set, tmp_path, caplog, edit, named):
    prior = model_copy / "prior.json"
    prior.write_text(json.dumps(edit(json.loads(prior.read_text()))))    # json writes NaN as NaN
    _reseal(model_copy)              # past the manifest check: the prior's own validation must refuse it
    out = tmp_path / "pred"
    assert _predict(test_set / "test_images", model_copy, out, "--test-csv", str(test_set / "test.csv")) == EXIT_ERROR
    assert any("prior.json" in line and named in line for line in _error_lines(caplog))
    assert not (out / "submission.csv").exists()       # never a submission with NaN in it


@pytest.mark.slow
def test_a_bad_choice_in_a_model_folder_config_is_refused(model_copy, test_set, tmp_path, caplog):
    saved = model_copy / "detector.yaml"
    data = yaml.safe_load(saved.read_text())
    data["detect"]["backend"] = "onxx"
    saved.write_text(yaml.safe_dump(data))
    _reseal(model_copy)              # past the manifest check: the config schema must refuse it
    assert _predict(test_set / "test_images", model_copy, tmp_path / "pred") == EXIT_ERROR
    assert any(str(saved) in line and "'detect.backend' = 'onxx'" in line and "'onnx'" in line
               for line in _error_lines(caplog))


# ---------------------------------------------------------------- bad configs fail in the first second
@pytest.mark.parametrize(("stage_set", "named"), [
    ('detector.set=["render.recipe=2.5D"]', "'render.recipe' = '2.5D'"),
    ('aggregation.set=["model.calibration=isotonc"]', "'model.calibration' = 'isotonc'"),
    ('detector.set=["detect.backend=onxx"]', "'detect.backend' = 'onxx'"),
    ('locator.set=["train.epochs=-1"]', "'train.epochs' = -1"),
    ('detector.set=["detect.conf=1.5"]', "'detect.conf' = 1.5"),
])
def test_train_with_a_bad_stage_config_fails_before_any_work(tmp_path, caplog, stage_set, named):
    data = tmp_path / "data"          # not even a dataset: the config is checked first
    out = tmp_path / "model"
    t0 = time.perf_counter()
    assert main(["train", str(data), "--out", str(out), "--set", stage_set, "--no-progress"]) == EXIT_ERROR
    assert time.perf_counter() - t0 < 30                 # seconds, not the hours before the last stage
    assert any(named in line and "--set" in line for line in _error_lines(caplog))
    assert not out.exists()


def test_stage_commands_refuse_out_of_range_values(tmp_path, caplog):
    weights = tmp_path / "best.pt"
    assert main(["train-detector", str(tmp_path / "data.yaml"), "--out", str(tmp_path / "run"),
                 "--epochs", "-1"]) == EXIT_ERROR
    assert main(["detect", str(tmp_path), "--weights", str(weights), "--out", str(tmp_path / "det"),
                 "--conf", "1.5"]) == EXIT_ERROR
    assert main(["prepare-detector", str(tmp_path), "--out", str(tmp_path / "ds"),
                 "--set", "render.recipe=2.5D"]) == EXIT_ERROR
    lines = _error_lines(caplog)
    assert any("'train.epochs' = -1" in line for line in lines)
    assert any("'detect.conf' = 1.5" in line and "less than or equal to 1" in line for line in lines)
    assert any("did you mean '2.5d'" in line for line in lines)
    assert not (tmp_path / "run").exists() and not (tmp_path / "det").exists() and not (tmp_path / "ds").exists()


def test_a_bad_user_config_file_is_named(tmp_path, caplog):
    user = tmp_path / "agg.yaml"
    user.write_text("model:\n  calibration: isotonc\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"aggregation:\n  config: {user}\n")
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--config", str(pipeline)]) \
        == EXIT_ERROR
    assert any(f"{user}: 'model.calibration' = 'isotonc'" in line for line in _error_lines(caplog))


# ---------------------------------------------------------------- OS faults: one line naming the path
def test_read_only_out_is_one_line_naming_the_path(small_data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    _refuse_writes_under(monkeypatch, out, errno.EROFS)   # root ignores chmod; the file system would not
    try:
        rc = main(["train", str(small_data), "--out", str(out), "--no-progress"])
    finally:
        out.chmod(stat.S_IRWXU)
    assert rc == EXIT_ERROR
    lines = _error_lines(caplog)
    assert len(lines) == 1 and f"{out / '.spinefrac.lock'}: Read-only file system" in lines[0]  # its first file
    assert not any(r.exc_info for r in caplog.records)                # no traceback without -v
    assert list(out.iterdir()) == []


def test_permission_denied_with_verbose_adds_the_traceback(small_data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "locked"
    _refuse_writes_under(monkeypatch, out, errno.EACCES)
    rc = main(["train", str(small_data), "--out", str(out), "--no-progress", "-v"])
    assert rc == EXIT_ERROR
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(out) in errors[0].getMessage() and "Permission denied" in errors[0].getMessage()
    assert errors[0].exc_info                                          # -v: the traceback is logged too


@pytest.mark.slow
def test_disk_full_while_writing_names_the_file(trained_pipeline, test_set, tmp_path, monkeypatch, caplog):
    out = tmp_path / "pred"
    real_to_csv = pd.DataFrame.to_csv

    def full_disk(self, path_or_buf=None, *args, **kwargs):
        if path_or_buf is not None and Path(str(path_or_buf)).resolve().is_relative_to(out.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))      # as a write() fails: no file name
        return real_to_csv(self, path_or_buf, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    rc = _predict(test_set / "test_images", trained_pipeline / "model", out, "--test-csv", str(test_set / "test.csv"))
    assert rc == EXIT_ERROR
    lines = _error_lines(caplog)
    assert len(lines) == 1 and str(out) in lines[0] and "No space left on device" in lines[0]
    assert "disk is full" in lines[0]
    assert not list(out.rglob("*.tmp"))                                # no half-written temporary files left


def test_a_failed_atomic_write_names_its_target(tmp_path, monkeypatch):
    target = tmp_path / "boxes.csv"
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(OSError) as exc:
        artifacts.write_csv_atomic(target, pd.DataFrame({"a": [1]}))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- file modes and worker processes
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = [artifacts.write_csv_atomic(tmp_path / "t.csv", pd.DataFrame({"a": [1]})),
                 artifacts.write_json_atomic(tmp_path / "sub" / "m.json", {"a": 1})]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == artifacts.NEW_FILE_MODE & ~umask, path


@pytest.mark.slow
def test_prediction_files_follow_the_umask(trained_pipeline, test_set, tmp_path):
    out = tmp_path / "pred"
    old = os.umask(0o002)
    try:
        rc = _predict(test_set / "test_images", trained_pipeline / "model", out, "--test-csv",
                      str(test_set / "test.csv"))
    finally:
        os.umask(old)
    assert rc == 0
    _assert_complete_submission(out, test_set / "test.csv")
    for name in ("submission.csv", "predictions.csv", "boxes.csv", "predictions.csv.meta.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name     # group-writable, as the umask says


ORPHAN_SCRIPT = """
import os, sys, time
from data_prep.dicom.volume import _pool
pool = _pool(2, "process")
futures = [pool.submit(time.sleep, 120) for _ in range(2)]
time.sleep(1.0)
print(" ".join(str(pid) for pid in pool._processes), flush=True)
os.kill(os.getpid(), 9)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reader_workers_die_with_a_killed_owner(tmp_path):
    """SIGKILL the process that owns the reader's decode pool: its busy workers end within seconds."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == -9, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if _alive(p)]
    for pid in alive:                     # clean up before failing: these are this test's own processes
        os.kill(pid, 9)
    assert not alive, f"decode workers {alive} outlived their killed owner"
