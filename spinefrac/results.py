"""From a detect folder's tables to predictions.csv, submission.csv and evidence.csv (predict, merge of shards, the node)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep.errors import AllStudiesFailedError
from data_prep.runs import registry
from data_prep.runs.artifacts import write_csv_atomic, write_sidecar
from spinefrac.model_folder import ModelFolder

log = logging.getLogger("spinefrac")

EVIDENCE_TOP = 3  # boxes listed per level in evidence.csv
EVIDENCE_VERTEBRA_COLUMNS = ("first_slice", "last_slice", "n_slices", "cls_max", "cls_topk", "cls_mean")
"""vertebrae.csv columns copied into evidence.csv per study and level (the z-range and the classifier's scores)."""


def read_detections(detect_dirs: Sequence[Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Read and stack boxes.csv, slices.csv and (where present) vertebrae.csv of detect folders (one per fold)."""
    from aggregation.features import load_detection_tables, load_vertebrae_table
    from detector.detect_outputs import VERTEBRAE_CSV

    parts = [load_detection_tables(Path(d) / "boxes.csv", Path(d) / "slices.csv") for d in detect_dirs]
    boxes = pd.concat([b for b, _ in parts if len(b)] or [parts[0][0]], ignore_index=True)
    slices = pd.concat([s for _, s in parts], ignore_index=True)
    found = [Path(d) / VERTEBRAE_CSV for d in detect_dirs if (Path(d) / VERTEBRAE_CSV).is_file()]
    vertebrae = pd.concat([load_vertebrae_table(p) for p in found], ignore_index=True) if found else None
    return boxes, slices, vertebrae


def aggregate_detections(out: Path, *, model: ModelFolder, aggregator: Any, uids: Sequence[str],
                         test: pd.DataFrame | None, started: float, extra: Mapping[str, Any], report: bool = True
                         ) -> Path:
    """From a detect folder's tables to predictions, submission and evidence (predict, and merge of shards).

    report: also write worklist.csv and report/ (off for a node's one-study staging folder, which nobody reviews).
    """
    from aggregation.features import build_features
    from aggregation.submission import (
        complete_predictions,
        make_submission,
        write_predictions,
        write_submission,
    )

    t0 = started
    errors = pd.read_csv(out / "errors.csv", dtype={registry.STUDY_COL: str})
    failed = set(errors[registry.STUDY_COL]) & set(uids)
    boxes, slices = _detections(out, failed=failed, uids=uids)
    vertebrae = _vertebrae_table(out, failed=failed, uids=uids)
    finished = [u for u in uids if u not in failed and u in set(slices[registry.STUDY_COL].astype(str))]
    if finished:
        features = build_features(boxes, slices, config=model.configs["aggregation"], studies=finished,
                                  vertebrae=vertebrae)
        write_csv_atomic(out / "features.csv", features)
        probs = aggregator.predict_proba(features)
    else:
        probs = pd.DataFrame(columns=[registry.STUDY_COL, *registry.TARGETS])
    predictions = complete_predictions(probs, studies=uids, prior=model.prior, failed=failed)
    write_predictions(predictions, out / "predictions.csv")
    submission = make_submission(predictions, test_csv=test, prior=model.prior, failed=failed)
    write_submission(submission, out / "submission.csv")
    write_csv_atomic(out / "evidence.csv", evidence_table(boxes, predictions, vertebrae=vertebrae))
    runtime = time.perf_counter() - t0
    write_sidecar(out / "predictions.csv", kind="predictions", inputs={"model": str(model.root),
                                                                      "studies": len(uids)},
                  counts={"studies": len(uids), "failed": len(failed), "boxes": len(boxes)}, runtime_s=runtime,
                  extra=dict(extra))
    log.info("predicted %d studies (%d failed, given the prior) in %.0f s -> %s", len(uids), len(failed), runtime,
             out / "predictions.csv")
    if report:
        from spinefrac.report import write_report

        write_report(out, model_dir=model.root)   # worklist.csv and report/ (prints the operating point)
    if uids and not finished:
        first = errors[errors[registry.STUDY_COL].isin(failed)].head(1)
        example = f" (first: {first[registry.STUDY_COL].iloc[0]}: {first['error'].iloc[0]})" if len(first) else ""
        raise AllStudiesFailedError(
            f"every one of the {len(uids)} studies failed{example}; see {out / 'errors.csv'}. "
            f"{out / 'predictions.csv'} and {out / 'submission.csv'} hold the training prior for every row")
    return out


def _detections(out: Path, *, failed: set[str], uids: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read boxes.csv and slices.csv; empty tables when no study finished (their files then lack level columns)."""
    from aggregation.features import BOX_REQUIRED, SLICE_REQUIRED, load_detection_tables

    if set(uids) <= failed:
        return pd.DataFrame(columns=list(BOX_REQUIRED)), pd.DataFrame(columns=list(SLICE_REQUIRED))
    return load_detection_tables(out / "boxes.csv", out / "slices.csv")


def _vertebrae_table(out: Path, *, failed: set[str], uids: Sequence[str]) -> pd.DataFrame | None:
    """This run's vertebrae.csv rows (finished studies only), or None when detect wrote none."""
    from aggregation.features import load_vertebrae_table
    from detector.detect_outputs import VERTEBRAE_CSV

    path = out / VERTEBRAE_CSV
    if set(uids) <= failed or not path.is_file():
        return None
    table = load_vertebrae_table(path)
    return table[table[registry.STUDY_COL].astype(str).isin(set(uids) - failed)].reset_index(drop=True)


def evidence_table(boxes: pd.DataFrame, predictions: pd.DataFrame, top: int = EVIDENCE_TOP,
                   vertebrae: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per study and level: the probability, the top boxes (slice_number:score) assigned to that level, and
    (from vertebrae.csv) the level's z-range and the vertebra classifier's scores (NaN without them)."""
    rows = []
    by_uid = {str(u): g for u, g in boxes.groupby(registry.STUDY_COL)} if len(boxes) else {}
    for rec in predictions.itertuples(index=False):
        uid = str(getattr(rec, registry.STUDY_COL))
        g = by_uid.get(uid)
        for level in registry.LEVELS:
            entry = {registry.STUDY_COL: uid, "level": level, "probability": float(getattr(rec, level)),
                     "n_boxes": 0, "max_score": 0.0, "top_boxes": ""}
            if g is not None and f"w_{level}" in g.columns:
                on = g[g[f"w_{level}"] > 0].assign(weighted=lambda d, lv=level: d["score"] * d[f"w_{lv}"])
                on = on.sort_values("weighted", ascending=False)
                if len(on):
                    entry.update(n_boxes=int(len(on)), max_score=float(on["score"].max()),
                                 top_boxes=";".join(f"slice {int(r.slice_number)}: {r.score:.2f} x w {r.weighted / max(r.score, 1e-9):.2f}"
                                                    for r in on.head(top).itertuples(index=False)))
            rows.append(entry)
    table = pd.DataFrame(rows, columns=[registry.STUDY_COL, "level", "probability", "n_boxes", "max_score",
                                        "top_boxes"])
    extra = pd.DataFrame(columns=[registry.STUDY_COL, "level", *EVIDENCE_VERTEBRA_COLUMNS])
    if vertebrae is not None and len(vertebrae):
        extra = vertebrae[[registry.STUDY_COL, "level", *EVIDENCE_VERTEBRA_COLUMNS]].astype({registry.STUDY_COL: str})
    return table.merge(extra, on=[registry.STUDY_COL, "level"], how="left")
