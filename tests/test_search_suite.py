"""The task-suite evaluator on a tiny model and a tiny suite: materialized candidates are scored by
the real scoring engine, consistently with scoring the checkpoint loaded from disk."""

from __future__ import annotations


import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.engine import Scorer
from evomerge.evaluate.suite import load_suite
from evomerge.recipe import DataFlowRecipe, PathStep, parse_recipe
from evomerge.search import start_search
from evomerge.evaluate.evaluators import make_evaluator
from test_search_support import family, write_space, write_suite


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite_world")
    fam = family(root / "fam", n_experts=2, noise=0.05)
    offsets = {"search": 0, "held-out": 50}
    suite = write_suite(root, [
        {"name": "ll", "kind": "loglik",
         "rows": {s: [{"prompt": f"a{i + o}:", "target": f"{i + o}"} for i in range(8)] for s, o in offsets.items()}},
        {"name": "gen", "kind": "generate", "max_new_tokens": 3,
         "rows": {s: [{"prompt": f"q{i + o}=", "answer": f"{i}"} for i in range(4)] for s, o in offsets.items()}}])
    return fam, suite


def test_suite_evaluator_matches_scoring_the_checkpoint(world):
    fam, suite = world
    ev = make_evaluator({"kind": "suite", "suite": suite, "batch_size": 8})
    assert ev.metric_names() == ["ll", "gen", "combined"] and ev.split_size("search") == 12
    alone = DataFlowRecipe(kind="dataflow", path=[PathStep(model=fam["expert1"], layer=i) for i in range(4)],
                           embed=fam["expert1"], head=fam["expert1"])
    got = ev.evaluate(alone, split="held-out")
    model = AutoModelForCausalLM.from_pretrained(fam["expert1"])
    want = Scorer(load_suite(suite), "held-out", batch_size=8).score(model, AutoTokenizer.from_pretrained(fam["expert1"]))
    assert got.scores["ll"] == pytest.approx(want.tasks["ll"].score, rel=1e-5)
    assert got.scores["combined"] == pytest.approx(want.combined, rel=1e-5)
    assert got.n == {"ll": 8, "gen": 4, "combined": 12}
    half = ev.evaluate(alone, split="held-out", fidelity=0.5)
    assert half.n["ll"] == 4
    merged = parse_recipe({"method": "ties", "base": fam["base"],
                           "sources": [{"model": fam["expert1"]}, {"model": fam["expert2"]}]})
    assert ev.evaluate(merged, split="search").scores["ll"] < 0


def test_a_search_with_the_suite_evaluator(tmp_path, world):
    fam, suite = world
    space = {"kind": "ps", "ps": {"base": fam["base"], "sources": [fam["expert1"], fam["expert2"]],
                                  "method": "ties", "params": {"lambda": 1.0}},
             "objectives": [{"metric": "ll"}, {"cost": "params"}], "optimizer": {"name": "random"},
             "evaluation": {"kind": "suite", "suite": suite, "batch_size": 8},
             "multi_fidelity": {"enabled": True, "rungs": [0.5, 1.0]}, "budget": {"trials": 3}}
    res = start_search(write_space(tmp_path / "s.yaml", space), tmp_path / "study", progress=False)
    assert res.complete and (tmp_path / "study" / "pareto.png").is_file()


def test_a_repeated_candidate_is_not_scored_twice(tmp_path, world, monkeypatch):
    fam, suite = world
    cfg = {"kind": "suite", "suite": suite, "batch_size": 8, "cache_dir": str(tmp_path / "cache")}
    ev = make_evaluator(cfg)
    recipe = parse_recipe({"method": "linear", "sources": [{"model": fam["expert1"]}, {"model": fam["expert2"]}]})
    first = ev.evaluate(recipe, split="search")
    built = []
    monkeypatch.setattr(type(ev), "model", lambda self, r: built.append(r))  # any materialization is recorded
    again = ev.evaluate(recipe, split="search")
    assert again.scores == first.scores and again.n == first.n and built == []
    # another process (a fresh evaluator) finds the score on disk; another split or fidelity is scored anew
    fresh = make_evaluator(cfg)
    monkeypatch.setattr(type(fresh), "model", lambda self, r: built.append(r))
    assert fresh.evaluate(recipe, split="search").scores == first.scores and built == []
    with pytest.raises(AttributeError):  # the recorder returns None: proves a miss materializes
        fresh.evaluate(recipe, split="search", fidelity=0.5)
    assert built == [recipe]


def test_host_and_device_residency_score_as_the_reference(world):
    """Sources held in host memory (read once, copied per tensor) or on the device (fused kernels)
    give the scores of materializing from the checkpoints; the held copy reads the files' bytes."""
    from evomerge.checkpoint import Checkpoint
    from evomerge.evaluate.resident import ResidentSuiteEvaluator

    fam, suite = world
    recipe = parse_recipe({"method": "ties", "base": fam["base"],
                           "sources": [{"model": fam["expert1"], "params": {"weight": 0.7, "density": 0.5}},
                                       {"model": fam["expert2"], "params": {"weight": 0.4, "density": 0.8}}]})
    want = make_evaluator({"kind": "suite", "suite": suite, "batch_size": 8}).evaluate(recipe, split="search")
    for residency in ("host", "device"):
        ev = ResidentSuiteEvaluator(suite, batch_size=8, residency=residency)
        got = ev.evaluate(recipe, split="search")
        assert got.scores == pytest.approx(want.scores, rel=1e-5), residency
        assert ev.resident.nbytes() > 0
    ck = Checkpoint.open(fam["expert1"])
    held = ck.held()
    assert held.held_nbytes() == sum(ck.read(n).numel() * ck.read(n).element_size() for n in ck.names)
    for name in ck.names:
        assert held.read(name).equal(ck.read(name))
