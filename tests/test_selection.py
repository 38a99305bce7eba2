"""Paired comparisons and the winner's choice (evomerge.search.selection) against direct float64
computations and scipy's own tests."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from evomerge.search.objectives import Objective, utility
from evomerge.search.selection import (
    Entry,
    ItemResults,
    choose,
    cost_constant,
    estimate,
    paired,
    task_coefs,
    top_k,
    unpaired,
)


def _results(rng: random.Random, tasks: dict[str, int], p: dict[str, float], loglik=()) -> ItemResults:
    out = {}
    for t, n in tasks.items():
        if t in loglik:
            out[t] = {i: -abs(rng.gauss(p[t], 0.5)) for i in range(n)}
        else:
            out[t] = {i: float(rng.random() < p[t]) for i in range(n)}
    return ItemResults(out, {t: 1.0 for t in tasks})


def test_one_task_is_the_paired_t_test_and_the_sign_test():
    rng = random.Random(0)
    a = _results(rng, {"t": 200}, {"t": 0.6})
    b = ItemResults({"t": {i: (v if rng.random() < 0.8 else 1 - v) for i, v in a.tasks["t"].items()}}, {"t": 1.0})
    got = paired(a, b, {"t": 1.0})
    x = np.array([a.tasks["t"][i] for i in range(200)], dtype=np.float64)
    y = np.array([b.tasks["t"][i] for i in range(200)], dtype=np.float64)
    ref = stats.ttest_rel(x, y)
    ci = ref.confidence_interval(0.95)
    d = x - y
    assert got.mean == pytest.approx(d.mean(), abs=1e-15)
    assert got.se == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), rel=1e-12)
    assert got.n == 200 and got.df == pytest.approx(199)
    assert got.t == pytest.approx(ref.statistic, rel=1e-12)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    assert (got.wins, got.losses) == (wins, losses)
    assert got.p_sign == pytest.approx(stats.binomtest(wins, wins + losses).pvalue, rel=1e-12)
    assert got.significant == (ci.low > 0 or ci.high < 0)


def test_stratified_difference_with_weights_costs_and_matched_ids():
    rng = random.Random(1)
    tasks = {"gen": 60, "mc": 40, "ll": 30}
    a = _results(rng, tasks, {"gen": 0.5, "mc": 0.7, "ll": 1.0}, loglik=("ll",))
    b = _results(rng, tasks, {"gen": 0.4, "mc": 0.7, "ll": 1.2}, loglik=("ll",))
    # b was scored on a subset of gen's items, listed in another order: pairs are matched by id
    b.tasks["gen"] = {i: b.tasks["gen"][i] for i in reversed(range(10, 60))}
    coefs = {"gen": 0.5, "mc": 0.25, "ll": -0.25}
    got = paired(a, b, coefs, const_diff=0.125)
    means, variances, ns = [], [], []
    for t, c in coefs.items():
        ids = sorted(set(a.tasks[t]) & set(b.tasks[t]))
        d = np.array([a.tasks[t][i] - b.tasks[t][i] for i in ids], dtype=np.float64)
        means.append(c * d.mean())
        variances.append(c * c * d.var(ddof=1) / len(d))
        ns.append(len(d))
    se = math.sqrt(sum(variances))
    df = sum(variances) ** 2 / sum(v * v / (n - 1) for v, n in zip(variances, ns))
    mean = sum(means) + 0.125
    assert got.n == 50 + 40 + 30
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert got.se == pytest.approx(se, rel=1e-12)
    assert got.df == pytest.approx(df, rel=1e-12)
    half = stats.t.ppf(0.975, df) * se
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert got.p == pytest.approx(2 * stats.t.sf(abs(mean / se), df), rel=1e-9)


def test_identical_candidates_differ_by_exactly_nothing():
    rng = random.Random(2)
    a = _results(rng, {"t": 30}, {"t": 0.5})
    got = paired(a, a, {"t": 1.0})
    assert (got.mean, got.se, got.low, got.high, got.p, got.wins, got.losses) == (0, 0, 0, 0, 1.0, 0, 0)
    assert not got.significant


def test_no_shared_item_is_an_error():
    a = ItemResults({"t": {0: 1.0, 1: 0.0}}, {"t": 1.0})
    b = ItemResults({"t": {2: 1.0, 3: 0.0}}, {"t": 1.0})
    with pytest.raises(ValueError, match="share no scored item"):
        paired(a, b, {"t": 1.0})


def test_estimate_is_the_utility_with_a_stratified_interval():
    rng = random.Random(3)
    res = _results(rng, {"x": 50, "y": 80}, {"x": 0.3, "y": 0.8})
    res = ItemResults(res.tasks, {"x": 1.0, "y": 3.0})
    objs = [Objective("combined", "metric", "combined", "maximize", 1.0),
            Objective("cost:layers", "cost", "layers", "minimize", 0.01)]
    coefs = task_coefs(objs, res.weights)
    assert coefs == pytest.approx({"x": 0.25, "y": 0.75})
    values = {"combined": (res.task_mean("x") + 3 * res.task_mean("y")) / 4, "cost:layers": 6.0}
    est = estimate(res, coefs, cost_constant(objs, values))
    assert est.mean == pytest.approx(utility(objs, values), abs=1e-12)
    vx = np.var(list(res.tasks["x"].values()), ddof=1) / 50
    vy = np.var(list(res.tasks["y"].values()), ddof=1) / 80
    se = math.sqrt(0.25 ** 2 * vx + 0.75 ** 2 * vy)
    assert est.se == pytest.approx(se, rel=1e-12) and est.n == 130
    df = (0.0625 * vx + 0.5625 * vy) ** 2 / ((0.0625 * vx) ** 2 / 49 + (0.5625 * vy) ** 2 / 79)
    assert est.high - est.mean == pytest.approx(stats.t.ppf(0.975, df) * se, rel=1e-9)


def test_task_coefficients_follow_the_objectives():
    w = {"a": 1.0, "b": 1.0}
    first = [Objective("a", "metric", "a", "maximize"), Objective("cost:params", "cost", "params", "minimize")]
    assert task_coefs(first, w) == {"a": 1.0}  # unweighted: the first objective's utility
    minimized = [Objective("b", "metric", "b", "minimize")]
    assert task_coefs(minimized, w) == {"b": -1.0}
    assert task_coefs([Objective("acc_norm", "metric", "acc_norm", "maximize")], w) is None
    assert cost_constant(first, {"a": 0.5, "cost:params": 10.0}) == 0.0


def test_unpaired_difference_is_the_independent_normal_interval():
    a = estimate(ItemResults({"t": {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}}), {"t": 1.0})
    b = estimate(ItemResults({"t": {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0}}), {"t": 1.0})
    d = unpaired(a, b)
    se = math.hypot(a.se, b.se)
    assert d.mean == pytest.approx(0.5) and d.se == pytest.approx(se)
    assert d.high - d.mean == pytest.approx(stats.norm.ppf(0.975) * se)


def test_the_winner_is_the_best_validation_score_and_is_compared_with_the_search_best():
    rng = random.Random(4)
    pool = []
    for n, (search, p) in enumerate([(0.9, 0.55), (0.8, 0.75), (0.7, 0.6), (0.5, 0.4)]):
        pool.append(Entry(n, f"c{n}", search, _results(rng, {"t": 120}, {"t": p})))
    pool.append(Entry(9, "no validation", 0.95, None))
    choice = choose(pool, {"t": 1.0})
    means = {e.number: np.mean(list(e.validation.tasks["t"].values())) for e in pool if e.validation}
    assert choice.winner == max(means, key=means.get)
    assert choice.incumbent == 9  # the best search score, although it has no validation result
    assert set(choice.scores) == set(means)
    assert choice.scores[choice.winner].mean == pytest.approx(means[choice.winner])
    assert choice.versus_incumbent is None  # no validation result to pair with
    pool[-1] = Entry(9, "incumbent", 0.95, pool[0].validation)
    choice = choose(pool, {"t": 1.0})
    want = paired(pool[choice.winner].validation, pool[0].validation, {"t": 1.0})
    assert choice.versus_incumbent == want


def test_top_k_breaks_ties_by_trial_number():
    assert top_k([(5, 0.5), (2, 0.9), (7, 0.9), (1, 0.1)], 3) == [2, 7, 5]
