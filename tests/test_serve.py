"""`spinefrac serve`: a DICOM node receives studies over C-STORE, predicts each complete one with the loaded
model, writes what predict writes and sends the SR/SC results to a destination SCP; bad objects and garbage
on the port are refused without stopping it; the spool survives a restart mid-study."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from data_prep.errors import InputError
from data_prep.runs.config import ConfigError, load_config
from spinefrac.cli import main
from spinefrac.dicom_out.identity import MANUFACTURER as RESULTS_MANUFACTURER
from spinefrac.serve import ServeNode
from spinefrac.serve.scp import (
    STATUS_CANNOT_DECODE,
    STATUS_INVALID_UID,
    STATUS_MISSING_UID,
    STATUS_SUCCESS,
    store_instance,
)
from spinefrac.serve.spool import DONE, INCOMING, OUT_OF_RESOURCES, READY, TMP, Spool, SpoolError

pytest.importorskip("pynetdicom")

QUIET_S = 1.5           # quiet time of the node in the tests (s)
POLL_S = 0.3
WAIT_S = 240.0          # longest wait for a study to be predicted and sent on a busy 2-core machine
RESTART_QUIET_S = 20.0  # long enough that the second half, sent in one go, is not split by a quiet period on a busy machine
HOLD_QUIET_S = 3600.0   # the first node of the restart test never takes half a study as complete, however slow the
                        # machine is while the test tries a second node (a load of 20 once made 6 s run out)
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22")
"""Comprehensive 3D SR, Comprehensive SR, Enhanced SR."""
EXIT_ERROR = 2


# ---------------------------------------------------------------- helpers
def _study_dirs(trained: Path) -> list[Path]:
    return sorted((trained / "test" / "test_images").iterdir())


def _send(port: int, items: Sequence[pydicom.Dataset | Path], ae_title: str = "SPINEFRAC") -> list[int | None]:
    """C-STORE each item (a dataset, or a file as it is on disk) in one association; return the statuses."""
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    items = [pydicom.dcmread(item) if isinstance(item, Path) else item for item in items]
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in items}
    for sop_class, syntax in sorted(pairs):      # one context per transfer syntax: every file goes as it is
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, f"no association with the node on port {port}"
    statuses = []
    try:
        for item in items:
            status = assoc.send_c_store(item)
            statuses.append(int(status.Status) if status and "Status" in status else None)
    finally:
        assoc.release()
    return statuses


def _echo(port: int) -> int | None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINEFRAC")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


class _Destination:
    """A loopback C-STORE SCP (the PACS the node sends its results to) keeping every dataset it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="TESTPACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def info_log():
    """The spinefrac logger's INFO messages (loading the YOLO models sets the level of caplog's handler to WARNING)."""
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("spinefrac")
    handler, old_level = _Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def destination():
    dest = _Destination()
    yield dest
    dest.close()


def _node_config(trained: Path, tmp_path: Path, *, quiet: float = QUIET_S, dest_port: int | None = None,
                 port: int = 0):
    sets = [f"paths.spool={tmp_path / 'spool'}", f"paths.out={tmp_path / 'out'}", f"paths.model={trained / 'model'}",
            f"node.port={port}", f"worker.quiet_seconds={quiet}", f"worker.poll_seconds={POLL_S}", "worker.device=cpu",
            "worker.min_free_mb=0", "destination.timeout_s=10"]
    if dest_port is not None:
        sets += ["destination.ae_title=TESTPACS", "destination.host=127.0.0.1", f"destination.port={dest_port}"]
    return load_config("serve", None, sets)


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _numbers(ds: pydicom.Dataset) -> list[float]:
    """Every NUM content item's value in an SR's content tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
            found.append(float(item.MeasuredValueSequence[0].NumericValue))
        found += _numbers(item)
    return found


def _cut_pixels(path: Path) -> pydicom.Dataset:
    """A slice of the study (a new SOPInstanceUID) whose Pixel Data is cut in half: its header reads, its image not."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


