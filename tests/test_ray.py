"""predict --ray: a local Ray instance writes the same tables as a single-process predict, a dead worker's study
is retried on another actor (or recorded as failed when its workers keep dying), and a rerun resumes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from data_prep.runs.registry import STUDY_COL
from spinefrac import ray_runner
from spinefrac.cli import main
from spinefrac.ray_runner import MAX_ATTEMPTS, RAY_STAGE, DetectActor, parse_address

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='Ray is not installed (pip install "spinefrac[ray]")')
LOCAL_CPUS = 2
TEST_OBJECT_STORE = 80 * 2 ** 20      # bytes; Ray's minimum is about 75 MiB
TABLES = ("boxes.csv", "slices.csv", "vertebrae.csv", "level_boxes.csv", "predictions.csv", "submission.csv",
          "evidence.csv")
EXIT_ERROR = 2


# ---------------------------------------------------------------- no Ray needed
@pytest.mark.parametrize("text", ["auto", "local", "10.0.0.5:6379", "ray://head:10001"])
def test_cluster_addresses_are_accepted(text):
    assert parse_address(text) == text


@pytest.mark.parametrize("text", ["data/test_images", "head", "head:port", ":6379"])
def test_other_addresses_are_refused_with_the_forms_named(text):
    with pytest.raises(ValueError, match="ray://HOST:PORT"):
        parse_address(text)


def test_ray_missing_names_the_extra_before_any_work(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` now raises ImportError
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path), "--model", str(tmp_path / "no_model"), "--out", str(out), "--ray",
                 "--no-progress"]) == EXIT_ERROR
    assert 'pip install "spinefrac[ray]"' in caplog.text
    assert "no_model" not in caplog.text                   # refused before the model folder is even opened
    assert not out.exists()


class _FakeCluster:
    """Stands in for the ray module where only cluster_resources() is read."""

    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@pytest.mark.parametrize(("resources", "actors", "gpu", "expected"), [
    ({"CPU": 16.0}, None, False, (8, {"num_cpus": 2.0})),                # CPUS_PER_ACTOR each by default
    ({"CPU": 3.0}, None, False, (1, {"num_cpus": 2.0})),
    ({"CPU": 2.0}, 4, False, (4, {"num_cpus": 0.5})),                    # more actors than fit: they share
    ({"CPU": 8.0, "GPU": 2.0}, None, True, (2, {"num_gpus": 1.0, "num_cpus": 2.0})),
    ({"CPU": 8.0, "GPU": 2.0}, 4, True, (4, {"num_gpus": 0.5, "num_cpus": 2.0})),
])
def test_actors_default_to_the_clusters_cpus_or_gpus_and_always_fit(resources, actors, gpu, expected):
    assert ray_runner._actor_options(_FakeCluster(**resources), actors, gpu) == expected


def test_a_gpu_device_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(ray_runner.RayUnavailableError, match="has none"):
        ray_runner._actor_options(_FakeCluster(CPU=8.0), None, True)


def test_each_actor_uses_as_many_threads_as_cpus_it_reserved_with_the_same_settings_key():
    from data_prep.runs.config import load_config
    from detector.detect import detect_settings

    every_core = load_config("detector", None, ["detect.inference_threads=0"])
    one = ray_runner.actor_config(every_core, 1.5)
    assert one["detect"]["inference_threads"] == 1
    assert ray_runner.actor_config(every_core, 0.5)["detect"]["inference_threads"] == 1
    assert ray_runner.actor_config(every_core, 4.0)["detect"]["inference_threads"] == 4
    assert detect_settings(one, weights="w.pt") == detect_settings(every_core, weights="w.pt")
    chosen = load_config("detector", None, ["detect.inference_threads=3"])
    assert ray_runner.actor_config(chosen, 1.0)["detect"]["inference_threads"] == 3       # the user's choice stands


class _NeverInit:
    """A ray module stand-in that fails the test if Ray is asked to connect."""

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        raise AssertionError("ray.init was called for an address where nothing answers")


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_nothing_answers_is_refused_at_once(scheme):
    with socket.socket() as probe:               # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ray_runner.RayUnavailableError, match=f"nothing answers at 127.0.0.1:{port}"):
        ray_runner._connect(_NeverInit(), f"{scheme}127.0.0.1:{port}")


def test_spinefrac_imports_without_loading_ray():
    code = ("import sys, spinefrac.cli, spinefrac.pipeline, spinefrac.ray_runner; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ---------------------------------------------------------------- on a local Ray instance
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs, a small object store) for the module; predict --ray joins it."""
    if not HAVE_RAY:
        pytest.skip("Ray is not installed")
    import ray

    ray.init(address="local", num_cpus=LOCAL_CPUS, object_store_memory=TEST_OBJECT_STORE, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def studies(trained, tmp_path_factory):
    """A copy of the session's test studies and test.csv, one study with a truncated slice."""
    root = tmp_path_factory.mktemp("ray_studies")
    shutil.copytree(trained / "test" / "test_images", root / "test_images")
    shutil.copy(trained / "test" / "test.csv", root / "test.csv")
    broken = sorted((root / "test_images").iterdir())[-1]
    victim = sorted(broken.glob("*.dcm"))[len(list(broken.glob("*.dcm"))) // 2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def single(trained, studies, tmp_path_factory):
    """The single-process predict of the same studies with the same model: the reference."""
    out = tmp_path_factory.mktemp("ray_single") / "pred"
    assert main(_predict_args(trained, studies, out)) == 0
    return out


def _predict_args(trained: Path, studies: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", str(studies / "test_images"), "--model", str(trained / "model"), "--out", str(out),
            "--test-csv", str(studies / "test.csv"), "--no-progress", *extra]


def _assert_same_outputs(out: Path, reference: Path) -> None:
    """Every table equal to the reference's, the same failed studies for the same reason, the same overlays."""
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(reference / name), obj=name)
    errors, ref_errors = (pd.read_csv(p / "errors.csv", dtype={STUDY_COL: str}) for p in (out, reference))
    assert list(errors[STUDY_COL]) == list(ref_errors[STUDY_COL]) and len(errors) == 1
    assert list(errors["error"]) == list(ref_errors["error"])
    for sub in ("done", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(p.name for p in (reference / sub).iterdir())


def _this_run(out: Path) -> dict:
    return json.loads((out / "boxes.csv.meta.json").read_text())["extra"]["this_run"]


def _dying_actor(victim: str, flag: Path | None) -> type:
    """An actor that dies (os._exit) on `victim`: once (when `flag` is given, it marks the death), or always."""

    class DyingActor(DetectActor):
        def run(self, study: str):
            if Path(study).name == victim and (flag is None or not flag.exists()):
                if flag is not None:
                    flag.touch()
                os._exit(1)
            return super().run(study)

    return DyingActor


@needs_ray
@pytest.mark.slow
def test_predict_on_ray_writes_what_a_single_process_run_writes(local_ray, trained, studies, single, tmp_path):
    out = tmp_path / "ray"
    assert main(_predict_args(trained, studies, out, "--ray", "--ray-actors", "2")) == 0
    _assert_same_outputs(out, single)
    run = _this_run(out)
    assert run["actors"] == 2 and run["finished"] == 3 and run["failed"] == 1 and run["retried"] == []
    assert local_ray.is_initialized()                 # joined the module's instance, left it running

    # a GPU --device on a cluster without GPUs: a clear refusal, not a worker that never starts
    assert main(_predict_args(trained, studies, tmp_path / "gpu", "--ray", "--device", "0")) == EXIT_ERROR


@needs_ray
@pytest.mark.slow
def test_a_dead_workers_study_is_retried_and_a_rerun_skips_finished_studies(local_ray, trained, studies, single,
                                                                            tmp_path, monkeypatch, caplog):
    good = sorted((studies / "test_images").iterdir())[0].name
    flag = tmp_path / "died_once"
    monkeypatch.setattr(ray_runner, "DetectActor", _dying_actor(good, flag))
    out = tmp_path / "ray"
    assert main(_predict_args(trained, studies, out, "--ray", "--ray-actors", "2")) == 0
    assert flag.exists()                              # the worker did die on that study...
    assert _this_run(out)["retried"] == [good] and _this_run(out)["actors_replaced"] == 1
    _assert_same_outputs(out, single)                 # ...and another one finished it: nothing differs
    assert "retrying it on another worker" in caplog.text

    monkeypatch.setattr(ray_runner, "DetectActor", DetectActor)
    assert main(_predict_args(trained, studies, out, "--ray", "--ray-actors", "2")) == 0
    run = _this_run(out)
    assert run["skipped"] == 3 and run["finished"] == 0 and run["failed"] == 1   # only the broken one is retried
    _assert_same_outputs(out, single)

    # a folder made with other settings is refused before Ray runs anything, as a local run refuses it
    marker = out / "done" / f"{good}.json"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "settings_key": "0" * 16}))
    assert main(_predict_args(trained, studies, out, "--ray")) == EXIT_ERROR
    assert "other settings" in caplog.text


