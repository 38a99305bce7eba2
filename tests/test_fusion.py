"""Runtime fusion: logit ensemble and panel + judge checked against direct float64 computations, the
cost figures against hand-computed values, fusion recipes' errors, and lm-eval's path. MoA and the
OpenAI-compatible server are in test_fusion_moa.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest
import torch

from evomerge.cli import main
from evomerge.errors import ConfigError, EvalError
from evomerge.evaluate import Scorer, load_model, load_suite
from evomerge.evaluate.backends.hf import HFLM, generation_text
from evomerge.fusion import (
    FusionBackend,
    FusionRecipe,
    load_sources,
    merge_cost,
    parse_fusion,
    score_suite,
)
from evomerge.fusion.cost import read_params
from evomerge.fusion.logit import LogitEnsembleLM
from evomerge.fusion.panel import Member, PanelLM
from evomerge.fusion.sources import check_shared_vocab, clear_loaded
from evomerge.zoo import ZooConfig, build_tokenizer, make_model

PROMPTS = ["a:12+3=", "r:abcdef=", "e:q=", "c:123+456=", "x", "r:zz="]
LL_REQS = [("a:12+3=", "15"), ("r:abc=", "cbaxx"), ("", "hello"), ("e:k=", "q")]


def tiny_model(seed: int, scale: float = 4.0):
    """A 2-layer zoo-shaped Llama with weights scaled away from uniform outputs (float32)."""
    tok = build_tokenizer()
    model = make_model(ZooConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=seed), len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.config.max_position_embeddings = 256
    return model.eval(), tok


def save(model, tok, path: Path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three tiny models on disk (seeds 3, 4, 5) and a copy of the first."""
    root = tmp_path_factory.mktemp("fusion_zoo")
    refs = {}
    for name, seed in (("a", 3), ("b", 4), ("c", 5)):
        refs[name] = save(*tiny_model(seed), root / name)
    refs["a2"] = save(*tiny_model(3), root / "a2")
    yield refs
    clear_loaded()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Every task kind: generation with a stop string, multiple choice, log-likelihood."""
    d = tmp_path_factory.mktemp("fusion_suite")
    words = ["abc", "hello", "qrs", "xy", "mnop", "kk", "zyx", "ab"]
    rows = {"g": [{"prompt": f"r:{w}=", "answer": w[::-1]} for w in words],
            "mc": [{"prompt": f"r:{w}=", "choices": [w[::-1], w, w + "z"], "label": 0} for w in words],
            "ll": [{"prompt": f"r:{w}=", "target": w[::-1]} for w in words]}
    for name, recs in rows.items():
        for split, part in (("search", recs[::2]), ("held-out", recs[1::2])):
            (d / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    tasks = ("  - {name: g, kind: generate, max_new_tokens: 6, until: ['z'], data: {search: g.search.jsonl, "
             "held-out: g.held-out.jsonl}}\n"
             "  - {name: mc, kind: multiple_choice, data: {search: mc.search.jsonl, held-out: mc.held-out.jsonl}}\n"
             "  - {name: ll, kind: loglik, data: {search: ll.search.jsonl, held-out: ll.held-out.jsonl}}\n")
    (d / "suite.yaml").write_text("name: mixed\ntasks:\n" + tasks)
    return load_suite(d / "suite.yaml")


def _ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


def _logprobs64(models, weights, ids: list[int]) -> torch.Tensor:
    """Reference: the log-linear pool's next-token log-probabilities after ``ids``, one unbatched,
    uncached forward per model, in float64."""
    mixed = sum(w * torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
                for m, w in zip(models, weights))
    return mixed - torch.logsumexp(mixed, -1)


# ------------------------------------------------------------------------------- logit ensemble


def test_logit_ensemble_of_one_model_is_that_model(zoo, suite):
    model, tok = load_model(zoo["a"])
    one = LogitEnsembleLM([model], tok, batch_size=3)
    single = HFLM(model, tok, 3, None)
    assert one.generate(PROMPTS, 6, ()) == single.generate(PROMPTS, 6, ())
    assert one.generate(PROMPTS, 6, ("z", "b")) == single.generate(PROMPTS, 6, ("z", "b"))
    for (s1, n1), (s2, n2) in zip(one.loglik(LL_REQS), single.loglik(LL_REQS)):
        assert n1 == n2 and s1 == pytest.approx(s2, abs=1e-5)
    fused = Scorer(suite, "held-out", batch_size=3, backend=FusionBackend()).score(
        load_sources(FusionRecipe(method="logit", models=[zoo["a"]])), tok, model_key="one")
    plain = Scorer(suite, "held-out", batch_size=3).score(model, tok)
    for name, t in plain.tasks.items():
        assert fused.tasks[name].score == pytest.approx(t.score, abs=1e-6), name
        assert fused.tasks[name].n == t.n and fused.tasks[name].stderr == pytest.approx(t.stderr, abs=1e-6)


def test_logit_ensemble_of_identical_models_is_one_of_them(zoo):
    model, tok = load_model(zoo["a"])
    twin, _ = load_model(zoo["a2"])
    pair = LogitEnsembleLM([model, twin], tok, [0.3, 0.7], batch_size=4)
    single = HFLM(model, tok, 4, None)
    assert pair.generate(PROMPTS, 6, ("z",)) == single.generate(PROMPTS, 6, ("z",))
    for (s1, _), (s2, _) in zip(pair.loglik(LL_REQS), single.loglik(LL_REQS)):
        assert s1 == pytest.approx(s2, abs=1e-5)


def test_logit_ensemble_matches_direct_mean_of_logprobs(zoo):
    a, tok = load_model(zoo["a"])
    b, _ = load_model(zoo["b"])
    w = [0.7, 0.3]
    lm = LogitEnsembleLM([a, b], tok, [7, 3], batch_size=2)  # weights are normalised
    got = lm.loglik(LL_REQS)
    for (ctx, cont), (s, n) in zip(LL_REQS, got):
        ids, total = _ids(tok, ctx), 0.0
        for c in tok.encode(cont, add_special_tokens=False):
            with torch.no_grad():
                total += _logprobs64([a, b], w, ids)[c].item()
            ids.append(c)
        assert n == len(cont) and s == pytest.approx(total, abs=1e-4)
    gens = lm.generate(PROMPTS, 6, ())
    toks = lm.generate_tokens([(_ids(tok, p), 6, []) for p in PROMPTS])
    differs = False
    for p, g, t in zip(PROMPTS, gens, toks):
        ids, out = _ids(tok, p), []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(_logprobs64([a, b], w, ids).argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        assert t == out and g == tok.decode([x for x in out if x != tok.eos_token_id], skip_special_tokens=True)
        with torch.no_grad():
            differs |= out[0] != int(a(input_ids=torch.tensor([_ids(tok, p)])).logits[0, -1].argmax())
    assert differs, "the pooled argmax never differed from model a's: the check could not fail"
    # token-level log-likelihood and its greedy flag, as lm-eval asks for them
    reqs = [(_ids(tok, "a:1+2="), tok.encode("3", add_special_tokens=False)), (_ids(tok, PROMPTS[1]), toks[1][:2])]
    (s0, _), (s1, greedy1) = lm.loglik_tokens(reqs)
    with torch.no_grad():
        assert s0 == pytest.approx(_logprobs64([a, b], w, reqs[0][0])[reqs[0][1][0]].item(), abs=1e-4)
    assert greedy1 and s1 < 0


def test_logit_ensemble_refuses_other_tokenizers_and_vllm(zoo, tmp_path):
    a, tok = load_model(zoo["a"])
    other = build_tokenizer()
    other.add_tokens(["@"])
    with pytest.raises(EvalError, match=r"needs one tokenizer.*vocabularies differ.*'@'.*panel"):
        check_shared_vocab({"a": (a, tok), "b": (a, other)}, "logit ensemble")
    sources = load_sources(FusionRecipe(method="logit", models=[zoo["a"], zoo["b"]]))

    class Vllm:
        name = "vllm"

    with pytest.raises(EvalError, match="backend hf"):
        FusionBackend(Vllm()).lm(sources, tok)
    # a recipe-level tokenizer encodes the prompts: it must share the models' vocabulary too
    import shutil

    odd = tmp_path / "odd_tokenizer"
    shutil.copytree(zoo["a"], odd)
    other.save_pretrained(odd)
    with pytest.raises(EvalError, match=r"recipe's tokenizer.*'@'"):
        load_sources(FusionRecipe(method="logit", models=[zoo["a"], zoo["b"]], tokenizer=str(odd)))


# ------------------------------------------------------------------------------- panel + judge


def test_panel_returns_the_answer_the_panel_finds_most_likely(zoo):
    models = [load_model(zoo[k])[0] for k in ("a", "b", "c")]
    tok = load_model(zoo["a"])[1]
    singles = [HFLM(m, tok, 8, None) for m in models]
    lms = [HFLM(m, tok, 8, None) for m in models]
    members = [Member(k, (lambda lm=lm: lm)) for k, lm in zip("abc", lms)]
    panel = PanelLM(members, tok)
    judged = PanelLM(members[:2], tok, judges=[members[2]])
    got, got_judged = panel.generate(PROMPTS, 6, ("z",)), judged.generate(PROMPTS, 6, ("z",))
    answers = [s.generate(PROMPTS, 6, ("z",)) for s in singles]
    disagree = 0
    for q, p in enumerate(PROMPTS):
        cands = [a[q] for a in answers]
        disagree += len(set(cands)) > 1

        def score(text, judges, p=p):
            return -math.inf if not text else sum(j.loglik([(p, text)])[0][0] for j in judges) / len(judges)

        best = max(range(3), key=lambda i: (score(cands[i], singles), -i))
        assert got[q] == cands[best], p
        best_j = max(range(2), key=lambda i: (score(cands[i], singles[2:]), -i))
        assert got_judged[q] == cands[best_j], p
    assert disagree >= 3, "the members agree too often for the test to mean anything"
    # log-likelihood requests: the members' mean
    want = [sum(s.loglik([r])[0][0] for s in singles) / 3 for r in LL_REQS]
    assert [x for x, _ in panel.loglik(LL_REQS)] == pytest.approx(want, abs=1e-5)


def test_panel_of_one_model_is_that_model(zoo, suite):
    model, tok = load_model(zoo["b"])
    fused = Scorer(suite, "search", batch_size=3, backend=FusionBackend()).score(
        load_sources(FusionRecipe(method="panel", models=[zoo["b"]])), tok, model_key="panel-one")
    plain = Scorer(suite, "search", batch_size=3).score(model, tok)
    for name, t in plain.tasks.items():
        assert fused.tasks[name].score == pytest.approx(t.score, abs=1e-6), name
    lm = HFLM(model, tok, 3, None)
    ids = lm.generate_tokens([(_ids(tok, p), 6, ["z"]) for p in PROMPTS])
    assert [generation_text(tok, i, tok.eos_token_id, ("z",)) for i in ids] == HFLM(model, tok, 3, None).generate(
        PROMPTS, 6, ("z",))


# ------------------------------------------------------------------------------- cost


def test_cost_figures_match_hand_computed_values(zoo, suite):
    three = [zoo["a"], zoo["b"], zoo["c"]]
    tok = load_model(zoo["a"])[1]
    backend = FusionBackend()
    _, cost = score_suite(load_sources(FusionRecipe(method="logit", models=three)), backend, suite, "search")
    assert cost == {"passes": 3.0, "read": 3.0, "calls": 3.0, "models": 3.0}
    _, cost = score_suite(load_sources(FusionRecipe(method="logit", models=three, weights=[1, 0, 1])), backend,
                          suite, "search")
    assert cost["passes"] == 2.0 and cost["read"] == 2.0  # a zero-weight source is not run
    # panel on generation only: sum_q (sum_i T_qi + n d_q) / sum_q mean_i T_qi, T counted by hand
    gen_only = dataclasses.replace(suite, tasks=tuple(t for t in suite.tasks if t.kind == "generate"))
    sources = load_sources(FusionRecipe(method="panel", models=three))
    _, cost = score_suite(sources, backend, gen_only, "search")
    items = gen_only.tasks[0].splits["search"]
    passes = base = calls = 0.0
    for it in items:
        outs = [HFLM(sources.models[r], tok, 8, None).generate_tokens([(_ids(tok, it.prompt), 6, ["z"])])[0]
                for r in three]
        texts = {generation_text(tok, o, tok.eos_token_id, ("z",)) for o in outs} - {""}
        passes += sum(map(len, outs)) + 3 * len(texts)
        base += sum(map(len, outs)) / 3
        calls += 3 + 3 * len(texts)
    assert cost["passes"] == pytest.approx(passes / base) and cost["read"] == pytest.approx(passes / base)
    assert cost["calls"] == pytest.approx(calls / len(items)) and cost["models"] == 3
    assert 3 < cost["passes"] < 3 + 9  # n + J d / T: between the generations alone and one pass per token
    # panel on log-likelihood tasks: n passes per request
    ll_only = dataclasses.replace(suite, tasks=tuple(t for t in suite.tasks if t.kind != "generate"))
    _, cost = score_suite(sources, backend, ll_only, "search")
    assert cost["passes"] == 3.0 and cost["calls"] == 3.0


def test_merge_cost_and_parameter_counts(zoo, tmp_path):
    from evomerge.recipe import parse_recipe

    model, _ = load_model(zoo["a"])
    emb = model.get_input_embeddings().weight.numel()
    assert read_params(model) == sum(p.numel() for p in model.parameters()) - emb
    ties = parse_recipe({"method": "linear", "sources": [{"model": zoo["a"], "params": {"weight": 1.0}},
                                                         {"model": zoo["b"], "params": {"weight": 1.0}}]})
    assert merge_cost(ties) == {"passes": 1.0, "read": 1.0, "calls": 1.0, "models": 1.0}
    # a data-flow path of 3 layers of a 2-layer model: reads (head + norms + 3 layers) / (head + norms + 2 layers)
    flow = parse_recipe({"kind": "dataflow", "embed": zoo["a"], "path": [{"model": zoo["a"], "layer": i}
                                                                        for i in (0, 1, 1)]})
    layer = sum(p.numel() for p in model.model.layers[1].parameters())
    other = read_params(model) - 2 * layer
    assert merge_cost(flow)["read"] == pytest.approx((other + 3 * layer) / (other + 2 * layer))


# ------------------------------------------------------------------------------- recipes and CLI


def test_fusion_recipe_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        parse_fusion({"kind": "fusion", "method": "logit", "models": ["a", "b"], "weights": [1, -1, 2],
                      "judge": "c", "colour": 1}, source="f.yaml")
    msg = str(err.value)
    assert "f.yaml: colour" in msg and "f.yaml: weights" in msg
    assert "f.yaml: judge: only method panel takes `judge`" in msg
    with pytest.raises(ConfigError, match="unknown fusion method 'mean'"):
        parse_fusion({"method": "mean", "models": ["a"]})
    with pytest.raises(ConfigError) as err:
        parse_fusion({"method": "moa", "moa": {"agents": {"x": {"model": "m", "endpoint": "ftp://h"}},
                                               "layers": [["x", "y"]], "aggregator": "z", "max_tokens": 0}})
    msg = str(err.value)
    assert all(s in msg for s in ("moa.agents.x.endpoint", "'y' is not an agent", "moa.aggregator", "max_tokens"))
    r = parse_fusion({"method": "panel", "models": ["m1", "m2"], "judge": "j", "normalize": True})
    assert r.local_refs() == ["m1", "m2", "j"] and r.label() == "panel + judge (m1, m2) judge j"


def test_eval_cli_scores_an_ensemble_with_cost(zoo, suite, capsys):
    from evomerge.fusion.cli import ensemble_eval_command

    code = ensemble_eval_command([zoo["a"], zoo["b"]], [str(suite.path)], "logit", weights=[2, 1], split="held-out")
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.splitlines()
    assert lines[0] == "logit ensemble (a, b) w=2/1 (held-out split)"
    row = next(line.split() for line in lines if line.split()[1:2] == ["combined"])
    assert row[-1] == "12" and float(row[-2]) > 0  # items of the three tasks, standard error
    assert lines[-1] == ("mixed: cost relative to one source: 2 forward passes and 2x the parameters read per "
                         "generated token; 2 model calls per query; 2 model(s)")
    code = ensemble_eval_command([zoo["a"]], [str(suite.path)], "logit", weights=[1, 2])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "weights: 2 weight(s) for 1 model(s)" in err
    code = ensemble_eval_command([zoo["a"]], [str(suite.path)], "moa")
    err = capsys.readouterr().err
    assert code == 2 and "task(s) mc, ll: Mixture-of-Agents passes text" in err


def test_eval_command_line_takes_ensemble_flags(zoo, suite, capsys):
    from evomerge.cli import main

    assert main(["eval", "--ensemble", "panel", zoo["a"], zoo["b"], "--judge", zoo["c"], "--suite", str(suite.path),
                 "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "panel + judge (a, b) judge c (search split)" and "model calls per query" in out
    assert main(["eval", zoo["a"], zoo["b"], "--suite", str(suite.path)]) == 2
    assert "scores one model folder, got 2" in capsys.readouterr().err
    assert main(["eval", zoo["a"], "--weights", "1", "--suite", str(suite.path)]) == 2
    assert "--weights: for ensembles only" in capsys.readouterr().err


# ------------------------------------------------------------------------------- studies


def test_fusion_aware_evaluator_scores_merges_and_ensembles_with_cost(zoo, suite):
    """The suite evaluator of a study scores a fusion candidate on its own items (same scores as the
    engine, per-item payload) and puts a cost record on every outcome."""
    from evomerge.evaluate.suite_eval import SuiteEvaluator
    from evomerge.fusion import FusionAware
    from evomerge.recipe import parse_recipe

    ev = FusionAware(SuiteEvaluator(str(suite.path), batch_size=4))
    merge = parse_recipe({"method": "linear", "sources": [{"model": zoo["a"], "params": {"weight": 1.0}},
                                                          {"model": zoo["b"], "params": {"weight": 1.0}}]})
    out = ev.evaluate(merge, split="held-out")
    assert out.cost == {"passes": 1.0, "read": 1.0, "calls": 1.0, "models": 1.0}
    fusion = FusionRecipe(method="logit", models=[zoo["a"], zoo["b"]])
    got = ev.evaluate(fusion, split="held-out", fidelity=0.5)
    res, cost = score_suite(load_sources(fusion), FusionBackend(), suite, "held-out", limit=2, batch_size=4)
    assert got.scores == {**{k: t.score for k, t in res.tasks.items()}, "combined": res.combined}
    assert got.n["combined"] == 6 and got.cost == cost == {"passes": 2.0, "read": 2.0, "calls": 2.0, "models": 2.0}
    assert got.items["tasks"]["mc"]["values"] == res.tasks["mc"].items and len(got.items["tasks"]["mc"]["ids"]) == 2
    assert got.to_dict()["cost"] == cost


def test_cost_objectives_read_the_cost_record(zoo):
    from evomerge.recipe import parse_recipe
    from evomerge.search.objectives import Objective, objective_values

    objs = [Objective("combined", "metric", "combined", "maximize"), Objective("cost:read", "cost", "read", "minimize"),
            Objective("cost:params", "cost", "params", "minimize")]
    merge = parse_recipe({"method": "linear", "sources": [{"model": zoo["a"], "params": {"weight": 1.0}}]})
    vals = objective_values(objs, {"combined": 0.5}, merge)
    model, _ = load_model(zoo["a"])
    assert vals == {"combined": 0.5, "cost:read": 1.0, "cost:params": sum(p.numel() for p in model.parameters())}
    fusion = FusionRecipe(method="panel", models=[zoo["a"], zoo["b"]])
    vals = objective_values(objs, {"combined": 0.7}, fusion, {"passes": 2.5, "read": 2.5, "calls": 4.0, "models": 2})
    assert vals["cost:read"] == 2.5 and vals["cost:params"] == 2 * sum(p.numel() for p in model.parameters())
    with pytest.raises(KeyError, match="no cost 'read'"):
        objective_values(objs, {"combined": 0.7}, fusion)


def test_space_baselines_name_sources_and_report_every_problem(zoo):
    from evomerge.fusion.study import baseline_entry, parse_baselines, parse_candidate

    sources = [("a", zoo["a"]), ("b", zoo["b"]), ("base", zoo["c"])]
    merges, fused, problems = parse_baselines(
        {"merges": False, "fusion": [{"method": "logit"}, {"method": "panel", "models": ["a", "b"], "judge": "base"},
                                     {"method": "logit", "models": ["a", "nowhere"], "weights": [1]},
                                     {"method": "vote"}]}, "baselines", sources, lambda r: f"/abs/{r}")
    assert merges is False and [r.method for r in fused] == ["logit", "panel"]
    assert fused[0].models == [zoo["a"], zoo["b"]] and fused[1].judge == zoo["c"]
    text = "\n".join(map(str, problems))
    assert "baselines.fusion[2].weights: 1 weight(s) for 2 model(s)" in text
    assert "baselines.fusion[3].method: unknown fusion method 'vote'" in text
    assert parse_baselines(True, "baselines", sources, str) == (True, (), [])
    _, _, problems = parse_baselines({"fusion": [{"method": "logit", "models": ["a", "missing"]}]}, "baselines",
                                     sources, lambda r: r)
    assert len(problems) == 1 and "cannot open model missing" in str(problems[0])
    # a stored baseline parses back to the same recipe
    import yaml

    from evomerge.recipe import recipe_to_yaml

    assert parse_candidate(yaml.safe_load(recipe_to_yaml(fused[1]))) == fused[1]
    assert baseline_entry(fused[1])["judge"] == zoo["c"]


def test_lmeval_tasks_score_a_fused_candidate_as_lmeval_scores_the_model(zoo, tmp_path):
    """lm-eval's requests reach the fused candidate through BackendLM: a logit ensemble of one model
    and a panel of one score a multiple-choice and a generation task as lm-eval's own HFLM scores
    the model."""
    pytest.importorskip("lm_eval")
    from evomerge.evaluate import lmeval_score

    model, tok = load_model(zoo["a"])
    words = ["abc", "hello", "qrs", "xy", "mnop", "kk"]
    own = HFLM(model, tok, 8, None).generate([f"r:{w}=" for w in words], 6, ("z",))
    # generation targets: the model's own answer for half the items, an impossible one for the rest
    rows = [{"q": f"r:{w}=", "choices": [w[::-1], w, w + "z"], "label": 0, "a": own[i] if i % 2 else "###"}
            for i, w in enumerate(words)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {tmp_path / 'data.jsonl'}}}}}\ntest_split: test\n"
    (tmp_path / "rev_mc.yaml").write_text(
        "task: rev_mc\n" + head + "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "rev_gen.yaml").write_text(
        "task: rev_gen\n" + head + "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "target_delimiter: ''\ngeneration_kwargs: {until: ['z'], max_gen_toks: 6, do_sample: false}\n"
        "metric_list:\n  - metric: exact_match\n")
    want = lmeval_score(model, tok, ["rev_mc", "rev_gen"], include_path=tmp_path, batch_size=4)
    assert want.tasks["rev_gen"].score == 0.5  # lm-eval's HFLM generates what the hf backend does
    for method in ("logit", "panel"):
        sources = load_sources(FusionRecipe(method=method, models=[zoo["a"]]))
        got = lmeval_score(sources, sources.tokenizer, ["rev_mc", "rev_gen"], include_path=tmp_path,
                           backend=FusionBackend())
        for task in ("rev_mc", "rev_gen"):
            assert got.tasks[task].n == 6 and got.tasks[task].score == want.tasks[task].score, (method, task)


@pytest.mark.vllm
def test_panel_on_a_vllm_engine_scores_as_on_hf():
    """The panel's members loaded in turn into one running vLLM engine (in place) answer and judge as
    on the hf backend: the demo zoo's experts in float32 on the demo suite, generations identical."""
    pytest.importorskip("vllm")
    from evomerge.evaluate.backends import make_backend

    root = Path(__file__).resolve().parents[1]
    experts = [str(root / "evals" / "zoo" / f"expert_{k}") for k in ("arith", "reverse", "cipher")]
    demo = load_suite(root / "evals" / "zoo_demo.yaml")
    sources = load_sources(FusionRecipe(method="panel", models=experts), dtype="float32")
    vllm = make_backend("vllm", {})
    try:
        fused = FusionBackend(vllm)
        on_vllm, cost_v = score_suite(sources, fused, demo, "held-out", limit=16)
        # 3 answer; the judges run in reverse, the last member's weights still loaded: 2 more loads
        assert vllm.stats()["engine_starts"] == 1 and vllm.stats()["loads"] == 5
        score_suite(sources, fused, demo, "search", limit=2)  # starts with the member loaded last
        assert vllm.stats()["loads"] == 9
        with pytest.raises(EvalError, match="backend hf"):
            score_suite(load_sources(FusionRecipe(method="logit", models=experts), dtype="float32"),
                        FusionBackend(vllm), demo, "held-out", limit=2)
    finally:
        vllm.close()
    on_hf, cost_h = score_suite(sources, FusionBackend(), demo, "held-out", limit=16)
    for name, t in on_hf.tasks.items():
        assert on_vllm.tasks[name].items == t.items, name
    assert cost_v == pytest.approx(cost_h)


