"""Fault injection: resume never mixes results of two settings, and an output folder has one writer at a time.

detect/prepare-detector reruns into the same folder with other settings are refused naming the setting,
and with --overwrite give exactly what a clean run gives; `spinefrac train` redoes the stages whose
settings changed and those downstream, and keeps the rest; a second concurrent run on one folder refuses
naming the holder, and a stale lock is taken over.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.dicom.writer import write_series
from data_prep.runs.locks import HOLDER_NAME
from data_prep.runs.registry import LEVELS, STUDY_COL
from data_prep.runs.resume import file_sha256, settings_key
from spinefrac.cli import main

ROWS, COLS, N = 48, 64, 12
IMGSZ = 32
MODEL_BOX = (8.0, 4.0, 24.0, 20.0)
REPO = Path(__file__).resolve().parents[1]
DETECT_SETS = ["--set", "roi.enabled=false", "--set", f"render.imgsz={IMGSZ}", "--set", "detect.batch=5",
               "--set", "overlays.display_size=64", "--set", "overlays.top_n=1"]
HOLD_SECONDS = 60      # the helper process holds the lock at most this long (killed by the test before)


def slice_hu(k: int) -> float:
    return -480.0 + 40.0 * k


def write_study(root: Path, uid: str, *, n: int = N, boxes: tuple = ()) -> Path:
    hu = np.stack([np.full((ROWS, COLS), slice_hu(k), dtype=np.float32) for k in range(n)])
    for number, x, y, w, h in boxes:
        hu[number - 1, int(y) + 1:int(y + h) - 1, int(x) + 1:int(x + w) - 1] = 1300.0
    write_series(root / uid, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=2.0, z_top_mm=100.0)
    return root / uid


class WeightsPredictor:
    """A fake detector whose scores depend on its weights file (a number): other weights, other boxes."""

    backend = "fake"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def predict(self, images):
        return [np.array([[*MODEL_BOX, self.factor * float(im[IMGSZ // 2, IMGSZ // 2, 1]) / 255.0, 0]],
                         dtype=np.float32) for im in images]


@pytest.fixture
def fake_detector(monkeypatch, tmp_path):
    """Load WeightsPredictor(factor read from the weights file) instead of a YOLO model."""
    monkeypatch.setenv("SPINEFRAC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("detector.backends.load_predictor",
                        lambda weights, **kw: WeightsPredictor(float(Path(weights).read_text())))


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "test_images"
    for uid in ("4.1", "4.2", "4.3"):
        write_study(root, uid)
    return root


def weights(tmp_path: Path, name: str, factor: float) -> Path:
    path = tmp_path / name
    path.write_text(f"{factor}\n")
    return path


def detect(studies, w: Path, out: Path, *extra: str) -> int:
    return main(["detect", *[str(s) for s in (studies if isinstance(studies, list) else [studies])],
                 "--weights", str(w), "--out", str(out), "--workers", "1", "--no-progress", *DETECT_SETS, *extra])


def tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(out / name, dtype={STUDY_COL: str}) for name in ("boxes.csv", "slices.csv",
                                                                             "errors.csv")}


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_dtype=False, obj=name)


# ---------------------------------------------------------------- detect: settings key
def test_detect_rerun_with_another_conf_is_refused_then_overwrite_equals_a_clean_run(images, fake_detector, tmp_path,
                                                                                      caplog):
    w = weights(tmp_path, "w.pt", 1.0)
    out = tmp_path / "det"
    assert detect(images, w, out) == 0
    before = tables(out)
    caplog.clear()
    assert detect(images, w, out, "--conf", "0.3") == 2
    assert "detect.conf: 0.01 -> 0.3" in caplog.text and "--overwrite" in caplog.text
    for name, table in tables(out).items():                  # nothing was touched
        pd.testing.assert_frame_equal(table, before[name], obj=name)

    assert detect(images, w, out, "--conf", "0.3", "--overwrite") == 0
    clean = tmp_path / "clean"
    assert detect(images, w, clean, "--conf", "0.3") == 0
    assert_same_tables(out, clean)
    assert len(tables(clean)["boxes.csv"]) < len(before["boxes.csv"])   # the new conf did change the result
    # the same settings again: every study skipped, outputs unchanged
    caplog.clear()
    caplog.set_level("INFO")
    assert detect(images, w, out, "--conf", "0.3") == 0
    assert "3 of 3 studies already finished" in caplog.text
    assert_same_tables(out, clean)


def test_detect_rerun_with_other_weights_is_refused_then_overwrite_equals_a_clean_run(images, fake_detector, tmp_path,
                                                                                       caplog):
    out = tmp_path / "det"
    assert detect(images, weights(tmp_path, "a.pt", 1.0), out) == 0
    other = weights(tmp_path, "b.pt", 0.5)                    # other weights: scores halve
    caplog.clear()
    assert detect(images, other, out) == 2
    assert "detector.weights_sha256" in caplog.text and str(out) in caplog.text
    assert detect(images, other, out, "--overwrite") == 0
    clean = tmp_path / "clean"
    assert detect(images, other, clean) == 0
    assert_same_tables(out, clean)
    scores = tables(out)["boxes.csv"]["score"]
    assert scores.max() <= 0.5 + 1e-6                          # no box of the first weights survived


def test_detect_never_mixes_even_for_studies_new_to_the_folder(images, fake_detector, tmp_path, caplog):
    w = weights(tmp_path, "w.pt", 1.0)
    out = tmp_path / "det"
    assert detect([images / "4.1", images / "4.2"], w, out) == 0
    caplog.clear()
    # 4.3 was never done here, but the folder's combined tables would mix two conf thresholds
    assert detect([images / "4.3"], w, out, "--conf", "0.2") == 2
    assert "detect.conf" in caplog.text
    assert not (out / "done" / "4.3.json").exists()
    assert detect([images / "4.3"], w, out, "--conf", "0.2", "--overwrite") == 0
    assert set(tables(out)["slices.csv"][STUDY_COL]) == {"4.3"}          # the other-settings studies are gone
    assert sorted(p.stem for p in (out / "done").glob("*.json")) == ["4.3"]
    assert not list((out / "parts").glob("4.1.*"))


def test_done_markers_of_an_older_version_are_refused(images, fake_detector, tmp_path, caplog):
    w = weights(tmp_path, "w.pt", 1.0)
    out = tmp_path / "det"
    assert detect(images, w, out) == 0
    marker = out / "done" / "4.2.json"
    data = json.loads(marker.read_text())
    for key in ("settings_key", "settings"):
        data.pop(key)
    marker.write_text(json.dumps(data))
    caplog.clear()
    assert detect(images, w, out) == 2
    assert "older version" in caplog.text and "4.2" in caplog.text


def test_overwrite_removes_parts_the_new_settings_do_not_make(images, fake_detector, tmp_path):
    """A study redone with other settings loses its old part files (e.g. level boxes of an earlier locator run)."""
    w = weights(tmp_path, "w.pt", 1.0)
    out = tmp_path / "det"
    assert detect(images, w, out) == 0
    stale = out / "parts" / "4.1.level_boxes.csv"
    pd.DataFrame({STUDY_COL: ["4.1"], "level": [LEVELS[0]]}).to_csv(stale, index=False)
    marker = out / "done" / "4.1.json"
    data = json.loads(marker.read_text())
    data["files"].append("parts/4.1.level_boxes.csv")
    marker.write_text(json.dumps(data))
    assert detect(images, w, out, "--conf", "0.2", "--overwrite") == 0
    assert not stale.exists() and not (out / "level_boxes.csv").exists()


# ---------------------------------------------------------------- prepare-detector: settings key
@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    box = (20.5, 10.25, 20.0, 14.0)
    boxed = {"5.1": [4, 5, 6], "5.2": [7, 8]}
    train, rows = [], []
    for uid, numbers in boxed.items():
        write_study(root / "train_images", uid, boxes=tuple((m, *box) for m in numbers))
        train.append({STUDY_COL: uid, "patient_overall": 1, **{lv: int(lv == "C2") for lv in LEVELS}})
        rows += [{STUDY_COL: uid, "x": box[0], "y": box[1], "width": box[2], "height": box[3], "slice_number": m}
                 for m in numbers]
    for uid in ("5.3", "5.4"):
        write_study(root / "train_images", uid)
        train.append({STUDY_COL: uid, "patient_overall": 0, **dict.fromkeys(LEVELS, 0)})
    pd.DataFrame(train).to_csv(root / "train.csv", index=False)
    pd.DataFrame(rows).to_csv(root / "train_bounding_boxes.csv", index=False)
    return root


def prepare(root: Path, out: Path, *extra: str) -> int:
    return main(["prepare-detector", str(root), "--out", str(out), "--workers", "1", "--no-progress",
                 "--set", "roi.enabled=false", "--set", "prepare.n_folds=2", "--set", "prepare.margin_slices=2",
                 *extra])


def test_prepare_detector_rerun_with_another_imgsz_is_refused_then_redone(data_root, tmp_path, caplog):
    import cv2

    out = tmp_path / "ds"
    assert prepare(data_root, out, "--imgsz", "32") == 0
    index = pd.read_csv(out / "index.csv", dtype={STUDY_COL: str})
    caplog.clear()
    assert prepare(data_root, out, "--imgsz", "48") == 2
    assert "render.imgsz: 32 -> 48" in caplog.text and "prepare-detector" in caplog.text
    pd.testing.assert_frame_equal(pd.read_csv(out / "index.csv", dtype={STUDY_COL: str}), index)

    assert prepare(data_root, out, "--imgsz", "48", "--overwrite") == 0
    clean = tmp_path / "clean"
    assert prepare(data_root, clean, "--imgsz", "48") == 0
    redone = pd.read_csv(out / "index.csv", dtype={STUDY_COL: str})
    pd.testing.assert_frame_equal(redone, pd.read_csv(clean / "index.csv", dtype={STUDY_COL: str}))
    for rel in redone["image"]:
        assert cv2.imread(str(out / rel)).shape[:2] == (48, 48), rel     # no 32 px image of the first run left
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) == sorted(redone["image"])


def test_prepare_detector_rerun_with_other_roi_settings_is_refused(data_root, tmp_path, caplog):
    out = tmp_path / "ds"
    assert prepare(data_root, out, "--imgsz", "32") == 0
    caplog.clear()
    caplog.set_level("INFO")
    # roi.size_mm does not matter while the ROI is off ...
    assert prepare(data_root, out, "--imgsz", "32", "--set", "roi.size_mm=50") == 0
    assert "already finished" in caplog.text
    caplog.clear()
    # ... turning it on does
    assert prepare(data_root, out, "--imgsz", "32", "--set", "roi.enabled=true", "--set", "roi.fallback=full") == 2
    assert "roi.enabled: false -> true" in caplog.text


# ---------------------------------------------------------------- output folder lock
def hold_lock(folder: Path) -> subprocess.Popen:
    """Start a process that holds `folder`'s lock (command "holder-test"); return once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from data_prep.runs.locks import output_lock
        with output_lock({str(folder)!r}, command="holder-test"):
            print("locked", flush=True)
            time.sleep({HOLD_SECONDS})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_concurrent_detect_refuses_naming_the_holder(images, fake_detector, tmp_path, caplog):
    out = tmp_path / "det"
    proc = hold_lock(out)
    try:
        assert detect(images, weights(tmp_path, "w.pt", 1.0), out) == 2
    finally:
        proc.kill()
        proc.wait()
    assert f"pid {proc.pid}" in caplog.text and "holder-test" in caplog.text
    assert f"host {socket.gethostname()}" in caplog.text and "started 20" in caplog.text
    assert not (out / "done").exists() and not (out / "boxes.csv").exists()     # refused before any work


