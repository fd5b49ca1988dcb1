"""train_yolo / `spinefrac train-detector`: run folders, what Ultralytics was told, fine-tuning, folds, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import IMGSZ, N_FOLDS, N_TRAIN, N_VAL, make_yolo_dataset

from data_prep.errors import InputError
from data_prep.runs.config import ConfigError, load_config

FAST = [f"render.imgsz={IMGSZ}", "train.batch=4", "train.device=cpu", "train.plots=false"]


@pytest.mark.slow
def test_cli_train_detector_writes_a_new_numbered_run(yolo_home, tmp_path):
    from spinefrac.cli import main

    data = make_yolo_dataset(tmp_path / "ds")
    out = tmp_path / "runs" / "det"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("an earlier run")
    code = main(["train-detector", "-q", str(data), "--out", str(out), "--epochs", "2", "--imgsz", str(IMGSZ),
                 "--batch", "4", "--device", "cpu", "--set", "train.plots=true"])
    assert code == 0
    run = tmp_path / "runs" / "det2"
    assert (out / "keep.txt").read_text() == "an earlier run" and not (out / "weights").exists()
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "results.png", "args.yaml", "config.yaml",
                 "train.meta.json"):
        assert (run / name).is_file(), name
    with open(run / "results.csv", newline="") as fh:
        epochs = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in epochs] == [1, 2]
    assert "metrics/mAP50(B)" in epochs[0]

    args = yaml.safe_load((run / "args.yaml").read_text())  # what Ultralytics actually trained with
    cfg = load_config("detector")
    assert args["imgsz"] == IMGSZ and args["epochs"] == 2 and args["batch"] == 4 and args["device"] == "cpu"
    assert args["pretrained"] is False and args["model"] == "yolov8n.yaml"
    assert args["hsv_h"] == args["hsv_s"] == args["hsv_v"] == 0.0
    for key in ("degrees", "translate", "scale", "fliplr", "flipud", "mosaic", "seed", "patience"):
        assert args[key] == cfg.train[key], key
    assert Path(args["save_dir"]).resolve() == run.resolve()

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["render"]["imgsz"] == IMGSZ and saved["train"]["epochs"] == 2
    meta = json.loads((run / "train.meta.json").read_text())
    assert meta["counts"]["epochs_run"] == 2 and meta["runtime_s"] > 0
    assert "metrics/mAP50(B)" in meta["extra"]["final_metrics"]
    assert meta["inputs"]["model"] == "yolov8n.yaml" and meta["extra"]["from_scratch"] is True


@pytest.mark.slow
def test_fine_tune_from_local_pt_on_another_fold(yolo_home, tmp_path):
    from ultralytics import YOLO

    from detector.train import train_yolo
    from detector.weights import UnsafeWeightsError, convert_checkpoint, read_weights

    data = make_yolo_dataset(tmp_path / "ds")
    start = tmp_path / "start.pt"
    YOLO("yolov8n.yaml").save(str(start))
    out = tmp_path / "ft"
    out.mkdir()
    cfg = load_config("detector", overrides=[*FAST, "train.epochs=1", "train.fold=2"])
    with pytest.raises(UnsafeWeightsError, match="convert-weights"):  # an Ultralytics pickle is not unpickled
        train_yolo(data, out, config=cfg, model=start, overwrite=True)
    convert_checkpoint(start, trust=True)
    run = train_yolo(data, out, config=cfg, model=start, overwrite=True)
    assert run == out and (run / "weights" / "best.pt").is_file()
    for name in ("best.pt", "last.pt"):  # what training leaves loads weights-only
        assert read_weights(run / "weights" / name)["names"] == {0: "fracture"}
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert Path(args["model"]) == start and args["pretrained"] is True
    view = Path(args["data"])
    assert view == run / "data_fold2.yaml"
    val_list = Path(yaml.safe_load(view.read_text())["val"]).read_text().split()
    expected = [str((tmp_path / "ds" / f"images/train/train{i}.png").resolve())
                for i in range(N_TRAIN) if 1 + i % (N_FOLDS - 1) == 2]
    assert sorted(val_list) == sorted(expected)


def test_fold_view_lists_images_by_fold(tmp_path):
    from detector.train import _fold_data_yaml

    data = make_yolo_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    run.mkdir()
    assert _fold_data_yaml(data, None, run) == data
    assert _fold_data_yaml(data, 0, run) == data  # data.yaml was written for fold 0 already
    view = yaml.safe_load(_fold_data_yaml(data, 1, run).read_text())
    train = Path(view["train"]).read_text().split()
    val = Path(view["val"]).read_text().split()
    assert view["names"] == {0: "fracture"} and view["spinefrac"]["fold"] == 1
    assert len(train) + len(val) == N_TRAIN + N_VAL and not set(train) & set(val)
    assert all(Path(p).is_file() for p in train + val)
    assert any("/images/val/" in p for p in train)  # fold-0 images go back to training
    with pytest.raises(InputError, match="no validation"):
        _fold_data_yaml(data, N_FOLDS + 1, run)


def test_missing_weights_fail_before_any_work(tmp_path):
    from detector.train import train_yolo

    data = make_yolo_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    cfg = load_config("detector", overrides=FAST)
    with pytest.raises(InputError, match="never downloads") as err:
        train_yolo(data, out, config=cfg, model=tmp_path / "yolov8n.pt")
    assert "yolov8n.pt" in str(err.value)
    assert not out.exists()
    with pytest.raises(ConfigError, match="architecture YAML"):
        train_yolo(data, out, config=cfg, model="yolov8n")
    with pytest.raises(InputError, match="dataset not found: neither a dataset YAML"):
        train_yolo(tmp_path / "nope.yaml", out, config=cfg)
    assert not out.exists()


def test_cache_setting_is_checked(tmp_path):
    from detector.train import train_yolo

    data = make_yolo_dataset(tmp_path / "ds")
    with pytest.raises(ConfigError, match="train.cache"):   # refused when the config is loaded, before training
        train_yolo(data, tmp_path / "run", config=load_config("detector", overrides=[*FAST, "train.cache=memory"]))
    assert not (tmp_path / "run").exists()


def test_train_sections_hold_ct_safe_augmentation():
    """Colour jitter would shift the HU window the channels encode; up-down flips swap anterior/posterior."""
    for stage in ("detector", "locator"):
        train = load_config(stage).train
        assert train.hsv_h == train.hsv_s == train.hsv_v == 0.0, stage
        assert train.flipud == 0.0 and train.fliplr > 0 and train.degrees > 0, stage
        assert str(train.model).endswith(".yaml"), stage


def test_unknown_architecture_yaml_is_an_input_error(yolo_home, tmp_path):
    from detector.train import train_yolo

    data = make_yolo_dataset(tmp_path / "ds")
    with pytest.raises(InputError, match="yolov99z.yaml"):
        train_yolo(data, tmp_path / "run", config=load_config("detector", overrides=FAST), model="yolov99z.yaml")
    assert not (tmp_path / "run").exists()
