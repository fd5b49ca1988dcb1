"""The review report: worklist.csv and OUT/report/ built from a prediction folder made from the CSV contracts.

The folder (`make_pred_dir`) holds a flagged study, one below the threshold, a study with no box, a study whose
UID needs HTML escaping (`a<b&"c`) and a failed study; the model folder holds only an operating point.
"""

from __future__ import annotations

import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np
import pandas as pd
import pytest

from aggregation.operating_point import HELDOUT_FILE, OPERATING_FILE
from data_prep.errors import InputError
from data_prep.runs.artifacts import write_sidecar
from data_prep.runs.config import load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from detector.detect_outputs import overlay_dir
from spinefrac.cli import main
from spinefrac.report import write_report
from spinefrac.report.build import CSP, REPORT_DIR, study_slug

THRESHOLD = 0.5
WEIRD = 'a<b&"c'
# uid: (patient_overall, failed, overlay slice PNGs, boxes)
STUDIES = {
    "1.2.low": (0.30, 0, 1, 1),
    WEIRD: (0.80, 0, 2, 2),
    "1.2.nobox": (0.10, 0, 0, 0),
    "1.2.failed": (0.20, 1, 0, 0),
    "1.2.high": (0.95, 0, 2, 3),
}
ORDER = ["1.2.failed", "1.2.high", WEIRD, "1.2.low", "1.2.nobox"]     # failed first, then patient_overall
FLAGGED = {"1.2.high": 1, WEIRD: 1, "1.2.low": 0, "1.2.nobox": 0, "1.2.failed": 0}
ERROR = "TruncatedDicomError: /data/1.2.failed/3.dcm: file ends inside its pixel data"


def png(path: Path, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((32, 64, 3), colour, np.uint8))


def make_model_dir(root: Path, threshold: float | None = THRESHOLD) -> Path:
    model = root / "model"
    (model / "aggregator").mkdir(parents=True)
    if threshold is not None:
        (model / "aggregator" / OPERATING_FILE).write_text(json.dumps({
            "format_version": 1, "target_sensitivity": 0.95, "threshold": threshold, "sensitivity": 0.96,
            "specificity": 0.41, "n_studies": 50, "n_positive": 25, "n_negative": 25, "heldout_file": HELDOUT_FILE}))
    return model


def make_pred_dir(root: Path, *, model: Path | None) -> Path:
    """A prediction folder as predict writes it (docs/contracts.md), without running a model."""
    pred = root / "pred"
    pred.mkdir(parents=True)
    preds, evidence, boxes = [], [], []
    for k, (uid, (patient, failed, n_png, n_boxes)) in enumerate(STUDIES.items()):
        levels = {lv: round(patient * (j + 1) / 8, 3) for j, lv in enumerate(LEVELS)}
        preds.append({STUDY_COL: uid, **levels, PATIENT: patient, "failed": failed})
        for lv in LEVELS:
            evidence.append({STUDY_COL: uid, "level": lv, "probability": levels[lv], "n_boxes": 0, "max_score": 0.0,
                             "top_boxes": "", "first_slice": -1, "last_slice": -1, "n_slices": 0,
                             "cls_max": np.nan, "cls_topk": np.nan, "cls_mean": np.nan})
        for b in range(n_boxes):
            boxes.append({STUDY_COL: uid, "slice_number": 10 + b, "slice_index": b, "z_mm": -2.0 * b, "x": 5.0,
                          "y": 6.0, "width": 7.0, "height": 8.0, "score": 0.9 - 0.1 * b, "level": "C2"})
        if failed:
            continue
        folder = overlay_dir(pred, uid)      # overlays/<safe_name(uid)>/, as detect writes it
        for i in range(n_png):
            png(folder / f"{i + 1:02d}_slice{10 + i}.png", 40 * (k + 1))
        png(folder / "contact_sheet.png", 200)
        png(folder / "score_profile.png", 250)
    pd.DataFrame(preds).to_csv(pred / "predictions.csv", index=False)
    write_sidecar(pred / "predictions.csv", kind="predictions",
                  inputs={"model": str(model) if model else None, "studies": len(preds)})
    pd.DataFrame(evidence).to_csv(pred / "evidence.csv", index=False)
    pd.DataFrame(boxes).to_csv(pred / "boxes.csv", index=False)
    pd.DataFrame([{STUDY_COL: "1.2.failed", "path": "/data/1.2.failed", "stage": "detect", "error": ERROR}]).to_csv(
        pred / "errors.csv", index=False)
    return pred


