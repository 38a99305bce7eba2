"""Cheaper fitness: score a small informative subset of items and predict the full-split score.

The predictors are fitted on a **response table**: the per-item results (rows: models, columns:
items of one task's split) of models already scored on every item, e.g. a study's baselines (the
source models, the untuned default) and its first fully scored candidates. Two ways to choose the
``m`` items a new candidate is scored on and to predict from them, after tinyBenchmarks (Polo et
al., 2024, "tinyBenchmarks: evaluating LLMs with fewer examples") and MERGE3 (Mencattini et al.,
2025, "MERGE³: Efficient Evolutionary Merging on Consumer-grade GPUs"):

* **Stratified anchors** (:func:`stratified_anchors`): items are clustered by their correctness
  pattern across the table's models (k-means, ``k = m``, k-means++ seeding from a fixed seed); the
  anchor of a cluster is its item nearest the centroid and weighs the cluster's share of the items,
  ``w_c = |C_c| / N``. The prediction is ``sum_c w_c y_{anchor_c}``: a stratified sample mean whose
  strata are items that the known models get right or wrong together.
* **Item response theory** (:func:`fit_2pl`, :func:`predict_irt`): the two-parameter logistic
  model ``P(y_mi = 1) = sigmoid(a_i (theta_m - b_i))`` (ability ``theta_m`` of model ``m``,
  discrimination ``a_i > 0`` and difficulty ``b_i`` of item ``i``) fitted jointly by maximum a
  posteriori with priors ``theta ~ N(0, 1)``, ``log a ~ N(0, 0.5^2)``, ``b ~ N(0, 2^2)`` (float64,
  L-BFGS, deterministic). A candidate's ability is its MAP estimate given its anchor answers and
  the fitted items, and its predicted score is the performance-IRT estimate ``p-IRT``:
  ``(sum_{i in S} y_i + sum_{i not in S} sigmoid(a_i (theta - b_i))) / N``.

Both predict a task's mean; a suite's ``combined`` is the weighted mean of its tasks' predictions
with the anchors split among tasks in proportion to their item counts (:func:`allocate`). IRT needs
0/1 items (exact match, accuracy); a task of another kind (mean log-probability) is predicted by
its anchors. With few models in the table the item parameters are uncertain (the priors keep them
finite); ``scripts/bench_estimate.py`` measures how well each predictor ranks candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SEED = 0


# ------------------------------------------------------------------------------------------ anchors


def kmeans(points: np.ndarray, k: int, seed: int = SEED, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, centroids)`` of Lloyd's k-means on the rows of ``points`` with k-means++ seeding
    (Arthur & Vassilvitskii, 2007) from ``numpy.random.RandomState(seed)``; an empty cluster gets the
    point farthest from its centroid. Deterministic for a given input and seed."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    k = min(k, n)
    rng = np.random.RandomState(seed)
    centers = [pts[rng.randint(n)]]
    for _ in range(1, k):
        d2 = np.min(((pts[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        if total <= 0:  # every point is already a centre: take the next unused one
            used = {tuple(c) for c in centers}
            rest = [i for i in range(n) if tuple(pts[i]) not in used]
            centers.append(pts[rest[0]] if rest else pts[rng.randint(n)])
            continue
        centers.append(pts[rng.choice(n, p=d2 / total)])
    cent = np.array(centers)
    labels = np.full(n, -1)
    for _ in range(iters):
        d2 = ((pts[:, None, :] - cent[None]) ** 2).sum(-1)
        new = d2.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = pts[labels == c]
            if len(members):
                cent[c] = members.mean(0)
            else:
                far = int(d2[np.arange(n), labels].argmax())
                cent[c], labels[far] = pts[far], c
    return labels, cent


@dataclass(frozen=True)
class Anchors:
    """Anchor items (column indices of the table) and their weights (summing to 1)."""

    items: tuple[int, ...]
    weights: tuple[float, ...]

    def predict(self, values: np.ndarray) -> float:
        """The stratified estimate from a candidate's values on the anchor items (in ``items`` order)."""
        return float(np.dot(self.weights, np.asarray(values, dtype=np.float64)))