def test_a_second_concurrent_train_or_prepare_refuses_at_once(data_root, tmp_path, caplog):
    model = tmp_path / "model"
    proc = hold_lock(model)
    try:
        assert main(["train", str(data_root), "--out", str(model), "--no-progress"]) == 2
        assert f"pid {proc.pid}" in caplog.text
        assert not (model / "model.json").exists()
        caplog.clear()
        assert prepare(data_root, model) == 2          # prepare-* --out is locked too
        assert "holder-test" in caplog.text
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(images, fake_detector, tmp_path, caplog):
    out = tmp_path / "det"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    (out / HOLDER_NAME).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(),
                                               "started": "2026-01-01T00:00:00+0000", "command": "killed run"}))
    assert detect(images, weights(tmp_path, "w.pt", 1.0), out) == 0
    assert "stale lock" in caplog.text and f"pid {dead_pid}" in caplog.text
    assert len(tables(out)["slices.csv"]) == 3 * N
    assert not (out / HOLDER_NAME).exists()                  # released at the end


def test_a_lock_record_from_another_host_is_not_taken_over(images, fake_detector, tmp_path, caplog):
    out = tmp_path / "det"
    out.mkdir()
    (out / HOLDER_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x",
                                               "command": "remote run"}))
    assert detect(images, weights(tmp_path, "w.pt", 1.0), out) == 2
    assert "elsewhere.example" in caplog.text and HOLDER_NAME in caplog.text
    assert not (out / "done").exists()


