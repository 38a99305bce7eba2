"""Stopping a candidate at a rung once its promotion bar is out of reach never loses a trial that
would have been promoted: property tests over random item-score sequences through the real slice
scorer (evomerge.evaluate.views.score_bounded), and the bound end to end in a search."""

from __future__ import annotations

import json
import math
import random

import pytest
import yaml

from evomerge.evaluate.engine import combine, score_tasks
from evomerge.evaluate.suite import Extract, Item, Suite, Task
from evomerge.evaluate.views import Bar, reachable, score_bounded
from evomerge.search.bounds import async_bar, promoted, sync_bar, sync_keep


class TableLM:
    """Scripted answers: a generate request's answer is the gold one when the table says the item
    is right; a loglik request returns the table's value (one token). The random item scores of a
    property test go through the engine's real scoring and the slice scorer this way."""

    def __init__(self, right: dict[str, bool], logprob: dict[str, float]):
        self.right, self.logprob, self.calls = right, logprob, 0

    def generate_requests(self, reqs):
        self.calls += 1
        return [("ok" if self.right[p] else "no") for p, _, _ in reqs]

    def loglik(self, reqs):
        self.calls += 1
        return [(self.logprob[p + c], 1) for p, c in reqs]


def _suite(n_gen: int, n_ll: int, w_ll: float) -> Suite:
    gen = tuple(Item(prompt=f"g{i}", answers=("ok",)) for i in range(n_gen))
    ll = tuple(Item(prompt=f"l{i}", target="t") for i in range(n_ll))
    tasks = (Task("gen", "generate", {"search": gen, "held-out": gen}, 1.0, 4, (), Extract()),
             Task("ll", "loglik", {"search": ll, "held-out": ll}, w_ll))
    return Suite("table", None, tasks, "0")


def _candidate(rng: random.Random, suite: Suite) -> TableLM:
    p = rng.random()
    right = {it.prompt: rng.random() < p for it in suite.tasks[0].splits["search"]}
    lp = {it.prompt + "t": -rng.expovariate(1.0) * (1 + p) for t in suite.tasks[1:] for it in t.splits["search"]}
    return TableLM(right, lp)


def _work(suite):
    return [(t, list(t.splits["search"])) for t in suite.tasks]


def _full(lm, suite, coef, offset) -> float:
    res = score_tasks(lm, _work(suite))
    wsum = sum(t.weight for t in suite.tasks)
    metrics = {name: r.score for name, r in res.items()} | {"combined": combine(res)[0]}
    assert metrics["combined"] == pytest.approx(sum(t.weight * res[t.name].score for t in suite.tasks) / wsum)
    return sum(c * metrics[m] for m, c in coef.items()) + offset


FORMS = [({"combined": 1.0}, 0.0, 0.0), ({"gen": 1.0}, -0.3, 0.0), ({"gen": -1.0}, 0.0, 0.0),
         ({"combined": 1.0}, 0.0, 1.0), ({"gen": 2.0, "ll": 0.5}, 0.1, 0.5)]


@pytest.mark.parametrize("form", range(len(FORMS)))
def test_synchronous_halving_keeps_the_same_candidates_with_early_stops(form):
    coef, offset, w_ll = FORMS[form]
    stops = 0
    for seed in range(60):
        rng = random.Random(seed * 7 + form)
        suite = _suite(rng.randint(8, 40), rng.randint(1, 20) if w_ll else 0, w_ll)
        if not w_ll:
            suite = Suite("table", None, suite.tasks[:1], "0")
        pop = [_candidate(rng, suite) for _ in range(rng.randint(2, 10))]
        k = max(1, math.ceil(rng.choice([0.25, 0.5, 0.75]) * len(pop)))
        true = [_full(lm, suite, coef, offset) for lm in pop]
        stored = []
        for idx, lm in enumerate(pop):
            bar = sync_bar([u for u, _ in stored], k)
            if bar is None:
                stored.append((true[idx], idx))
                continue
            res, stopped = score_bounded(lm, _work(suite), Bar(coef, bar, offset), suite,
                                         chunks=rng.randint(1, 6))
            if stopped is None:
                metrics = {n: r.score for n, r in res.items()} | {"combined": combine(res)[0]}
                value = sum(c * metrics[m] for m, c in coef.items()) + offset
                assert value == pytest.approx(true[idx], abs=1e-12)  # slices score what the whole does
                stored.append((value, idx))
                continue
            stops += 1
            # the bound holds the true value, and is below the bar it was stopped at
            assert stopped["low"] - 1e-12 <= true[idx] <= stopped["high"] + 1e-12
            assert stopped["high"] < bar
            stored.append((stopped["low"], idx))
        keep_true = sync_keep([(u, i) for i, u in enumerate(true)], k)
        assert sync_keep(stored, k) == keep_true
    assert stops > 0  # the property was exercised


