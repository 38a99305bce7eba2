"""The validation re-score that names a stage's winner, against direct computations: the carved
validation items, their scores, the choice, the held-out margins of the report, and that held-out
items are scored only after the search."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml
from test_search_support import family, write_space, write_suite

from evomerge.evaluate.engine import Scorer
from evomerge.evaluate.suite import Suite, load_suite
from evomerge.evaluate.suite_eval import SuiteEvaluator
from evomerge.evaluate.views import carve, split_view
from evomerge.loader import load_recipe
from evomerge.recipe import parse_recipe, recipe_hash
from evomerge.search import selection as S
from evomerge.search.report import best_by, open_study
from evomerge.search.study import get_attr
from evomerge.search.validation import split_records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection_world")
    fam = family(root / "fam", n_experts=2, noise=0.05)
    offsets = {"search": 0, "held-out": 100}
    suite = write_suite(root, [
        {"name": "ll", "kind": "loglik", "weight": 2.0,
         "rows": {s: [{"prompt": f"a{i + o}:", "target": f"{(i + o) * 7 % 13}"} for i in range(24)]
                  for s, o in offsets.items()}},
        {"name": "mc", "kind": "multiple_choice",
         "rows": {s: [{"prompt": f"m{i + o}", "choices": ["x", "yy", "z"], "label": i % 3} for i in range(16)]
                  for s, o in offsets.items()}}])
    return fam, suite


def test_items_that_repeat_a_question_are_carved_to_one_side():
    from evomerge.suites import Item

    items = tuple(Item(prompt=f"q{i % 7}", answers=(str(i),)) for i in range(40))  # 7 questions, asked 5-6 times
    for fraction in (0.1, 0.25, 0.3, 0.5):
        val = carve(items, fraction)
        assert val and len(val) < len(items)
        assert not {items[i].prompt for i in val} & {items[i].prompt for i in range(len(items)) if i not in val}
    assert carve(tuple(Item(prompt="same") for _ in range(5)), 0.5) == frozenset()


def test_validation_items_are_carved_by_content_and_apart_from_the_search_items(world):
    _, suite_path = world
    suite = load_suite(suite_path)
    for task in suite.tasks:
        items = task.splits["search"]
        ranks = sorted(range(len(items)),
                       key=lambda i: hashlib.sha256(f"{items[i].prompt}\0{items[i].target}".encode()).hexdigest())
        want = set(ranks[:round(0.25 * len(items))])
        assert set(carve(items, 0.25)) == want
        # the line order of the file does not matter: the same items are carved
        assert {items[i] for i in want} == {tuple(reversed(items))[i] for i in carve(tuple(reversed(items)), 0.25)}
        fit, val = split_view(suite, "search", 0.25), split_view(suite, "validation", 0.25)
        assert set(fit.ids[task.name]) | set(val.ids[task.name]) == set(range(len(items)))
        assert not set(fit.ids[task.name]) & set(val.ids[task.name])
        assert set(val.ids[task.name]) == want
    ev = SuiteEvaluator(suite, validation="auto")
    assert ev.validation == 0  # 40 search items: auto carves nothing below 400
    assert ev.split_size("validation") is None


class Logged:
    """The real suite evaluator, noting the split of every evaluation in order."""

    def __init__(self, suite: str, log: list):
        self.inner, self.log = SuiteEvaluator(suite, batch_size=8, validation=0.25), log

    def metric_names(self):
        return self.inner.metric_names()

    def split_size(self, split):
        return self.inner.split_size(split)

    def evaluate(self, recipe, *, split, fidelity=1.0, limit=None):
        self.log.append(split)
        return self.inner.evaluate(recipe, split=split, fidelity=fidelity, limit=limit)


def _direct(recipe_yaml: str, suite: Suite, fam) -> dict:
    """Every task's per-item values of a recipe scored directly on a hand-built suite."""
    from evomerge.evaluate.suite_eval import load_tokenizer, materialize_model

    recipe = parse_recipe(yaml.safe_load(recipe_yaml))
    res = Scorer(suite, "search", batch_size=8).score(materialize_model(recipe), load_tokenizer(fam["base"]))
    return {name: r.items for name, r in res.tasks.items()}