# ---------------------------------------------------------------- train: stage keys
@pytest.mark.slow
def test_train_rerun_with_a_changed_detector_setting_redoes_the_detector_stages_only(trained_pipeline, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained_pipeline / "model", model)
    before = json.loads((model / "model.json").read_text())["stages"]
    cfg = tmp_path / "pipeline.yaml"          # the session's config with one detector setting changed
    session = (trained_pipeline / "pipeline.yaml").read_text()
    changed = session.replace('"train.val=false"]', '"train.val=false", "prepare.margin_slices=3"]', 1)
    assert changed != session
    cfg.write_text(changed)
    log = train_cli(trained_pipeline / "data", model, cfg)
    after = json.loads((model / "model.json").read_text())["stages"]
    for name in ("prepare-locator", "train-locator", "prepare-classifier", "train-classifier-fold0",
                 "train-classifier-fold1"):                                 # kept, untouched
        assert after[name] == before[name], name
        assert f"stage {name}: done already" in log
    for name in ("prepare-detector", "train-detector", "detect-aggregator-studies-fold0",
                 "detect-aggregator-studies-fold1", "train-aggregator"):
        assert after[name]["key"] != before[name]["key"], name
        assert f"stage {name} redone: its settings changed" in log, name
    assert "detector.prepare.margin_slices: 10 -> 3" in log
    assert "upstream.train-detector" in log                                # why the detections were redone
    meta = json.loads((model / "work" / "detector_dataset" / "index.csv.meta.json").read_text())
    assert meta["config"]["prepare"]["margin_slices"] == 3                  # the dataset was rebuilt
    # the aggregator's detections were made by the new detector weights, with the settings the stage recorded
    det_meta = json.loads((model / "work" / "aggregator_detect" / "fold0" / "boxes.csv.meta.json").read_text())
    fold0 = after["detect-aggregator-studies-fold0"]["settings"]["detect"]
    assert det_meta["extra"]["settings_key"] == settings_key(fold0)
    assert fold0["detector"]["weights_sha256"] == \
        file_sha256(model / "detector" / "weights" / "best.pt")
    # a second rerun with the same settings does nothing
    log = train_cli(trained_pipeline / "data", model, cfg)
    assert json.loads((model / "model.json").read_text())["stages"] == after
    assert log.count("done already") == len(after)


