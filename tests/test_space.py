"""Search spaces: strict YAML validation, dimensions, and the pure params -> recipe decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.recipe import ParamRule, layer_t, parse_recipe, recipe_to_yaml, resolve_param
from evomerge.search import dims as D
from evomerge.search.dfs import DFSSpace
from evomerge.search.objectives import model_size
from evomerge.search.space import load_space, parse_duration, parse_space
from evomerge.tiny import build_tiny_model
from test_search_support import family

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("space_fam")
    out = family(root, n_experts=3, noise=0.1)
    out["qwen"] = str(build_tiny_model(root / "qwen", arch="qwen2", num_layers=4))
    out["six"] = str(build_tiny_model(root / "six", num_layers=6))
    return out


def ps(fam, **over):
    data = {"kind": "ps", "evaluation": {"kind": "weights", "target": fam["base"]},
            "ps": {"base": fam["base"], "sources": [{"name": "a", "model": fam["expert1"]},
                                                    {"name": "b", "model": fam["expert2"]}],
                   "method": "ties"}}
    data["ps"].update(over.pop("ps", {}))
    data.update(over)
    return data


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_space(data, source="space.yaml")
    return [str(p) for p in err.value.problems]


def test_ps_dims_come_from_the_registry(fam):
    from evomerge.methods import get_method

    space = parse_space(ps(fam)).ps
    names = [d.name for d in space.dims()]
    ties = get_method("ties")
    searchable = [p for p in ties.params if p.searchable and p.search_low is not None]
    assert {n.split(".")[0] for n in names} == {p.name for p in searchable}
    w = next(d for d in space.dims() if d.name == "weight.a")
    spec = ties.param("weight")
    assert (w.low, w.high, w.default) == (spec.search_low, spec.search_high, spec.default)
    assert "normalize" not in names  # not searchable: left at its default


def test_granularity_groups_decode_to_piecewise_constant_per_layer(fam):
    space = parse_space(ps(fam, ps={"granularity": 2, "params": {"density": 0.7, "lambda": 1.0}})).ps
    assert space.groups == 2
    params = {d.name: 0.0 for d in space.dims()}
    params.update({"weight.a.g0": 0.2, "weight.a.g1": 0.9, "weight.b.g0": 0.4, "weight.b.g1": 0.6})
    recipe = space.decode(params)
    parse_recipe(yaml.safe_load(recipe_to_yaml(recipe)))  # a valid recipe
    wa = recipe.sources[0].params["weight"]
    n = space.num_layers
    got = [resolve_param(wa, f"model.layers.{i}.mlp.up_proj.weight", layer_t(i, n)) for i in range(n)]
    assert got == pytest.approx([0.2, 0.2, 0.9, 0.9], abs=1e-12)
    assert resolve_param(wa, "model.embed_tokens.weight", layer_t(None, n)) == pytest.approx(0.2)
    assert resolve_param(wa, "lm_head.weight", layer_t(None, n, is_head=True)) == pytest.approx(0.9)
    assert recipe.sources[0].params["density"] == 0.7 and recipe.params["lambda"] == 1.0


def test_module_split_decodes_to_filter_rules(fam):
    space = parse_space(ps(fam, ps={"modules": ["self_attn", "mlp"], "method": "task_arithmetic",
                                    "params": {"lambda": 1.0}})).ps
    names = {d.name for d in space.dims()}
    assert names == {f"weight.{s}.{m}" for s in "ab" for m in ("self_attn", "mlp", "other")}
    params = {n: 0.5 for n in names} | {"weight.a.self_attn": 0.1, "weight.a.mlp": 0.2, "weight.a.other": 0.3}
    value = space.decode(params).sources[0].params["weight"]
    assert all(isinstance(r, ParamRule) for r in value)
    at = lambda name: resolve_param(value, name, 0.5)  # noqa: E731
    assert at("model.layers.1.self_attn.q_proj.weight") == 0.1
    assert at("model.layers.1.mlp.down_proj.weight") == 0.2
    assert at("model.layers.1.input_layernorm.weight") == 0.3
    assert at("model.embed_tokens.weight") == 0.3


def test_method_choice_is_categorical_and_each_recipe_uses_its_methods_params(fam):
    space = parse_space(ps(fam, ps={"method": ["task_arithmetic", "ties"]})).ps
    dims = {d.name: d for d in space.dims()}
    assert dims["method"].kind == "categorical" and dims["method"].choices == ("task_arithmetic", "ties")
    params = {n: d.default_value() for n, d in dims.items()}
    ta = space.decode(params | {"method": "task_arithmetic"})
    assert ta.method == "task_arithmetic" and "density" not in ta.sources[0].params
    ti = space.decode(params | {"method": "ties"})
    assert ti.method == "ties" and "density" in ti.sources[0].params


def test_unit_cube_encoding_round_trips():
    dims = [D.Dim("w", "float", -1.0, 3.0), D.Dim("k", "int", 1, 5), D.Dim("m", "categorical", choices=("x", "y", "z"))]
    p = {"w": 2.0, "k": 4, "m": "y"}
    assert D.decode(dims, D.encode(dims, p)) == p
    assert D.decode(dims, [-5.0, 9.0, 1.0]) == {"w": -1.0, "k": 5, "m": "z"}  # clipped into the box


def test_every_problem_is_reported_at_once(fam):
    data = ps(fam, ps={"method": "ties", "granularity": 3, "bogus": 1,
                       "params": {"weight": {"low": 0.9, "high": 0.1}, "flavour": 1}}, extra=True)
    msgs = problems(data)
    text = "\n".join(msgs)
    assert "space.yaml: extra" in text and "unknown key 'extra'" in text
    assert "ps.bogus" in text
    assert "bounds reversed" in text
    assert "unknown parameter 'flavour'" in text
    assert "granularity 3 does not divide the layer count 4" in text
    assert len(msgs) >= 5


def test_unknown_method_and_missing_base(fam):
    assert any("unknown merge method 'tiez'" in m for m in problems(ps(fam, ps={"method": "tiez"})))
    data = ps(fam)
    del data["ps"]["base"]
    assert any("needs a base model" in m for m in problems(data))


def test_sources_of_different_architectures_are_refused(fam):
    data = ps(fam, ps={"sources": [fam["expert1"], fam["qwen"]]})
    assert any("different architectures" in m for m in problems(data))
    data = ps(fam, ps={"sources": [fam["expert1"], fam["six"]]})
    assert any("different layer counts" in m for m in problems(data))


def test_objectives_and_optimizer_checks(fam):
    msgs = problems(ps(fam, objectives=[{"metric": "combined"}, {"cost": "flops"}]))
    assert any("unknown cost 'flops'" in m for m in msgs)
    assert any("pycma CMA-ES optimizes one value" in m for m in msgs)
    msgs = problems(ps(fam, objectives=[{"metric": "a"}, {"metric": "b"}], optimizer={"name": "cmaes"}))
    assert any("CmaEsSampler does not support multi-objective" in m for m in msgs)
    assert any("unknown optimizer 'annealing'" in m for m in problems(ps(fam, optimizer={"name": "annealing"})))
    weighted = parse_space(ps(fam, objectives=[{"metric": "combined", "weight": 1}, {"cost": "layers", "weight": 0.1}]))
    assert [o.name for o in weighted.objectives] == ["combined", "cost:layers"]


def test_durations():
    assert parse_duration("8h") == 8 * 3600 and parse_duration("1h30m") == 5400 and parse_duration(90) == 90.0
    with pytest.raises(ConfigError):
        parse_duration("soon")


# ---------------------------------------------------------------------------------------------- DFS


def dfs_space(**kw) -> DFSSpace:
    base = dict(models=(("a", "A"), ("b", "B")), layers=(3, 3), repeats=2, embed=0, head=0, scale=(0.5, 2.0))
    return DFSSpace(**(base | kw))


def test_dfs_slots_follow_sakanas_order_and_indicators_select_layers():
    sp = dfs_space()
    slots = sp.slots()
    assert len(slots) == 2 * (3 + 3)
    assert slots[:7] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2), (1, 0, 0)]
    params = {d.name: -1.0 for d in sp.dims()} | {d.name: 1.0 for d in sp.dims() if d.name.startswith("scale")}
    on = ["ind.r0.a.0", "ind.r0.b.1", "ind.r1.a.0", "ind.r1.b.2"]
    params |= {k: 0.3 for k in on}
    params |= {"scale.b.a": 1.5, "scale.a.b": 0.7, "scale.a.a": 1.1}
    r = sp.decode(params)
    assert [(s.model, s.layer) for s in r.path] == [("A", 0), ("B", 1), ("A", 0), ("B", 2)]
    # W[model of this layer, model of previous layer]; the first step follows the embed model (a)
    assert [s.scale for s in r.path] == [1.1, 1.5, 0.7, 1.5]
    assert r.embed == "A" and r.head == "A"
    assert params["ind.r0.a.1"] < 0 and ("A", 1) not in [(s.model, s.layer) for s in r.path]


def test_dfs_constraints_first_last_max_depth_and_nonempty():
    sp = dfs_space(first_layers=1, last_layers=1, max_depth=4, scale=None)
    names = [d.name for d in sp.dims()]
    assert "ind.r0.a.0" not in names and "ind.r1.a.2" not in names  # forced layers are not searched
    assert not any(n.startswith("scale") for n in names)
    params = {n: 0.5 for n in names} | {"ind.r0.b.0": 0.9, "ind.r1.b.1": 0.8}
    r = sp.decode(params)
    steps = [(s.model, s.layer) for s in r.path]
    assert len(steps) == 4 and steps[0] == ("A", 0) and steps[-1] == ("A", 2)
    assert steps[1:3] == [("B", 0), ("B", 1)]  # the two largest indicators, in slot order
    assert all(s.scale == 1.0 for s in r.path)
    free = dfs_space(scale=None)
    empty = free.decode({d.name: -0.5 for d in free.dims()} | {"ind.r1.b.1": -0.1})
    assert [(s.model, s.layer) for s in empty.path] == [("B", 1)]


def test_dfs_default_point_is_the_embed_model_alone():
    sp = dfs_space()
    r = sp.decode(sp.default_params())
    assert [(s.model, s.layer, s.scale) for s in r.path] == [("A", 0, 1.0), ("A", 1, 1.0), ("A", 2, 1.0)]


def test_dfs_yaml_checks(fam):
    data = {"kind": "dfs", "evaluation": {"kind": "weights", "target": fam["base"]},
            "dfs": {"models": [{"name": "a", "model": fam["expert1"]}, {"name": "q", "model": fam["qwen"]}],
                    "embed": "zz", "scale": {"low": 2.0, "high": 1.0}, "repeats": 0}}
    text = "\n".join(problems(data))
    assert "'zz' is not one of the models" in text and "bounds reversed" in text
    assert "dfs.repeats" in text and "different architectures" in text
    data["dfs"] = {"models": [fam["expert1"], {"name": "w", "model": "@ps"}]}
    assert any("'@ps'" in m for m in problems(data))


# -------------------------------------------------------------------------------- shipped search spaces


SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


def test_there_are_shipped_spaces():
    assert {p.stem for p in SHIPPED} >= {"demo", "ps_ties_dare", "dfs", "ps_dfs"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_is_valid(path, fam):
    """Every shipped space validates; its zoo models are replaced by a tiny family of the same depth."""
    zoo = {"base": fam["base"], "expert_arith": fam["expert1"], "expert_reverse": fam["expert2"],
           "expert_cipher": fam["expert3"]}

    def sizes(ref: str):
        name = Path(ref).name
        assert name in zoo, f"unexpected model {ref} in {path.name}"
        return model_size(zoo[name])

    space = load_space(path, sizes=sizes)
    assert space.name == path.stem
    for stage in space.stages():
        sp = space.stage_space(stage)
        dims = sp.dims()
        assert dims
        sp.decode(sp.default_params())
        sp.decode(D.decode(dims, [0.7] * len(dims)))


# ------------------------------------------------------------------------- strict file, with lines


def test_problems_name_file_line_and_key_in_file_order(fam, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"""name: s
kind: ps
ps:
  base: {fam['base']}
  sources: [{fam['expert1']}, {fam['expert2']}]
  method: ties
  granularity: 3
  params:
    weight: {{low: 0.9, high: 0.1}}
    flavour: 1
