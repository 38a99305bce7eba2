"""Data-aware merges: RegMean and Fisher merging, their calibration data, statistics and cache.

The merged tensors are checked against independent float64 references: the layer inputs are
captured with forward hooks on a float64 transformers model, one text at a time, the RegMean
system solved with numpy; the Fisher is computed from per-text ``torch.autograd.grad`` calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.calibration import calibration_texts, clear_memory, source_statistics
from evomerge.checkpoint import Checkpoint
from evomerge.errors import ConfigError, MergeError
from evomerge.materialize import materialize_state_dict, merge_to_disk, plan_recipe
from evomerge.methods import get_method
from evomerge.recipe import parse_recipe
from evomerge.recipe_sections import CalibrationSpec
from evomerge.tiny import build_tiny_family

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"the {w} fox {i} jumps over {i * 7} lazy dogs" for i, w in enumerate(
    ["quick", "slow", "red", "blue", "tiny", "big", "odd", "even"])]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("da")
    paths = build_tiny_family(root / "fam", n_experts=2, noise=0.05, seed=7, num_layers=2, hidden_size=32,
                              intermediate_size=64)
    data = root / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    return {**{k: str(v) for k, v in paths.items()}, "data": str(data), "root": root}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    clear_memory()
    yield tmp_path / "cache"
    clear_memory()


def recipe(fam, method, sources, params=None, weights=None, **cal):
    srcs = [{"model": fam[s]} | ({"params": {"weight": w}} if w is not None else {})
            for s, w in zip(sources, weights or [None] * len(sources))]
    return parse_recipe({"method": method, "sources": srcs, "params": params or {},
                         "calibration": {"jsonl": fam["data"], "field": "text", "max_length": 24, **cal}})


def _texts_ids(path, n=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok(t, truncation=True, max_length=24)["input_ids"] for t in TEXTS[:n]]


def _model64(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def ref_grams(path, layers):
    """Input Gram matrices X^T X / N of ``layers``, one text at a time, float64."""
    model = _model64(path)
    xs = {name: [] for name in layers}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: xs[name].append(args[0][0].detach().numpy())) for name in layers]
    with torch.no_grad():
        for ids in _texts_ids(path):
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    out = {}
    for name in layers:
        x = np.concatenate(xs[name])
        out[name] = x.T @ x / len(x)
    return out, {name: model.get_submodule(name).weight.detach().numpy() for name in layers}


LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
          "model.layers.1.self_attn.o_proj", "lm_head"]


def test_regmean_matches_a_float64_reference(fam):
    weights, alpha = [1.0, 0.4], 0.7
    _, state = materialize_state_dict(recipe(fam, "regmean", ["expert1", "expert2"], {"alpha": alpha}, weights))
    refs = [ref_grams(fam[s], LAYERS) for s in ("expert1", "expert2")]
    for name in LAYERS:
        gs = [alpha * g[name] + (1 - alpha) * np.diag(np.diag(g[name])) for g, _ in refs]
        a = sum(w * g for w, g in zip(weights, gs))
        b = sum(w * g @ ws[name].T for w, g, (_, ws) in zip(weights, gs, refs))
        want = np.linalg.solve(a, b).T
        got = state[name + ".weight"].double().numpy()
        mean = sum(w * ws[name] for w, (_, ws) in zip(weights, refs)) / sum(weights)
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max(), name
        assert np.abs(got - mean).max() > 100 * np.abs(got - want).max(), name  # not just the average
    # every other tensor: the weighted average
    e1, e2 = Checkpoint.open(fam["expert1"]), Checkpoint.open(fam["expert2"])
    for name in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        want = (1.0 * e1.read(name).double() + 0.4 * e2.read(name).double()) / 1.4
        assert torch.allclose(state[name].double(), want, atol=1e-6), name


def test_regmean_of_one_source_is_the_source(fam):
    _, state = materialize_state_dict(recipe(fam, "regmean", ["expert1"], {"alpha": 1.0}))
    src = Checkpoint.open(fam["expert1"])
    for name, t in state.items():
        assert torch.allclose(t, src.read(name).float(), atol=2e-6, rtol=1e-5), name


def test_regmean_without_the_reduction_refuses_a_singular_gram_matrix():
    """4 calibration tokens for 64 inputs: the Gram matrix has rank 4; with alpha 1 the solve would
    return weights far outside the sources' range, so the merge is refused; alpha < 1 solves it."""
    gen = torch.Generator().manual_seed(1)
    grams = []
    for _ in range(2):
        x = torch.randn(4, 64, generator=gen)
        grams.append(x.T @ x / 4)
    ws = [torch.randn(8, 64, generator=gen) for _ in range(2)]
    spec = get_method("regmean")
    with pytest.raises(MergeError, match="singular"):
        spec(ws, None, weight=[1.0, 1.0], alpha=1.0, stats=grams)
    got = spec(ws, None, weight=[1.0, 1.0], alpha=0.9, stats=grams)
    assert got.abs().max() <= 2 * max(w.abs().max() for w in ws)


