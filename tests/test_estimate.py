"""Predicting a full-split score from a few items (evomerge.evaluate.estimate) against hand-built
item-response tables and direct float64 computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from evomerge.evaluate.estimate import (
    IRT2PL,
    PRIOR_THETA,
    ability,
    allocate,
    fit_2pl,
    fit_predictors,
    kmeans,
    predict_combined,
    predict_irt,
    random_subset,
    spearman,
    stratified_anchors,
)


def test_anchors_are_exact_when_items_repeat_a_few_correctness_patterns():
    rng = np.random.RandomState(0)
    patterns = np.array([[1, 0, 0, 1, 1], [1, 1, 0, 0, 1], [0, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=float)  # 4 models
    counts = [7, 3, 12, 1, 5]
    table = np.repeat(patterns, counts, axis=1)
    perm = rng.permutation(table.shape[1])  # the items in any order
    table = table[:, perm]
    group = np.repeat(np.arange(5), counts)[perm]
    anchors = stratified_anchors(table, 5)
    assert len(anchors.items) == 5 and math.isclose(sum(anchors.weights), 1.0)
    assert sorted(group[i] for i in anchors.items) == [0, 1, 2, 3, 4]
    for item, w in zip(anchors.items, anchors.weights):
        assert w == pytest.approx(counts[group[item]] / sum(counts))
    for _ in range(20):  # a new model answering every item of a pattern alike
        answer = rng.randint(0, 2, size=5).astype(float)
        full = answer[group].mean()
        assert anchors.predict(answer[group][list(anchors.items)]) == pytest.approx(full, abs=1e-15)


def test_kmeans_is_deterministic_and_separates_distinct_points():
    pts = np.array([[0.0, 0], [0, 0.1], [5, 5], [5, 5.1], [9, 0]])
    l1, c1 = kmeans(pts, 3, seed=4)
    l2, c2 = kmeans(pts, 3, seed=4)
    assert np.array_equal(l1, l2) and np.array_equal(c1, c2)
    assert l1[0] == l1[1] and l1[2] == l1[3] and len({l1[0], l1[2], l1[4]}) == 3


def _simulate(models: int, items: int, seed: int):
    rng = np.random.RandomState(seed)
    theta = rng.normal(0, 1, models)
    a = np.exp(rng.normal(0, 0.4, items))
    b = rng.normal(0, 1, items)
    p = 1 / (1 + np.exp(-a[None] * (theta[:, None] - b[None])))
    return (rng.random_sample(p.shape) < p).astype(float), theta, a, b


def test_2pl_fit_recovers_abilities_and_difficulties():
    y, theta, _, b = _simulate(80, 120, seed=1)
    fit = fit_2pl(y)
    assert np.corrcoef(fit.theta, theta)[0, 1] > 0.95
    assert np.corrcoef(fit.b, b)[0, 1] > 0.9
    assert np.all(fit.a > 0)
    again = fit_2pl(y)  # deterministic
    assert np.array_equal(again.theta, fit.theta) and np.array_equal(again.b, fit.b)


def test_p_irt_is_the_formula_with_the_map_ability():
    rng = np.random.RandomState(2)
    model = IRT2PL(np.zeros(3), np.exp(rng.normal(0, 0.3, 30)), rng.normal(0, 1, 30))
    items = np.array([1, 4, 9, 17, 22, 28])
    values = np.array([1, 0, 1, 1, 0, 1], dtype=float)

    def neg_log_post(t):
        p = 1 / (1 + np.exp(-model.a[items] * (t - model.b[items])))
        return -(np.sum(values * np.log(p) + (1 - values) * np.log(1 - p)) - 0.5 * t * t / PRIOR_THETA ** 2)

    want_theta = optimize.minimize_scalar(neg_log_post, bounds=(-10, 10), method="bounded",
                                          options={"xatol": 1e-12}).x
    assert ability(model, items, values) == pytest.approx(want_theta, abs=1e-7)
    p_rest = [1 / (1 + math.exp(-model.a[i] * (want_theta - model.b[i]))) for i in range(30) if i not in items]
    want = (values.sum() + sum(p_rest)) / 30
    assert predict_irt(model, items, values) == pytest.approx(want, abs=1e-9)
    # every item an anchor: the prediction is the observed mean
    all_items = np.arange(30)
    answers = rng.randint(0, 2, 30).astype(float)
    assert predict_irt(model, all_items, answers) == pytest.approx(answers.mean(), abs=1e-15)


def test_predictions_track_the_full_score_of_new_models():
    y, _, _, _ = _simulate(140, 200, seed=3)
    ref, new = y[:40], y[40:]
    ids = list(range(200))
    full = new.mean(1)
    errors = {}
    for method in ("irt", "anchors"):
        pred = fit_predictors({"t": (ids, ref)}, 20, method)
        got = [pred["t"].predict(dict(enumerate(row))) for row in new]
        errors[method] = np.mean(np.abs(np.array(got) - full))
        assert spearman(got, full) > 0.8
    rand = []
    for seed in range(20):
        pred = fit_predictors({"t": (ids, ref)}, 20, "random", seed=seed)
        got = [pred["t"].predict(dict(enumerate(row))) for row in new]
        rand.append(np.mean(np.abs(np.array(got) - full)))
    assert errors["irt"] < np.mean(rand)  # 20 informative items beat 20 random ones


def test_combined_prediction_and_allocation():
    assert allocate({"a": 100, "b": 50, "c": 10}, 16) == {"a": 10, "b": 5, "c": 1}
    assert sum(allocate({"a": 7, "b": 7, "c": 7}, 10).values()) == 10
    y1 = np.array([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=float)
    y2 = np.array([[-1.0, -2.0], [-0.5, -3.0]])
    preds = fit_predictors({"g": ([10, 11, 12, 13], y1), "l": ([3, 5], y2)}, 6, "anchors")
    values = {"g": {10: 1.0, 11: 0.0, 12: 0.0, 13: 1.0}, "l": {3: -1.0, 5: -4.0}}
    # every item is an anchor here: the prediction is the weighted mean of the task means
    assert predict_combined(preds, {"g": 1.0, "l": 3.0}, values) == pytest.approx((0.5 + 3 * -2.5) / 4)
    subset = random_subset(10, 4, seed=5)
    assert len(subset.items) == 4 and len(set(subset.items)) == 4 and sum(subset.weights) == pytest.approx(1)
