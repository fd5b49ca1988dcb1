"""`spinefrac train --budget`: durations, the split of a budget over the training stages, and a tiny budgeted run."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from configs.durations import parse_duration
from data_prep.runs.config import ConfigError, load_config
from spinefrac.budget import TrainingBudget, allot, planned_split, training_stages

WEIGHTS = {"locator": 0.2, "detector": 0.5, "classifier": 0.3}
STAGES = [("train-locator", "locator"), ("train-detector", "detector"), ("train-classifier-fold0", "classifier"),
          ("train-classifier-fold1", "classifier")]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("12m", 720), ("1h", 3600), ("1h30m", 5400),
                                               ("1.5h", 5400), ("2m30s", 150), (" 45 S ", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "reason"), [("90", "needs a unit"), ("12x", "not a duration"), ("", "not a duration"),
                                              ("30m1h", "in the order h, m, s"), ("5m5m", "each unit once"),
                                              ("0m", "not a positive"), ("-5m", "not a duration")])
def test_bad_durations_say_why(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


def test_a_bad_budget_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"budget\.total.*needs a unit"):
        load_config("pipeline", None, ["budget.total=90"])
    with pytest.raises(ConfigError, match=r"budget\.reserve"):
        load_config("pipeline", None, ["budget.reserve=1.0"])
    assert load_config("pipeline", None, ["budget.total=12m"]).budget.total == "12m"


def test_cli_refuses_a_budget_without_unit(capsys):
    from spinefrac.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "data", "--out", "model", "--budget", "60"])
    assert exc.value.code == 2
    assert "needs a unit" in capsys.readouterr().err


def test_weights_split_evenly_over_fold_models():
    stages = training_stages(STAGES, WEIGHTS)
    assert [s.weight for s in stages] == pytest.approx([0.2, 0.5, 0.15, 0.15])
    with pytest.raises(ValueError, match="unknown"):
        training_stages([("x", "segmenter")], WEIGHTS)


def test_plan_gives_the_budget_less_the_reserve_by_weight():
    plan = planned_split(1000.0, training_stages(STAGES, WEIGHTS), reserve=0.1)
    assert sum(plan.values()) == pytest.approx(900.0)
    assert plan == pytest.approx({"train-locator": 180.0, "train-detector": 450.0, "train-classifier-fold0": 135.0,
                                  "train-classifier-fold1": 135.0})
    # without a locator (reused, or no segmentations) its weight goes to the others
    plan = planned_split(1000.0, training_stages(STAGES[1:], WEIGHTS), reserve=0.1)
    assert plan["train-detector"] == pytest.approx(900.0 * 0.5 / 0.8)


def test_time_taken_before_a_stage_is_taken_from_the_stages_still_to_run():
    stages = training_stages(STAGES, WEIGHTS)
    # on plan: 1000 s, reserve 100; the locator (180 s) and 70 s of prepare stages spent -> 650 left for 0.8 weight
    assert allot(1000.0, 250.0, 0.1, stages[1:], min_stage_s=10.0) == pytest.approx(650.0 * 0.5 / 0.8)
    # an early stop leaves more for the rest; the last stage gets all that is left
    assert allot(1000.0, 400.0, 0.1, stages[3:], min_stage_s=10.0) == pytest.approx(500.0)
    # overrun: the floor
    assert allot(1000.0, 990.0, 0.1, stages[2:], min_stage_s=10.0) == 10.0
    with pytest.raises(ValueError):
        allot(1000.0, 0.0, 0.1, [], min_stage_s=10.0)


def test_budget_records_plan_given_and_used():
    cfg = load_config("pipeline", None, ["budget.total=10m"]).budget
    assert TrainingBudget.from_config(load_config("pipeline").budget, STAGES) is None
    budget = TrainingBudget.from_config(cfg, STAGES)
    assert budget.total_s == 600.0
    given = budget.give("train-locator", 0.0)
    assert given == pytest.approx(budget.plan_s["train-locator"])
    budget.record("train-locator", given + 30.0)      # overran by 30 s
    assert budget.give("train-detector", given + 30.0) < budget.plan_s["train-detector"]
    summary = budget.summary(700.0)
    assert summary["over_s"] == 100.0 and summary["stages"]["train-locator"]["used_s"] == pytest.approx(given + 30.0)
    with pytest.raises(KeyError):
        budget.give("train-aggregator", 0.0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from data_prep.runs.config import load_config as load
    from data_prep.synthetic.synth import synthesize

    root = tmp_path_factory.mktemp("budget") / "data"
    synthesize(root, n_studies=10, seed=5, progress=False,
               config=load("synth", None, ["image.size=64", "volume.slices=24", "labels.box_fraction=1.0"]))
    return root


@pytest.mark.slow
def test_a_tiny_budgeted_train_records_the_split_and_a_new_budget_redoes_training(tiny_data, tmp_path, caplog,
                                                                                   yolo_home):
    """Detector only (no locator, no classifier): the budget goes to train-detector through Ultralytics' `time`."""
    from spinefrac.cli import main

    model = tmp_path / "model"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text('detector:\n  set: ["render.imgsz=32", "train.plots=false", "train.batch=4"]\n'
                   'locator:\n  enabled: false\nclassifier:\n  enabled: false\n'
                   'aggregation:\n  set: ["splits.n_folds=2"]\n'
                   'budget:\n  min_stage_s: 0.5\n')
    args = ["train", str(tiny_data), "--out", str(model), "--config", str(cfg), "--no-progress"]
    assert main([*args, "--budget", "3s"]) == 0
    meta = json.loads((model / "model.json").read_text())
    budget = meta["budget"]
    assert budget["total"] == "3s" and budget["total_s"] == 3.0
    assert budget["stages"]["train-detector"]["planned_s"] == pytest.approx(3.0 * 0.9)
    given = budget["stages"]["train-detector"]["given_s"]
    assert given >= 0.5 and meta["stages"]["train-detector"]["budget_s"] == given
    assert set(budget["stages"]) == {"prepare-detector", "train-detector", "detect-aggregator-studies",
                                     "train-aggregator"}
    assert all(s["used_s"] > 0 for s in budget["stages"].values())
    args_yaml = yaml.safe_load((model / "detector" / "args.yaml").read_text())
    assert args_yaml["time"] == pytest.approx(given / 3600, rel=1e-3)     # what Ultralytics was given

    caplog.set_level(logging.INFO, logger="spinefrac")
    caplog.clear()
    assert main([*args, "--budget", "3s"]) == 0           # same budget: nothing to redo
    assert "stage train-detector: done already" in caplog.text
    caplog.clear()
    assert main([*args, "--budget", "4s"]) == 0           # another budget: a settings change of the training
    assert "stage train-detector redone: its settings changed" in caplog.text
    assert "prepare-detector: done already" in caplog.text
    assert json.loads((model / "model.json").read_text())["budget"]["total_s"] == 4.0