def stratified_anchors(table: np.ndarray, m: int, seed: int = SEED) -> Anchors:
    """``m`` anchors of the items (columns) of ``table`` (rows: models), clustered by correctness pattern."""
    y = np.asarray(table, dtype=np.float64)
    n = y.shape[1]
    if m >= n:
        return Anchors(tuple(range(n)), tuple([1.0 / n] * n))
    labels, cent = kmeans(y.T, m, seed)
    items, weights = [], []
    for c in range(cent.shape[0]):
        members = np.flatnonzero(labels == c)
        if not len(members):
            continue
        d2 = ((y.T[members] - cent[c]) ** 2).sum(1)
        items.append(int(members[int(d2.argmin())]))
        weights.append(len(members) / n)
    order = np.argsort(items)
    return Anchors(tuple(items[i] for i in order), tuple(weights[i] for i in order))


def random_subset(n: int, m: int, seed: int) -> Anchors:
    """``m`` items drawn uniformly without replacement, equal weights (the plain subsample)."""
    idx = sorted(np.random.RandomState(seed).choice(n, size=min(m, n), replace=False).tolist())
    return Anchors(tuple(idx), tuple([1.0 / len(idx)] * len(idx)))


# ---------------------------------------------------------------------------------------------- 2PL IRT


@dataclass(frozen=True)
class IRT2PL:
    """Fitted two-parameter logistic item response model of one task."""

    theta: np.ndarray  # abilities of the table's models
    a: np.ndarray  # discriminations (> 0)
    b: np.ndarray  # difficulties

    def prob(self, theta: float, items: np.ndarray | None = None) -> np.ndarray:
        a, b = (self.a, self.b) if items is None else (self.a[items], self.b[items])
        return 1.0 / (1.0 + np.exp(-a * (theta - b)))


# standard deviations of the priors. Discriminations are shrunk toward 1 (log a ~ N(0, 0.5^2)): a
# study's table has tens of models, not the hundreds of tinyBenchmarks, and items its few models
# split perfectly would otherwise get near-infinite discriminations (step functions): on the demo zoo
# (scripts/bench_estimate.py, 17 reference models) a prior of sd 1 biased p-IRT by -0.12, sd 0.5 and
# 0.25 by less than 0.01.
PRIOR_THETA, PRIOR_LOG_A, PRIOR_B = 1.0, 0.5, 2.0


def fit_2pl(table: np.ndarray, iters: int = 200) -> IRT2PL:
    """MAP fit of the 2PL model to a 0/1 table (rows: models, columns: items); float64 L-BFGS."""
    import torch

    y = torch.as_tensor(np.asarray(table, dtype=np.float64))
    m, n = y.shape
    theta = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    log_a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    # start each difficulty at the logit of its error rate (smoothed)
    p = (y.sum(0) + 0.5) / (m + 1.0)
    b = (-torch.log(p / (1 - p))).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta, log_a, b], lr=1.0, max_iter=iters, tolerance_grad=1e-10,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        z = torch.exp(log_a)[None, :] * (theta[:, None] - b[None, :])
        nll = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
        prior = (0.5 * (theta / PRIOR_THETA) ** 2).sum() + (0.5 * (log_a / PRIOR_LOG_A) ** 2).sum() \
            + (0.5 * (b / PRIOR_B) ** 2).sum()
        total = nll + prior
        total.backward()
        return total

    opt.step(loss)
    return IRT2PL(theta.detach().numpy().copy(), torch.exp(log_a).detach().numpy().copy(), b.detach().numpy().copy())


