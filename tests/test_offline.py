"""Ultralytics runs offline: a real tiny training + OpenVINO export with the network unreachable, in a fresh process.

Each check runs in a subprocess, because Ultralytics fixes its settings folder when first imported.
The subprocess replaces socket connect/getaddrinfo with functions that record the attempt and raise,
points HOME at an empty temp folder, and reports what happened as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import IMGSZ, make_yolo_dataset

SUBPROCESS_TIMEOUT_S = 300

PRELUDE = r'''
import json, socket, sys
from pathlib import Path

attempts = []

def _blocked(name):
    def refuse(*args, **kwargs):
        attempts.append([name, repr(args)[:200]])
        raise OSError(f"network unreachable (test): {name}")
    return refuse

socket.socket.connect = _blocked("socket.connect")
socket.socket.connect_ex = _blocked("socket.connect_ex")
socket.create_connection = _blocked("socket.create_connection")
socket.getaddrinfo = _blocked("socket.getaddrinfo")
socket.gethostbyname = _blocked("socket.gethostbyname")
args = json.loads(sys.argv[1])
report = {}
'''

CONFIGURE_ONLY = PRELUDE + r'''
from detector.offline import configure_ultralytics
configure_ultralytics(Path(args["home"]))
configure_ultralytics(Path(args["home"]))  # idempotent
import os
report["env"] = {k: os.environ.get(k) for k in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR",
                                                 "MPLCONFIGDIR", "CI")}
from ultralytics.utils import SETTINGS, USER_CONFIG_DIR, is_online
from ultralytics.utils.checks import check_font
report["user_config_dir"] = str(USER_CONFIG_DIR)
report["settings"] = dict(SETTINGS)
report["online"] = is_online()
report["fonts"] = [str(check_font("Arial.ttf")), str(check_font("Arial.Unicode.ttf"))]
from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
result = OptInChecker().check(enable_opt_in_dialog=False, disable_in_ci=True)  # as OpenVINO's converter asks
report["openvino_telemetry_declined"] = result == ConsentCheckResult.DECLINED
report["attempts"] = list(attempts)
check_font("NotBundled.ttf")  # control: a font we did not provide is fetched, so the harness must see it
report["control_attempts"] = attempts[len(report["attempts"]):]
Path(args["report"]).write_text(json.dumps(report))
'''

TRAIN_AND_EXPORT = PRELUDE + r'''
from detector.offline import configure_ultralytics
configure_ultralytics(Path(args["home"]))
import numpy as np
import torch
from ultralytics.engine.trainer import BaseTrainer

threads_seen = set()
_step = BaseTrainer.optimizer_step

def step(self):
    threads_seen.add(torch.get_num_threads())
    return _step(self)

BaseTrainer.optimizer_step = step
from data_prep.runs.config import load_config
from detector.backends import load_predictor
from detector.train import train_yolo

cfg = load_config("detector", overrides=args["overrides"])
run = train_yolo(Path(args["data"]), Path(args["out"]), config=cfg)
report["run"] = str(run)
report["threads_seen"] = sorted(threads_seen)
try:
    pred = load_predictor(run / "weights" / "best.pt", imgsz=args["imgsz"], backend="auto", conf=0.001,
                          iou=0.5, max_det=5)
    report["backend"] = pred.backend
    report["n_out"] = len(pred.predict(np.zeros((2, args["imgsz"], args["imgsz"], 3), np.uint8)))
except Exception as exc:  # reported, then asserted on by the test
    report["predict_error"] = repr(exc)
report["attempts"] = attempts
Path(args["report"]).write_text(json.dumps(report))
'''


def _run(script: str, args: dict, fake_home: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("YOLO_", "MPLCONFIGDIR", "SPINEFRAC_HOME", "CI"))}
    env["HOME"] = str(fake_home)
    env["XDG_CONFIG_HOME"] = env["XDG_CACHE_HOME"] = str(fake_home / "xdg-unused")  # must stay unused
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(args["report"]).read_text())


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_configure_sets_offline_env_fonts_settings_and_declines_telemetry(tmp_path):
    fake_home, home = tmp_path / "fake_home", tmp_path / "spinefrac_home"
    fake_home.mkdir()
    report = _run(CONFIGURE_ONLY, {"home": str(home), "report": str(tmp_path / "r.json")}, fake_home, tmp_path)
    env = report["env"]
    assert env["YOLO_OFFLINE"] == "1" and env["YOLO_AUTOINSTALL"] == "0" and env["CI"] == "true"
    assert Path(env["YOLO_CONFIG_DIR"]).is_relative_to(home) and Path(env["MPLCONFIGDIR"]).is_relative_to(home)
    assert Path(report["user_config_dir"]) == home / "ultralytics" / "Ultralytics"
    assert report["online"] is False
    settings = report["settings"]
    assert settings["sync"] is False and settings["wandb"] is False and settings["mlflow"] is False
    assert Path(settings["datasets_dir"]).is_relative_to(home) and Path(settings["runs_dir"]).is_relative_to(home)
    import matplotlib

    dejavu = (Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf").read_bytes()
    for font in report["fonts"]:  # check_font resolves both names locally, to a copy of DejaVuSans
        assert Path(font).parent == home / "ultralytics" / "Ultralytics"
        assert Path(font).read_bytes() == dejavu
    assert report["openvino_telemetry_declined"] is True
    assert report["attempts"] == []
    assert report["control_attempts"], "the blocked socket did not record a deliberate download attempt"
    assert _files_under(fake_home) == [], "something was written under $HOME"


@pytest.mark.slow
def test_training_and_export_complete_with_network_unreachable(tmp_path):
    fake_home, home = tmp_path / "fake_home", tmp_path / "spinefrac_home"
    fake_home.mkdir()
    data = make_yolo_dataset(tmp_path / "ds")
    args = {"home": str(home), "data": str(data), "out": str(tmp_path / "run"), "imgsz": IMGSZ,
            "report": str(tmp_path / "r.json"),
            "overrides": [f"render.imgsz={IMGSZ}", "train.epochs=1", "train.batch=4", "train.device=cpu",
                          "train.threads=2", "train.plots=true"]}
    work = tmp_path / "cwd"
    work.mkdir()
    report = _run(TRAIN_AND_EXPORT, args, fake_home, work)
    assert report["attempts"] == [], f"network was attempted: {report['attempts']}"
    run = Path(report["run"])
    assert (run / "weights" / "best.pt").is_file() and (run / "results.png").is_file()
    assert report["threads_seen"] == [2], "training steps did not run at the configured thread count"
    assert "predict_error" not in report, report.get("predict_error")
    assert report["n_out"] == 2 and report["backend"] in ("openvino", "onnx", "pytorch")
    assert _files_under(fake_home) == [], "something was written under $HOME"
    assert _files_under(work) == [], "something was written in the current folder"


CHECK_ARCHITECTURE = r'''
import json, os, sys
from pathlib import Path
args = json.loads(sys.argv[1])
os.environ["SPINEFRAC_HOME"] = args["home"]
from detector.weights import check_architecture
check_architecture({"backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Conv", [16, 3, 2]]]}, None)
from ultralytics.utils import USER_CONFIG_DIR
Path(args["report"]).write_text(json.dumps({"user_config_dir": str(USER_CONFIG_DIR)}))
'''


def test_checking_a_model_folder_imports_ultralytics_configured(tmp_path):
    """open_model checks architectures first: that first import of Ultralytics must already be configured."""
    fake_home, home = tmp_path / "fake_home", tmp_path / "spinefrac_home"
    fake_home.mkdir()
    report = _run(CHECK_ARCHITECTURE, {"home": str(home), "report": str(tmp_path / "r.json")}, fake_home, tmp_path)
    assert Path(report["user_config_dir"]) == home / "ultralytics" / "Ultralytics"
    assert _files_under(fake_home) == [], "something was written under $HOME"