class Page(HTMLParser):
    """Collects a page's links, image sources, worklist rows and meta tags."""

    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, str] = {}     # id or text -> href
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.meta: list[dict[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "a":
            self.hrefs.append(a["href"])
            if "id" in a:
                self.links[a["id"]] = a["href"]
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "tr" and "data-rank" in a:
            self.rows.append(a)
        if tag == "meta":
            self.meta.append(a)

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def local_target(page_path: Path, url: str, root: Path) -> Path:
    """The file a relative link points to; fails for an absolute, external or outside-the-folder link."""
    parts = urlsplit(url)
    assert not parts.scheme and not parts.netloc and not url.startswith("/"), url
    target = (page_path.parent / unquote(parts.path)).resolve()
    assert target.is_relative_to(root.resolve()), url
    assert target.is_file(), url
    return target


@pytest.fixture
def pred(tmp_path):
    return make_pred_dir(tmp_path, model=make_model_dir(tmp_path))


def test_worklist_csv_ranks_flags_and_keeps_failed_studies(pred, caplog):
    caplog.set_level(logging.INFO, logger="spinefrac")
    write_report(pred)                                   # the model folder comes from the predictions sidecar
    worklist = pd.read_csv(pred / "worklist.csv", dtype={STUDY_COL: str}, keep_default_na=False)
    assert list(worklist[STUDY_COL]) == ORDER and list(worklist["rank"]) == [1, 2, 3, 4, 5]
    assert dict(zip(worklist[STUDY_COL], worklist["flagged"], strict=True)) == FLAGGED
    failed = worklist.set_index(STUDY_COL).loc["1.2.failed"]
    assert failed["failed"] == 1 and failed["error"] == ERROR
    assert (worklist.loc[worklist["failed"] == 0, "error"] == "").all()
    meta = json.loads((pred / "worklist.csv.meta.json").read_text())
    assert meta["counts"] == {"studies": 5, "failed": 1, "flagged": 2, "warned": 0}
    assert meta["extra"]["operating_point"]["threshold"] == THRESHOLD
    assert "operating point: flag patient_overall >= 0.5000 (out-of-fold sensitivity 0.960" in caplog.text


def test_index_shows_rows_in_rank_order_with_escaped_uid_and_working_links(pred):
    index = write_report(pred)
    root = pred / REPORT_DIR
    assert index == root / "index.html"
    raw = index.read_text(encoding="utf-8")
    assert WEIRD not in raw and "a&lt;b&amp;&#34;c" in raw           # escaped in text and attributes
    page = parse(index)
    assert [r["data-uid"] for r in page.rows] == ORDER                # the parser unescapes: the true UID
    assert [r["data-flagged"] for r in page.rows] == [str(FLAGGED[u]) for u in ORDER]
    assert [r["data-failed"] for r in page.rows] == ["1", "0", "0", "0", "0"]
    assert ERROR in "".join(page.text)
    assert {"http-equiv": "Content-Security-Policy", "content": CSP} in page.meta
    for url in page.hrefs + page.srcs:
        local_target(index, url, root)
    thumbs = [s for s in page.srcs if s.endswith("thumb.png")]
    assert len(thumbs) == 4                                           # every study but the failed one
    assert cv2.imread(str(local_target(index, thumbs[0], root))).shape[1] == 240
    weird_page = local_target(index, next(h for h in page.hrefs if study_slug(WEIRD) in unquote(h)), root)
    assert "a&lt;b&amp;&#34;c" in weird_page.read_text(encoding="utf-8")


def test_study_pages_link_prev_next_in_worklist_order_and_show_their_images(pred):
    index = write_report(pred)
    root = pred / REPORT_DIR
    first = local_target(index, parse(index).hrefs[0], root)
    seen, page_path = [], first
    while True:
        page = parse(page_path)
        seen.append(page_path)
        assert local_target(page_path, page.links["index"], root) == index.resolve()
        for url in page.srcs + page.hrefs:
            local_target(page_path, url, root)
        if "next" not in page.links:
            break
        following = local_target(page_path, page.links["next"], root)
        assert local_target(following, parse(following).links["prev"], root) == page_path.resolve()
        page_path = following
    assert [p.name for p in seen] == [f"{study_slug(u)}.html" for u in ORDER]
    pages = {u: parse(p) for u, p in zip(ORDER, seen, strict=True)}
    assert len(pages["1.2.high"].srcs) == 1 + 2                       # score profile + two overlay slices
    assert len(pages["1.2.nobox"].srcs) == 1                          # no overlay slice, no box: profile only
    assert "No box was found in this study" in "".join(pages["1.2.nobox"].text)
    assert pages["1.2.failed"].srcs == [] and ERROR in "".join(pages["1.2.failed"].text)
    assert "training prior" in "".join(pages["1.2.failed"].text)
    assert "flag" in "".join(pages[WEIRD].text) and WEIRD in "".join(pages[WEIRD].text)
    assert not any("nan" in t.split() for p in pages.values() for t in p.text)   # empty cells stay empty


def test_old_model_folder_without_operating_point_gives_no_flag_and_says_why(tmp_path, caplog):
    pred = make_pred_dir(tmp_path, model=make_model_dir(tmp_path, threshold=None))
    caplog.set_level(logging.WARNING, logger="spinefrac")
    write_report(pred)
    worklist = pd.read_csv(pred / "worklist.csv", dtype={STUDY_COL: str})
    assert list(worklist[STUDY_COL]) == ORDER and worklist["flagged"].isna().all()
    assert "worklist without a flag" in caplog.text and "trained before operating points existed" in caplog.text
    assert "No flag:" in (pred / REPORT_DIR / "index.html").read_text(encoding="utf-8")
    assert all(r["data-flagged"] == "" for r in parse(pred / REPORT_DIR / "index.html").rows)


def test_unreachable_target_sensitivity_gives_no_flag_and_says_so(tmp_path, caplog):
    """A model that cannot reach the target sensitivity with any specificity flags nothing, and says why."""
    from aggregation.operating_point import write_operating_point

    model = make_model_dir(tmp_path, threshold=None)
    heldout = pd.DataFrame({STUDY_COL: [f"s{i}" for i in range(10)], "repeat": 0, "fold": np.arange(10) % 2,
                            "label": np.arange(10) % 2, "probability": 0.4})     # a constant: ranks nothing
    write_operating_point(model / "aggregator", heldout, None, load_config("aggregation"))
    pred = make_pred_dir(tmp_path, model=model)
    caplog.set_level(logging.WARNING, logger="spinefrac")
    write_report(pred)
    worklist = pd.read_csv(pred / "worklist.csv", dtype={STUDY_COL: str})
    assert list(worklist[STUDY_COL]) == ORDER and worklist["flagged"].isna().all()      # not everything flagged
    said = "the model cannot reach sensitivity 0.95 on its training studies"
    assert said in caplog.text
    assert said in (pred / REPORT_DIR / "index.html").read_text(encoding="utf-8")
    assert said in json.loads((pred / "worklist.csv.meta.json").read_text())["extra"]["no_flag_reason"]


def test_model_option_overrides_the_sidecar(tmp_path):
    pred = make_pred_dir(tmp_path, model=None)
    other = make_model_dir(tmp_path / "other", threshold=0.9)
    write_report(pred, model_dir=other)
    worklist = pd.read_csv(pred / "worklist.csv", dtype={STUDY_COL: str})
    assert list(worklist.loc[worklist["flagged"] == 1, STUDY_COL]) == ["1.2.high"]


def test_rebuild_replaces_the_report_atomically(pred, monkeypatch):
    write_report(pred)
    stale = pred / REPORT_DIR / "studies" / "stale.html"
    stale.write_text("old")
    write_report(pred)
    assert not stale.exists()                                          # a rebuild is a new folder, not a merge
    before = (pred / REPORT_DIR / "index.html").read_text(encoding="utf-8")
    from spinefrac.report import build

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(build, "_thumbnail", broken)
    with pytest.raises(OSError, match="disk full"):
        write_report(pred)
    assert (pred / REPORT_DIR / "index.html").read_text(encoding="utf-8") == before   # the old report stands
    assert not [p for p in pred.iterdir() if p.name.startswith(f".{REPORT_DIR}")]     # no temp folder left


def test_no_network_reference_in_any_page(pred):
    write_report(pred)
    for page in (pred / REPORT_DIR).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"https?:|ftp:|(src|href|action)\s*=\s*[\"']?//|url\(|@import", text), page


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "predictions.csv").unlink(), "predictions.csv: not found: not a prediction folder"),
    (lambda p: (p / "predictions.csv").write_text(
        f"{STUDY_COL},{','.join(LEVELS)},{PATIENT},failed\nx,{','.join(['0.1'] * 7)},1.5,0\n"),
     "row 1 (line 2), column patient_overall: must be a probability in [0, 1] (found 1.5)"),
    (lambda p: (p / "predictions.csv").write_text(f"{STUDY_COL},C1\nx,0.1\n"), "missing column 'C2'"),
    (lambda p: (p / "errors.csv").write_text(f"{STUDY_COL},stage\nx,detect\n"), "errors.csv: lacks column(s) error"),
    (lambda p: (p / "boxes.csv").write_bytes(b"\xff\xfe\x00bad"), "boxes.csv: is not a readable CSV"),
    (lambda p: (p.parent / "model" / "aggregator" / OPERATING_FILE).write_text("{"), "operating_point.json: not valid"),
])
def test_bad_input_is_a_clear_error_at_the_cli(pred, damage, message, caplog):
    damage(pred)
    with pytest.raises(InputError) as err:
        write_report(pred)
    assert message in str(err.value)
    caplog.clear()
    assert main(["report", str(pred)]) == 2
    assert message in caplog.text and "Traceback" not in caplog.text


