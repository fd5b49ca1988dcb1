"""Fault injection on model folders: pickle payloads, tampered, missing and extra files, old formats, --device.

Every case works on a copy of the session's tiny trained model folder (`trained`, conftest.py). A payload is
a pickle whose `__reduce__` touches a marker file when unpickled; each test first proves the payload is live
(unpickling it the unsafe way creates a control marker), then that spinefrac refuses the folder with exit
status 2, a message naming the file, and without creating the marker. "Resealed" folders have their manifest
recomputed, as someone who rewrites model.json could do: refusal must then come from safe loading itself.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import shutil

import joblib
import pandas as pd
import pytest
import torch

from data_prep.runs.manifest import build_manifest, file_sha256
from data_prep.runs.registry import STUDY_COL, TARGETS
from spinefrac.cli import main
from spinefrac.model_folder import MANIFEST_EXCLUDE, MODEL_JSON

pytestmark = pytest.mark.slow  # the session fixture trains a tiny model once

DET_WEIGHTS = pathlib.Path("detector/weights/best.pt")
LOC_WEIGHTS = pathlib.Path("locator/weights/best.pt")
AGGREGATOR = pathlib.Path("aggregator/aggregator.skops")


class Payload:
    """Unpickling this touches `marker`: the stand-in for any code a pickle could run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def model(trained, tmp_path):
    """A private copy of the trained model folder (without work/)."""
    dst = tmp_path / "model"
    shutil.copytree(trained / "model", dst, ignore=shutil.ignore_patterns("work"))
    return dst


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


def reseal(model: pathlib.Path) -> None:
    """Recompute model.json's manifest over the folder as it is now."""
    meta = json.loads((model / MODEL_JSON).read_text())
    meta["files"] = build_manifest(model, MANIFEST_EXCLUDE)
    (model / MODEL_JSON).write_text(json.dumps(meta))


def predict(trained, model, out, *extra):
    return main(["predict", str(trained / "test" / "test_images"), "--model", str(model), "--out", str(out),
                 "--test-csv", str(trained / "test" / "test.csv"), "--no-progress", *extra])


def assert_refused(trained, model, tmp_path, caplog, names: str, *words: str) -> None:
    """predict exits 2 before writing any output, and the error names `names` and says `words`."""
    caplog.clear()
    out = tmp_path / "pred"
    assert predict(trained, model, out) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and names in errors[0], errors
    for word in words:
        assert word in errors[0], errors[0]
    assert not (out / "boxes.csv").exists() and not (out / "predictions.csv").exists()


def live_control(dump, load, tmp_path) -> None:
    """Prove the payload format runs code when loaded the unsafe way (so its absence below means something)."""
    control = tmp_path / "CONTROL_RAN"
    path = tmp_path / "control.bin"
    dump(Payload(control), path)
    load(path)
    assert control.exists()


def test_pickled_detector_weights_are_refused_even_when_resealed(trained, model, marker, tmp_path, caplog):
    live_control(lambda obj, p: torch.save({"model": obj}, p), lambda p: torch.load(p, weights_only=False),
                 tmp_path)
    torch.save({"model": Payload(marker)}, model / DET_WEIGHTS)
    assert_refused(trained, model, tmp_path, caplog, str(DET_WEIGHTS), "differs from the model folder's manifest")
    reseal(model)
    assert_refused(trained, model, tmp_path, caplog, str(DET_WEIGHTS), "weights_only=True", "convert-weights",
                   "--trust")
    assert not marker.exists()


def test_pickled_locator_weights_are_refused(trained, model, marker, tmp_path, caplog):
    torch.save(Payload(marker), model / LOC_WEIGHTS)
    reseal(model)
    assert_refused(trained, model, tmp_path, caplog, str(LOC_WEIGHTS), "weights_only=True")
    assert not marker.exists()


def test_pickle_in_place_of_the_skops_aggregator_is_refused(trained, model, marker, tmp_path, caplog):
    live_control(lambda obj, p: p.write_bytes(pickle.dumps(obj)), lambda p: pickle.loads(p.read_bytes()), tmp_path)
    (model / AGGREGATOR).write_bytes(pickle.dumps({"level_models": Payload(marker), "patient_model": None}))
    reseal(model)
    assert_refused(trained, model, tmp_path, caplog, str(AGGREGATOR), "not a skops file")
    assert not marker.exists()


def test_old_joblib_aggregator_is_refused(trained, model, marker, tmp_path, caplog):
    live_control(joblib.dump, joblib.load, tmp_path)
    (model / AGGREGATOR).unlink()
    joblib.dump({"level_models": Payload(marker), "patient_model": None}, model / "aggregator" / "aggregator.joblib")
    reseal(model)
    assert_refused(trained, model, tmp_path, caplog, "aggregator.joblib", "pickle", "retrain")
    assert not marker.exists()


def test_skops_aggregator_needing_untrusted_types_is_refused(trained, model, marker, tmp_path, caplog):
    import skops.io as sio

    bundle = {"level_models": {"shared": functools.partial(os.system, f"touch {marker}")}, "patient_model": None}
    sio.dump(bundle, model / AGGREGATOR)
    reseal(model)
    assert_refused(trained, model, tmp_path, caplog, str(AGGREGATOR), "allow-list", "system")
    assert not marker.exists()


