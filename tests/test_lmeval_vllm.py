"""The lm-eval evaluator on the ``vllm`` backend: local custom lm-eval tasks over the shipped demo zoo
scored by a real in-process vLLM engine (reloaded in place per candidate) and by lm-eval's own HF
wrapper, which must agree; and a real search with each backend. Nothing is downloaded.

Measured on the zoo (float16 weights, CPU): per-request log-likelihoods differ by at most ~0.06 nats
(lm-eval's HF wrapper takes the log-softmax in float16, vLLM in float32), greedy flags and greedy
generations are identical, and every task accuracy is exactly equal; so the accuracies are compared
exactly and the log-likelihoods within 0.15.

Engines run in this process, and shutting one down resets vLLM's process-wide parallel state, which
breaks any other engine still running here. So the engines of this module never overlap a shutdown:
the search test's engine is started and closed first, the fresh-engine comparison's engine is closed
before the shared engine (``on_arith``) starts, and that one lives until the module ends.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytest.importorskip("vllm")

import optuna  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from test_search_support import write_space  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evomerge.errors import ConfigError, EvalError  # noqa: E402
from evomerge.evaluate import lmeval_score  # noqa: E402
from evomerge.evaluate.backends.lmeval_lm import BackendLM  # noqa: E402
from evomerge.evaluate.backends.vllm import VllmBackend  # noqa: E402
from evomerge.evaluate.evaluators import make_evaluator  # noqa: E402
from evomerge.search import start_search  # noqa: E402
from evomerge.search.study import heldout_records, read_meta  # noqa: E402
from test_lmeval_search import _mc  # noqa: E402  (the same multiple-choice documents)

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "evals" / "zoo"
MC = ["zoo_rev_mc", "zoo_compose_mc"]  # the compose task is hard for every zoo model: accuracies near 0.6
LL_TOLERANCE = 0.15  # nats per request (measured: <= 0.06)


def _rows(name: str, n: int = 40) -> list[dict]:
    with open(ROOT / "evals" / "data" / f"{name}.search.jsonl") as fh:
        return [json.loads(line) for line in fh][:n]


def _write_task(folder: Path, name: str, docs: list[dict], body: str) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {folder / (name + '.jsonl')}}}}}\n"
        f"test_split: test\n{body}")


_MC_BODY = ("output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
            "doc_to_target: '{{label}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
_GEN_BODY = ("output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
             "target_delimiter: ''\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
             "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Multiple choice: pick the reversed word (distractors: near misses), pick the composed answer
    (distractors: its reversal and rotation); generation: the sum (40 documents; 24 for the search)."""
    folder = tmp_path_factory.mktemp("lmeval_vllm_tasks")
    rev = [_mc(r["prompt"], r["answer"], [r["prompt"][2:-1], r["answer"][1] + r["answer"][0] + r["answer"][2:],
                                          r["answer"][::-1] + "x"], i) for i, r in enumerate(_rows("zoo_reverse"))]
    compose = [_mc(r["prompt"], r["answer"], [r["answer"][::-1], r["answer"][1:] + r["answer"][0]], i)
               for i, r in enumerate(_rows("zoo_compose"))]
    _write_task(folder, "zoo_rev_mc", rev, _MC_BODY)
    _write_task(folder, "zoo_compose_mc", compose, _MC_BODY)
    _write_task(folder, "zoo_arith_gen", _rows("zoo_arith"), _GEN_BODY)
    _write_task(folder, "zoo_arith_gen24", _rows("zoo_arith", 24), _GEN_BODY)
    return folder


