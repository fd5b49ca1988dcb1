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
"""Studies queued on one actor at a time: one running, one waiting (decode of the next is not shared)."""
MAX_ATTEMPTS = 3
"""Tries of a study during which its worker died; then it is recorded as failed (errors/<uid>.json)."""
REPLACEMENTS_PER_ACTOR = 2
"""A dead actor is replaced by a new one at most this many times per actor requested; then the run stops."""
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
    if text in (LOCAL_ADDRESS, "auto") or text.startswith("ray://"):
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


def detect_on_ray(study_dirs: Sequence[Path], *, model: Any, out: Path, address: str = LOCAL_ADDRESS,
                  actors: int | None = None, labels: Path | None = None, workers: int = 2, progress: bool = True,
                  overwrite: bool = False, device: str | None = None) -> dict[str, Any]:
    """Detect every study on Ray actors into `out` and rebuild its tables; return predict's detect summary."""
    from detector.detect import detect_markers, detect_settings, rebuild_outputs

    ray = require_ray()
    t0 = time.perf_counter()
    out = Path(out).absolute()
    gpu = device is not None and str(device).strip().lower() not in CPU_DEVICES
    kwargs = runner_kwargs(model, labels=labels, workers=workers, device="0" if gpu else device)
    settings = detect_settings(kwargs["config"], weights=kwargs["weights"], locator=kwargs["locator"],
                               locator_config=kwargs["locator_config"], levels_config=kwargs["levels_config"],
                               classifier=kwargs["classifier"], classifier_config=kwargs["classifier_config"])
    markers = detect_markers(out, settings)
    plan = markers.plan([s.name for s in study_dirs], overwrite=overwrite)   # refuses other settings, before Ray
    if overwrite:
        _drop_other_errors(out, markers.key)
    run = RayRun(skipped=list(plan.skip))
    todo = [Path(s).absolute() for s in study_dirs if s.name not in set(plan.skip)]
    if run.skipped:
        log.info("detect: %d of %d studies already finished in %s (skipped; --overwrite redoes them)",
                 len(run.skipped), len(study_dirs), out)
    started_here = _connect(ray, address)
    describe: dict[str, Any] = {"settings_key": markers.key}
    try:
        if todo:
            describe = _stream(ray, todo, out=out, kwargs=kwargs, actors=actors, gpu=gpu, run=run,
                               progress=progress, rebuild_every=max(1, int(kwargs["config"]["detect"]["rebuild_every"])),
                               key=markers.key)
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
    """Start or join Ray unless this process is connected already; return whether this call connected."""
    if ray.is_initialized():
        return False
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


