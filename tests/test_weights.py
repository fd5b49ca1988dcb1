"""detector.weights: the architecture check that stands between a weights file and Ultralytics' model builder."""

from __future__ import annotations

import copy

import pytest
import torch

from data_prep.errors import InputError


@pytest.fixture(scope="module")
def arch(yolo_home):
    from ultralytics.nn.tasks import yaml_model_load

    return yaml_model_load("yolov8n.yaml")


def test_bundled_architecture_passes_and_builds(arch, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from detector.weights import build_model, check_architecture, read_weights, save_weights

    check_architecture(arch, None)
    model = DetectionModel(copy.deepcopy(arch), nc=1, verbose=False)
    model.names = {0: "fracture"}
    path = save_weights(model, tmp_path / "w.pt", source={"file": "test"})
    payload = read_weights(path)
    assert payload["names"] == {0: "fracture"} and payload["architecture"]["backbone"] == arch["backbone"]
    rebuilt = build_model(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], rebuilt(x)[0])


@pytest.mark.parametrize("activation, ok", [
    ("nn.SiLU()", True), ("torch.nn.LeakyReLU(0.1, inplace=True)", True),
    ("nn.SiLU(__import__('os'))", False), ("os.system('x')", False), ("nn.functional.relu(1)", False),
    ("nn.Module.__subclasses__()", False), ("nn.SiLU(**{'a': 1})", False), ("lambda: 0", False)])
def test_activation_must_be_a_torch_nn_class_with_literals(arch, activation, ok):
    from detector.weights import check_architecture

    spec = {**arch, "activation": activation}
    if ok:
        check_architecture(spec, None)
    else:
        with pytest.raises(InputError, match="activation"):
            check_architecture(spec, None)


@pytest.mark.parametrize("module, arg", [("torch_load", None), ("check_requirements", None), ("Conv", "1+__x__"),
                                          ("nn.functional", None), (7, None)])
def test_layers_must_be_module_classes_and_args_names_or_literals(arch, module, arg):
    from detector.weights import check_architecture

    layers = copy.deepcopy(arch["backbone"])
    layers[0][2] = module
    if arg is not None:
        layers[0][3] = [*layers[0][3], arg]
    with pytest.raises(InputError, match=r"backbone\[0\]"):
        check_architecture({**arch, "backbone": layers}, None)


def test_non_plain_payload_is_refused(arch, tmp_path):
    from detector.weights import WEIGHTS_FORMAT, WEIGHTS_VERSION, UnsafeWeightsError, read_weights

    path = tmp_path / "w.pt"
    torch.save({"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "architecture": arch, "names": {0: "a"},
                "state_dict": {"w": torch.zeros(1)}, "source": {"extra": torch.zeros(1)}}, path)
    with pytest.raises(InputError, match="source.extra holds a Tensor"):
        read_weights(path)
    torch.save({"w": torch.zeros(1)}, path)  # a bare state_dict: weights-only, but no architecture
    with pytest.raises(UnsafeWeightsError, match="not a spinefrac-yolo-weights file"):
        read_weights(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(UnsafeWeightsError, match="weights_only=True"):
        read_weights(path)