def _trials(study_dir: Path) -> tuple[list, dict]:
    meta = read_meta(study_dir)
    study = optuna.load_study(study_name=meta.study_name(meta.stages[-1]), storage=meta.storage)
    return [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"], heldout_records(study)


def test_a_search_on_an_lmeval_task_with_each_backend(tmp_path, task_dir):
    evaluation = {"kind": "lmeval", "tasks": ["zoo_arith_gen24"], "include_path": str(task_dir), "held_out": 0.25}
    runs = {}
    for backend in ("vllm", "hf"):
        config = {**evaluation, "backend": backend}
        space = {"name": f"lm_{backend}", "kind": "ps",
                 "ps": {"base": str(ZOO / "base"),
                        "sources": [{"name": "rev", "model": str(ZOO / "expert_reverse")},
                                    {"name": "arith", "model": str(ZOO / "expert_arith")}],
                        "method": "task_arithmetic", "params": {"lambda": 1.0}},
                 "objectives": [{"metric": "zoo_arith_gen24"}],
                 "optimizer": {"name": "pycma", "popsize": 4, "sigma0": 0.3, "seed": 1},
                 "evaluation": config, "multi_fidelity": {"enabled": False}, "baselines": False,
                 "budget": {"trials": 8}}
        out = tmp_path / backend
        res = start_search(write_space(tmp_path / f"{backend}.yaml", space), out, progress=False)
        assert res.complete and not res.failed_stages()
        runs[backend] = (make_evaluator(config), *_trials(out))

    # the same documents in both runs: the splits do not depend on the backend, and are disjoint
    (ev_v, trials_v, held_v), (ev_h, trials_h, held_h) = runs["vllm"], runs["hf"]
    assert ev_v.splits == ev_h.splits
    search, held = ev_v.splits["search"]["zoo_arith_gen24"], ev_v.splits["held-out"]["zoo_arith_gen24"]
    assert not set(search) & set(held) and sorted(search + held) == list(range(24)) and len(held) == 6
    for trials, heldout in ((trials_v, held_v), (trials_h, held_h)):
        assert len(trials) == 8 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert all(t.user_attrs["n"]["zoo_arith_gen24"] == len(search) for t in trials)
        assert heldout and all(r["n"]["zoo_arith_gen24"] == len(held) and math.isfinite(r["stderr"]["combined"])
                               for r in heldout.values())

    # vllm: one engine for the whole study in this worker, reloaded for every candidate
    stats = [t.user_attrs["backend"] for t in trials_v] + [r["backend"] for r in held_v.values()]
    assert all(s["engine_starts"] == 1 for s in stats)
    assert max(s["loads"] for s in stats) == len(trials_v) + len(held_v)
    assert not any("backend" in t.user_attrs for t in trials_h)  # hf: no counters

    # the same fitness: trial by trial the same candidates (pycma sees the same scores) scoring the same
    by_number = {t.number: t for t in trials_h}
    for t in trials_v:
        assert t.params == by_number[t.number].params
        assert t.user_attrs["scores"] == by_number[t.number].user_attrs["scores"]
    assert len({t.user_attrs["scores"]["combined"] for t in trials_v}) > 1  # a fitness that tells them apart
    assert {n: r["scores"] for n, r in held_v.items()} == {n: r["scores"] for n, r in held_h.items()}


@pytest.fixture(scope="module")
def zoo():
    """name -> (model, tokenizer) of the zoo's experts, as stored (float16)."""
    return {name: (AutoModelForCausalLM.from_pretrained(ZOO / name).eval(), AutoTokenizer.from_pretrained(ZOO / name))
            for name in ("expert_reverse", "expert_arith")}


@pytest.fixture(scope="module")
def fresh_reverse(zoo, task_dir):
    """The multiple-choice results of expert_reverse on an engine started for it (then closed)."""
    backend = VllmBackend({}, "cpu")
    try:
        model, tok = zoo["expert_reverse"]
        result = lmeval_score(model, tok, MC, include_path=task_dir, backend=backend)
        assert backend.stats()["engine_starts"] == 1
        return result
    finally:
        backend.close()  # before on_arith starts its engine (see the module docstring)


@pytest.fixture(scope="module")
def on_arith(zoo, task_dir, fresh_reverse):
    """A vLLM backend whose engine was started on expert_arith (scoring the generation task), and
    that first result; other zoo models are later reloaded into the same engine."""
    backend = VllmBackend({}, "cpu")
    model, tok = zoo["expert_arith"]
    first = lmeval_score(model, tok, ["zoo_arith_gen"], include_path=task_dir, backend=backend)
    yield backend, first
    backend.close()


def _same_results(a, b, tasks):
    for task in tasks:
        assert a.tasks[task].metrics == b.tasks[task].metrics, task
        assert a.tasks[task].n == b.tasks[task].n and a.tasks[task].primary == b.tasks[task].primary
        assert _same(a.tasks[task].stderr, b.tasks[task].stderr), task
    assert a.combined == b.combined and _same(a.combined_stderr, b.combined_stderr)


def _same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def test_multiple_choice_matches_hf_and_a_reloaded_engine_matches_a_fresh_one(zoo, task_dir, fresh_reverse,
                                                                               on_arith):
    model, tok = zoo["expert_reverse"]
    hf = lmeval_score(model, tok, MC, include_path=task_dir, batch_size=8)
    fresh = fresh_reverse
    backend, _ = on_arith
    reloaded = lmeval_score(model, tok, MC, include_path=task_dir, backend=backend)
    assert backend.stats()["engine_starts"] == 1 and backend.stats()["loads"] >= 2  # reloaded, not restarted
    _same_results(fresh, hf, MC)  # accuracies, n and stderr exactly equal
    _same_results(reloaded, fresh, MC)
    assert 0.3 < hf.tasks["zoo_compose_mc"].score < 0.9  # a task with wrong answers: the comparison means something

    # per request: log-likelihoods within the tolerance, greedy flags identical
    reqs = [Instance("loglikelihood", {}, (d["q"], c), 0) for d in _docs(task_dir, "zoo_compose_mc")
            for c in d["choices"]]
    reqs += [Instance("loglikelihood", {}, (d["q"], c), 0) for d in _docs(task_dir, "zoo_rev_mc")[:10]
             for c in d["choices"]]  # expert_reverse's skill: greedy continuations among them
    reqs += [Instance("loglikelihood", {}, ("", d["q"]), 0) for d in _docs(task_dir, "zoo_rev_mc")[:5]]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=16).loglikelihood(reqs, disable_tqdm=True)
    got = BackendLM(backend.lm(model, tok), tok).loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(g[0] - w[0]) for g, w in zip(got, want)) < LL_TOLERANCE
    assert [g[1] for g in got] == [w[1] for w in want]
    assert any(w[1] for w in want) and not all(w[1] for w in want)
    texts = [Instance("loglikelihood_rolling", {}, (d["q"] + d["choices"][d["label"]],), 0)
             for d in _docs(task_dir, "zoo_rev_mc")[:8]]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=16).loglikelihood_rolling(texts, disable_tqdm=True)
    got = BackendLM(backend.lm(model, tok), tok).loglikelihood_rolling(texts, disable_tqdm=True)
    assert max(abs(g - w) for g, w in zip(got, want)) < LL_TOLERANCE