def test_asynchronous_halving_never_loses_a_promotion():
    coef, offset = {"combined": 1.0}, 0.0
    stops = 0
    for seed in range(80):
        rng = random.Random(1000 + seed)
        suite = _suite(rng.randint(8, 40), 0, 0.0)
        suite = Suite("table", None, suite.tasks[:1], "0")
        promote = rng.choice([0.25, 1 / 3, 0.5])
        hist_true: list[float] = []
        hist_stop: list[float] = []
        for _ in range(rng.randint(3, 25)):
            lm = _candidate(rng, suite)
            u = _full(lm, suite, coef, offset)
            bar_true, bar_stop = async_bar(hist_true, promote), async_bar(hist_stop, promote)
            assert bar_stop is None or bar_true is None or bar_stop <= bar_true + 1e-12
            if bar_stop is None:
                got, stopped = u, None
            else:
                res, stopped = score_bounded(lm, _work(suite), Bar(coef, bar_stop, offset), suite,
                                             chunks=rng.randint(1, 6))
                got = stopped["low"] if stopped else combine(res)[0]
            if promoted(u, bar_true):  # promoted with every score known: promoted with stops too
                assert stopped is None and promoted(got, bar_stop)
            stops += stopped is not None
            hist_true.append(u)
            hist_stop.append(got)
    assert stops > 0


def test_reachable_is_the_best_completion():
    kinds = {"a": "generate", "b": "loglik"}
    assert reachable({"a": 1.0}, kinds, {"a": [1, 0, 0]}, {"a": 5}) == pytest.approx(3 / 5)
    assert reachable({"a": -1.0}, kinds, {"a": [1, 0, 0]}, {"a": 5}) == pytest.approx(-1 / 5)
    assert reachable({"b": 1.0}, kinds, {"b": [-1.0, -3.0]}, {"b": 4}) == pytest.approx(-1.0)
    assert reachable({"b": -1.0}, kinds, {"b": [-1.0]}, {"b": 4}) == math.inf


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny family and a generate task whose answers are what the base model says: merges close to
    the base get many right, far ones none, so some candidates cannot reach their bar."""
    from test_search_support import family
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate.backends.hf import HFLM
    from evomerge.evaluate.suite_eval import load_tokenizer

    root = tmp_path_factory.mktemp("bounds")
    fam = family(root / "fam", n_experts=2, noise=0.1)
    model = AutoModelForCausalLM.from_pretrained(fam["base"])
    prompts = [f"q{i}=" for i in range(80)]
    answers = HFLM(model, load_tokenizer(fam["base"]), 16, None).generate(prompts, 1, ())
    (root / "data").mkdir()
    for split, part in (("search", slice(0, 64)), ("held-out", slice(64, 80))):
        (root / "data" / f"g.{split}.jsonl").write_text(
            "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts[part], answers[part])))
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "echo", "tasks": [
        {"name": "g", "kind": "generate", "max_new_tokens": 1, "until": [],
         "data": {"search": "data/g.search.jsonl", "held-out": "data/g.held-out.jsonl"}}]}))
    return fam, str(suite), root


@pytest.mark.slow
def test_a_search_stops_candidates_at_their_bound_and_the_bound_holds(world, tmp_path):
    from test_search_support import write_space

    from evomerge.evaluate.evaluators import make_evaluator
    from evomerge.recipe import parse_recipe
    from evomerge.search import start_search
    from evomerge.search.report import open_study

    fam, suite, _ = world
    space = {"name": "b", "kind": "ps",
             "ps": {"base": fam["base"], "method": "task_arithmetic", "params": {"weight": {"low": 0.0, "high": 3.0}, "lambda": 1.0},
                    "sources": [{"name": "e1", "model": fam["expert1"]}, {"name": "e2", "model": fam["expert2"]}]},
             "objectives": [{"metric": "combined"}], "optimizer": {"name": "pycma", "popsize": 8, "seed": 2, "sigma0": 0.6},
             "evaluation": {"kind": "suite", "suite": suite, "batch_size": 16, "validation": 0},
             "multi_fidelity": {"enabled": True, "rungs": [0.5, 1.0], "promote": 0.25},
             "budget": {"trials": 16}, "baselines": False}
    start_search(write_space(tmp_path / "s.yaml", space), tmp_path / "study", progress=False, report=False)
    _, _, studies = open_study(tmp_path / "study")
    ev = make_evaluator({"kind": "suite", "suite": suite, "batch_size": 16, "validation": 0})
    stopped = [t for t in studies["ps"].get_trials() if (t.user_attrs.get("rungs", {}).get("0.5") or {}).get("stopped")]
    assert stopped, "no candidate was stopped at its bound"
    for t in stopped:
        rec = t.user_attrs["rungs"]["0.5"]
        assert t.state.name == "PRUNED" and rec["n"]["g"] < 32
        full = ev.evaluate(parse_recipe(yaml.safe_load(t.user_attrs["recipe"])), split="search", fidelity=0.5)
        assert full.n["g"] == 32
        assert rec["stopped"]["low"] <= full.scores["combined"] <= rec["stopped"]["high"] < rec["stopped"]["bar"]
