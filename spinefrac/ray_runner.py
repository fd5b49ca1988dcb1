"""`spinefrac predict --ray [ADDRESS]`: the detect stage of predict spread over the actors of a Ray cluster.

Each actor (DetectActor) holds one detector.detect.StudyRunner, so the models load once per worker, and
studies stream through the actors (at most IN_FLIGHT_PER_ACTOR queued on one). Every actor writes a study's
parts and done marker, or its failure record, straight into OUT, exactly as a local run does: on a cluster
the study folders, the model folder and OUT must be on a filesystem every node mounts at the same path
(as with a batch scheduler), and every node needs the same spinefrac installed. The driver checks the
settings first (a folder made with other settings is refused, as locally), skips finished studies (an
interrupted run resumes), retries the studies of a worker that died on another actor (at most
MAX_ATTEMPTS tries of the study a worker died on), then rebuilds the combined tables; predict aggregates
them as it does after a local run, so the outputs are the same files with the same rows.

Addresses: "local" (`--ray` alone) starts a private Ray instance on this machine (object store
LOCAL_OBJECT_STORE_MB: results travel as files, not objects); "auto", "host:6379" or "ray://host:10001"
join an existing cluster (`ray start --head`). This module is optional (`pip install "spinefrac[ray]"`);
nothing below spinefrac/ imports it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.errors import SpinefracError

log = logging.getLogger("spinefrac")

RAY_EXTRA = 'pip install "spinefrac[ray]"'
LOCAL_ADDRESS = "local"
"""--ray without an address: start a private Ray instance on this machine."""
LOCAL_OBJECT_STORE_MB = 128
"""Object store of a local instance (MiB); actors return only small outcome records."""
MB = 2 ** 20
CPUS_PER_ACTOR = 2
"""CPUs one actor reserves by default: one study's decode threads and the models' threads (as --workers 2)."""
GPUS_PER_ACTOR = 1
"""GPUs one actor reserves when --device names a GPU."""
CPU_DEVICES = ("cpu", "")
IN_FLIGHT_PER_ACTOR = 2
"""Studies queued on one actor at a time: one running and one waiting, so an actor never idles between studies."""
MAX_ATTEMPTS = 3
"""Tries of a study during which its worker died; then it is recorded as failed (errors/<uid>.json)."""
REPLACEMENTS_PER_ACTOR = 2
"""A dead actor is replaced by a new one at most this many times per actor requested; then the run stops."""
CONNECT_TIMEOUT_S = 10.0
"""How long a cluster address may take to accept a TCP connection before --ray gives up on it."""
RAY_CLIENT_PREFIX = "ray://"
RAY_STAGE = "ray"
"""The `stage` of a failure record the driver writes for a study its workers kept dying on."""


class RayUnavailableError(SpinefracError):
    """Ray is not installed, or the cluster cannot be reached or cannot run the workers."""


@dataclass
class RayRun:
    """What a Ray detect run did: finished, skipped and failed studies, retries, slices and summed timings (s)."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    actors: int = 0
    replaced: int = 0
    n_slices: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The run's counts for the tables' sidecars."""
        return {"finished": len(self.finished), "skipped": len(self.skipped), "failed": len(self.failed),
                "retried": sorted(set(self.retried)), "actors": self.actors, "actors_replaced": self.replaced,
                "slices": self.n_slices, "timings_s": {k: round(v, 3) for k, v in self.timings.items()}}


def require_ray() -> Any:
    """Import and return the ray module, or raise RayUnavailableError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"--ray needs Ray, which is not installed ({exc}): {RAY_EXTRA}") from None
    return ray


def parse_address(text: str) -> str:
    """Check a --ray address ("local", "auto", "host:port" or "ray://host:port"); raise ValueError otherwise."""
    text = str(text).strip()
    if text in (LOCAL_ADDRESS, "auto") or text.startswith(RAY_CLIENT_PREFIX):
        return text
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit():
        return text
    raise ValueError(f"--ray takes no address (a local instance), 'auto', HOST:PORT or ray://HOST:PORT; found "
                     f"{text!r} (put the study folders before --ray)")


