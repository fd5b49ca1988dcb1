"""Batch detection: outputs complete and consistent, exact box mapping, failures isolated, resumable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydicom
import pytest

from data_prep.dicom.writer import write_series
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, STUDY_COL
from detector.detect import detect_studies, detect_study, find_studies
from detector.locate import Locator

ROWS, COLS, N = 48, 64, 12
IMGSZ = 32                       # x scale 0.5, y scale 2/3
THICKNESS = 2.0
# the fake model's box in imgsz pixels, and the same box in original pixels (x / 0.5, y / (2/3))
MODEL_BOX = (8.0, 4.0, 24.0, 20.0)
ORIGINAL_BOX = (16.0, 6.0, 32.0, 24.0)   # x, y, width, height
LOW_SCORE = 0.005                # below detect.conf 0.01: never written


def slice_hu(k: int) -> float:
    return -480.0 + 40.0 * k


def bone_window(hu: float) -> int:
    """WL 400 / WW 1800 by hand: -500 HU -> 0, 1300 HU -> 255."""
    return int(np.rint(np.clip((hu + 500.0) / 1800.0 * 255.0, 0, 255)))


class FakePredictor:
    """Returns MODEL_BOX on every image with score = centre channel value / 255, plus one weak box."""

    backend = "fake"

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def predict(self, images):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        assert images.dtype == np.uint8 and images.shape[1:] == (IMGSZ, IMGSZ, 3)
        return [np.array([[*MODEL_BOX, float(im[IMGSZ // 2, IMGSZ // 2, 1]) / 255.0, 0],
                          [0.0, 0.0, 4.0, 4.0, LOW_SCORE, 0]], dtype=np.float32) for im in images]


def write_study(folder, uid, order="head_first"):
    hu = np.stack([np.full((ROWS, COLS), slice_hu(k), dtype=np.float32) for k in range(N)])
    write_series(folder / uid, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=THICKNESS,
                 z_top_mm=100.0, instance_order=order)
    return folder / uid


@pytest.fixture
def studies(tmp_path):
    root = tmp_path / "test_images"
    write_study(root, "2.1")
    write_study(root, "2.2", order="feet_first")
    write_study(root, "2.3")
    bad = write_study(root, "2.0")                   # sorts first: its failure must not stop the others
    path = bad / "5.dcm"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])   # cut short
    return root


@pytest.fixture
def config():
    return load_config("detector", None, ["roi.enabled=false", f"render.imgsz={IMGSZ}", "render.neighbour_mm=2.0", "detect.batch=5",
                                          "overlays.display_size=64", "overlays.top_n=2"])


@pytest.fixture
def fake_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINEFRAC_HOME", str(tmp_path / "home"))
    made = []

    def load(weights, **kw):
        assert kw["imgsz"] == IMGSZ and kw["conf"] == pytest.approx(0.01)
        made.append(FakePredictor(fail_on_call=load.fail_on_call))
        return made[-1]

    load.fail_on_call = None
    monkeypatch.setattr("detector.backends.load_predictor", load)
    return load


def expected_number(uid, k):
    return N - k if uid == "2.2" else k + 1


def test_detect_study_maps_boxes_back_to_original_pixels_exactly(studies, config):
    found = detect_study(studies / "2.2", FakePredictor(), config=config, workers=1)
    assert found.n_slices == N and len(found.boxes) == N          # the weak box is dropped by detect.conf
    np.testing.assert_array_equal(found.boxes[["x", "y", "width", "height"]].to_numpy(),
                                  np.tile(ORIGINAL_BOX, (N, 1)))
    assert found.boxes["slice_index"].tolist() == list(range(N))
    assert found.boxes["slice_number"].tolist() == [N - k for k in range(N)]      # feet-first numbering
    np.testing.assert_allclose(found.boxes["z_mm"], 100.0 - THICKNESS * np.arange(N))
    # the model saw the right slice in the centre channel: its score is that slice's bone-window value
    np.testing.assert_allclose(found.boxes["score"], [bone_window(slice_hu(k)) / 255.0 for k in range(N)],
                               atol=1e-6)
    assert set(found.timings) >= {"decode", "preprocess", "model", "postprocess"}


def test_batch_outputs_complete_consistent_and_failures_isolated(studies, config, fake_loader, tmp_path):
    out = tmp_path / "det"
    result = detect_studies(studies, weights=tmp_path / "w.pt", out=out, config=config, workers=1,
                            progress=False)
    assert sorted(result.finished) == ["2.1", "2.2", "2.3"] and result.failed == ["2.0"]
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    boxes = pd.read_csv(out / "boxes.csv", dtype={STUDY_COL: str})
    errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str})
    assert list(slices.columns) == [STUDY_COL, "slice_number", "slice_index", "z_mm", "max_score", "n_boxes",
                                    "roi_x", "roi_y", "roi_width", "roi_height", "roi_source", "sop_instance_uid"]
    assert (slices["roi_source"] == "full").all() and (slices["roi_width"] == COLS).all()   # roi.enabled=false
    for row in slices[slices[STUDY_COL] == "2.1"].itertuples():     # each slice names its source file's instance
        ds = pydicom.dcmread(studies / "2.1" / f"{row.slice_number}.dcm", stop_before_pixels=True)
        assert row.sop_instance_uid == ds.SOPInstanceUID
    series = pd.read_csv(out / "series.csv", dtype=str)
    assert sorted(series[STUDY_COL]) == ["2.1", "2.2", "2.3"] and (series["chosen"] == "1").all()
    assert list(boxes.columns) == [STUDY_COL, "slice_number", "slice_index", "z_mm", "x", "y", "width", "height",
                                   "score"]
    for uid in ("2.1", "2.2", "2.3"):
        s = slices[slices[STUDY_COL] == uid]
        assert s["slice_index"].tolist() == list(range(N))                       # every slice, once
        assert s["slice_number"].tolist() == [expected_number(uid, k) for k in range(N)]
        b = boxes[boxes[STUDY_COL] == uid]
        assert len(b) == N and (s["n_boxes"] == 1).all()
        np.testing.assert_allclose(s["max_score"], b["score"])
        assert (out / "done" / f"{uid}.json").is_file()
        assert (out / "overlays" / uid / "contact_sheet.png").is_file()
    assert ((boxes["x"] >= 0) & (boxes["x"] + boxes["width"] <= COLS)).all()
    assert ((boxes["y"] >= 0) & (boxes["y"] + boxes["height"] <= ROWS)).all()
    assert errors[STUDY_COL].tolist() == ["2.0"] and "5.dcm" in errors["error"].iloc[0]
    assert not (out / "done" / "2.0.json").exists()
    for name in ("boxes.csv", "slices.csv", "errors.csv"):
        meta = json.loads((out / f"{name}.meta.json").read_text())
        assert meta["counts"]["studies_finished"] == 3

    # rerun: finished studies are skipped, the failed one is retried (and fails again)
    before = (out / "done" / "2.1.json").stat().st_mtime_ns
    again = detect_studies(studies, weights=tmp_path / "w.pt", out=out, config=config, workers=1, progress=False)
    assert sorted(again.skipped) == ["2.1", "2.2", "2.3"] and again.failed == ["2.0"] and not again.finished
    assert (out / "done" / "2.1.json").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "boxes.csv", dtype={STUDY_COL: str}), boxes)

    # the broken file is repaired: the rerun picks it up and its error row goes away
    write_study(studies, "2.0")
    fixed = detect_studies(studies, weights=tmp_path / "w.pt", out=out, config=config, workers=1, progress=False)
    assert fixed.finished == ["2.0"]
    assert pd.read_csv(out / "errors.csv").empty
    assert pd.read_csv(out / "slices.csv")[STUDY_COL].nunique() == 4


def test_interrupted_run_leaves_only_finished_studies_and_resumes(studies, config, fake_loader, tmp_path):
    (studies / "2.0").rename(studies.parent / "broken")           # only the three good studies
    out = tmp_path / "det"
    # 12 slices in batches of 5 -> 3 model calls per study; interrupt during the second study
    fake_loader.fail_on_call = 5
    with pytest.raises(KeyboardInterrupt):
        detect_studies(studies, weights=tmp_path / "w.pt", out=out, config=config, workers=1, progress=False)
    slices = pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str})
    assert slices[STUDY_COL].unique().tolist() == ["2.1"]               # no half study in the outputs
    assert sorted(p.stem for p in (out / "done").glob("*.json")) == ["2.1"]
    fake_loader.fail_on_call = None
    result = detect_studies(studies, weights=tmp_path / "w.pt", out=out, config=config, workers=1, progress=False)
    assert result.skipped == ["2.1"] and sorted(result.finished) == ["2.2", "2.3"]
    assert len(pd.read_csv(out / "slices.csv")) == 3 * N


def test_find_studies_accepts_a_root_or_study_folders(studies):
    assert [p.name for p in find_studies(studies)] == ["2.0", "2.1", "2.2", "2.3"]
    assert [p.name for p in find_studies([studies / "2.3", studies / "2.1"])] == ["2.3", "2.1"]


class WholeImageLocator:
    """A locator that sees C3 over the whole image on every sampled slice."""

    backend = "fake"

    def predict(self, images):
        size = images.shape[1]
        return [np.array([[0.0, 0.0, size, size, 0.95, LEVELS.index("C3")]], dtype=np.float32) for _ in images]


def test_locator_adds_levels_to_boxes_and_slices(studies, config):
    # every slice sampled: in a 24 mm study the evidence of 3 sampled slices (every_k 4) is a few nats, less than
    # what the size prior asks of a field that ends inside the column at both ends (real: 2 and 3 of 87 studies)
    locator = Locator(WholeImageLocator(), load_config("locator", None, ["render.imgsz=32", "locate.every_k=1"]),
                      load_config("levels"))
    found = detect_study(studies / "2.1", FakePredictor(), config=config, locator=locator, workers=1)
    # decode.model sizes: a 24 mm field cannot be C3 alone (C3 by itself is about 5 mm long; it shares about
    # 13 mm with C2 and with C4 each), and the locator never saw C2 or C4, so their absence is no evidence: C3 is
    # on every slice, and boxes on the slices it shares with a neighbour get both levels' weights
    assert (found.slices["p_C3"] > 0.5).all()
    assert (found.boxes["w_C3"] > 0).all() and found.boxes["level"].isin(["C2", "C3", "C4"]).all()
    # the located vertebra boxes: C3 over the whole image, mapped back to original pixels; a neighbour decoded
    # without detections holds C3's box (source extrapolated)
    located = found.level_boxes[found.level_boxes["source"] != "extrapolated"]
    assert set(located["level"]) == {"C3"}
    assert set(found.level_boxes["level"]) - {"C3"} <= {"C2", "C4"}
    np.testing.assert_allclose(found.level_boxes[["x", "y", "width", "height"]].to_numpy(dtype=float),
                               np.tile([0.0, 0.0, COLS, ROWS], (len(found.level_boxes), 1)), atol=1e-6)
    assert found.boxes[[f"w_{lv}" for lv in LEVELS]].sum(axis=1).round(9).eq(1.0).all()
    p = found.slices[[f"p_{lv}" for lv in LEVELS]].to_numpy()
    assert p.shape == (N, len(LEVELS)) and ((p >= 0) & (p <= 1)).all()
    assert (p[:, LEVELS.index("C3")] >= p.max(axis=1) - 1e-9).all()     # the evidence wins on every slice
    assert found.vertebrae.set_index("level").loc["C3", "source"] == "located"


def test_the_former_decoder_stretches_the_one_level_seen(studies, config):
    """decode.model runs (kept for the benchmark): no sizes, so C3 covers every slice alone."""
    levels = load_config("levels", overrides=["decode.model=runs"])
    locator = Locator(WholeImageLocator(), load_config("locator", None, ["render.imgsz=32"]), levels)
    found = detect_study(studies / "2.1", FakePredictor(), config=config, locator=locator, workers=1)
    assert (found.boxes["level"] == "C3").all()
    np.testing.assert_allclose(found.boxes["w_C3"], 1.0)


def test_without_locator_levels_come_from_relative_z(studies, config):
    """No locator: slice presence follows configs/levels.yaml relative_z fractions; boxes take their slice's levels."""
    levels_cfg = load_config("levels")
    found = detect_study(studies / "2.1", FakePredictor(), config=config, levels_config=levels_cfg, workers=1)
    start = np.asarray(levels_cfg.relative_z.start)
    end = np.asarray(levels_cfg.relative_z.end)
    for k in range(N):
        centre = (k + 0.5) / N                      # the slice centre as a fraction of the scan, 0 = top
        expected = (centre >= start) & (centre < end)
        got = found.slices.loc[found.slices.slice_index == k, [f"p_{lv}" for lv in LEVELS]].to_numpy()[0]
        np.testing.assert_array_equal(got, expected.astype(float))
    for box in found.boxes.itertuples(index=False):
        on_slice = [lv for lv, s, e in zip(LEVELS, start, end, strict=True)
                    if s <= (box.slice_index + 0.5) / N < e]
        weights = {lv: getattr(box, f"w_{lv}") for lv in LEVELS}
        if on_slice:
            assert {lv for lv, w in weights.items() if w > 0} == set(on_slice)
            assert box.level_source == "slice"
        else:                                        # above C1 or below C7: the nearest slice with a level
            assert box.level_source == "nearest"