# ---------------------------------------------------------------- fast: the spool and the SCP handler
def test_spool_writes_instances_atomically_and_refuses_unsafe_uids(tmp_path):
    spool = Spool(tmp_path / "spool")
    path = spool.store("1.2.3", "1.2.3.4", b"DICM-bytes")
    assert path == tmp_path / "spool" / INCOMING / "1.2.3" / "1.2.3.4.dcm" and path.read_bytes() == b"DICM-bytes"
    assert list((tmp_path / "spool" / TMP).iterdir()) == []             # no temp file left behind
    for study, sop in (("../../etc", "1.2.3.4"), ("1.2.3", "../x"), ("1.2.3", "1.2/3"), ("1.2.3", "")):
        with pytest.raises(SpoolError) as err:
            spool.store(study, sop, b"x")
        assert err.value.status == STATUS_INVALID_UID and "not a valid DICOM UID" in err.value.reason
    assert [p.name for p in (tmp_path / "spool" / INCOMING).iterdir()] == ["1.2.3"]   # nothing written outside

    full = Spool(tmp_path / "full", max_studies=1)
    full.store("1.2.3", "1.2.3.4", b"a")
    full.store("1.2.3", "1.2.3.5", b"b")                                   # the same study: accepted
    with pytest.raises(SpoolError) as err:
        full.store("1.2.4", "1.2.4.1", b"c")
    assert err.value.status == OUT_OF_RESOURCES and "max_spool_studies" in err.value.reason
    with pytest.raises(SpoolError) as err:
        Spool(tmp_path / "small", min_free_mb=2 ** 40).store("1.2.3", "1.2.3.4", b"a")
    assert err.value.status == OUT_OF_RESOURCES and "min_free_mb" in err.value.reason


def test_a_disk_error_while_writing_is_out_of_resources_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    spool = Spool(tmp_path / "spool")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("spinefrac.serve.spool.os.fsync", full_disk)
    with pytest.raises(SpoolError) as err:
        spool.store("1.2.3", "1.2.3.4", b"a")
    assert err.value.status == OUT_OF_RESOURCES and "No space left" in err.value.reason
    assert list((tmp_path / "spool" / TMP).iterdir()) == [] and spool.instances(INCOMING, "1.2.3") == []


def test_store_handler_refuses_bad_objects_with_a_failure_status(tmp_path, caplog):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    spool = Spool(tmp_path / "spool")

    def encoded(**keep) -> bytes:
        ds = pydicom.Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.update(keep)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    study, sop = generate_uid(), generate_uid()
    assert store_instance(spool, encoded(StudyInstanceUID=study, SOPInstanceUID=sop)) == STATUS_SUCCESS
    assert (spool.folder(INCOMING, study) / f"{sop}.dcm").is_file()
    assert store_instance(spool, encoded(SOPInstanceUID=generate_uid())) == STATUS_MISSING_UID
    assert store_instance(spool, encoded(StudyInstanceUID="../../x", SOPInstanceUID=sop)) == STATUS_INVALID_UID
    good = encoded(StudyInstanceUID=study, SOPInstanceUID=generate_uid())
    assert store_instance(spool, good[: len(good) - 7]) == STATUS_CANNOT_DECODE      # cut inside an element
    assert store_instance(spool, b"\x00garbage" * 50) == STATUS_CANNOT_DECODE
    # the node's own results routed back by a PACS: acknowledged, never spooled (no predict-send loop)
    own = encoded(StudyInstanceUID=study, SOPInstanceUID=generate_uid(), Manufacturer=RESULTS_MANUFACTURER)
    assert store_instance(spool, own) == STATUS_SUCCESS
    assert len(spool.instances(INCOMING, study)) == 1
    assert "has no StudyInstanceUID" in caplog.text and "does not decode" in caplog.text


def test_a_study_left_waiting_by_a_stop_gets_a_full_quiet_period_after_the_restart(tmp_path):
    before = Spool(tmp_path / "spool")
    path = before.store("1.2.3", "1.2.3.4", b"half a study")
    old = time.time() - 3600.0
    os.utime(path, (old, old))                 # received an hour ago by a node running since before ...
    before.opened = old - 60.0
    assert before.quiet_studies(30.0) == ["1.2.3"]     # ... which would have taken it as complete; it stopped
    after = Spool(tmp_path / "spool")          # the node starts again: the sender may now send the rest
    assert after.quiet_studies(30.0) == []
    assert after.promote("1.2.3", 30.0) == "busy"
    assert after.quiet_studies(30.0, now=after.opened + 30.0) == ["1.2.3"]