def train_cli(data: Path, model: Path, cfg: Path) -> str:
    """Run `spinefrac train` as its own process (as a user would, with Ultralytics' logging set up its way); return its log."""
    run = subprocess.run([sys.executable, "-m", "spinefrac", "train", str(data), "--out", str(model), "--config",
                          str(cfg), "--no-progress"], cwd=REPO, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


# ---------------------------------------------------------------- the shared mechanism (data_prep/runs/resume.py)
def test_settings_changes_are_named_key_by_key():
    from data_prep.runs.resume import changed_settings

    old = {"detect": {"conf": 0.01, "iou": 0.5}, "roi": {"enabled": False}}
    new = {"detect": {"conf": 0.2, "iou": 0.5}, "roi": {"enabled": True, "size_mm": 80.0}}
    assert changed_settings(old, new) == ["detect.conf: 0.01 -> 0.2", "roi.enabled: false -> true",
                                          "roi.size_mm: <not recorded> -> 80.0"]
    assert changed_settings(new, new) == []


def test_an_export_folder_is_hashed_by_its_files(tmp_path):
    a, b = tmp_path / "a_openvino_model", tmp_path / "b_openvino_model"
    for folder in (a, b):
        folder.mkdir()
        (folder / "model.xml").write_text("<net/>")
        (folder / "model.bin").write_bytes(b"\x00\x01")
    assert file_sha256(a) == file_sha256(b)
    (b / "model.bin").write_bytes(b"\x00\x02")
    assert file_sha256(a) != file_sha256(b)
    (b / "model.bin").write_bytes(b"\x00\x01")
    (b / "model.bin").rename(b / "other.bin")                       # a renamed file is another export
    assert file_sha256(a) != file_sha256(b)


def test_a_corrupt_done_marker_means_the_study_is_redone(images, fake_detector, tmp_path, caplog):
    w = weights(tmp_path, "w.pt", 1.0)
    out = tmp_path / "det"
    assert detect(images, w, out) == 0
    clean = tables(out)
    (out / "done" / "4.2.json").write_text('{"StudyInstanceUID": "4.2", "settings_k')     # cut short by a crash
    caplog.clear()
    caplog.set_level("INFO")
    assert detect(images, w, out) == 0
    assert "unreadable done marker" in caplog.text and "4.2" in caplog.text
    assert "2 of 3 studies already finished" in caplog.text
    for name, table in tables(out).items():
        pd.testing.assert_frame_equal(table, clean[name], obj=name)


@pytest.mark.slow
def test_predict_rerun_with_another_model_is_refused_then_overwrite_equals_a_clean_run(trained_pipeline, tmp_path,
                                                                                      caplog):
    import yaml

    from data_prep.runs.manifest import build_manifest
    from spinefrac.model_folder import MANIFEST_EXCLUDE, MODEL_JSON

    other = tmp_path / "other_model"                        # the same weights, another detect.conf
    shutil.copytree(trained_pipeline / "model", other, ignore=shutil.ignore_patterns("work"))
    cfg = yaml.safe_load((other / "detector.yaml").read_text())
    cfg["detect"]["conf"] = 0.3
    (other / "detector.yaml").write_text(yaml.safe_dump(cfg))
    meta = json.loads((other / MODEL_JSON).read_text())
    meta["files"] = build_manifest(other, MANIFEST_EXCLUDE)   # as `spinefrac train` would have written it
    (other / MODEL_JSON).write_text(json.dumps(meta))

    def predict(model: Path, out: Path, *extra: str) -> int:
        return main(["predict", str(trained_pipeline / "test" / "test_images"), "--model", str(model), "--out",
                     str(out), "--workers", "1", "--no-progress", "--device", "cpu", *extra])

    out = tmp_path / "pred"
    assert predict(trained_pipeline / "model", out) == 0
    first = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str})
    caplog.clear()
    assert predict(other, out) == 2
    assert "detect.conf: 0.01 -> 0.3" in caplog.text and "--overwrite" in caplog.text
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str}), first)
    assert predict(other, out, "--overwrite") == 0
    clean = tmp_path / "clean"
    assert predict(other, clean) == 0
    for name in ("boxes.csv", "slices.csv", "errors.csv", "predictions.csv", "submission.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(clean / name), obj=name)


# ---------------------------------------------------------------- leftovers of killed runs (issue 23)
def test_a_killed_prepare_leaves_temporaries_that_the_next_run_removes(data_root, tmp_path, caplog):
    out = tmp_path / "ds"
    assert prepare(data_root, out, "--imgsz", "32") == 0
    image = next((out / "images").rglob("*.png"))
    # what a worker killed by SIGTERM inside cv2.imwrite / an atomic write leaves behind
    leftovers = [image.with_name(f".{image.stem}.4242.tmp.png"),
                 out / "labels" / image.parent.name / f".{image.stem}.txt.0123456789abcdef.tmp",
                 out / ".index.csv.fedcba9876543210.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    keep = out / "images" / "notes.tmp.txt"            # not a spinefrac temporary: kept
    keep.write_text("mine")
    with caplog.at_level("INFO"):
        assert prepare(data_root, out, "--imgsz", "32") == 0
    assert [p for p in leftovers if p.exists()] == [] and keep.exists()
    assert "temporary file(s) left by an interrupted run" in caplog.text


def test_overlays_that_fail_to_write_leave_the_study_unfinished_and_a_rerun_draws_them(images, fake_detector,
                                                                                        tmp_path, monkeypatch):
    import errno

    import detector.overlays

    w = weights(tmp_path, "w.txt", 1.0)
    out = tmp_path / "det"
    real = detector.overlays.write_overlays

    def disk_full(geometry, boxes, out_dir, **kw):
        if out_dir.name == "4.2":
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "01_slice3.png"))
        return real(geometry, boxes, out_dir, **kw)

    monkeypatch.setattr(detector.overlays, "write_overlays", disk_full)
    assert detect(images, w, out) == 0
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert errors[STUDY_COL].tolist() == ["4.2"] and errors["stage"].tolist() == ["overlays"]
    assert "No space left on device" in errors["error"].iloc[0]
    assert not (out / "done" / "4.2.json").exists() and (out / "done" / "4.1.json").exists()
    monkeypatch.setattr(detector.overlays, "write_overlays", real)
    assert detect(images, w, out) == 0                                 # the rerun redoes 4.2 only, with overlays
    assert pd.read_csv(out / "errors.csv").empty
    assert (out / "done" / "4.2.json").exists() and (out / "overlays" / "4.2" / "contact_sheet.png").is_file()


