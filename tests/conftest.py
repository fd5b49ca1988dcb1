"""Shared fixtures. Tests write only under tmp_path; real reference files are optional."""

from __future__ import annotations

import os

import pytest

# Keep Ultralytics and matplotlib from writing under $HOME or reaching the network during tests.
os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def spinefrac_home(tmp_path_factory):
    """Point SPINEFRAC_HOME (Ultralytics settings, fonts, matplotlib cache) at a temp folder for the session."""
    home = tmp_path_factory.mktemp("spinefrac_home")
    old = os.environ.get("SPINEFRAC_HOME")
    os.environ["SPINEFRAC_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SPINEFRAC_HOME", None)
    else:
        os.environ["SPINEFRAC_HOME"] = old


@pytest.fixture
def realdata():
    """Return a function name -> Path of a real file in ../shared/realdata, skipping when absent."""
    from data_prep.realdata import realdata_file

    def get(name: str):
        path = realdata_file(name)
        if path is None:
            pytest.skip(f"real reference file {name} not present (../shared/realdata)")
        return path

    return get


@pytest.fixture(scope="module")
def yolo_home(tmp_path_factory):
    """Point the project folder (Ultralytics settings, fonts, matplotlib cache) at a temp folder, configured."""
    home = tmp_path_factory.mktemp("yolo_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPINEFRAC_HOME", str(home))
        from detector.offline import configure_ultralytics

        configure_ultralytics(home)
        yield home


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory):
    """Synthesise tiny train/test sets and train every stage once per session (1 epoch): data/, test/, model/."""
    from helpers import TINY_SYNTH

    from spinefrac.cli import main

    root = tmp_path_factory.mktemp("pipeline")
    sets = [f"--set={s}" for s in TINY_SYNTH]
    assert main(["synth", str(root / "data"), "--studies", "12", "--seed", "21", "--no-progress", *sets]) == 0
    assert main(["synth", str(root / "test"), "--studies", "4", "--seed", "22", "--split", "test", "--no-progress",
                 *sets]) == 0
    cfg = root / "pipeline.yaml"
    cfg.write_text(
        'detector:\n  set: ["train.epochs=1", "render.imgsz=64", "train.plots=false", "train.val=false"]\n'
        'locator:\n  set: ["train.epochs=2", "render.imgsz=64", "train.plots=false", "train.val=false"]\n'
        # a 2-epoch locator is barely trained: take its faint detections as vertebrae, so levels, crops and
        # the classifier's scores exist (the tests check the wiring, not the accuracy)
        'levels:\n  set: ["locate.min_conf=0.0001", "locate.presence_threshold=0.0002", '
        '"locate.column_threshold=0.0002"]\n'
        # the classifier renders the crack channel: train and predict carry it (test_pipeline.py)
        'classifier:\n  set: ["train.epochs=1", "render.imgsz=32", "crops.slices_per_level=2",'
        ' "render.crack_channel=2"]\n'
        'aggregation:\n  set: ["splits.n_folds=2"]\n')
    assert main(["train", str(root / "data"), "--out", str(root / "model"), "--config", str(cfg),
                 "--no-progress"]) == 0
    return root


@pytest.fixture(scope="session")
def trained(trained_pipeline):
    """The same session-trained tiny pipeline (data/, test/, model/) under the name the model-folder tests use."""
    return trained_pipeline
