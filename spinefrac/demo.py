"""`spinefrac demo`: synthesise studies, train every stage, predict held-out studies and evaluate, on the CPU.

Folders under OUT (a rerun resumes; --clean starts again):
    data/      synthetic training studies in the Kaggle layout
    test/      synthetic test studies (test_images/, test.csv; hidden labels in truth/)
    model/     the model folder written by `spinefrac train`
    predict/   predictions.csv, submission.csv, boxes.csv, slices.csv, evidence.csv, overlays/
    eval/      metrics.json, ROC and calibration plots
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from data_prep.runs.config import Config, load_config

log = logging.getLogger("spinefrac")


def demo_config(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Return the pipeline config with the demo's per-stage overrides folded into each stage's `set` (the user's own win)."""
    base = load_config("pipeline", config_path, overrides)
    folded = [f"{stage}.set={json.dumps([*base.demo[f'{stage}_set'], *base[stage]['set']])}"
              for stage in ("detector", "locator", "levels", "aggregation", "classifier")]
    return load_config("pipeline", config_path, [*overrides, *folded])


def run_demo(out: str | os.PathLike = "demo_out", *, config_path: str | os.PathLike | None = None,
             overrides: Sequence[str] = (), progress: bool = True, clean: bool = False) -> dict:
    """Run the whole pipeline on synthetic studies and print the metric, the baselines and where to look."""
    from aggregation.evaluate import evaluate_predictions
    from data_prep.synthetic.synth import synth_config, synthesize
    from spinefrac.pipeline import predict_all, train_all

    t0 = time.perf_counter()
    out = Path(out)
    if clean and out.exists():
        shutil.rmtree(out)
    cfg = demo_config(config_path, overrides)
    demo = cfg.demo
    synth_cfg = synth_config(demo.world, None, list(demo.synth_set))
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        s = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - s, 1)
        log.info("demo: %s took %.0f s", name, timings[name])
        return result

    data, test = out / "data", out / "test"
    if not (data / "train.csv").is_file():
        timed("synth-train", lambda: synthesize(data, n_studies=int(demo.train_studies), seed=int(demo.seed),
                                                split="train", config=synth_cfg, progress=progress, overwrite=True))
    if not (test / "test.csv").is_file():
        timed("synth-test", lambda: synthesize(test, n_studies=int(demo.test_studies), seed=int(demo.seed) + 1,
                                               split="test", config=synth_cfg, progress=progress, overwrite=True))
    model = timed("train", lambda: train_all(data, out / "model", config=cfg, progress=progress))
    pred = timed("predict", lambda: predict_all([test / "test_images"], model_dir=model, out=out / "predict",
                                                test_csv=test / "test.csv",
                                                labels=test / "truth" / "train_bounding_boxes.csv",
                                                progress=progress, overwrite=True))   # the model may have changed
    report = timed("evaluate", lambda: evaluate_predictions(pred / "predictions.csv",
                                                            labels=test / "truth" / "train.csv",
                                                            out=out / "eval", boxes=pred / "boxes.csv",
                                                            prior=model / "prior.json"))
    total = time.perf_counter() - t0
    print(report.format())
    print(f"\ndemo finished in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"  model folder:  {model}")
    print(f"  submission:    {pred / 'submission.csv'}")
    print(f"  evidence:      {pred / 'evidence.csv'}")
    print(f"  review report: {pred / 'report' / 'index.html'} (worklist ranked by patient_overall; open in a browser)")
    print(f"  overlays:      {pred / 'overlays'}/<StudyInstanceUID>/ (contact_sheet.png, score_profile.png)")
    print(f"  evaluation:    {out / 'eval'} (metrics.json, ROC and calibration PNGs)")
    return {"report": report.to_dict(), "timings_s": timings, "total_s": round(total, 1)}