def test_weights_whose_architecture_would_eval_code_are_refused(trained, model, marker, tmp_path, caplog):
    """Weights-only loadable, but the architecture dict is a vector: an eval-ed activation or a non-layer global."""
    good = torch.load(model / DET_WEIGHTS, weights_only=True)
    cases = {"activation": f"__import__('pathlib').Path('{marker}').touch()"}
    for key, value in cases.items():
        evil = {**good, "architecture": {**good["architecture"], key: value}}
        torch.save(evil, model / DET_WEIGHTS)
        reseal(model)
        assert_refused(trained, model, tmp_path, caplog, str(DET_WEIGHTS), "activation")
    layers = [list(layer) for layer in good["architecture"]["backbone"]]
    layers[0][2] = "torch_load"  # a function in ultralytics.nn.tasks that parse_model would call with the args
    torch.save({**good, "architecture": {**good["architecture"], "backbone": layers}}, model / DET_WEIGHTS)
    reseal(model)
    assert_refused(trained, model, tmp_path, caplog, str(DET_WEIGHTS), "torch_load", "not a network layer")
    assert not marker.exists()


@pytest.mark.parametrize("rel", ["prior.json", "aggregation.yaml", str(DET_WEIGHTS), "aggregator/aggregator.json"])
def test_one_changed_byte_is_refused_naming_the_file(trained, model, tmp_path, caplog, rel):
    path = model / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert_refused(trained, model, tmp_path, caplog, rel, "SHA-256 changed")


@pytest.mark.parametrize("rel", [str(LOC_WEIGHTS), str(AGGREGATOR), "levels.yaml"])
def test_missing_file_is_refused_naming_it(trained, model, tmp_path, caplog, rel):
    (model / rel).unlink()
    assert_refused(trained, model, tmp_path, caplog, rel, "missing")


def test_extra_loadable_file_is_refused_but_export_caches_are_not_in_the_manifest(trained, model, marker, tmp_path,
                                                                                  caplog):
    (model / "aggregator" / "helper.pkl").write_bytes(pickle.dumps(Payload(marker)))
    assert_refused(trained, model, tmp_path, caplog, "helper.pkl", "not part of the model folder's manifest")
    assert not marker.exists()
    manifest = json.loads((model / MODEL_JSON).read_text())["files"]
    assert str(DET_WEIGHTS) in manifest and str(AGGREGATOR) in manifest
    assert not [rel for rel in manifest if rel.startswith("work/") or "openvino" in rel or rel.endswith(".onnx")]
    assert manifest[str(DET_WEIGHTS)] == file_sha256(model / DET_WEIGHTS)


def test_folder_of_the_old_format_is_refused(trained, model, tmp_path, caplog):
    meta = json.loads((model / MODEL_JSON).read_text())
    (model / MODEL_JSON).write_text(json.dumps({**meta, "format_version": 1}))
    assert_refused(trained, model, tmp_path, caplog, MODEL_JSON, "model format 1", "retrain")
    del meta["files"]
    (model / MODEL_JSON).write_text(json.dumps(meta))
    assert_refused(trained, model, tmp_path, caplog, MODEL_JSON, "no file manifest")


def test_gpu_trained_folder_predicts_on_cpu(trained, model, tmp_path, caplog):
    """A folder whose stage configs say train.device=0 predicts with --device cpu (and by default without a GPU)."""
    import yaml

    for stage in ("detector", "locator"):
        cfg = yaml.safe_load((model / f"{stage}.yaml").read_text())
        cfg["train"]["device"] = 0
        (model / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
    reseal(model)  # as `spinefrac train --set detector.set=[train.device=0]` would have written it
    runs = [("cpu", ["--device", "cpu"])]
    if not torch.cuda.is_available():
        runs.append(("default", []))
    for name, extra in runs:
        out = tmp_path / name
        assert predict(trained, model, out, *extra) == 0, caplog.text
        predictions = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str})
        assert len(predictions) == 4 and predictions[list(TARGETS)].notna().all().all()
        assert (predictions["failed"] == 0).all()
    if not torch.cuda.is_available():
        caplog.clear()
        assert predict(trained, model, tmp_path / "gpu", "--device", "0") == 2
        assert "device '0' is not available" in caplog.text and "--device cpu" in caplog.text


def test_convert_weights_needs_trust_and_makes_a_weights_only_file(marker, tmp_path, caplog):
    from ultralytics import YOLO

    from detector.weights import UnsafeWeightsError, read_weights

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, evil)
    assert main(["convert-weights", str(evil)]) == 2
    assert "evil.pt" in caplog.text and "--trust" in caplog.text
    assert not marker.exists()

    ultralytics_pt = tmp_path / "colleague.pt"
    YOLO("yolov8n.yaml").save(str(ultralytics_pt))
    with pytest.raises(UnsafeWeightsError, match="weights_only"):
        read_weights(ultralytics_pt)
    assert main(["convert-weights", str(ultralytics_pt), "--out", str(tmp_path / "safe.pt"), "--trust"]) == 0
    assert read_weights(tmp_path / "safe.pt")["source"]["sha256"] == file_sha256(ultralytics_pt)