def test_regmean_with_equal_grams_is_the_weighted_average():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    g = (x.T @ x / 40).float()
    ws = [torch.randn(5, 6, generator=gen) for _ in range(3)]
    spec = get_method("regmean")
    for alpha in (1.0, 0.5, 0.0):
        got = spec(ws, None, weight=[1.0, 2.0, 0.5], alpha=alpha, stats=[g, g, g]).double()
        want = (1.0 * ws[0].double() + 2.0 * ws[1].double() + 0.5 * ws[2].double()) / 3.5
        assert torch.allclose(got, want, atol=1e-5), alpha
    other = (g + torch.eye(6)).float()
    assert not torch.allclose(spec(ws[:2], None, weight=[1.0, 1.0], alpha=1.0, stats=[g, other]),
                              (ws[0] + ws[1]) / 2, atol=1e-4)


def ref_fisher(path, names):
    """Mean over texts of the squared gradient of each text's log-likelihood (its own tokens)."""
    model = _model64(path)
    params = [model.get_parameter(n) for n in names]
    acc = [torch.zeros_like(p) for p in params]
    texts = _texts_ids(path)
    for ids in texts:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1)
        ll = logp[torch.arange(len(ids) - 1), x[0, 1:]].sum()
        for a, g in zip(acc, torch.autograd.grad(ll, params)):
            a += g ** 2
    return [a / len(texts) for a in acc], [p.detach() for p in params]


def test_fisher_matches_a_float64_reference(fam):
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight",
             "model.embed_tokens.weight", "lm_head.weight"]
    weights, eps = [0.6, 1.0], 1e-9
    _, state = materialize_state_dict(recipe(fam, "fisher", ["expert1", "expert2"], {"epsilon": eps}, weights,
                                             labels="data"))
    (f1, p1), (f2, p2) = ref_fisher(fam["expert1"], names), ref_fisher(fam["expert2"], names)
    for k, name in enumerate(names):
        a, b = weights[0] * f1[k].clamp_min(eps), weights[1] * f2[k].clamp_min(eps)
        want = (a * p1[k] + b * p2[k]) / (a + b)
        got = state[name].double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name
        mean = (weights[0] * p1[k] + weights[1] * p2[k]) / sum(weights)
        assert (got - mean).abs().max() > 10 * (got - want).abs().max(), name


def test_fisher_with_equal_fishers_is_the_weighted_average():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(7, 3, generator=gen) for _ in range(3)]
    f = torch.rand(7, 3, generator=gen)
    spec = get_method("fisher")
    got = spec(xs, None, weight=[0.2, 1.0, 0.8], epsilon=1e-8, stats=[f, f, f]).double()
    want = (0.2 * xs[0].double() + xs[1].double() + 0.8 * xs[2].double()) / 2.0
    assert torch.allclose(got, want, atol=1e-6)
    # zero Fisher everywhere and no floor: the weighted average, not NaN
    zero = torch.zeros(7, 3)
    got = spec(xs[:2], None, weight=[1.0, 1.0], epsilon=0.0, stats=[zero, zero])
    assert torch.allclose(got, (xs[0] + xs[1]) / 2, atol=1e-6)


