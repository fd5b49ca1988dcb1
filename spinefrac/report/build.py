"""OUT/report/: a static, offline HTML review of a prediction folder (the worklist and one page per study).

Reads only the documented files of a prediction folder (predictions.csv and its sidecar, errors.csv,
evidence.csv, boxes.csv, overlays/<uid>/) and writes, atomically (a temp folder renamed over the old one):
    report/index.html               the worklist (worklist.csv's order), sortable, filter for flagged / failed
    report/studies/<slug>.html      one page per study: probabilities, evidence, top boxes, score profile, overlays
    report/studies/<slug>/          that study's overlay PNGs (hard links, or copies across file systems) and
                                    thumb.png (the contact sheet, THUMB_WIDTH px wide)
Every link is relative; a Content-Security-Policy meta tag forbids any request but the folder's own images.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import pandas as pd

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import replace_folder
from data_prep.runs.tables import read_csv_table
from data_prep.safe_paths import inside, safe_name
from detector.detect_outputs import BOXES_CSV, overlay_dir
from detector.overlays import CONTACT_SHEET, SCORE_PROFILE, SLICE_PNG_PATTERN
from spinefrac.report.worklist import write_worklist

log = logging.getLogger("spinefrac")

REPORT_DIR = "report"
STUDIES_DIR = "studies"
INDEX_HTML = "index.html"
EVIDENCE_CSV = "evidence.csv"
THUMB = "thumb.png"
THUMB_WIDTH = 240                 # px: the worklist's contact-sheet thumbnail
BAR_HEIGHT = 30                   # px: a level bar at probability 1
TOP_BOXES = 12                    # boxes listed on a study page (highest scores)
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")
TEMPLATES = Path(__file__).with_name("templates")


def study_slug(uid: str) -> str:
    """A study's file and folder name in the report: `data_prep.safe_paths.safe_name` of its key."""
    return safe_name(uid)


def write_report(pred_dir: str | os.PathLike, *, model_dir: str | os.PathLike | None = None) -> Path:
    """Write OUT/worklist.csv and the HTML review OUT/report/ of a prediction folder; return the index page."""
    t0 = time.perf_counter()
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(pred_dir, ("is a file" if pred_dir.exists() else "not found") +
                         ": expected a prediction folder (written by spinefrac predict)")
    worklist, point = write_worklist(pred_dir, model_dir=model_dir)
    evidence = _read_optional(pred_dir / EVIDENCE_CSV)
    boxes = _read_optional(pred_dir / BOXES_CSV)
    env = _environment()
    final = pred_dir / REPORT_DIR
    tmp = pred_dir / f".{REPORT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / STUDIES_DIR).mkdir(parents=True)
    try:
        rows = [_row(r, pred_dir, tmp) for r in worklist.to_dict("records")]
        threshold = None if point.record is None else float(point.record["threshold"])
        common = {"csp": CSP, "levels": registry.LEVELS, "threshold": threshold, "n_rows": len(rows)}
        ev_by = _group(evidence)
        box_by = _group(boxes)
        for k, row in enumerate(rows):
            page = env.get_template("study.html.j2").render(
                **common, row=row,
                prev=Path(rows[k - 1]["page"]).name if k else None,
                next=Path(rows[k + 1]["page"]).name if k + 1 < len(rows) else None,
                evidence=_evidence_rows(ev_by.get(row["uid"])), has_evidence=row["uid"] in ev_by,
                boxes=_box_rows(box_by.get(row["uid"])), profile=row["profile"], overlays=row["overlays"])
            (tmp / row["page"]).write_text(page, encoding="utf-8")
        index = env.get_template("index.html.j2").render(
            **common, rows=rows, point=point.record, no_flag_reason=point.reason, bar_height=BAR_HEIGHT,
            n_flagged=sum(bool(r["flagged"]) for r in rows), n_failed=sum(bool(r["failed"]) for r in rows),
            source=pred_dir.name, created=time.strftime("%Y-%m-%d %H:%M"))
        (tmp / INDEX_HTML).write_text(index, encoding="utf-8")
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("review report of %d studies in %.1f s -> %s", len(rows), time.perf_counter() - t0,
             final / INDEX_HTML)
    return final / INDEX_HTML


