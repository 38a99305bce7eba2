"""Promotion bars of successive halving, and stopping a candidate that can no longer reach its bar.

A candidate scored at a rung below the last is promoted when its rung utility reaches the rung's
*bar*. Both schedules of :mod:`evomerge.search.runner` have a bar known when the candidate is
submitted that can only be too low, never too high:

* **synchronous** (pycma: a population's best ``k = ceil(promote * popsize)`` go on): the final bar
  is the ``k``-th best utility of the whole population at the rung; the ``k``-th best of the members
  already scored (:func:`sync_bar`) can only rise as more are scored, so it is a lower bound.
* **asynchronous** (Optuna samplers, ASHA): the bar is the ``ceil(promote * (h + 1))``-th best of the
  ``h`` utilities seen at the rung so far (:func:`async_bar`; none before ``ceil(1 / promote)`` of
  them, every one promoted). It is taken when the candidate is submitted and the promotion decided
  against that same bar, so a candidate's fate does not depend on which of the trials running
  alongside it finish first.

The suite evaluator scores a rung in slices and stops as soon as the largest utility the candidate
can still reach (every unscored item at its best value: :func:`evomerge.evaluate.views.reachable`)
is below the bar. Such a candidate would not have been promoted: its full rung utility is at most
that bound, below a bar that is at most the final bar. Stopping therefore never loses a trial that
would have been promoted (the property tests in ``tests/test_bounds.py``), and a broken candidate
costs a fraction of a rung instead of a whole one. The utility as a linear form over the metrics
(:func:`bar_form`) includes the cost objectives as a constant (they are known before scoring).
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.search.objectives import Objective, candidate_costs, is_scalarized


def sync_bar(scored: list[float], k: int) -> float | None:
    """The ``k``-th best of the rung utilities scored so far (None: fewer than ``k``)."""
    if len(scored) < k:
        return None
    return sorted(scored, reverse=True)[k - 1]


def sync_keep(scored: list[tuple[float, int]], k: int) -> set[int]:
    """Indices of the ``k`` best ``(utility, index)`` pairs (ties: the lower index)."""
    return {idx for _, _, idx in sorted(((u, -idx, idx) for u, idx in scored), reverse=True)[:k]}


def async_bar(history: list[float], promote: float) -> float | None:
    """The asynchronous promotion bar given the utilities seen at the rung (None: promote)."""
    if len(history) < math.ceil(1 / promote):
        return None
    ranked = sorted(history, reverse=True)
    k = max(1, math.ceil(promote * (len(history) + 1)))
    return ranked[min(k, len(ranked)) - 1]


def promoted(utility: float, bar: float | None) -> bool:
    return bar is None or utility >= bar


def bar_form(objectives: list[Objective], recipe) -> tuple[dict[str, float], float]:
    """``(coef, offset)`` with utility ``= sum_m coef[m] * metric_m + offset`` for ``recipe``."""
    used = objectives if is_scalarized(objectives) else objectives[:1]
    coef: dict[str, float] = {}
    offset = 0.0
    costs: dict[str, float] | None = None
    for o in used:
        a = (o.weight if is_scalarized(objectives) else 1.0) * o.sign
        if o.kind == "cost":
            costs = costs or candidate_costs(recipe)
            offset += a * costs[o.key]
        else:
            coef[o.key] = coef.get(o.key, 0.0) + a
    return coef, offset


def bar_payload(objectives: list[Objective], recipe, value: float | None) -> dict[str, Any] | None:
    """The ``bar`` of a job (see :class:`evomerge.evaluate.views.Bar`), or None without a bar."""
    if value is None or not math.isfinite(value):
        return None
    coef, offset = bar_form(objectives, recipe)
    return {"coef": coef, "value": float(value), "offset": offset}