def ability(model: IRT2PL, items: np.ndarray, values: np.ndarray, iters: int = 50) -> float:
    """MAP ability ``theta`` (prior N(0, 1)) of a candidate answering ``values`` (0/1) on ``items``
    (Newton's method on the concave log posterior)."""
    items = np.asarray(items)
    y = np.asarray(values, dtype=np.float64)
    a = model.a[items]
    theta = 0.0
    for _ in range(iters):
        p = model.prob(theta, items)
        grad = np.sum(a * (y - p)) - theta / PRIOR_THETA ** 2
        hess = -np.sum(a * a * p * (1 - p)) - 1.0 / PRIOR_THETA ** 2
        step = grad / hess
        theta -= step
        if abs(step) < 1e-12:
            break
    return float(theta)


def predict_irt(model: IRT2PL, items: np.ndarray, values: np.ndarray) -> float:
    """The p-IRT estimate of a task's mean from a candidate's 0/1 answers on ``items``."""
    items = np.asarray(items)
    theta = ability(model, items, values)
    p = model.prob(theta)
    rest = np.ones(len(p), dtype=bool)
    rest[items] = False
    return float((np.sum(values) + p[rest].sum()) / len(p))


# ------------------------------------------------------------------------------------- several tasks


def allocate(sizes: dict[str, int], m: int) -> dict[str, int]:
    """Anchors per task, ``m`` in all, in proportion to the tasks' item counts (largest remainders;
    at least one per task)."""
    total = sum(sizes.values())
    raw = {t: m * n / total for t, n in sizes.items()}
    out = {t: max(1, min(sizes[t], math.floor(v))) for t, v in raw.items()}
    for t in sorted(sizes, key=lambda t: raw[t] - math.floor(raw[t]), reverse=True):
        if sum(out.values()) >= m:
            break
        if out[t] < sizes[t]:
            out[t] += 1
    return out


@dataclass(frozen=True)
class TaskPredictor:
    """How one task's mean is predicted from its anchors."""

    ids: tuple[int, ...]  # item ids of the task's columns
    anchors: Anchors
    irt: IRT2PL | None  # None: a task with values other than 0/1, or method "anchors"

    def anchor_ids(self) -> list[int]:
        return [self.ids[i] for i in self.anchors.items]

    def predict(self, values: dict[int, float]) -> float:
        """The task's predicted mean from ``{item id: value}`` on (at least) its anchors."""
        y = np.array([values[self.ids[i]] for i in self.anchors.items], dtype=np.float64)
        if self.irt is None:
            return self.anchors.predict(y)
        return predict_irt(self.irt, np.array(self.anchors.items), y)


def fit_predictors(tables: dict[str, tuple[list[int], np.ndarray]], m: int, method: str = "irt",
                   seed: int = SEED) -> dict[str, TaskPredictor]:
    """A predictor per task from ``{task: (item ids, table)}`` with ``m`` anchors in all.
    ``method``: ``anchors``, ``irt`` (anchors chosen the same way, predicted by p-IRT) or ``random``
    (a uniform random subset of the same size, its plain mean)."""
    if method not in ("anchors", "irt", "random"):
        raise ValueError(f"unknown estimator {method!r}; use anchors, irt or random")
    per = allocate({t: len(ids) for t, (ids, _) in tables.items()}, m)
    out = {}
    for t, (ids, y) in tables.items():
        y = np.asarray(y, dtype=np.float64)
        if method == "random":
            out[t] = TaskPredictor(tuple(ids), random_subset(len(ids), per[t], seed), None)
            continue
        anchors = stratified_anchors(y, per[t], seed)
        binary = bool(np.all((y == 0) | (y == 1)))
        out[t] = TaskPredictor(tuple(ids), anchors, fit_2pl(y) if method == "irt" and binary else None)
    return out


def predict_combined(predictors: dict[str, TaskPredictor], weights: dict[str, float],
                     values: dict[str, dict[int, float]]) -> float:
    """The predicted ``combined`` score (weighted mean of the tasks' predictions)."""
    wsum = sum(weights[t] for t in predictors)
    return sum(weights[t] * p.predict(values[t]) for t, p in predictors.items()) / wsum


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)