# ---------------------------------------------------------------- internals
def _environment() -> Any:
    """A jinja2 environment over the package's templates, autoescaping on, undefined names an error."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["quote"] = lambda s: quote(str(s), safe="/")
    return env


def _read_optional(path: Path) -> pd.DataFrame | None:
    """A documented CSV of the prediction folder, or None when absent; unreadable is an InputError naming it."""
    if not path.is_file():
        return None
    return read_csv_table(path, (registry.STUDY_COL,), path.name, keep_default_na=False, na_values=[""])


def _group(df: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    return {} if df is None or not len(df) else {str(u): g for u, g in df.groupby(registry.STUDY_COL, sort=False)}


def _row(rec: Mapping[str, Any], pred_dir: Path, tmp: Path) -> dict[str, Any]:
    """One worklist row for the templates; links the study's overlay PNGs into the report and makes its thumbnail."""
    uid = str(rec[registry.STUDY_COL])
    slug = study_slug(uid)
    flagged = rec["flagged"]
    flagged = None if flagged is None or pd.isna(flagged) else bool(flagged)
    row: dict[str, Any] = {
        "uid": uid, "rank": int(rec["rank"]), "patient": float(rec[registry.PATIENT]),
        "levels": {lv: float(rec[lv]) for lv in registry.LEVELS}, "failed": bool(rec["failed"]),
        "error": str(rec["error"] or ""), "warning": str(rec.get("warning") or ""), "flagged": bool(flagged), "flagged_value": "" if flagged is None else
        str(int(flagged)), "page": f"{STUDIES_DIR}/{slug}.html", "thumb": None, "profile": None, "overlays": []}
    source = overlay_dir(pred_dir, uid)
    if not source.is_dir():
        return row
    images = inside(tmp / STUDIES_DIR, slug, source=f"study {uid!r}")
    images.mkdir()
    for png in sorted(p for p in source.iterdir() if SLICE_PNG_PATTERN.match(p.name)):
        _link(png, images / png.name)
        row["overlays"].append({"src": f"{slug}/{png.name}", "caption": png.stem.replace("_", " ")})
    if (source / SCORE_PROFILE).is_file():
        _link(source / SCORE_PROFILE, images / SCORE_PROFILE)
        row["profile"] = f"{slug}/{SCORE_PROFILE}"
    if (source / CONTACT_SHEET).is_file() and _thumbnail(source / CONTACT_SHEET, images / THUMB):
        row["thumb"] = f"{STUDIES_DIR}/{slug}/{THUMB}"
    return row


def _link(source: Path, target: Path) -> None:
    """Hard-link a file into the report (no copy of the bytes); copy it where links are impossible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _thumbnail(source: Path, target: Path) -> bool:
    """Write a THUMB_WIDTH px wide PNG of an image; False (logged) when the image cannot be read."""
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        log.warning("report: %s is not a readable image; no thumbnail", source)
        return False
    height = max(1, round(image.shape[0] * THUMB_WIDTH / image.shape[1]))
    small = cv2.resize(image, (THUMB_WIDTH, height), interpolation=cv2.INTER_AREA)
    if not cv2.imwrite(str(target), small):
        raise OSError(f"{target}: OpenCV could not write the thumbnail")
    return True


def _fmt(value: Any, spec: str = ".3f") -> str:
    """A table cell: a number in `spec`, empty for NaN/missing, text as it is."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return "" if isinstance(value, float) and math.isnan(value) else format(value, spec)
    return str(value)


def _evidence_rows(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The study's evidence.csv rows, formatted for the page (one per level)."""
    if df is None:
        return []
    out = []
    for r in df.to_dict("records"):
        first, last = r.get("first_slice"), r.get("last_slice")
        found = first is not None and not pd.isna(first) and float(first) >= 0
        out.append({"level": r.get("level", ""), "probability": _fmt(r.get("probability")),
                    "n_boxes": _fmt(r.get("n_boxes"), "g"), "max_score": _fmt(r.get("max_score")),
                    "top_boxes": [b for b in _fmt(r.get("top_boxes")).split(";") if b],
                    "slices": f"{int(first)}-{int(last)}" if found else "", "n_slices": _fmt(r.get("n_slices"), "g"),
                    "cls_max": _fmt(r.get("cls_max")), "cls_topk": _fmt(r.get("cls_topk")),
                    "cls_mean": _fmt(r.get("cls_mean"))})
    return out


def _box_rows(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The study's TOP_BOXES highest-scoring boxes of boxes.csv, formatted for the page."""
    if df is None or not len(df):
        return []
    top = df.sort_values("score", ascending=False, kind="stable").head(TOP_BOXES)
    return [{"slice_number": _fmt(r.get("slice_number"), "g"), "slice_index": _fmt(r.get("slice_index"), "g"),
             "z_mm": _fmt(r.get("z_mm"), ".1f"), "score": _fmt(r.get("score")), "level": _fmt(r.get("level")),
             "xywh": ", ".join(_fmt(r.get(c), ".0f") for c in ("x", "y", "width", "height"))}
            for r in top.to_dict("records")]