def test_a_study_is_written_in_the_writer_thread_while_the_next_one_is_detected(images, fake_detector, tmp_path,
                                                                               monkeypatch):
    import threading

    import detector.overlays

    w = weights(tmp_path, "w.txt", 1.0)
    out = tmp_path / "det"
    real = detector.overlays.write_overlays
    events: list[tuple[str, str]] = []
    next_detected = threading.Event()

    def watched(geometry, boxes, out_dir, **kw):
        events.append((out_dir.name, threading.current_thread().name))
        if out_dir.name == "4.1":   # the first study's overlays wait until the second study has been detected
            assert next_detected.wait(timeout=60), "the next study was not detected while 4.1 was being written"
        return real(geometry, boxes, out_dir, **kw)

    import detector.detect as detect_module

    real_detect = detect_module.detect_study

    def detect_study(study, *args, **kwargs):
        found = real_detect(study, *args, **kwargs)
        if found.uid == "4.2":
            next_detected.set()
        return found

    monkeypatch.setattr(detector.overlays, "write_overlays", watched)
    monkeypatch.setattr(detect_module, "detect_study", detect_study)
    assert detect(images, w, out) == 0
    assert [uid for uid, _ in events] == ["4.1", "4.2", "4.3"]
    assert all(name.startswith("detect-outputs") for _, name in events)
    assert all((out / "done" / f"{uid}.json").is_file() for uid in ("4.1", "4.2", "4.3"))
    assert pd.read_csv(out / "errors.csv").empty