def test_tampered_export_cache_is_not_trusted(trained, model, tmp_path):
    from detector.export import export_weights, fresh_export

    weights = model / DET_WEIGHTS
    onnx = export_weights(weights, fmt="onnx", imgsz=64)
    assert fresh_export(weights, "onnx", 64) == onnx
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0x01
    onnx.write_bytes(bytes(data))
    assert fresh_export(weights, "onnx", 64) is None  # a changed cache is re-exported, not used


def test_an_export_of_another_shape_than_the_config_asks_is_not_reused(trained, model, tmp_path):
    from data_prep.runs.config import load_config
    from detector.export import export_weights, fresh_export

    weights = model / DET_WEIGHTS
    dynamic = load_config("detector").export.to_dict() | {"dynamic": True}
    static = dynamic | {"dynamic": False, "batch": 4}
    onnx = export_weights(weights, fmt="onnx", imgsz=64, options=dynamic)
    assert fresh_export(weights, "onnx", 64, dynamic) == onnx
    assert fresh_export(weights, "onnx", 64, static) is None          # the config now asks for a static batch 4
    export_weights(weights, fmt="onnx", imgsz=64, options=static)
    assert fresh_export(weights, "onnx", 64, static) == onnx
    assert fresh_export(weights, "onnx", 64, static | {"batch": 8}) is None
    assert fresh_export(weights, "onnx", 64, dynamic) is None


def test_predict_loads_nothing_with_pickle(trained, model, tmp_path, monkeypatch):
    """Every torch.load of a whole predict (weights and export) is weights-only; joblib/pickle file loads never run."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle load ran during predict")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(joblib, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    for cache in model.rglob("*_openvino_model"):  # force an export too
        shutil.rmtree(cache)
    assert predict(trained, model, tmp_path / "pred", "--device", "cpu") == 0
    assert calls and all(flag is True for flag in calls), calls


# ---------------------------------------------------------------- names in a model folder (issue 23)
@pytest.mark.parametrize("where", ["parent", "absolute", "unlisted"])
def test_a_classifier_entry_outside_the_folder_or_manifest_is_refused(trained, model, tmp_path, caplog, where):
    meta = json.loads((model / MODEL_JSON).read_text())
    assert meta["classifier"], "the session model has classifiers"
    outside = tmp_path / "x.pt"
    shutil.copy(model / meta["classifier"][0], outside)          # valid weights: only where they lie is wrong
    if where == "unlisted":                                       # inside the folder, but not in the manifest
        shutil.copy(outside, model / "classifier" / "x.weights")
        entry = "classifier/x.weights"
    else:
        entry = "../x.pt" if where == "parent" else str(outside)
    meta["classifier"][0] = entry
    (model / MODEL_JSON).write_text(json.dumps(meta))
    assert_refused(trained, model, tmp_path, caplog, "classifier[0]", repr(entry))


def test_a_poisoned_export_cache_is_rebuilt_with_a_warning(trained, model, tmp_path, caplog):
    import yaml

    from data_prep.runs.artifacts import read_sidecar, write_sidecar
    from data_prep.runs.manifest import tree_sha256
    from detector.backends import load_predictor
    from detector.export import EXPORT_HASH_KEY, export_weights

    weights = model / DET_WEIGHTS
    export = export_weights(weights, fmt="openvino", imgsz=64)
    meta_yaml = export / "metadata.yaml"                # Ultralytics' metadata of an OpenVINO export
    data = yaml.safe_load(meta_yaml.read_text())
    data["names"] = "__import__('os').system('touch PWNED')"
    meta_yaml.write_text(yaml.safe_dump(data))
    sidecar = read_sidecar(export)                      # resealed: the cache's own hash matches again
    write_sidecar(export, kind=sidecar["kind"], inputs=sidecar["inputs"],
                  extra={**sidecar["extra"], EXPORT_HASH_KEY: tree_sha256(export)})
    with caplog.at_level("WARNING"):
        predictor = load_predictor(weights, imgsz=64, backend="openvino", device="cpu", conf=0.1, iou=0.5,
                                   max_det=10)
    assert predictor.backend == "openvino" and predictor.names == {0: "fracture"}
    assert str(export) in caplog.text and "not a literal" in caplog.text and "re-exporting" in caplog.text
    assert yaml.safe_load(meta_yaml.read_text())["names"] == {0: "fracture"}        # rebuilt
    meta_yaml.write_text(yaml.safe_dump({**data, "names": "{0: 'fracture'"}))        # malformed, given directly
    from data_prep.errors import InputError

    with pytest.raises(InputError, match=r"best_openvino_model: metadata names is .* not a literal"):
        load_predictor(export, imgsz=64, backend="auto", device="cpu", conf=0.1, iou=0.5, max_det=10)
    assert not (tmp_path / "PWNED").exists() and not pathlib.Path("PWNED").exists()