@needs_ray
@pytest.mark.slow
def test_a_study_its_workers_keep_dying_on_is_recorded_as_failed(local_ray, trained, studies, single, tmp_path,
                                                                 monkeypatch):
    good = sorted((studies / "test_images").iterdir())[0].name
    monkeypatch.setattr(ray_runner, "DetectActor", _dying_actor(good, None))
    out = tmp_path / "ray"
    assert main(_predict_args(trained, studies, out, "--ray", "--ray-actors", "2")) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    assert set(errors.index) == set(pd.read_csv(single / "errors.csv", dtype={STUDY_COL: str})[STUDY_COL]) | {good}
    run = _this_run(out)
    assert run["retried"] == [good] and run["actors_replaced"] == MAX_ATTEMPTS   # no other study was charged
    assert errors.loc[good, "stage"] == RAY_STAGE
    assert f"died {MAX_ATTEMPTS} times" in errors.loc[good, "error"]
    predictions = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    reference = pd.read_csv(single / "predictions.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)
    others = [u for u in reference.index if u != good]
    pd.testing.assert_frame_equal(predictions.loc[others], reference.loc[others])   # the rest are untouched
    assert not (out / "done" / f"{good}.json").exists()


def _no_models() -> type:
    """An actor whose models cannot load (defined in a function: Ray ships it to the workers by value)."""

    class NoModels(DetectActor):
        def __init__(self, out, runner_kwargs):
            raise OSError("weights unreadable on this node")

    return NoModels


@needs_ray
@pytest.mark.slow
def test_workers_that_cannot_load_or_all_die_stop_the_run_with_a_clear_message(local_ray, trained, studies, tmp_path,
                                                                              monkeypatch, caplog):
    monkeypatch.setattr(ray_runner, "DetectActor", _no_models())
    assert main(_predict_args(trained, studies, tmp_path / "a", "--ray")) == EXIT_ERROR
    assert "could not load the models" in caplog.text and "weights unreadable on this node" in caplog.text

    first = sorted((studies / "test_images").iterdir())[0].name
    monkeypatch.setattr(ray_runner, "DetectActor", _dying_actor(first, None))
    monkeypatch.setattr(ray_runner, "REPLACEMENTS_PER_ACTOR", 0)
    assert main(_predict_args(trained, studies, tmp_path / "b", "--ray", "--ray-actors", "1")) == EXIT_ERROR
    assert "every Ray worker died" in caplog.text and "a rerun resumes" in caplog.text
    assert not (tmp_path / "b" / "predictions.csv").exists()
