"""Every config key is validated when loaded: types, choices and ranges, with the key, value and source named."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from configs import schema as config_schema
from data_prep.runs.config import ConfigError, load_config


def _yaml_keys(data: dict, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a YAML mapping (a mapping-valued leaf of the schema counts as one key)."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys += _yaml_keys(value, dotted + ".") if isinstance(value, dict) else [dotted]
    return keys


def _schema_entry(schema: type[BaseModel], dotted: str) -> bool:
    model: object = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return i > 0            # a dict-typed field (e.g. fracture.kinds_c1) holds the rest
        if part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


def _packaged_configs() -> dict[str, Path]:
    folder = Path(str(resources.files("configs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def test_every_key_of_every_packaged_config_has_a_schema_entry():
    """A new key in configs/*.yaml without a line in configs/schema.py fails here, naming it."""
    configs = _packaged_configs()
    assert set(configs) == set(config_schema.SCHEMAS), "every configs/*.yaml needs a schema (and vice versa)"
    missing = [f"{stage}: {key}" for stage, path in configs.items()
               for key in _yaml_keys(yaml.safe_load(path.read_text()))
               if not _schema_entry(config_schema.SCHEMAS[stage], key)]
    assert not missing, ("keys without a schema entry (add one line each to their section class in "
                         f"configs/schema.py): {missing}")


def test_every_required_schema_key_has_a_documented_default():
    """The other direction: a schema key the YAML lacks would make every load fail."""
    for stage, path in _packaged_configs().items():
        keys = set(_yaml_keys(yaml.safe_load(path.read_text())))

        def walk(model: type[BaseModel], prefix: str, stage: str = stage, keys: set[str] = keys) -> None:
            for name, field in model.model_fields.items():
                sub = field.annotation
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{prefix}{name}.")
                elif field.is_required():
                    assert any(k == f"{prefix}{name}" or k.startswith(f"{prefix}{name}.") for k in keys), \
                        f"{stage}: {prefix}{name} is in the schema but not in configs/{stage}.yaml"

        walk(config_schema.SCHEMAS[stage], "")


def test_choices_agree_with_the_modules_that_use_them():
    from aggregation import candidates, features, model, splits
    from detector import backends, levels, render, train, yolo_dataset

    assert config_schema.RECIPES == render.RECIPES
    assert config_schema.NEGATIVE_SAMPLING == yolo_dataset.NEGATIVE_SAMPLING
    assert set(config_schema.CACHE) == set(train.CACHE_CHOICES)
    assert set(config_schema.OMP_WAITS) == set(train.OMP_WAIT_CHOICES)
    assert set(config_schema.BACKENDS) == set(backends.BACKEND_CHOICES)
    assert config_schema.LEVEL_MODES == model.LEVEL_MODES
    assert config_schema.CALIBRATIONS == model.CALIBRATION_METHODS
    assert set(config_schema.AREA_UNITS) == set(features.AREA_UNITS)
    assert set(config_schema.SPLIT_SCHEMES) == set(splits.SCHEMES)
    assert config_schema.CANDIDATE_CHOICES == candidates.CHOICES
    assert config_schema.DECODE_MODELS == levels.DECODE_MODELS


@pytest.mark.parametrize(("stage", "override", "allowed", "suggestion"), [
    ("aggregation", "model.calibration=isotonc", "'sigmoid', 'isotonic', 'none'", "isotonic"),
    ("detector", "render.recipe=2.5D", "'2.5d', 'windows'", "2.5d"),
    ("locator", "render.recipe=2.5D", "'2.5d', 'windows'", "2.5d"),
    ("detector", "detect.backend=onxx", "'auto', 'pytorch', 'onnx', 'openvino'", "onnx"),
    ("aggregation", "splits.scheme=hold-out", "'auto', 'boxed', 'holdout', 'oof'", "holdout"),
])
def test_a_bad_choice_names_key_value_choices_and_suggestion(stage, override, allowed, suggestion):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as exc:
        load_config(stage, None, [override])
    text = str(exc.value)
    assert f"--set {override}" in text and f"{key!r} = {value!r}" in text
    assert allowed in text and f"did you mean {suggestion!r}" in text


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    user = tmp_path / "my_detector.yaml"
    user.write_text("detect:\n  conf: 1.5\ntrain:\n  epochs: -3\n")
    with pytest.raises(ConfigError) as exc:
        load_config("detector", user)
    lines = str(exc.value).splitlines()
    assert len(lines) == 2                          # every bad key at once, one line each
    assert any(f"{user}: 'detect.conf' = 1.5" in ln and "less than or equal to 1" in ln for ln in lines)
    assert any(f"{user}: 'train.epochs' = -3" in ln and "greater than or equal to 1" in ln for ln in lines)


@pytest.mark.parametrize("override", [
    "train.batch=0", "prepare.val_fold=5", "render.windows=[[400.0, 1800.0]]", "detect.iou=-0.1",
    "train.fliplr=2.0", "render.imgsz=0", "overlays.box_color=[0, 0, 300]", "train.patience=-1",
])
def test_out_of_range_detector_values_fail_at_load(override):
    with pytest.raises(ConfigError, match=f"--set {override.split('=')[0]}"):
        load_config("detector", None, [override])


def test_cross_key_checks_name_the_section_and_the_override():
    with pytest.raises(ConfigError, match=r"--set relative_z.start=.*section 'relative_z'.*not for C1"):
        load_config("levels", None, ["relative_z.start=[0.9, 0.2, 0.361, 0.438, 0.512, 0.58, 0.646]"])
    with pytest.raises(ConfigError, match=r"image.fov_mm.*low <= high"):
        load_config("synth", None, ["image.fov_mm=[200.0, 100.0]"])
    with pytest.raises(ConfigError, match=r"'detector.set.0' = 3"):
        load_config("pipeline", None, ["detector.set=[3]"])


def test_ultralytics_keys_pass_through_only_from_the_list():
    from detector.train import _ultralytics_args

    cfg = load_config("detector", None, ["train.amp=false", "train.resume=true", "train.weight_decay=0.001"])
    args = _ultralytics_args(cfg.train)
    assert args["amp"] is False and args["resume"] is True and args["weight_decay"] == 0.001
    assert "amp" not in load_config("detector").train              # absent unless set: Ultralytics' default
    with pytest.raises(ConfigError, match=r"'train.amp' = 'maybe'"):
        load_config("detector", None, ["train.amp=maybe"])
    with pytest.raises(ConfigError, match="unknown key 'train.project'"):
        load_config("detector", None, ["train.project=elsewhere"])   # spinefrac sets it: never passed through
    with pytest.raises(ConfigError, match="unknown key 'detect.amp'"):
        load_config("detector", None, ["detect.amp=true"])          # pass-through only where listed


def test_a_model_folder_config_is_validated_with_its_path(tmp_path):
    """A hand-edited stage config inside a model folder is refused when the folder is opened."""
    saved = tmp_path / "aggregation.yaml"
    data = load_config("aggregation").to_dict()
    data["model"]["calibration"] = "isotonc"
    saved.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"{saved}: 'model.calibration' = 'isotonc'"):
        load_config("aggregation", saved)