def test_statistics_are_cached_and_keyed(fam, cache):
    spec = CalibrationSpec(jsonl=fam["data"], field="text", max_length=24)
    ck = Checkpoint.open(fam["expert1"])
    first = source_statistics(ck, spec, "gram")
    assert first.origin == "computed" and first.path.parent == cache / "calibration" and first.texts == len(TEXTS)
    assert first.aliases["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert source_statistics(ck, spec, "gram").origin == "memory"
    clear_memory()
    again = source_statistics(ck, spec, "gram")
    assert again.origin == "disk" and again.path == first.path and again.names == first.names
    # other texts (limit), another statistic, another model: computed anew
    assert source_statistics(ck, spec.model_copy(update={"limit": 3}), "gram").origin == "computed"
    assert source_statistics(ck, spec, "fisher").origin == "computed"
    assert source_statistics(Checkpoint.open(fam["expert2"]), spec, "gram").origin == "computed"
    # the plan records where each source's statistics came from; the second plan reads them
    plan = plan_recipe(recipe(fam, "regmean", ["expert1", "expert2"]))
    assert {s.origin for s in plan.statistics.values()} <= {"memory", "disk"}


def test_merge_to_disk_and_resident_agree(fam, tmp_path):
    from evomerge.resident import ResidentSources

    r = recipe(fam, "fisher", ["expert1", "expert2"], weights=[1.0, 0.3])
    out = merge_to_disk(r, tmp_path / "out", progress=False)
    _, state = materialize_state_dict(r)
    res = ResidentSources.load([fam["expert1"], fam["expert2"]], device="cpu", fused=False)
    dst = res.materialize_into(r, res.empty_state_dict(r))
    ck = Checkpoint.open(out)
    for name, t in state.items():
        assert torch.equal(ck.read(name), t), name
        assert torch.equal(dst[name], t), name


def test_calibration_from_a_suite_split():
    spec = CalibrationSpec(suite=str(REPO / "evals" / "zoo_demo.yaml"), limit=2)
    texts = calibration_texts(spec)
    first = json.loads((REPO / "evals" / "data" / "zoo_arith.search.jsonl").read_text().splitlines()[0])
    assert texts[0] == first["prompt"] + first["answer"] and len(texts) == 8  # 4 tasks x 2


@pytest.mark.parametrize("data, match", [
    ({"method": "regmean"}, "computes statistics on calibration data"),
    ({"method": "linear", "calibration": {"jsonl": "x.jsonl"}}, "uses no calibration data"),
    ({"method": "regmean", "calibration": {"jsonl": "x.jsonl", "suite": "s.yaml"}}, "exactly one of"),
    ({"method": "regmean", "calibration": {"jsonl": "x.jsonl", "labels": "data"}}, "for method 'fisher'"),
    ({"method": "fisher", "calibration": {"jsonl": "x.jsonl", "split": "search"}}, "has none"),
    ({"method": "fisher", "calibration": {"jsonl": "x.jsonl", "rows": 3}}, "unknown key 'rows'"),
    ({"method": "regmean", "params": {"alpha": 1.5}, "calibration": {"jsonl": "x.jsonl"}}, "outside its valid range"),
])
def test_recipe_validation(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe({"sources": [{"model": "a"}, {"model": "b"}], **data}, source="r.yaml")


def test_bad_calibration_data_is_named(fam, tmp_path):
    with pytest.raises(ConfigError, match="calibration JSONL file not found"):
        plan_recipe(parse_recipe({"method": "regmean", "sources": [{"model": fam["expert1"]}],
                                  "calibration": {"jsonl": str(tmp_path / "none.jsonl")}}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: no string field 'text'"):
        plan_recipe(parse_recipe({"method": "regmean", "sources": [{"model": fam["expert1"]}],
                                  "calibration": {"jsonl": str(bad), "field": "text"}}))


def test_search_space_searches_alpha_and_weights(fam):
    """A PS space over regmean (and ties): alpha and per-source weights are dimensions, the decoded
    recipes carry the calibration data (data-aware methods only) and merge in the resident path."""
    from evomerge.resident import ResidentSources
    from evomerge.search.space import parse_space

    ps_section = {"method": ["regmean", "ties"], "base": fam["base"],
                  "sources": [{"name": "a", "model": fam["expert1"]}, {"name": "b", "model": fam["expert2"]}],
                  "calibration": {"jsonl": fam["data"], "field": "text", "max_length": 24}}
    space = {"kind": "ps", "evaluation": {"kind": "weights", "target": fam["base"]}, "ps": ps_section}
    ps = parse_space(space).ps
    assert {"method", "alpha", "weight.a", "weight.b"} <= {d.name for d in ps.dims()}
    rec = ps.decode(ps.default_params() | {"method": "regmean", "alpha": 0.6, "weight.a": 0.3})
    assert rec.method == "regmean" and rec.base is None and rec.params["alpha"] == 0.6
    assert rec.calibration.jsonl == fam["data"] and rec.sources[0].params["weight"] == 0.3
    assert parse_recipe(rec.model_dump(exclude_none=True)) == rec
    assert ps.decode(ps.default_params() | {"method": "ties"}).calibration is None
    res = ResidentSources.load([fam["expert1"], fam["expert2"]], device="cpu", fused=False)
    got = res.materialize_into(rec, res.empty_state_dict(rec))
    want = materialize_state_dict(rec)[1]
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="ps.calibration: method.s. regmean compute statistics"):
        parse_space({**space, "ps": {k: v for k, v in ps_section.items() if k != "calibration"}})
    with pytest.raises(ConfigError, match="ps.calibration: no listed method uses calibration data"):
        parse_space({**space, "ps": {**ps_section, "method": "ties"}})