def test_a_new_version_of_a_done_study_is_merged_into_it(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.store("1.2.3", "1.2.3.1", b"old-1")
    spool.store("1.2.3", "1.2.3.2", b"old-2")
    assert spool.promote("1.2.3", 0.0) is None
    spool.move("1.2.3", READY, DONE)
    spool.store("1.2.3", "1.2.3.2", b"new-2")                           # resent: the new file wins
    spool.store("1.2.3", "1.2.3.3", b"new-3")
    assert spool.promote("1.2.3", 60.0) == "busy"                       # not quiet yet: left where it is
    assert spool.promote("1.2.3", 0.0) == DONE
    files = {p.name: p.read_bytes() for p in spool.instances(READY, "1.2.3")}
    assert files == {"1.2.3.1.dcm": b"old-1", "1.2.3.2.dcm": b"new-2", "1.2.3.3.dcm": b"new-3"}
    assert not spool.folder(INCOMING, "1.2.3").exists() and not spool.folder(DONE, "1.2.3").exists()

    (spool.root / DONE / "1.2.3").mkdir()                               # a folder a crash left where it goes
    (spool.root / DONE / "1.2.3" / "1.2.3.0.dcm").write_bytes(b"kept")
    spool.move("1.2.3", READY, DONE)                                    # merged into, never deleted
    assert len(spool.instances(DONE, "1.2.3")) == 4 and not spool.folder(READY, "1.2.3").exists()


def test_serve_config_errors_are_clear(tmp_path, caplog):
    with pytest.raises(ConfigError, match="destination needs ae_title, host and port"):
        load_config("serve", None, ["destination.host=pacs"])
    with pytest.raises(ConfigError, match="at most 16 characters"):
        load_config("serve", None, ["node.ae_title=A_VERY_LONG_AE_TITLE"])
    with pytest.raises(ConfigError, match="allowed_calling_ae_titles"):
        load_config("serve", None, ['node.allowed_calling_ae_titles=["PACS1", "A_VERY_LONG_AE_TITLE"]'])
    with pytest.raises(InputError, match="paths.spool, paths.out, paths.model"):
        ServeNode(load_config("serve"))
    with pytest.raises(InputError, match="two different folders"):
        ServeNode(load_config("serve", None, [f"paths.spool={tmp_path}", f"paths.out={tmp_path}/.", "paths.model=m"]))
    assert main(["serve", "--set", f"paths.spool={tmp_path}"]) == EXIT_ERROR
    assert "needs paths.out, paths.model" in caplog.text
    assert main(["serve", "--set", f"paths.spool={tmp_path / 's'}", "--set", f"paths.out={tmp_path / 'o'}",
                 "--set", f"paths.model={tmp_path / 'nomodel'}"]) == EXIT_ERROR
    assert "not a spinefrac model folder" in caplog.text
    assert not (tmp_path / "o").exists() and not (tmp_path / "s" / ".spinefrac.lock.json").exists()   # released


def test_a_missing_dicom_extra_is_named(tmp_path, monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pynetdicom" else real(name, *a))
    assert main(["serve", "--set", f"paths.spool={tmp_path / 's'}", "--set", f"paths.out={tmp_path / 'o'}",
                 "--set", f"paths.model={tmp_path / 'm'}"]) == EXIT_ERROR
    assert "needs pynetdicom, which is not installed: pip install 'spinefrac[dicom]'" in caplog.text
    assert not (tmp_path / "s").exists()                              # refused before any folder is touched


class _FakePredictor:
    """Stands in for the model in worker tests: records the studies it predicts, writes one result file each."""

    def __init__(self, out: Path, *, fail: set[str] = frozenset()) -> None:
        self.out, self.fail, self.calls, self.refreshes, self.stale = out, set(fail), [], [], False

    def predict(self, study_dir: Path) -> bool:
        self.calls.append((study_dir.name, len(list(study_dir.glob("*.dcm")))))
        self.stale = True
        return study_dir.name not in self.fail

    def refresh(self) -> bool:
        """Record how many studies had been predicted when OUT's tables were rebuilt (only when out of date)."""
        if self.stale:
            self.refreshes.append(len(self.calls))
            self.stale = False
        return True

    def failure(self, uid: str) -> str:
        return "detect: GeometryError: slices of two sizes"

    def write_results(self, uid: str) -> list[Path]:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = SR_CLASSES[0], generate_uid(), uid
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        path = self.out / "dicom" / uid / "SR.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return [path]


def _worker(tmp_path: Path, predictor_fail: set[str] = frozenset(), *, dest_port: int | None = None,
            tries: int = 2) -> ServeNode:
    """A node that is not listening, with a spool and a fake predictor: its worker is driven by poll_once()."""
    sets = [f"paths.spool={tmp_path / 'spool'}", f"paths.out={tmp_path / 'out'}", f"paths.model={tmp_path / 'm'}",
            "worker.quiet_seconds=0", f"destination.tries={tries}", "destination.timeout_s=2"]
    if dest_port is not None:
        sets += ["destination.ae_title=PACS", "destination.host=127.0.0.1", f"destination.port={dest_port}"]
    node = ServeNode(load_config("serve", None, sets))
    node.spool = Spool(tmp_path / "spool")
    node.predictor = _FakePredictor(tmp_path / "out", fail=predictor_fail)
    return node


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_worker_moves_studies_through_the_spool_and_predicts_a_new_version_again(tmp_path):
    node = _worker(tmp_path, predictor_fail={"1.2.9"})
    spool = node.spool
    for sop in ("1.2.3.1", "1.2.3.2"):
        spool.store("1.2.3", sop, b"x")
    spool.store("1.2.9", "1.2.9.1", b"x")
    node.poll_once()
    assert node.predictor.calls == [("1.2.3", 2), ("1.2.9", 1)]
    assert node.predictor.refreshes == [2]          # OUT's tables rebuilt once, after both studies were handled
    assert spool.folder(DONE, "1.2.3").is_dir() and spool.folder("failed", "1.2.9").is_dir()
    log = pd.read_csv(tmp_path / "out" / "serve_log.csv", dtype={"study": str}).set_index("study")
    assert log.loc["1.2.3", "status"] == "done" and log.loc["1.2.3", "latency_s"] >= 0
    assert log.loc["1.2.9", "status"] == "failed" and "GeometryError" in log.loc["1.2.9", "reason"]

    node.poll_once()                                                    # nothing new: nothing predicted again
    assert len(node.predictor.calls) == 2
    spool.store("1.2.3", "1.2.3.3", b"x")                               # a new instance of a done study
    node.predictor.fail.clear()
    spool.store("1.2.9", "1.2.9.2", b"x")                               # and of a failed one
    node.poll_once()
    assert node.predictor.calls[2:] == [("1.2.3", 3), ("1.2.9", 2)]     # whole studies, predicted again
    assert node.predictor.refreshes == [2, 4]       # not at the poll that predicted nothing
    log = pd.read_csv(tmp_path / "out" / "serve_log.csv", dtype={"study": str}).set_index("study")
    assert log["version"].to_dict() == {"1.2.3": 2, "1.2.9": 2} and (log["status"] == "done").all()


def test_a_send_failure_is_retried_then_the_study_goes_to_failed(tmp_path, destination):
    node = _worker(tmp_path, dest_port=_closed_port(), tries=2)
    node.spool.store("1.2.3", "1.2.3.1", b"x")
    node.poll_once()
    assert node.spool.folder(READY, "1.2.3").is_dir()                  # kept for the next poll
    assert node.spool.read_state("1.2.3")["send_tries"] == 1
    node.poll_once()
    assert node.spool.folder("failed", "1.2.3").is_dir()
    record = node.spool.read_state("1.2.3")
    assert record["status"] == "failed" and record["send_tries"] == 2 and "association" in record["reason"]
    assert node.predictor.calls == [("1.2.3", 1)]                       # predicted once, sent twice

    # a study predicted before a restart (its results on disk) is sent at the next poll, not predicted again
    node = _worker(tmp_path / "second", dest_port=destination.port)
    node.spool.store("1.2.4", "1.2.4.1", b"x")
    results = node.predictor.write_results("1.2.4")
    assert node.spool.promote("1.2.4", 0.0) is None
    node.spool.write_state("1.2.4", {"study": "1.2.4", "version": 1, "status": "predicted", "send_tries": 0,
                                     "results": [str(p) for p in results]})
    node.poll_once()
    assert node.predictor.calls == [] and node.spool.folder(DONE, "1.2.4").is_dir()
    assert [str(ds.StudyInstanceUID) for ds in destination.received] == ["1.2.4"]


# ---------------------------------------------------------------- slow: the node with the session's model
@pytest.mark.slow
def test_node_predicts_two_studies_refuses_bad_objects_and_sends_the_sr(trained_pipeline, tmp_path, destination,
                                                                         caplog, info_log):
    studies = _study_dirs(trained_pipeline)[:2]
    with ServeNode(_node_config(trained_pipeline, tmp_path, dest_port=destination.port)) as node:
        # garbage bytes on the port: that connection is dropped, the node still answers
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(b"\x07\xff GET / HTTP/1.1\r\n\r\n" + os.urandom(512))
            time.sleep(0.5)
        assert _echo(node.port) == STATUS_SUCCESS

        files = {s.name: sorted(s.glob("*.dcm")) for s in studies}
        no_study = pydicom.dcmread(files[studies[0].name][0])
        del no_study.StudyInstanceUID
        bad_uid = pydicom.dcmread(files[studies[0].name][1])
        bad_uid.StudyInstanceUID = "../../../tmp/evil"
        statuses = _send(node.port, [*files[studies[0].name], no_study, bad_uid,
                                     _cut_pixels(files[studies[1].name][0]), *files[studies[1].name]])
        n0 = len(files[studies[0].name])
        assert statuses[:n0] == [STATUS_SUCCESS] * n0
        assert statuses[n0:n0 + 3] == [STATUS_MISSING_UID, STATUS_INVALID_UID, STATUS_CANNOT_DECODE]
        assert statuses[n0 + 3:] == [STATUS_SUCCESS] * len(files[studies[1].name])
        assert _echo(node.port) == STATUS_SUCCESS                       # the bad objects did not stop it

        spool = tmp_path / "spool"
        _wait_for(lambda: all((spool / DONE / s.name).is_dir() for s in studies), "both studies in done/")

    out = tmp_path / "out"
    predictions = pd.read_csv(out / "predictions.csv", dtype={"StudyInstanceUID": str})
    assert sorted(predictions["StudyInstanceUID"]) == sorted(s.name for s in studies)
    assert (predictions["failed"] == 0).all()
    slices = pd.read_csv(out / "slices.csv", dtype={"StudyInstanceUID": str})
    for s in studies:                                                   # every slice received was predicted
        assert (slices["StudyInstanceUID"] == s.name).sum() == len(files[s.name])
        assert sorted(p.name for p in (spool / DONE / s.name).iterdir()) == sorted(
            f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm" for f in files[s.name])
    assert (out / "report" / "index.html").is_file() and (out / "worklist.csv").is_file()
    assert not (out / ".serve-tables-stale").exists()                   # the tables were rebuilt by the stop
    assert not any((out / ".serve-stage").iterdir())                    # each study's staging folder removed
    assert not (Path("/tmp/evil")).exists() and not any((spool / INCOMING).iterdir())

    srs = [ds for ds in destination.received if str(ds.SOPClassUID) in SR_CLASSES]
    assert sorted(str(ds.StudyInstanceUID) for ds in srs) == sorted(s.name for s in studies)
    for ds in srs:                                                      # a probability read back from the SR
        row = predictions[predictions["StudyInstanceUID"] == str(ds.StudyInstanceUID)].iloc[0]
        values = _numbers(ds)
        assert any(abs(v - float(row["patient_overall"])) < 1e-6 for v in values), (values, row.to_dict())

    log = pd.read_csv(out / "serve_log.csv", dtype={"study": str})
    assert sorted(log["study"]) == sorted(s.name for s in studies)
    assert (log["status"] == "done").all() and (log["version"] == 1).all()
    assert (log["latency_s"] >= QUIET_S).all() and (log["results"] >= 1).all()
    assert "does not decode" in caplog.text
    assert any("from its last instance received to its results sent" in m for m in info_log)


@pytest.mark.slow
def test_restart_mid_study_predicts_it_once_with_every_slice(trained_pipeline, tmp_path, destination):
    study = _study_dirs(trained_pipeline)[2]
    files = sorted(study.glob("*.dcm"))
    half = len(files) // 2
    config = _node_config(trained_pipeline, tmp_path, quiet=HOLD_QUIET_S, dest_port=destination.port)
    with ServeNode(config) as node:
        assert _send(node.port, files[:half]) == [STATUS_SUCCESS] * half
        with pytest.raises(InputError, match="another run is writing into this folder"):
            ServeNode(config).start()                                   # a second node on the same spool
        busy = _node_config(trained_pipeline, tmp_path / "other", port=node.port)
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{node.port}"):
            ServeNode(busy).start()                                     # a port in use: named, locks released
        assert not (tmp_path / "other" / "spool" / ".spinefrac.lock.json").exists()
    incoming = tmp_path / "spool" / INCOMING / study.name
    assert len(list(incoming.glob("*.dcm"))) == half                  # kept on disk across the stop
    assert not (tmp_path / "out" / "predictions.csv").exists()

    config = _node_config(trained_pipeline, tmp_path, quiet=RESTART_QUIET_S, dest_port=destination.port)
    with ServeNode(config) as node:                                     # the same spool: the study resumes
        assert _send(node.port, files[half:]) == [STATUS_SUCCESS] * (len(files) - half)
        _wait_for(lambda: (tmp_path / "spool" / DONE / study.name).is_dir(), "the study in done/")
    slices = pd.read_csv(tmp_path / "out" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert (slices["StudyInstanceUID"] == study.name).sum() == len(files)
    log = pd.read_csv(tmp_path / "out" / "serve_log.csv", dtype={"study": str})
    assert log["study"].tolist() == [study.name] and log["version"].tolist() == [1]   # predicted exactly once
    assert log["instances"].tolist() == [len(files)]
    srs = [ds for ds in destination.received if str(ds.SOPClassUID) in SR_CLASSES]
    assert [str(ds.StudyInstanceUID) for ds in srs] == [study.name]  # one SR sent, not one per half


@pytest.mark.slow
def test_a_whole_pacs_study_is_read_through_its_bone_series(trained_pipeline, tmp_path, destination):
    from helpers import TINY_SYNTH

    export = tmp_path / "export"
    assert main(["synth", str(export), "--studies", "1", "--seed", "5", "--split", "test", "--export", "tree",
                 "--no-progress", *(f"--set={s}" for s in TINY_SYNTH)]) == 0
    files = sorted(p for p in export.rglob("*") if p.is_file() and p.name.startswith("IM"))
    datasets = [pydicom.dcmread(p) for p in files]
    study_uid = str(datasets[0].StudyInstanceUID)
    with ServeNode(_node_config(trained_pipeline, tmp_path, dest_port=destination.port)) as node:
        assert _send(node.port, datasets) == [STATUS_SUCCESS] * len(datasets)   # scout, kernels, MPRs, dose SR
        _wait_for(lambda: (tmp_path / "spool" / DONE / study_uid).is_dir(), "the study in done/")
    series = pd.read_csv(tmp_path / "out" / "series.csv", dtype={"StudyInstanceUID": str})
    chosen = series[series["chosen"] == 1]
    assert len(chosen) == 1 and "BONE" in chosen["description"].iloc[0].upper() and "THICK" not in \
        chosen["description"].iloc[0].upper()
    assert (series["chosen"] == 0).sum() >= 4 and series.loc[series["chosen"] == 0, "reason"].str.len().gt(0).all()
    slices = pd.read_csv(tmp_path / "out" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert (slices["StudyInstanceUID"] == study_uid).sum() == int(chosen["n_files"].iloc[0])
    assert study_uid in {str(ds.StudyInstanceUID) for ds in destination.received}


@pytest.mark.slow
def test_cli_serve_stops_gracefully_on_sigterm(trained_pipeline, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"paths:\n  spool: {tmp_path / 'spool'}\n  out: {tmp_path / 'out'}\n"
                      f"  model: {trained_pipeline / 'model'}\nnode:\n  port: 0\nworker:\n  device: cpu\n")
    proc = subprocess.Popen([sys.executable, "-m", "spinefrac", "serve", "--config", str(config)],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: any("listening on" in line for line in lines) or proc.poll() is not None,
                  "the node to listen", timeout=120)
        match = next(re.search(r"listening on 127\.0\.0\.1:(\d+)", line) for line in lines if "listening" in line)
        assert _echo(int(match.group(1))) == STATUS_SUCCESS
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    assert any("serve: stopped" in line for line in lines), "".join(lines)
    assert not (tmp_path / "spool" / ".spinefrac.lock.json").exists()


def test_only_the_allowed_calling_ae_titles_may_associate():
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from spinefrac.serve.scp import build_ae, handle_echo

    ae = build_ae("SPINEFRAC", max_associations=2, network_timeout=5, dimse_timeout=5, require_called_ae_title=False,
                  allowed_calling_ae_titles=["PACS1"])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, handle_echo)])
    try:
        port = server.server_address[1]
        answers = {}
        for caller in ("PACS1", "OTHER"):
            scu = AE(ae_title=caller)
            scu.add_requested_context(Verification)
            assoc = scu.associate("127.0.0.1", port, ae_title="SPINEFRAC")
            answers[caller] = assoc.is_established and int(assoc.send_c_echo().Status)
            if assoc.is_established:
                assoc.release()
            else:
                assert assoc.is_rejected
        assert answers == {"PACS1": STATUS_SUCCESS, "OTHER": False}
    finally:
        server.shutdown()