@pytest.mark.slow
def test_tiny_trained_model_end_to_end(tmp_path, monkeypatch):
    """Prepare -> train 1 epoch at imgsz 64 (CPU) -> detect with the real predictor: outputs complete."""
    pytest.importorskip("ultralytics")
    from detector.train import train_yolo

    monkeypatch.setenv("SPINEFRAC_HOME", str(tmp_path / "home"))
    from detector.yolo_dataset import prepare_detector_dataset

    root = tmp_path / "data"
    rows, box_rows = [], []
    for s in range(6):
        uid = f"3.{s}"
        hu = np.stack([np.full((ROWS, COLS), -800.0, dtype=np.float32) for _ in range(N)])
        if s % 2 == 0:
            hu[3:7, 10:30, 20:44] = 1200.0
            box_rows += [{STUDY_COL: uid, "x": 20.0, "y": 10.0, "width": 24.0, "height": 20.0, "slice_number": k + 1}
                         for k in range(3, 7)]
        write_series(root / "train_images" / uid, hu, study_uid=uid, pixel_spacing=(0.5, 0.5),
                     slice_thickness=THICKNESS)
        rows.append({STUDY_COL: uid, "patient_overall": int(s % 2 == 0), **{lv: int(s % 2 == 0 and lv == "C2")
                                                                            for lv in LEVELS}})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    pd.DataFrame(box_rows).to_csv(root / "train_bounding_boxes.csv", index=False)
    config = load_config("detector", None, ["render.imgsz=64", "prepare.n_folds=2", "prepare.margin_slices=1",
                                            "train.epochs=1", "train.batch=8", "train.plots=false", "train.device=cpu",
                                            "detect.overlays=false"])
    data_yaml = prepare_detector_dataset(root, tmp_path / "ds", config=config, workers=1, progress=False)
    run = train_yolo(data_yaml, tmp_path / "run", config=config)
    out = tmp_path / "det"
    result = detect_studies(root / "train_images", weights=run / "weights" / "best.pt", out=out,
                            config=load_config("detector", None, ["render.imgsz=64", "detect.backend=pytorch",
                                                                  "detect.overlays=false"]),
                            workers=1, progress=False)
    assert len(result.finished) == 6 and not result.failed
    slices = pd.read_csv(out / "slices.csv")
    assert len(slices) == 6 * N and slices.groupby(STUDY_COL)["slice_index"].nunique().eq(N).all()
    boxes = pd.read_csv(out / "boxes.csv")
    assert ((boxes["x"] >= 0) & (boxes["x"] + boxes["width"] <= COLS + 1e-6)).all()
    assert ((boxes["score"] >= 0.01) & (boxes["score"] <= 1)).all()


def test_a_box_with_no_area_inside_the_image_is_no_box(config, monkeypatch, tmp_path):
    """A predicted box wholly outside the image keeps no area once clipped: it is dropped, not written as 0 x 0."""
    from helpers import use_fixed_boxes

    write_study(tmp_path / "studies", "3.1")
    use_fixed_boxes(monkeypatch, tmp_path / "home", ((40.0, 4.0, 60.0, 20.0, 0.9, 0),     # beyond the 32 px input
                                                     (4.0, 4.0, 12.0, 12.0, 0.5, 0)))   # inside it
    out = tmp_path / "det"
    assert detect_studies(tmp_path / "studies", weights=tmp_path / "w.pt", out=out, config=config, workers=1,
                          progress=False).finished == ["3.1"]
    boxes = pd.read_csv(out / "boxes.csv", dtype={STUDY_COL: str})
    assert len(boxes) == N and (boxes["width"] > 0).all() and (boxes["height"] > 0).all()
    assert (boxes["score"] == 0.5).all()
    assert (pd.read_csv(out / "slices.csv")["n_boxes"] == 1).all()