def _docs(task_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]


def test_generation_matches_hf(zoo, task_dir, on_arith):
    backend, got = on_arith
    model, tok = zoo["expert_arith"]
    want = lmeval_score(model, tok, ["zoo_arith_gen"], include_path=task_dir, batch_size=8)
    _same_results(got, want, ["zoo_arith_gen"])
    assert 0 < want.tasks["zoo_arith_gen"].score < 1

    # the strings themselves, with a stop string that cuts generations mid-answer and a tight limit
    rows = _rows("zoo_arith", 16)
    reqs = [Instance("generate_until", {}, (r["prompt"], {"until": ["0"] if i % 2 else ["\n"],
                                                           "max_gen_toks": 2 + i % 3}), 0)
            for i, r in enumerate(rows)]
    hf_text = HFLM(pretrained=model, tokenizer=tok, batch_size=8).generate_until(reqs, disable_tqdm=True)
    vllm_text = BackendLM(backend.lm(model, tok), tok).generate_until(reqs, disable_tqdm=True)
    assert vllm_text == hf_text and any(hf_text)


def test_chat_template_and_few_shot_match_hf(zoo, task_dir, on_arith):
    backend, _ = on_arith
    model, _ = zoo["expert_reverse"]
    tok = AutoTokenizer.from_pretrained(ZOO / "expert_reverse")
    tok.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
    args = {"include_path": task_dir, "samples": {"zoo_compose_mc": list(range(12))}, "num_fewshot": 2,
            "apply_chat_template": True}
    want = lmeval_score(model, tok, ["zoo_compose_mc"], batch_size=8, **args)
    got = lmeval_score(model, tok, ["zoo_compose_mc"], backend=backend, **args)
    _same_results(got, want, ["zoo_compose_mc"])
    lm = BackendLM(backend.lm(model, tok), tok)
    assert lm.apply_chat_template([{"role": "user", "content": "x"}]) == "u:x;"


def test_sampling_is_refused_with_a_clear_error(zoo, task_dir, on_arith):
    backend, _ = on_arith
    model, tok = zoo["expert_arith"]
    with pytest.raises(EvalError, match="greedily.*do_sample"):
        lmeval_score(model, tok, ["zoo_arith_gen"], include_path=task_dir, backend=backend,
                     samples={"zoo_arith_gen": [0, 1]}, gen_kwargs={"do_sample": True, "temperature": 0.7})


def test_bad_vllm_options_are_reported_together(task_dir):
    config = {"kind": "lmeval", "tasks": ["zoo_rev_mc"], "include_path": str(task_dir), "backend": "vllm",
              "vllm": {"max_model_len": 1, "flash": True}, "model_args": {"max_length": 32},
              "gen_kwargs": {"repetition_penalty": 1.2}}
    with pytest.raises(ConfigError) as err:
        make_evaluator(config)
    text = str(err.value)
    for needle in ("evaluation.vllm.max_model_len", "evaluation.vllm.flash", "evaluation.model_args",
                   "evaluation.gen_kwargs", "repetition_penalty"):
        assert needle in text, (needle, text)
    with pytest.raises(ConfigError, match="unknown backend"):
        make_evaluator({**config, "backend": "tgi", "vllm": None, "model_args": None, "gen_kwargs": None})
    with pytest.raises(ConfigError, match="backend is not vllm"):
        make_evaluator({"kind": "lmeval", "tasks": ["zoo_rev_mc"], "include_path": str(task_dir),
                        "vllm": {"max_model_len": 32}})
