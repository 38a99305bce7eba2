"""Scores of a suite split: per task (primary metric, its standard error, sample size) and combined.

``combined`` is the weighted mean of the tasks' primary scores, with standard error
``sqrt(sum w_i^2 se_i^2) / sum w_i`` (tasks scored on independent items). Results are plain data:
:meth:`SuiteResult.to_dict` / :meth:`SuiteResult.from_dict` round-trip them through JSON (the score
cache, study attributes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskResult:
    name: str
    kind: str
    primary: str
    score: float  # value of the primary metric
    stderr: float  # standard error of the primary metric
    n: int  # items scored
    metrics: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0
    items: list[float] = field(default_factory=list)  # each item's value of the primary metric (its mean is score)


@dataclass
class SuiteResult:
    suite: str
    split: str
    limit: int | None
    seed: int
    tasks: dict[str, TaskResult]
    combined: float
    combined_stderr: float
    seconds: float = 0.0
    cached: bool = False

    @property
    def n(self) -> int:
        return sum(t.n for t in self.tasks.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = {k: asdict(v) for k, v in self.tasks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        d = dict(d)
        d["tasks"] = {k: TaskResult(**v) for k, v in d["tasks"].items()}
        return cls(**d)


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def combine(results: dict[str, TaskResult]) -> tuple[float, float]:
    """Weighted mean of the tasks' primary scores and its standard error."""
    wsum = sum(r.weight for r in results.values())
    if wsum <= 0:
        return float("nan"), float("nan")
    score = sum(r.weight * r.score for r in results.values()) / wsum
    se = math.sqrt(sum((r.weight * r.stderr) ** 2 for r in results.values())) / wsum
    return score, se