objectives:
  - metric: combined
    direction: upward
optimizer: {{name: pycma, popsize: 1}}
evaluation: {{kind: weights, target: {fam['base']}}}
budget: {{timeout: soon}}
colour: red
""")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    wheres = [p.where for p in err.value.problems]
    want = [f"{path}:7: ps.granularity", f"{path}:9: ps.params.weight", f"{path}:10: ps.params.flavour",
            f"{path}:13: objectives[0].direction", f"{path}:14: optimizer.popsize", f"{path}:16: budget.timeout",
            f"{path}:17: colour"]
    assert wheres == want
    text = str(err.value)
    assert "granularity 3 does not divide the layer count 4 (fix: use one of [1, 2, 4])" in text
    assert "expected maximize or minimize, got 'upward'" in text
    assert "cannot read the duration 'soon'" in text and "unknown key 'colour' (fix: allowed keys here:" in text


def test_values_are_not_coerced_and_aliases_are_named_once(fam):
    msgs = problems(ps(fam, seed="3", baselines="yes", multi_fidelity={"enabled": 1}))
    assert "space.yaml: seed: expected a whole number, got '3'" in msgs
    assert any(m.startswith("space.yaml: baselines: expected true, false or a mapping {merges, fusion}, got 'yes'")
               for m in msgs)
    assert "space.yaml: multi_fidelity.enabled: expected true, false or auto, got 1" in msgs
    assert any("unknown dtype 'f8' (fix: use float32, bfloat16 or float16)" in m for m in problems(ps(fam, dtype="f8")))
    space = parse_space(ps(fam, dtype="bf16"))
    assert space.ps.dtype == "bfloat16" and space.ps.decode(space.ps.default_params()).dtype == "bfloat16"


def test_a_source_count_the_method_does_not_take_is_named_with_what_it_takes(fam):
    msgs = problems(ps(fam, ps={"method": "slerp"}))
    assert ("space.yaml: ps.sources: method 'slerp' takes exactly 1 source model(s) (the base not counted), got 2 "
            "(fix: list the number of sources the method takes)") in msgs