def test_not_a_folder_is_a_clear_error(tmp_path, caplog):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope: not found: expected a prediction folder" in caplog.text
    (tmp_path / "file").write_text("x")
    assert main(["report", str(tmp_path / "file")]) == 2
    assert "file: is a file: expected a prediction folder" in caplog.text


def test_cli_report_writes_the_index(pred, capsys):
    assert main(["report", str(pred), "--model", str(pred.parent / "model")]) == 0
    assert capsys.readouterr().out.strip() == str(pred / REPORT_DIR / "index.html")


def test_slug_is_safe_and_unique():
    slugs = {study_slug(u) for u in (WEIRD, "a_b__c", "../x", ".hidden", "é")}
    assert len(slugs) == 5
    assert all(s.replace("-", "").replace("_", "").replace(".", "").isalnum() and not s.startswith(".")
               for s in slugs)


class Collect(logging.Handler):
    """Collect the messages of one logger (INFO and up) while in a `with` block."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.logger = logging.getLogger(name)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self.lines

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


@pytest.mark.slow
def test_trained_model_operating_point_is_reproduced_and_predict_writes_the_report(trained, tmp_path):
    """The session-trained tiny model stores its operating point; predict prints it and writes the report."""
    from aggregation.operating_point import achieved

    aggregator = trained / "model" / "aggregator"
    point = json.loads((aggregator / OPERATING_FILE).read_text())
    heldout = pd.read_csv(aggregator / HELDOUT_FILE, dtype={STUDY_COL: str})
    roles = json.loads((trained / "model" / "splits.json").read_text())["roles"]
    if len(heldout):                              # out-of-fold rows: every aggregator study once per repeat
        first = heldout[heldout["repeat"] == 0]
        assert sorted(first[STUDY_COL]) == sorted(u for u, r in roles.items() if r == "aggregator")
        assert point["n_studies"] == len(first) and point["n_positive"] == int(first["label"].sum())
    if point["threshold"] is not None:          # a tiny split may hold too few positives for two folds
        again = achieved(heldout["label"].to_numpy(), heldout["probability"].to_numpy(), point["threshold"])
        assert again == pytest.approx({"sensitivity": point["sensitivity"], "specificity": point["specificity"]})
        assert point["sensitivity"] >= point["target_sensitivity"]
    else:
        assert point["reason"]
    out = tmp_path / "pred"
    with Collect("spinefrac") as lines:          # a handler of our own: independent of pytest's log capture
        assert main(["predict", str(trained / "test" / "test_images"), "--model", str(trained / "model"), "--out",
                     str(out), "--no-progress"]) == 0
    expected = "operating point: flag patient_overall >=" if point["threshold"] is not None \
        else "worklist without a flag"
    assert any(expected in line for line in lines), lines
    worklist = pd.read_csv(out / "worklist.csv", dtype={STUDY_COL: str})
    predictions = pd.read_csv(out / "predictions.csv", dtype={STUDY_COL: str})
    assert sorted(worklist[STUDY_COL]) == sorted(predictions[STUDY_COL])
    assert worklist[PATIENT].is_monotonic_decreasing
    if point["threshold"] is not None:
        assert (worklist["flagged"] == (worklist[PATIENT] >= point["threshold"]).astype(int)).all()
    index = out / REPORT_DIR / "index.html"
    assert [r["data-uid"] for r in parse(index).rows] == list(worklist[STUDY_COL])
    for url in parse(index).hrefs + parse(index).srcs:
        local_target(index, url, out / REPORT_DIR)