@pytest.mark.slow
def test_the_winner_is_chosen_on_validation_and_held_out_is_scored_after(tmp_path, world):
    from evomerge.search import start_search

    fam, suite_path = world
    space = {"name": "sel", "kind": "ps",
             "ps": {"base": fam["base"], "method": "task_arithmetic", "params": {"lambda": 1.0},
                    "sources": [{"name": "e1", "model": fam["expert1"]}, {"name": "e2", "model": fam["expert2"]}]},
             "objectives": [{"metric": "combined"}], "optimizer": {"name": "pycma", "popsize": 4, "seed": 1, "sigma0": 0.3},
             "evaluation": {"kind": "suite", "suite": suite_path, "batch_size": 8, "validation": 0.25},
             "multi_fidelity": {"enabled": False}, "budget": {"trials": 8}}
    log: list[str] = []
    start_search(write_space(tmp_path / "s.yaml", space), tmp_path / "study", progress=False,
                 evaluator_factory=lambda: Logged(suite_path, log))
    # held-out items are scored only after every search and validation score
    first_held = log.index("held-out")
    assert "validation" in log and all(s == "held-out" for s in log[first_held:])
    _, _, studies = open_study(tmp_path / "study")
    study = studies["ps"]
    objs = [S.Objective("combined", "metric", "combined", "maximize")]
    choice = get_attr(study, "selection")
    suite = load_suite(suite_path)
    fit, val = split_view(suite, "search", 0.25), split_view(suite, "validation", 0.25)
    trials = {t.number: t for t in study.get_trials() if t.state.name == "COMPLETE"}
    # the optimizer saw the search items only; the validation items are the rest of the search split
    for t in trials.values():
        for task, rec in t.user_attrs["items"]["tasks"].items():
            assert sorted(rec["ids"]) == sorted(fit.ids[task])
    recs = split_records(study, "validation")
    assert set(recs) == set(choice["pool"])
    # top-5 search trials by search score, then every baseline
    search = sorted((n for n, t in trials.items() if t.user_attrs["kind"] == "search"),
                    key=lambda n: (-t_u(trials[n]), n))[:5]
    baselines = [n for n, t in trials.items() if t.user_attrs["kind"] == "baseline"]
    assert sorted(choice["pool"]) == sorted(search + baselines)
    weights = {t.name: t.weight for t in suite.tasks}
    direct = {}
    for n in choice["pool"]:
        values = _direct(trials[n].user_attrs["recipe"], val.suite, fam)
        stored = recs[n]["items"]["tasks"]
        for task, vals in values.items():
            assert stored[task]["ids"] == list(val.ids[task])
            assert stored[task]["values"] == pytest.approx(vals, rel=1e-5, abs=1e-6)
        direct[n] = sum(weights[t] * np.mean(v) for t, v in values.items()) / sum(weights.values())
        assert recs[n]["scores"]["combined"] == pytest.approx(direct[n], rel=1e-5)
    best = max(direct.values())
    assert direct[choice["winner"]] == pytest.approx(best, rel=1e-6)
    assert best_by(study, objs).number == choice["winner"]
    exported = load_recipe(tmp_path / "study" / "best.yaml")
    assert recipe_hash(exported) == recipe_hash(parse_recipe(yaml.safe_load(trials[choice["winner"]].user_attrs["recipe"])))
    # the report's held-out margins are the paired differences of the stored held-out items
    summary = json.loads((tmp_path / "study" / "selection.json").read_text())
    held = split_records(study, "held-out")
    coefs = S.task_coefs(objs, weights)
    win = S.ItemResults.from_payload(held[choice["winner"]]["items"])
    assert summary["margins"], "no baseline margin reported"
    for m in summary["margins"]:
        other = S.ItemResults.from_payload(held[m["versus"]]["items"])
        want = S.paired(win, other, coefs)
        assert m["mean"] == pytest.approx(want.mean, abs=1e-12) and m["significant"] == want.significant
        d = {t: np.array([win.tasks[t][i] - other.tasks[t][i] for i in sorted(win.tasks[t])]) for t in coefs}
        assert m["mean"] == pytest.approx(sum(c * d[t].mean() for t, c in coefs.items()), abs=1e-9)
    assert "| trial | role |" in (tmp_path / "study" / "selection.md").read_text()


def t_u(t) -> float:
    return t.user_attrs["objectives"]["combined"]


@pytest.mark.slow
def test_first_rung_on_anchor_items_predicts_the_full_score(tmp_path, world):
    """With every item an anchor the prediction is the full score itself: a promoted candidate's
    predicted first rung equals its full-split score; before the reference table is full, the first
    rung is the usual subsample."""
    from evomerge.search import start_search

    fam, suite_path = world
    space = {"name": "anchors", "kind": "ps",
             "ps": {"base": fam["base"], "method": "task_arithmetic", "params": {"lambda": 1.0},
                    "sources": [{"name": "e1", "model": fam["expert1"]}, {"name": "e2", "model": fam["expert2"]}]},
             "objectives": [{"metric": "combined"}], "optimizer": {"name": "pycma", "popsize": 4, "seed": 3},
             "evaluation": {"kind": "suite", "suite": suite_path, "batch_size": 8, "validation": 0},
             "multi_fidelity": {"enabled": True, "rungs": [0.5, 1.0], "promote": 0.5,
                                "estimator": "anchors", "anchors": 1000, "reference": 5},
             "budget": {"trials": 12}}
    start_search(write_space(tmp_path / "s.yaml", space), tmp_path / "study", progress=False, report=False)
    _, _, studies = open_study(tmp_path / "study")
    trials = sorted(studies["ps"].get_trials(), key=lambda t: t.number)
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    estimated = [t for t in search if "estimated" in t.user_attrs["rungs"].get("0.5", {})]
    plain = [t for t in search if "0.5" in t.user_attrs["rungs"] and t not in estimated]
    assert estimated and plain  # the first trials ran before 5 trials were fully scored
    assert min(t.number for t in estimated) > max(t.number for t in plain)
    for t in estimated:
        first = t.user_attrs["rungs"]["0.5"]
        assert first["n"]["combined"] == 40  # every item scored as an anchor
        if t.state.name == "COMPLETE":
            assert first["scores"]["combined"] == pytest.approx(t.user_attrs["scores"]["combined"], abs=1e-9)
    for t in plain:
        assert t.user_attrs["rungs"]["0.5"]["n"]["combined"] == 12 + 12  # ceil(0.5 * 24) items of each task
