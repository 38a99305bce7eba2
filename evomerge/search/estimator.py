"""The first rung scored on informative anchor items, its full-split score predicted
(``multi_fidelity: {estimator: anchors | irt, anchors: 24, reference: 16}``).

Successive halving's first rung normally scores a random subsample of the search split. With an
estimator it scores ``anchors`` items chosen from the per-item results of the trials already scored
on the whole split (the baselines first, then every completed candidate: the *reference table*), and
its rung scores are the predicted full-split scores (:mod:`evomerge.evaluate.estimate`: stratified
anchors, or p-IRT from a 2PL model). Until ``reference`` trials are in the table the first rung is
the usual random subsample. The predictors are refitted whenever the table has grown by a quarter
since the last fit, so the anchors follow the region the optimizer explores.

Measured on the demo zoo (``scripts/bench_estimate.py``, ``docs/search-quality.md``): with the 5
baselines alone as reference, anchors and IRT rank candidates worse than a random subset of the same
size, on both demo spaces: a handful of models does not show which items separate candidates. With
17 reference models (the baselines and 12 candidates), 24 anchors ranked candidates at 0.94 (TIES
space) and 0.90 (task-arithmetic space) against 0.77 and 0.82 for 24 random items; at 48 and 96
items the gain held on one space and turned into a loss on the other. Hence ``reference: 16`` and
``anchors: 24`` by default, and no estimator unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.evaluate import estimate as E
from evomerge.search.selection import ItemResults

REFIT_GROWTH = 1.25  # refit when the reference table has grown by this factor since the last fit


class RungEstimator:
    """Anchor items of the first rung, and full-split scores predicted from a candidate's answers."""

    def __init__(self, method: str, anchors: int, reference: int, seed: int = 0):
        self.method, self.m, self.reference, self.seed = method, anchors, reference, seed
        self.rows: dict[int, ItemResults] = {}
        self.weights: dict[str, float] = {}
        self.fitted: Fitted | None = None

    def add(self, number: int, payload: dict[str, Any] | None) -> None:
        """A trial scored on every search item (its outcome's per-item payload)."""
        res = ItemResults.from_payload(payload)
        if res is None or (self.rows and set(res.tasks) != set(next(iter(self.rows.values())).tasks)):
            return
        self.rows[number] = res
        self.weights = res.weights

    def load(self, study) -> None:
        """Every completed trial of ``study`` with per-item results (a resumed stage)."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("items"):
                self.add(t.number, t.user_attrs["items"])

    def ready(self) -> bool:
        return len(self.rows) >= self.reference

    def current(self) -> Fitted | None:
        """The predictors to score the next first-rung candidate with (None: the reference table is
        still too small), refitted when the table has grown enough."""
        if not self.ready():
            return None
        if self.fitted is None or len(self.rows) >= REFIT_GROWTH * self.fitted.reference:
            first = next(iter(self.rows.values()))
            tables = {}
            for task in first.tasks:
                ids = sorted(set.intersection(*(set(r.tasks[task]) for r in self.rows.values())))
                tables[task] = (ids, np.array([[r.tasks[task][i] for i in ids] for r in self.rows.values()]))
            self.fitted = Fitted(E.fit_predictors(tables, self.m, self.method, seed=self.seed), dict(self.weights),
                                 self.method, len(self.rows))
        return self.fitted


@dataclass(frozen=True)
class Fitted:
    """Predictors fitted on a reference table of ``reference`` trials: a candidate is predicted by
    the same predictors whose anchors it was scored on."""

    predictors: dict[str, E.TaskPredictor]
    weights: dict[str, float]
    method: str
    reference: int

    def anchor_items(self) -> dict[str, list[int]]:
        """Item ids per task the first rung scores."""
        return {task: p.anchor_ids() for task, p in self.predictors.items()}

    def predict(self, payload: dict[str, Any]) -> tuple[dict[str, float], dict[str, int]]:
        """Predicted full-split scores (every task and ``combined``) and the items scored, from a
        candidate's per-item payload on the anchors."""
        res = ItemResults.from_payload(payload)
        scores = {task: p.predict(res.tasks[task]) for task, p in self.predictors.items()}
        wsum = sum(self.weights[t] for t in self.predictors)
        scores["combined"] = sum(self.weights[t] * scores[t] for t in self.predictors) / wsum
        n = {task: len(res.tasks[task]) for task in self.predictors}
        return scores, n | {"combined": sum(n.values())}