# ------------------------------------------------------------------------------- fusion baselines in a study


def _fusion_space(tmp_path, zoo, suite, **over) -> Path:
    import yaml

    space = {"name": "fb", "kind": "ps", "dtype": "float32",
             "ps": {"sources": [{"name": "sa", "model": zoo["a"]}, {"name": "sb", "model": zoo["b"]}],
                    "method": "linear", "params": {"weight": {"low": 0.1, "high": 1.0}}},
             "objectives": [{"metric": "combined"}, {"cost": "passes"}],
             "optimizer": {"name": "tpe", "seed": 0},
             "evaluation": {"kind": "suite", "suite": str(suite.path), "validation": 0.5},
             "multi_fidelity": {"enabled": False}, "budget": {"trials": 3},
             "baselines": {"merges": True, "fusion": [{"method": "logit"}, {"method": "panel", "judge": zoo["c"]}]}}
    space.update(over)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.mark.slow
def test_fusion_baselines_are_scored_in_a_study_and_never_win(zoo, suite, tmp_path, capsys):
    """``baselines: {fusion: [...]}``: each ensemble is a baseline trial scored on the search split
    like the merges (same items, the cost record), re-scored on held-out, marked apart, compared with
    the winner in selection.md, kept out of the winner's choice and of a mergekit export."""
    import yaml

    from evomerge.evaluate.evaluators import make_evaluator
    from evomerge.fusion.study import FusionAware, is_fusion
    from evomerge.search.driver import open_study_space, resume_search, start_search
    from evomerge.search.report import best_by
    from evomerge.search.study import heldout_records, read_meta
    from evomerge.search.validation import SELECTION, split_records

    out = tmp_path / "study"
    res = start_search(_fusion_space(tmp_path, zoo, suite), out, progress=False)
    assert res.complete
    meta = read_meta(out)
    study = optuna.load_study(study_name=meta.study_name("ps"), storage=meta.storage)
    trials = study.get_trials()
    fused = [t for t in trials if is_fusion(t.user_attrs.get("recipe", ""))]
    # labelled by the space's source names; the judge, a folder, by its name
    assert [t.user_attrs["label"] for t in fused] == ["logit ensemble (sa, sb)", "panel + judge (sa, sb) judge c"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["kind"] == "baseline" for t in fused)
    # the stored search score is the ensemble's score under the study's evaluator, by a separate run
    evaluator = make_evaluator({"kind": "suite", "suite": str(suite.path), "validation": 0.5, "dtype": "float32"})
    logit = fused[0]
    direct = FusionAware(evaluator).evaluate(
        FusionRecipe(method="logit", models=[zoo["a"], zoo["b"]], dtype="float32"), split="search")
    assert logit.user_attrs["scores"] == pytest.approx(direct.scores) and logit.user_attrs["n"] == direct.n
    assert logit.user_attrs["cost"]["passes"] == pytest.approx(2.0) and logit.values[1] == pytest.approx(2.0)
    assert fused[1].user_attrs["cost"]["passes"] > 2.0  # two answers, then every answer read by the panel and the judge
    # held-out: scored for the fusion baselines too; the winner is a merge, chosen among merges
    held = heldout_records(study)
    assert all(t.number in held and not held[t.number].get("error") for t in fused)
    choice = study.user_attrs["evomerge:" + SELECTION]
    assert not {t.number for t in fused} & ({choice["winner"]} | set(choice["pool"]))
    assert not any(n in split_records(study, "validation") for n in (t.number for t in fused))
    assert not is_fusion(best_by(study, list(open_study_space(out).objectives)).user_attrs["recipe"])
    md = (out / "selection.md").read_text()
    assert "logit ensemble (sa, sb)" in md and "panel + judge (sa, sb) judge c" in md
    assert (out / "pareto.png").stat().st_size > 0
    # the study's space.yaml names the models by absolute path; a resume scores no baseline again
    stored = yaml.safe_load((out / "space.yaml").read_text())["baselines"]
    assert stored["fusion"][0]["models"] == [zoo["a"], zoo["b"]] and stored["fusion"][1]["judge"] == zoo["c"]
    n_before = len(trials)
    assert resume_search(out, trials=4, progress=False).complete
    again = optuna.load_study(study_name=meta.study_name("ps"), storage=meta.storage).get_trials()
    assert len(again) == n_before + 1
    # an ensemble exports as a fusion recipe, not as a mergekit config
    assert main(["export", str(out), "-o", str(tmp_path / "f.yaml"), "--trial", str(logit.number)]) == 0
    assert is_fusion((tmp_path / "f.yaml").read_text())
    capsys.readouterr()
    assert main(["export", str(out), "-o", str(tmp_path / "m.yaml"), "--trial", str(logit.number),
                 "--format", "mergekit"]) == 2
    assert "ensemble" in capsys.readouterr().err and not (tmp_path / "m.yaml").exists()


@pytest.mark.parametrize("over, says", [
    ({"evaluation": {"kind": "weights", "target": "T"}}, "suite and lmeval evaluators"),
    ({"baselines": {"fusion": [{"method": "logit", "models": ["sa", "nope"]}]}}, "nope"),
    ({"baselines": {"fusion": [{"method": "logit"}], "merge": True}}, "merge"),
])
def test_fusion_baselines_problems_name_the_key(zoo, suite, tmp_path, capsys, over, says):
    if "evaluation" in over:
        over = {"evaluation": {"kind": "weights", "target": zoo["c"]}}
    path = _fusion_space(tmp_path, zoo, suite, **over)
    capsys.readouterr()
    assert main(["search", str(path), "--study-dir", str(tmp_path / "s"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "baselines" in err and says in err and not (tmp_path / "s").exists()


def test_a_logit_baseline_on_the_vllm_backend_is_refused(zoo, suite, tmp_path):
    from evomerge.search.space import load_space

    path = _fusion_space(tmp_path, zoo, suite, evaluation={"kind": "suite", "suite": str(suite.path),
                                                           "backend": "vllm"})
    with pytest.raises(ConfigError, match=r"baselines.fusion\[0\].*vllm backend"):
        load_space(path)