class DetectActor:
    """A Ray actor's state: one StudyRunner (models loaded once) writing into the shared output folder."""

    def __init__(self, out: str, runner_kwargs: Mapping[str, Any]) -> None:
        from detector.detect import StudyRunner

        self.runner = StudyRunner(out, **dict(runner_kwargs))

    def run(self, study: str) -> Any:
        """Detect one study into the output folder; return its StudyOutcome (a failed study never raises)."""
        return self.runner.run(study)

    def describe(self) -> dict[str, Any]:
        """The runner's provenance (weights, backend, settings key, ...) for the sidecars."""
        return self.runner.describe()


def runner_kwargs(model: Any, *, labels: Path | None, workers: int, device: str | None) -> dict[str, Any]:
    """StudyRunner's arguments for a model folder, as predict's local detect passes them (absolute paths)."""
    cfgs = model.configs
    return {"weights": str(Path(model.detector_weights).absolute()), "config": cfgs["detector"],
            "labels": str(Path(labels).absolute()) if labels is not None else None,
            "locator": str(Path(model.locator_weights).absolute()) if model.locator_weights else None,
            "locator_config": cfgs["locator"], "levels_config": cfgs["levels"], "workers": workers,
            "device": device,
            "classifier": [str(Path(w).absolute()) for w in model.classifier_weights] or None,
            "classifier_config": cfgs["classifier"]}


def actor_config(config: Mapping[str, Any], cpus: float) -> Mapping[str, Any]:
    """The detector config an actor runs with: model threads (torch and OpenVINO) = the CPUs it reserved, unless
    `detect.inference_threads` is set (0, every core, would make each actor use all of its node's cores). A run
    setting, not a detect setting: the settings key is the same."""
    from data_prep.runs.config import Config

    if int((config.get("detect") or {}).get("inference_threads") or 0):
        return config
    data = config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(config))
    data.setdefault("detect", {})["inference_threads"] = max(1, int(cpus))
    return Config(data, "detector")


def detect_on_ray(study_dirs: Sequence[Path], *, model: Any, out: Path, address: str = LOCAL_ADDRESS,
                  actors: int | None = None, labels: Path | None = None, workers: int = 2, progress: bool = True,
                  overwrite: bool = False, device: str | None = None) -> dict[str, Any]:
    """Detect every study on Ray actors into `out` and rebuild its tables; return predict's detect summary."""
    from data_prep.dicom.study_inputs import absolute_study
    from detector.detect import detect_settings
    from detector.detect_outputs import detect_markers, plan_studies, rebuild_outputs

    ray = require_ray()
    t0 = time.perf_counter()
    out = Path(out).absolute()
    gpu = device is not None and str(device).strip().lower() not in CPU_DEVICES
    kwargs = runner_kwargs(model, labels=labels, workers=workers, device="0" if gpu else device)
    settings = detect_settings(kwargs["config"], weights=kwargs["weights"], locator=kwargs["locator"],
                               locator_config=kwargs["locator_config"], levels_config=kwargs["levels_config"],
                               classifier=kwargs["classifier"], classifier_config=kwargs["classifier_config"])
    markers = detect_markers(out, settings)
    skipped, todo = plan_studies(study_dirs, markers, overwrite=overwrite)   # refuses other settings, before Ray
    run = RayRun(skipped=skipped)
    todo = [absolute_study(s) for s in todo]
    started_here = _connect(ray, address)
    describe: dict[str, Any] = {"settings_key": markers.key}
    try:
        if todo:
            describe = _stream(ray, todo, out=out, kwargs=kwargs, actors=actors, gpu=gpu, run=run,
                               progress=progress, rebuild_every=max(1, int(kwargs["config"]["detect"]["rebuild_every"])),
                               markers=markers, overwrite=overwrite)
    finally:
        rebuild_outputs(out, config=kwargs["config"], runtime_s=time.perf_counter() - t0,
                        extra={**describe, "this_run": run.summary(), "ray": {"address": address}})
        if started_here:
            ray.shutdown()
    if run.failed:
        log.warning("detect: %d studies failed, see %s", len(run.failed), out / "errors.csv")
    backend = describe.get("backend")
    return {"finished": len(run.finished) + len(run.skipped), "failed": len(run.failed), "slices": run.n_slices,
            "backend": backend, "ray": {"address": address, "actors": run.actors, "replaced": run.replaced,
                                        "retried": sorted(set(run.retried))}}