def _actor_options(ray: Any, actors: int | None, gpu: bool) -> tuple[int, dict[str, Any]]:
    """How many actors and the resources each reserves (CPU_PER_ACTOR, fewer if asked for more actors than fit)."""
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0.0))
    if gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < GPUS_PER_ACTOR:
            raise RayUnavailableError("--device names a GPU but the Ray cluster has none: start GPU workers "
                                      "(`ray start --address ... --num-gpus N`) or pass --device cpu")
        n = actors or gpus // GPUS_PER_ACTOR
        return n, {"num_gpus": GPUS_PER_ACTOR, "num_cpus": min(CPUS_PER_ACTOR, cpus / n) if cpus else 0}
    if cpus <= 0:
        raise RayUnavailableError("the Ray cluster offers no CPUs to run workers on")
    n = actors or max(1, int(cpus // CPUS_PER_ACTOR))
    return n, {"num_cpus": min(float(CPUS_PER_ACTOR), cpus / n)}


def _stream(ray: Any, todo: Sequence[Path], *, out: Path, kwargs: Mapping[str, Any], actors: int | None, gpu: bool,
            run: RayRun, progress: bool, rebuild_every: int, key: str) -> dict[str, Any]:
    """Stream `todo` through the actors, replacing dead ones and retrying their studies; return the provenance."""
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm.auto import tqdm

    from detector.detect import rebuild_outputs

    n, options = _actor_options(ray, actors, gpu)
    remote = ray.remote(DetectActor).options(max_restarts=0, max_task_retries=0, **options)

    def start() -> Any:
        return remote.remote(str(out), dict(kwargs))

    pool = [start() for _ in range(min(n, len(todo)))]
    run.actors = len(pool)
    log.info("Ray: %d actors (%s each) over %d studies", len(pool), options, len(todo))
    try:
        describe = ray.get(pool[0].describe.remote())
    except RayActorError as exc:       # its models failed to load: every actor would fail the same way
        raise RayUnavailableError(f"a Ray worker could not load the models: {_cause(exc)}") from None
    queue: deque[Path] = deque(todo)
    attempts: dict[str, int] = {}
    on_actor: dict[int, deque[Any]] = {i: deque() for i in range(len(pool))}   # refs in submission order
    in_flight: dict[Any, tuple[int, Path]] = {}
    budget = REPLACEMENTS_PER_ACTOR * len(pool)
    done = 0
    bar = tqdm(total=len(todo), desc="detect (ray)", unit="study", disable=not progress)
    try:
        while queue or in_flight:
            for i, actor in enumerate(pool):
                while actor is not None and queue and len(on_actor[i]) < IN_FLIGHT_PER_ACTOR:
                    study = queue.popleft()
                    ref = actor.run.remote(str(study))
                    on_actor[i].append(ref)
                    in_flight[ref] = (i, study)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            i, study = in_flight[ref]
            try:
                outcome = ray.get(ref)
            except RayActorError as exc:
                budget = _replace(pool, i, on_actor, in_flight, queue, attempts, run, exc, budget=budget,
                                  start=start, out=out, key=key)
                done = len(run.finished) + len(run.failed)
                bar.n = done
                bar.refresh()
                continue
            except RayTaskError as exc:    # run() itself broke (not the study: that is recorded, never raised)
                outcome = None
                _record_failure(out, study, key=key, error=f"the Ray worker raised: {_cause(exc)}")
            del in_flight[ref]
            on_actor[i].remove(ref)
            if outcome is not None and outcome.finished:
                run.finished.append(outcome.uid)
                run.n_slices += outcome.n_slices
                for k, v in outcome.timings.items():
                    run.timings[k] = run.timings.get(k, 0.0) + v
            else:
                run.failed.append(study.name)
            done += 1
            bar.update(1)
            if done % rebuild_every == 0:
                rebuild_outputs(out, config=kwargs["config"])
    finally:
        bar.close()
        for actor in pool:
            if actor is not None:
                ray.kill(actor)
    return describe


def _replace(pool: list[Any], i: int, on_actor: dict[int, deque[Any]], in_flight: dict[Any, tuple[int, Path]],
             queue: deque[Path], attempts: dict[str, int], run: RayRun, exc: Exception, *, budget: int,
             start: Any, out: Path, key: str) -> int:
    """Actor i died: charge the study it was running, requeue its other studies, start a replacement."""
    refs = list(on_actor[i])
    on_actor[i].clear()
    for k, ref in enumerate(refs):
        _, study = in_flight.pop(ref)
        if k:                               # queued behind the running one: never started, requeued free
            queue.appendleft(study)
            continue
        uid = study.name
        attempts[uid] = attempts.get(uid, 0) + 1
        run.retried.append(uid)
        if attempts[uid] >= MAX_ATTEMPTS:
            log.warning("study %s: its Ray worker died %d times while detecting it; recorded as failed", uid,
                        attempts[uid])
            _record_failure(out, study, key=key, error=f"the Ray worker died {attempts[uid]} times while detecting "
                                                       f"this study (last: {_cause(exc)})")
            run.failed.append(uid)
        else:
            log.warning("study %s: its Ray worker died (%s); retrying it on another worker (try %d of %d)", uid,
                        _cause(exc), attempts[uid] + 1, MAX_ATTEMPTS)
            queue.append(study)
    if budget <= 0:
        pool[i] = None
        if all(a is None for a in pool):
            raise RayUnavailableError(f"every Ray worker died ({_cause(exc)}); finished studies are kept in {out} "
                                      "and a rerun resumes")
        return budget
    pool[i] = start()
    run.replaced += 1
    return budget - 1


def _record_failure(out: Path, study: Path, *, key: str, error: str) -> None:
    """Write a study's failure record as detect does (errors/<uid>.json; errors.csv lists it)."""
    from data_prep.artifacts import write_json_atomic
    from data_prep.registry import STUDY_COL
    from detector.detect import ERRORS_DIR

    write_json_atomic(out / ERRORS_DIR / f"{study.name}.json", {STUDY_COL: study.name, "path": str(study),
                                                                "stage": RAY_STAGE, "error": error,
                                                                "settings_key": key})


def _drop_other_errors(out: Path, key: str) -> None:
    """With --overwrite, remove failure records made with other settings (as a local detect run does)."""
    from detector.detect import ERRORS_DIR

    for path in sorted((out / ERRORS_DIR).glob("*.json")) if (out / ERRORS_DIR).is_dir() else []:
        try:
            made_with = json.loads(path.read_text(encoding="utf-8")).get("settings_key")
        except (OSError, ValueError):
            made_with = None
        if made_with != key:
            path.unlink(missing_ok=True)


def _cause(exc: BaseException) -> str:
    """The first line of a Ray error's message (its tracebacks are long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
