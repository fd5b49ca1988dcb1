"""`spinefrac train --budget 60m`: one wall-clock budget for the whole of `train`, spent by the YOLO trainings.

The training stages (the locator, the detector and the fold detectors, the fold classifiers) get Ultralytics'
`time` argument (hours), and Ultralytics fits its epochs to it. The other stages (prepare-*, detecting the
aggregator's studies, the aggregator) are not given time: they take what they take, and the budget absorbs
it (configs/pipeline.yaml `budget:`):
- `reserve` of the budget is kept for the stages after the last training stage;
- when a training stage starts, what is left of the budget (minus the reserve) is shared among the training
  stages still to run in proportion to their weights (`locator`, `detector`, `classifier`; a kind's weight is
  split evenly over its fold models), and this stage gets its part. So the time of the prepare stages before
  it, and an earlier stage that overran (Ultralytics ends after the batch that crosses its time, then
  validates) or stopped early (patience), move to the stages after it.
- a stage gets at least `min_stage_s`, even when the stages before it overran.
Synthesis is outside the budget (it is not part of `train`). Stages a rerun skips count with the runtime
recorded when they ran, so a resumed run spends the same budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from configs.durations import format_duration, parse_duration

log = logging.getLogger("spinefrac")

KINDS = ("locator", "detector", "classifier")
"""The kinds of training stage, each with its weight in configs/pipeline.yaml `budget:`."""


@dataclass(frozen=True)
class TrainingStage:
    """One YOLO training stage of `train`: its stage name and its share of the training time."""

    name: str
    kind: str
    weight: float


def training_stages(names: Sequence[tuple[str, str]], weights: Mapping[str, float]) -> list[TrainingStage]:
    """(stage name, kind) in running order -> stages whose weights split each kind's weight evenly over its stages."""
    counts = {kind: sum(1 for _, k in names if k == kind) for kind in KINDS}
    unknown = sorted({k for _, k in names} - set(KINDS))
    if unknown:
        raise ValueError(f"unknown training stage kind(s) {unknown}; expected {', '.join(KINDS)}")
    return [TrainingStage(name, kind, float(weights[kind]) / counts[kind]) for name, kind in names]


def planned_split(total_s: float, stages: Sequence[TrainingStage], reserve: float) -> dict[str, float]:
    """Seconds each training stage would get if nothing else took time: (1 - reserve) of the total, by weight."""
    weight = sum(s.weight for s in stages)
    if weight <= 0:
        return {s.name: 0.0 for s in stages}
    return {s.name: total_s * (1.0 - reserve) * s.weight / weight for s in stages}


def allot(total_s: float, elapsed_s: float, reserve: float, remaining: Sequence[TrainingStage],
          min_stage_s: float) -> float:
    """Seconds for remaining[0], the training stage about to start: its weight's part of what is left.

    What is left is the total minus the time already spent minus the reserve; it is shared among the training
    stages still to run (`remaining`, this one first) in proportion to their weights; at least `min_stage_s`.
    """
    if not remaining:
        raise ValueError("no training stage left to allot time to")
    left = total_s * (1.0 - reserve) - elapsed_s
    weight = sum(s.weight for s in remaining)
    share = remaining[0].weight / weight if weight > 0 else 1.0 / len(remaining)
    return max(min_stage_s, left * share)


@dataclass
class TrainingBudget:
    """A budget being spent by one `train` run: the plan, what each training stage was given, what each stage used."""

    total_s: float
    reserve: float
    min_stage_s: float
    stages: list[TrainingStage]
    text: str = ""
    given_s: dict[str, float] = field(default_factory=dict)
    used_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, budget: Mapping[str, Any], names: Sequence[tuple[str, str]]) -> TrainingBudget | None:
        """The budget of configs/pipeline.yaml `budget:` over these training stages, or None when `total` is null."""
        if budget["total"] is None:
            return None
        weights = {kind: float(budget[kind]) for kind in KINDS}
        return cls(parse_duration(budget["total"]), float(budget["reserve"]), float(budget["min_stage_s"]),
                   training_stages(names, weights), text=str(budget["total"]))

    @property
    def plan_s(self) -> dict[str, float]:
        """The planned seconds of each training stage (before any stage took time)."""
        return planned_split(self.total_s, self.stages, self.reserve)

    def settings(self) -> dict[str, Any]:
        """What a training stage's result depends on (part of its settings key): a new budget redoes training."""
        return {"total_s": self.total_s, "reserve": self.reserve, "min_stage_s": self.min_stage_s,
                "weights": {s.name: s.weight for s in self.stages}}

    def give(self, name: str, elapsed_s: float) -> float:
        """Seconds for training stage `name`, which starts after `elapsed_s` of the run; recorded as given."""
        names = [s.name for s in self.stages]
        if name not in names:
            raise KeyError(f"{name} is not a training stage of this budget ({', '.join(names)})")
        seconds = allot(self.total_s, elapsed_s, self.reserve, self.stages[names.index(name):], self.min_stage_s)
        self.given_s[name] = seconds
        log.info("budget %s: %s gets %s (planned %s; %s of the budget spent so far)", self.text, name,
                 format_duration(seconds), format_duration(self.plan_s[name]), format_duration(elapsed_s))
        return seconds

    def record(self, name: str, used_s: float) -> None:
        """Record the wall time a stage (training or not) took."""
        self.used_s[name] = float(used_s)

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        """model.json `budget`: the total, the shares, and per stage the planned, given and used seconds."""
        plan = self.plan_s
        return {"total": self.text, "total_s": self.total_s, "reserve": self.reserve, "min_stage_s": self.min_stage_s,
                "weights": {s.name: round(s.weight, 6) for s in self.stages},
                "stages": {name: {"planned_s": _round(plan.get(name)), "given_s": _round(self.given_s.get(name)),
                                  "used_s": _round(used)} for name, used in self.used_s.items()},
                "used_s": round(elapsed_s, 1), "over_s": round(elapsed_s - self.total_s, 1)}

    def log_summary(self, elapsed_s: float) -> None:
        """Log how the budget was spent: per stage planned, given (to Ultralytics) and used; the total."""
        rows = self.summary(elapsed_s)["stages"]
        lines = [f"{'stage':<34}{'planned':>10}{'given':>10}{'used':>10}"]
        for name, r in rows.items():
            cells = [format_duration(r[k]) if r[k] is not None else "-" for k in ("planned_s", "given_s", "used_s")]
            lines.append(f"{name:<34}" + "".join(f"{c:>10}" for c in cells))
        over = elapsed_s - self.total_s
        verdict = f"{format_duration(-over)} left" if over <= 0 else f"{format_duration(over)} over"
        log.info("budget %s (%s) spent: %s used, %s\n%s", self.text, format_duration(self.total_s),
                 format_duration(elapsed_s), verdict, "\n".join(lines))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)
