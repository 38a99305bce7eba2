"""Pareto fronts over the recorded objective values (user attribute ``objectives`` of each trial).

The front is computed from the per-objective values, not from the Optuna study's values, so a
study that optimized a weighted scalar still shows the trade-off between its objectives.
"""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

from evomerge.search.objectives import Objective


def dominates(a: list[float], b: list[float]) -> bool:
    """``a`` dominates ``b`` (both already oriented so that larger is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_indices(points: list[list[float]]) -> list[int]:
    """Indices of the non-dominated points (larger is better in every coordinate); duplicates all kept."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def oriented(objectives: list[Objective], values: dict[str, float]) -> list[float]:
    return [o.sign * values[o.name] for o in objectives]


def front_trials(study, objectives: list[Objective], *, include_baselines: bool = True) -> list[FrozenTrial]:
    """Completed trials on the Pareto front, ordered by the first objective (best first)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "objectives" in t.user_attrs
              and (include_baselines or t.user_attrs.get("kind", "search") == "search")]
    points = [oriented(objectives, t.user_attrs["objectives"]) for t in trials]
    front = [trials[i] for i in pareto_indices(points)]
    return sorted(front, key=lambda t: (-oriented(objectives, t.user_attrs["objectives"])[0], t.number))