# ---------------------------------------------------------------- internals
def _connect(ray: Any, address: str) -> bool:
    """Start or join Ray; return whether this call connected. A process connected already (ray.init by the
    caller, e.g. a notebook or a test) keeps its connection and `address` is not used."""
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        if address == LOCAL_ADDRESS:
            ray.init(address=LOCAL_ADDRESS, object_store_memory=LOCAL_OBJECT_STORE_MB * MB, include_dashboard=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(f"--ray {address}: cannot start or reach Ray ({type(exc).__name__}: {exc}); start "
                                  "a cluster with `ray start --head` or run without an address for a local one") \
            from None
    log.info("Ray: %s, resources %s", address, ray.cluster_resources())
    return True


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) where nothing answers, at once: Ray itself waits on it for minutes."""
    if address in (LOCAL_ADDRESS, "auto"):
        return
    host, sep, port = address.removeprefix(RAY_CLIENT_PREFIX).rpartition(":")
    if not (sep and port.isdigit()):
        return                           # ray://HOST without a port: Ray Client's default port, left to Ray
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayUnavailableError(f"--ray {address}: nothing answers at {host}:{port} ({exc}); start the cluster "
                                  "with `ray start --head` there, check the address, or run --ray alone for a "
                                  "local instance") from None


def _actor_options(ray: Any, actors: int | None, gpu: bool) -> tuple[int, dict[str, Any]]:
    """How many actors and the resources each reserves (CPUS_PER_ACTOR and GPUS_PER_ACTOR, or the cluster's
    share when asked for more actors than that allows, so that every actor can start)."""
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0.0))
    if gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < GPUS_PER_ACTOR:
            raise RayUnavailableError("--device names a GPU but the Ray cluster has none: start GPU workers "
                                      "(`ray start --address ... --num-gpus N`) or pass --device cpu")
        n = actors or gpus // GPUS_PER_ACTOR      # more actors than GPUs share them (fractions of a GPU)
        return n, {"num_gpus": min(float(GPUS_PER_ACTOR), gpus / n), "num_cpus": min(CPUS_PER_ACTOR, cpus / n)}
    if cpus <= 0:
        raise RayUnavailableError("the Ray cluster offers no CPUs to run workers on")
    n = actors or max(1, int(cpus // CPUS_PER_ACTOR))
    return n, {"num_cpus": min(float(CPUS_PER_ACTOR), cpus / n)}


def _stream(ray: Any, todo: Sequence[Path], *, out: Path, kwargs: Mapping[str, Any], actors: int | None, gpu: bool,
            run: RayRun, progress: bool, rebuild_every: int, markers: Any, overwrite: bool) -> dict[str, Any]:
    """Stream `todo` through the actors, replacing dead ones and retrying their studies; return the provenance."""
    from ray.exceptions import RayActorError
    from tqdm.auto import tqdm

    from detector.detect_outputs import rebuild_outputs

    n, options = _actor_options(ray, actors, gpu)
    remote = ray.remote(DetectActor).options(max_restarts=0, max_task_retries=0, **options)
    actor_kwargs = {**kwargs, "config": actor_config(kwargs["config"], options["num_cpus"])}
    try:
        pool = _Pool(ray, lambda: remote.remote(str(out), actor_kwargs), min(n, len(todo)), markers=markers,
                     overwrite=overwrite, run=run)
    except Exception as exc:   # noqa: BLE001 - e.g. Ray Client: the cluster cannot import spinefrac's actor class
        raise RayUnavailableError(f"cannot start a Ray worker ({type(exc).__name__}: {_cause(exc)}): every node "
                                  f"needs the same spinefrac installed ({RAY_EXTRA})") from None
    log.info("Ray: %d actors (%s each) over %d studies", run.actors, options, len(todo))
    bar = tqdm(total=len(todo), desc="detect (ray)", unit="study", disable=not progress)
    try:
        try:
            describe = ray.get(pool.actors[0].describe.remote())
        except RayActorError as exc:       # its models failed to load: every actor would fail the same way
            raise RayUnavailableError(f"a Ray worker could not load the models: {_cause(exc)}") from None
        except Exception as exc:   # noqa: BLE001 - anything else that stops the first worker: named, no traceback
            raise RayUnavailableError(f"cannot start a Ray worker ({type(exc).__name__}: {_cause(exc)}): every "
                                      f"node needs the same spinefrac installed ({RAY_EXTRA})") from None
        pool.queue.extend(todo)
        rebuilt = 0
        while pool.queue or pool.in_flight:
            pool.fill()
            pool.collect()
            bar.update(pool.settled - bar.n)
            if pool.settled - rebuilt >= rebuild_every:
                rebuild_outputs(out, config=kwargs["config"])
                rebuilt = pool.settled
    finally:
        bar.close()
        pool.kill()
    return describe


class _Pool:
    """The driver's view of the actors: a queue of studies, the studies in flight on each actor (in submission
    order: an actor runs them one after another), tries of studies whose worker died, replacements left."""

    def __init__(self, ray: Any, start: Any, n: int, *, markers: Any, overwrite: bool, run: RayRun) -> None:
        self.ray, self.start, self.markers, self.overwrite, self.run = ray, start, markers, overwrite, run
        self.out, self.key = Path(markers.root), markers.key
        self.actors: list[Any] = [start() for _ in range(n)]
        self.on_actor: list[deque[Any]] = [deque() for _ in range(n)]
        self.in_flight: dict[Any, tuple[int, Path, float]] = {}    # ref -> actor, study, wall time sent
        self.queue: deque[Path] = deque()
        self.attempts: dict[str, int] = {}
        self.replacements = REPLACEMENTS_PER_ACTOR * n
        self.settled = 0
        run.actors = n

    def fill(self) -> None:
        """Give every live actor studies until IN_FLIGHT_PER_ACTOR are queued on it."""
        for i, actor in enumerate(self.actors):
            while actor is not None and self.queue and len(self.on_actor[i]) < IN_FLIGHT_PER_ACTOR:
                study = self.queue.popleft()
                ref = actor.run.remote(str(study))
                self.on_actor[i].append(ref)
                self.in_flight[ref] = (i, study, time.time())

    def collect(self) -> None:
        """Wait for one result and count it; when its actor died, settle or requeue all of that actor's studies."""
        (ref,), _ = self.ray.wait(list(self.in_flight), num_returns=1)
        i = self.in_flight[ref][0]
        died = self._settle(ref)
        if died is not None:
            self._actor_died(i, died)

    def _settle(self, ref: Any) -> Exception | None:
        """Count a finished ref's outcome; return the error instead (leaving it in flight) when its actor died."""
        from ray.exceptions import RayActorError, RayTaskError

        study = self.in_flight[ref][1]
        try:
            outcome = self.ray.get(ref)
        except RayActorError as exc:
            return exc
        except RayTaskError as exc:                # run() itself broke (a study's failure is recorded, never raised)
            _record_failure(self.out, study, key=self.key, error=f"the Ray worker raised: {_cause(exc)}")
            outcome = None
        if outcome is not None and outcome.finished:
            self._finished(ref, outcome.n_slices, outcome.timings)
        else:
            self._drop(ref)
            self.run.failed.append(study.name)
            self.settled += 1
        return None

    def _finished(self, ref: Any, n_slices: int, timings: Mapping[str, float]) -> None:
        """Count a finished study of this run."""
        study = self._drop(ref)
        self.run.finished.append(study.name)
        self.run.n_slices += int(n_slices)
        for k, v in timings.items():
            self.run.timings[k] = self.run.timings.get(k, 0.0) + float(v)
        self.settled += 1

    def _drop(self, ref: Any) -> Path:
        """Take a ref out of flight; return its study."""
        i, study, _ = self.in_flight.pop(ref)
        self.on_actor[i].remove(ref)
        return study

    def _done_on_disk(self, ref: Any) -> dict[str, Any] | None:
        """The done marker this try wrote, when the actor died after finishing the study but before its reply
        reached the driver (the files are the truth); None when there is none."""
        _, study, sent = self.in_flight[ref]
        data = self.markers.read(study.name)
        if data is None or data.get("settings_key") != self.key:
            return None
        if self.overwrite and self.markers.marker(study.name).stat().st_mtime < sent:
            return None                    # --overwrite: the previous run's marker, not this try's
        return data

    def _actor_died(self, i: int, exc: Exception) -> None:
        """Actor i died: count what it finished, charge the study it was running, requeue the rest, replace it."""
        running, waiting = None, []
        for ref in list(self.on_actor[i]):
            if running is None and self._settle(ref) is None:
                continue                           # it had finished this one before it died
            done = self._done_on_disk(ref) if running is None else None
            if done is not None:
                self._finished(ref, done.get("n_slices", 0), done.get("timings_s") or {})
                continue
            study = self._drop(ref)
            if running is None:
                running = study
            else:                                  # queued behind the running one: never started, requeued free
                waiting.append(study)
        self.queue.extendleft(reversed(waiting))
        if running is not None:
            self._charge(running, exc)
        if self.replacements <= 0:
            self.actors[i] = None
            if all(a is None for a in self.actors) and (self.queue or self.in_flight):
                raise RayUnavailableError(f"every Ray worker died ({_cause(exc)}); finished studies are kept in "
                                          f"{self.out} and a rerun resumes")
            return
        self.actors[i] = self.start()
        self.replacements -= 1
        self.run.replaced += 1

    def _charge(self, study: Path, exc: Exception) -> None:
        """One more try of a study whose worker died on it: requeue it, or after MAX_ATTEMPTS record it as failed."""
        uid = study.name
        self.attempts[uid] = self.attempts.get(uid, 0) + 1
        self.run.retried.append(uid)
        if self.attempts[uid] < MAX_ATTEMPTS:
            log.warning("study %s: its Ray worker died (%s); retrying it on another worker (try %d of %d)", uid,
                        _cause(exc), self.attempts[uid] + 1, MAX_ATTEMPTS)
            self.queue.append(study)
            return
        log.warning("study %s: its Ray worker died %d times while detecting it; recorded as failed", uid,
                    self.attempts[uid])
        _record_failure(self.out, study, key=self.key, error=f"the Ray worker died {self.attempts[uid]} times while "
                                                             f"detecting this study (last: {_cause(exc)})")
        self.run.failed.append(uid)
        self.settled += 1

    def kill(self) -> None:
        """End every live actor (their models' memory is freed at once on a shared cluster)."""
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor)


def _record_failure(out: Path, study: Path, *, key: str, error: str) -> None:
    """Write a study's failure record as detect does (errors/<uid>.json; errors.csv lists it)."""
    from data_prep.runs.artifacts import write_json_atomic
    from data_prep.runs.registry import STUDY_COL
    from detector.detect_outputs import error_record

    write_json_atomic(error_record(out, study.name), {STUDY_COL: study.name, "path": str(study),
                                                                "stage": RAY_STAGE, "error": error,
                                                                "settings_key": key})


def _cause(exc: BaseException) -> str:
    """One line of a Ray error's long message: the raised exception's line for an error inside the worker's code
    (a RayTaskError, or an actor whose __init__ raised), else the first line (why the worker died)."""
    from ray.exceptions import RayTaskError

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    inside = isinstance(exc, RayTaskError) or bool(getattr(exc, "actor_init_failed", False))
    return lines[-1] if inside else lines[0]
