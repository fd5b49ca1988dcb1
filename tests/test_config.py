"""Config merging: defaults < YAML < --set, with type checks and suggestions for typos."""

from __future__ import annotations

import pytest
import yaml

from data_prep.runs.config import ConfigError, load_config, with_overrides


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """A throwaway stage 'toy' with known defaults, found through a patched default path."""
    defaults = {"render": {"imgsz": 384, "window_level": 400.0, "recipe": "2.5d", "flip": True},
                "train": {"epochs": 30, "device": "cpu", "windows": [[1, 2]]}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(defaults))
    monkeypatch.setattr("data_prep.runs.config.default_config_path", lambda name: path)
    return "toy"


def test_defaults_then_file_then_overrides(stage, tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  epochs: 5\nrender:\n  imgsz: 256\n")
    cfg = load_config(stage, user, ["train.epochs=7", "render.window_level=300"])
    assert cfg.train.epochs == 7          # --set wins over the file
    assert cfg.render.imgsz == 256        # the file wins over the default
    assert cfg.render.window_level == 300.0 and isinstance(cfg.render.window_level, float)
    assert cfg.train.device == "cpu"      # untouched default survives
    assert cfg.to_dict()["render"]["recipe"] == "2.5d"


def test_unknown_key_is_an_error_with_a_suggestion(stage):
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*did you mean 'epochs'"):
        load_config(stage, None, ["train.epoch=3"])


def test_type_mismatch_names_the_key_and_source(stage, tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("render:\n  imgsz: big\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'render.imgsz' must be int, found 'big'"):
        load_config(stage, user)
    with pytest.raises(ConfigError, match="true or false"):
        load_config(stage, None, ["render.flip=1"])
    with pytest.raises(ConfigError, match="must be a section"):
        load_config(stage, None, ["render=3"])


def test_override_syntax_and_missing_file(stage, tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(stage, None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(stage, tmp_path / "nope.yaml")


def test_config_is_read_only(stage):
    cfg = load_config(stage)
    with pytest.raises(TypeError):
        cfg["train"] = {}  # type: ignore[index]
    with pytest.raises(AttributeError, match="did you mean"):
        _ = cfg.train.epoch


def test_every_packaged_config_loads():
    """Each configs/*.yaml parses and is a mapping of sections (a broken default file fails here)."""
    from importlib import resources
    from pathlib import Path

    folder = Path(str(resources.files("configs")))
    stages = sorted(p.stem for p in folder.glob("*.yaml"))
    assert "detector" in stages
    for name in stages:
        cfg = load_config(name)
        assert len(cfg) > 0, name


def test_demo_overrides_fold_into_every_stage_and_resolve():
    """`spinefrac demo` folds demo.<stage>_set into each stage; every key must exist there (unknown keys fail)."""
    from spinefrac.demo import demo_config
    from spinefrac.pipeline import stage_configs

    cfg = demo_config(None, ["detector.set=[\"train.epochs=3\"]"])
    stages = stage_configs(cfg)
    det = stages["detector"]
    assert any(s.startswith("train.epochs=") for s in cfg.demo.detector_set)
    assert det.train.epochs == 3                          # the user's own detector.set wins over the demo's
    assert det.render.recipe == "windows" and det.prepare.boxed_every == 2
    assert stages["aggregation"].splits.aggregator_fraction == 0.4
    from data_prep.synthetic.synth import synth_config

    synth = synth_config(cfg.demo.world, None, list(cfg.demo.synth_set))
    # the demo's studies have the real geometry (512 px over the whole neck) and go through the spine ROI
    assert synth.image.size == 512 and det.roi.enabled
    assert det.roi.size_mm < min(synth.image.fov_mm)       # the crop is a part of the slice, not all of it


def test_with_overrides_changes_a_loaded_config_without_losing_its_other_values(tmp_path):
    """A variant of a resolved config keeps every value that differs from the defaults, and is checked again."""
    user = tmp_path / "detector.yaml"
    user.write_text("detect:\n  conf: 0.123\n")
    loaded = load_config("detector", user)
    variant = with_overrides("detector", loaded, ["detect.overlays=false"])
    assert variant.detect.overlays is False and loaded.detect.overlays is True      # the original is untouched
    assert variant.detect.conf == 0.123                                             # not reset to the default
    assert {k: v for k, v in variant.to_dict().items() if k != "detect"} == \
        {k: v for k, v in loaded.to_dict().items() if k != "detect"}
    with pytest.raises(ConfigError, match="ovrelays"):
        with_overrides("detector", loaded, ["detect.ovrelays=false"])
    with pytest.raises(ConfigError, match="detect.conf"):
        with_overrides("detector", loaded, ["detect.conf=7"])                     # out of range: validated again
