"""`spinefrac serve`: a DICOM node that receives studies, predicts each complete one and sends the results back.

ServeNode ties the pieces together: the C-STORE SCP (scp.py) writes instances into the spool (spool.py); a
worker thread polls the spool every `worker.poll_seconds`: a study whose newest instance is `quiet_seconds`
old moves to ready/, is predicted with the model loaded once at start (predict.py), its SR and SC are written
to OUT/dicom/ and sent to the destination (scu.py), and the study moves to done/ (or failed/). A send that
fails is retried at the next poll, `destination.tries` sends in all, then the study goes to failed/ (its
predictions stay in OUT). Studies found in incoming/ and ready/ at start resume. OUT/serve_log.csv lists every
study with its times, among them the seconds from its last instance received to its results sent.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep.errors import InputError
from data_prep.runs.config import Config
from spinefrac.serve.spool import DONE, FAILED, INCOMING, READY, Spool

log = logging.getLogger("spinefrac")

SERVE_LOG_CSV = "serve_log.csv"
SERVE_LOG_COLUMNS = ("study", "version", "status", "instances", "last_received", "predict_s", "results",
                     "results_sent", "latency_s", "send_tries", "reason")
"""OUT/serve_log.csv: one row per study (its latest version); times in UTC ISO 8601, durations in seconds."""
PREDICTED, STATUS_DONE, STATUS_FAILED, STATUS_READY = "predicted", "done", "failed", "ready"
STOP_WAIT_S = 0.5          # how often the main thread wakes to notice a stop request while serving
REQUIRED_PATHS = ("spool", "out", "model")
_RUNNING: set[Path] = set()
"""Spool and output folders of the nodes running in this process (the folder lock is re-entrant within one)."""


class ServeNode:
    """A running DICOM node: start() loads the model and listens; stop() ends it gracefully."""

    def __init__(self, config: Config) -> None:
        missing = [f"paths.{k}" for k in REQUIRED_PATHS if not config["paths"][k]]
        if missing:
            raise InputError(None, f"spinefrac serve needs {', '.join(missing)} (in --config FILE or "
                                   f"--set {missing[0]}=FOLDER)")
        self.config = config
        self.spool_dir = Path(config["paths"]["spool"])
        self.out = Path(config["paths"]["out"])
        if self.spool_dir.resolve() == self.out.resolve():
            raise InputError(self.out, "paths.spool and paths.out must be two different folders")
        self.model_dir = Path(config["paths"]["model"])
        self.worker_cfg = config["worker"]
        from spinefrac.serve.scu import destination_of

        self.destination = destination_of(config["destination"])
        self.tries = int(config["destination"]["tries"])
        self._stop = threading.Event()
        self._stack = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self.spool: Spool | None = None
        self.predictor: Any = None

    # ------------------------------------------------------------ life cycle
    def start(self) -> ServeNode:
        """Lock the spool and output folders, load the model, start the worker and listen; return self."""
        from data_prep.runs.locks import FolderLockedError, output_lock
        from spinefrac.serve.predict import StudyPredictor, require_dicom_out

        require_dicom_out()              # a missing extra is named before any folder is touched
        from spinefrac.serve.scp import build_ae, handle_echo, make_store_handler

        node = self.config["node"]
        try:
            for folder in (self.spool_dir, self.out):
                self._stack.enter_context(output_lock(folder, command="spinefrac serve"))
                key = folder.resolve()
                if key in _RUNNING:
                    raise FolderLockedError(folder, "another run is writing into this folder: a node in this "
                                                    "process uses it")
                _RUNNING.add(key)
                self._stack.callback(_RUNNING.discard, key)
            self.spool = Spool(self.spool_dir, max_studies=int(self.worker_cfg["max_spool_studies"]),
                               min_free_mb=int(self.worker_cfg["min_free_mb"]))
            self.predictor = StudyPredictor(self.model_dir, self.out, workers=int(self.worker_cfg["workers"]),
                                            device=self.worker_cfg["device"])
            from pynetdicom import evt

            ae = build_ae(node["ae_title"], max_associations=node["max_associations"],
                          network_timeout=node["network_timeout_s"], dimse_timeout=node["dimse_timeout_s"],
                          require_called_ae_title=node["require_called_ae_title"],
                          allowed_calling_ae_titles=node["allowed_calling_ae_titles"])
            try:
                self._server = ae.start_server((node["host"], int(node["port"])), block=False, evt_handlers=[
                    (evt.EVT_C_STORE, make_store_handler(self.spool)), (evt.EVT_C_ECHO, handle_echo)])
            except OSError as exc:
                raise InputError(None, f"cannot listen on {node['host']}:{node['port']} (node.host, node.port): "
                                       f"{exc.strerror or exc}") from None
        except BaseException:
            self._stack.close()
            raise
        resumed = {s: len(self.spool.studies(s)) for s in (INCOMING, READY)}
        log.info("serve: %s listening on %s:%d; spool %s (%d studies receiving, %d ready resume); out %s; "
                 "results to %s", node["ae_title"], node["host"], self.port, self.spool_dir, resumed[INCOMING],
                 resumed[READY], self.out, _where(self.destination) if self.destination else "OUT/dicom only")
        self._thread = threading.Thread(target=self._work, name="spinefrac-serve-worker", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The TCP port the node listens on (the one chosen when node.port is 0)."""
        return int(self._server.server_address[1]) if self._server is not None else int(self.config["node"]["port"])

    def request_stop(self, *_: Any) -> None:
        """Ask the node to stop (safe in a signal handler): the worker finishes the step it is in."""
        self._stop.set()

    def wait(self) -> None:
        """Block until a stop is requested."""
        while not self._stop.wait(STOP_WAIT_S):
            pass
        log.info("serve: stopping (the study in progress is finished first)")

    def stop(self) -> None:
        """Stop listening, let the worker finish its step, release the folders' locks."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.predictor is not None:
            try:
                self.predictor.refresh()     # a stopped node leaves OUT's tables current
            except Exception:   # noqa: BLE001 - the stale marker stays; the next start rebuilds them
                log.exception("serve: rebuilding OUT's tables at stop failed; the next start does it")
        self._stack.close()
        log.info("serve: stopped")

    def __enter__(self) -> ServeNode:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------ the worker
    def _work(self) -> None:
        poll = float(self.worker_cfg["poll_seconds"])
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:   # noqa: BLE001 - the worker must outlive any one bad poll (logged with its traceback)
                log.exception("serve: a poll of the spool failed; retrying in %.0f s", poll)
            self._stop.wait(poll)

    def poll_once(self) -> None:
        """Move quiet studies to ready/, then predict and send every study in ready/ (one at a time)."""
        assert self.spool is not None
        quiet = float(self.worker_cfg["quiet_seconds"])
        for uid in self.spool.quiet_studies(quiet):
            if self._stop.is_set():
                return
            self._promote(uid, quiet)
        for uid in self.spool.studies(READY):
            if self._stop.is_set():
                return
            self._process(uid)
        self.predictor.refresh()      # OUT's tables over every study, once the waiting studies are sent

    def _promote(self, uid: str, quiet: float) -> None:
        """incoming/<uid> is quiet: record its new version and move it to ready/ (merged into an older one)."""
        spool = self.spool
        old = spool.read_state(uid)
        newest = spool.last_received(INCOMING, uid)
        n_new = len(spool.instances(INCOMING, uid))
        record = {"study": uid, "version": int(old.get("version", 0)) + 1, "status": STATUS_READY,
                  "last_received": newest, "send_tries": 0}
        spool.write_state(uid, record)          # first: a crash after it redoes the study, never skips it
        previous = spool.promote(uid, quiet)
        if previous == "busy":                  # an instance arrived meanwhile: the old record stands
            if old:
                spool.write_state(uid, old)
            return
        record["instances"] = len(spool.instances(READY, uid))
        spool.write_state(uid, record)
        if previous is None:
            log.info("study %s complete: %d instances", uid, n_new)
        else:
            log.info("study %s: %d instances arrived for a study in %s/; version %d (%d instances) is predicted "
                     "and sent again", uid, n_new, previous, record["version"], record["instances"])

    def _process(self, uid: str) -> None:
        """Predict a ready study (unless done already), write and send its results; then done/ or failed/."""
        spool, predictor = self.spool, self.predictor
        record = spool.read_state(uid) or {"study": uid, "version": 1, "send_tries": 0,
                                           "last_received": spool.last_received(READY, uid),
                                           "instances": len(spool.instances(READY, uid))}
        if record.get("status") == STATUS_DONE:     # finished just before a crash, not yet moved
            spool.move(uid, READY, DONE)
            return None
        results = [Path(p) for p in record.get("results", [])]
        if record.get("status") != PREDICTED or not all(p.is_file() for p in results):
            t0 = time.perf_counter()
            try:
                finished = predictor.predict(spool.folder(READY, uid))
            except Exception as exc:   # noqa: BLE001 - one study's failure must not stop the node
                log.exception("study %s: prediction failed", uid)
                return self._fail(uid, record, f"prediction: {type(exc).__name__}: {exc}")
            record["predict_s"] = round(time.perf_counter() - t0, 2)
            if not finished:
                return self._fail(uid, record, predictor.failure(uid))
            try:
                results = predictor.write_results(uid)
            except Exception as exc:   # noqa: BLE001 - the predictions stand; the study is recorded as failed
                log.exception("study %s: writing its DICOM results failed", uid)
                return self._fail(uid, record, f"DICOM results: {type(exc).__name__}: {exc}")
            record.update(status=PREDICTED, results=[str(p) for p in results], send_tries=0)
            spool.write_state(uid, record)
        if self.destination is not None:
            from spinefrac.serve.scu import SendError, send_files

            try:
                send_files(results, calling_ae=self.config["node"]["ae_title"], destination=self.destination)
            except SendError as exc:
                record["send_tries"] = int(record.get("send_tries", 0)) + 1
                if record["send_tries"] >= self.tries:
                    return self._fail(uid, record, f"send: {exc} ({record['send_tries']} tries)")
                log.warning("study %s: sending its results failed (try %d of %d, retried at the next poll): %s",
                            uid, record["send_tries"], self.tries, exc)
                spool.write_state(uid, record)
                return None
            record["send_tries"] = int(record.get("send_tries", 0)) + 1
        sent = time.time()
        record.update(status=STATUS_DONE, results_sent=sent, reason="")
        last = record.get("last_received")
        record["latency_s"] = round(sent - float(last), 2) if last is not None else None
        spool.write_state(uid, record)
        spool.move(uid, READY, DONE)
        log.info("study %s (version %d, %d instances): %d result files %s; %.1f s from its last instance received "
                 "to its results %s", uid, record.get("version", 1), record.get("instances", 0), len(results),
                 f"sent to {_where(self.destination)}" if self.destination else "written",
                 record["latency_s"] or 0.0, "sent" if self.destination else "written")
        self._write_log()
        return None

    def _fail(self, uid: str, record: dict[str, Any], reason: str) -> None:
        """Record a study as failed and move it to failed/ (never lost: a new version of it is tried again)."""
        record.update(status=STATUS_FAILED, reason=reason)
        self.spool.write_state(uid, record)
        self.spool.move(uid, READY, FAILED)
        log.warning("study %s failed and moved to %s: %s", uid, self.spool.folder(FAILED, uid), reason)
        self._write_log()

    def _write_log(self) -> None:
        """Rewrite OUT/serve_log.csv from the spool's state records."""
        from data_prep.runs.artifacts import write_csv_atomic

        rows = []
        for rec in self.spool.states():
            rows.append({"study": rec.get("study"), "version": rec.get("version"), "status": rec.get("status"),
                         "instances": rec.get("instances"), "last_received": _iso(rec.get("last_received")),
                         "predict_s": rec.get("predict_s"), "results": len(rec.get("results", [])),
                         "results_sent": _iso(rec.get("results_sent")), "latency_s": rec.get("latency_s"),
                         "send_tries": rec.get("send_tries"), "reason": rec.get("reason", "")})
        write_csv_atomic(self.out / SERVE_LOG_CSV, pd.DataFrame(rows, columns=list(SERVE_LOG_COLUMNS)))


def serve(config: Config) -> None:
    """Run a DICOM node until SIGINT or SIGTERM (`spinefrac serve`); a stop lets the study in progress finish."""
    node = ServeNode(config)
    node.start()
    previous = {sig: signal.signal(sig, node.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.wait()
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _where(destination: Mapping[str, Any] | None) -> str:
    if not destination:
        return "-"
    return f"{destination['ae_title']}@{destination['host']}:{destination['port']}"


def _iso(epoch: Any) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(float(epoch), tz=timezone.utc).isoformat(timespec="seconds")
