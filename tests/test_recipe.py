"""Recipe parsing, validation, parameter resolution and mergekit YAML import/export."""

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.loader import load_recipe
from evomerge.mergekit_compat import from_mergekit, to_mergekit
from evomerge.recipe import (DataFlowRecipe, MergeRecipe, ParamRule, StackRecipe, dump_recipe, layer_t,
                             model_refs, parse_recipe, recipe_hash, recipe_to_dict, resolve_param,
                             stack_to_dataflow)


def ties(**kw):
    data = {"method": "ties", "base": "b", "sources": [{"model": "x", "params": {"weight": 0.5, "density": 0.5}},
                                                       {"model": "y", "params": {"weight": 0.5}}],
            "params": {"density": 0.7}}
    data.update(kw)
    return data


def test_parse_merge_recipe_and_roundtrip(tmp_path):
    r = parse_recipe(ties(dtype="bf16"))
    assert isinstance(r, MergeRecipe) and r.dtype == "bfloat16" and r.sources[0].params["weight"] == 0.5
    path = dump_recipe(r, tmp_path / "r.yaml")
    again = load_recipe(path)
    assert again == r and recipe_hash(again) == recipe_hash(r)
    assert recipe_hash(parse_recipe(ties(seed=1))) != recipe_hash(r)
    assert model_refs(r) == ["b", "x", "y"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_every_problem_reported_together(tmp_path):
    bad = {"method": "ties", "sources": [{"model": "x", "params": {"weight": 0.5, "bogus": 1, "lambda": 2.0,
                                                                     "density": 1.5}}],
           "params": {"nope": 1}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    msg = str(info.value)
    assert str(f) in msg
    for needle in ["base", "bogus", "lambda", "nope", "density"]:
        assert needle in msg, needle
    assert len(info.value.problems) == 5


def test_structural_errors_name_keys():
    with pytest.raises(ConfigError) as info:
        parse_recipe({"kind": "stack", "slices": [{"model": "a", "layers": [3, 1], "extra": 1}], "typo": 1},
                     source="s.yaml")
    msg = str(info.value)
    assert "slices[0].layers" in msg and "slices[0].extra" in msg and "typo" in msg
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        parse_recipe({"method": "tie", "sources": [{"model": "a"}]})
    with pytest.raises(ConfigError, match="scale"):
        parse_recipe({"kind": "dataflow", "embed": "a", "path": [{"model": "a", "layer": 0, "scale": -1}]})
    with pytest.raises(ConfigError, match="unknown recipe kind"):
        parse_recipe({"kind": "soup", "sources": []})
    with pytest.raises(ConfigError, match="gradient"):
        parse_recipe({"method": "ties", "base": "b", "sources": [{"model": "x", "params": {"weight": "high"}}]})
    with pytest.raises(ConfigError, match="equal lengths"):
        parse_recipe({"method": "linear", "sources": [{"model": "x", "layers": [0, 2]},
                                                      {"model": "y", "layers": [0, 3]}]})


def test_resolve_param_gradients_and_filters():
    # independent reference: piecewise-linear interpolation at anchors spread evenly over [0, 1]
    vals = [0.0, 1.0, 0.25]
    for t, want in [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.625), (1.0, 0.25)]:
        assert resolve_param(vals, "x", t) == pytest.approx(want)
    rules = [ParamRule(filter="mlp", value=[0.0, 1.0]), ParamRule(filter="*", value=0.3)]
    assert resolve_param(rules, "model.layers.2.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_param(rules, "model.layers.2.self_attn.q_proj.weight", 0.5) == 0.3
    assert resolve_param([ParamRule(filter="mlp", value=1.0)], "attn", 0.0) is None
    assert resolve_param(True, "x", 0.3) is True
    assert [layer_t(i, 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1.0]
    assert layer_t(None, 5) == 0.0 and layer_t(None, 5, is_head=True) == 1.0 and layer_t(0, 1) == 1.0


def test_stack_to_dataflow():
    r = parse_recipe({"kind": "stack", "slices": [{"model": "a", "layers": [0, 3]}, {"model": "b", "layers": [1, 4]}]})
    assert isinstance(r, StackRecipe)
    d = stack_to_dataflow(r)
    assert [(s.model, s.layer) for s in d.path] == [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]
    assert d.embed == "a" and d.head == "b" and all(s.scale == 1.0 for s in d.path)


def test_mergekit_import_models_form():
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "base"}, {"model": "m1", "parameters": {"weight": 0.6, "density": [0.2, 0.8]}},
                      {"model": "m2", "parameters": {"weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.4}],
                                                      "density": 0.5}}],
           "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"}
    r = from_mergekit(cfg)
    assert isinstance(r, MergeRecipe) and r.base == "base" and [s.model for s in r.sources] == ["m1", "m2"]
    assert r.sources[0].params["density"] == [0.2, 0.8] and r.dtype == "bfloat16"
    assert "int8_mask" not in r.params and r.params["normalize"] is True
    back = to_mergekit(r)
    assert back["merge_method"] == "ties" and back["base_model"] == "base"
    assert from_mergekit(back) == r


def test_mergekit_keys_mergekit_ignores_are_dropped_with_a_warning():
    """mergekit passes every parameter to every method and each reads its own: a `weight` on slerp or
    model_stock sources (mergekit's own tests pass one) is accepted there, so the import drops it and
    says where; evomerge's own recipe format stays strict."""
    from evomerge.mergekit_compat import MergekitIgnoredWarning

    cases = [({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3, "weight": 1.0},
               "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.5}}]}, 2),
             ({"merge_method": "model_stock", "base_model": "a",
               "models": [{"model": "b", "parameters": {"weight": 1.0}}, {"model": "c", "parameters": {"weight": 1.0}}]}, 2)]
    for cfg, n in cases:
        with pytest.warns(MergekitIgnoredWarning) as caught:
            got = from_mergekit(cfg)
        assert len(caught) == n and all("does not use 'weight'" in str(w.message) for w in caught)
        clean = {**cfg, "models": [{"model": m["model"]} for m in cfg["models"]],
                 "parameters": {k: v for k, v in (cfg.get("parameters") or {}).items() if k != "weight"}}
        assert got == from_mergekit(clean)
    with pytest.raises(ConfigError, match="weight"):  # evomerge's own format: refused
        parse_recipe({"method": "slerp", "base": "a", "sources": [{"model": "b", "params": {"weight": 0.5}}]})


def test_mergekit_import_via_load_recipe_and_errors(tmp_path):
    f = tmp_path / "mk.yaml"
    f.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": "a",
                                 "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]},
                                                         {"model": "b", "layer_range": [0, 4]}]}],
                                 "parameters": {"t": [0.0, 0.5, 1.0]}}))
    r = load_recipe(f)
    assert isinstance(r, MergeRecipe) and r.method == "slerp" and r.base == "a" and r.base_layers == (0, 4)
    assert r.sources[0].layers == (0, 4)
    with pytest.raises(ConfigError) as info:
        from_mergekit({"merge_method": "frankenblend", "models": [{"model": "a"}], "tokenizer_source": "union",
                       "tokenizer": {"source": "base"}, "frobnicate": 1})
    msg = str(info.value)
    assert "frankenblend" in msg and "both `tokenizer_source` and `tokenizer`" in msg and "frobnicate" in msg


def test_mergekit_passthrough_and_dataflow_roundtrip():
    cfg = {"merge_method": "passthrough", "dtype": "float16",
           "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                      {"sources": [{"model": "b", "layer_range": [1, 3]}]}]}
    r = from_mergekit(cfg)
    assert isinstance(r, StackRecipe) and r.slices[1].layers == (1, 3)
    # a data-flow path with scales exports as passthrough slices with folded residual-writer scales
    d = parse_recipe({"kind": "dataflow", "embed": "a", "head": "b",
                      "path": [{"model": "a", "layer": 0}, {"model": "a", "layer": 1, "scale": 2.0},
                               {"model": "a", "layer": 2}, {"model": "b", "layer": 0, "scale": 0.5}]})
    assert isinstance(d, DataFlowRecipe)
    mk = to_mergekit(d)
    assert [s["sources"][0]["layer_range"] for s in mk["slices"]] == [[0, 1], [1, 3], [0, 1]]
    assert mk["slices"][1]["sources"][0]["parameters"]["scale"][0]["value"] == pytest.approx(0.5)
    back = from_mergekit(mk)
    assert isinstance(back, DataFlowRecipe)
    assert [(s.model, s.layer) for s in back.path] == [(s.model, s.layer) for s in d.path]
    assert [s.scale for s in back.path] == pytest.approx([s.scale for s in d.path])
    with pytest.raises(ConfigError, match="embeddings"):
        to_mergekit(parse_recipe({"kind": "dataflow", "embed": "c", "path": [{"model": "a", "layer": 0}]}))


def test_mergekit_rescale_semantics_kept():
    # mergekit's DARE rescale restores the L1 norm; importing keeps that, exporting refuses a recipe
    # that divides by the keep probability (evomerge's paper default) instead of silently changing it
    cfg = {"merge_method": "dare_ties", "base_model": "b",
           "models": [{"model": "x", "parameters": {"weight": 0.5, "density": 0.3}}]}
    r = from_mergekit(cfg)
    assert r.params["rescale_l1"] is True
    assert "rescale_l1" not in to_mergekit(r).get("parameters", {})
    native = parse_recipe({"method": "dare_ties", "base": "b",
                           "sources": [{"model": "x", "params": {"weight": 0.5, "density": 0.3}}]})
    with pytest.raises(ConfigError, match="rescale_l1"):
        to_mergekit(native)


def _plan_params(recipe):
    """Per output tensor: its resolved per-source and global parameters."""
    from evomerge.materialize import plan_recipe

    return {t.name: (dict(t.op.source_params), dict(t.op.global_params)) for t in plan_recipe(recipe).tensors}


@pytest.fixture(scope="module")
def tiny_fam(tmp_path_factory):
    from evomerge.tiny import build_tiny_family

    fam = build_tiny_family(tmp_path_factory.mktemp("fam"), n_experts=2, num_layers=3)
    return {k: str(v) for k, v in fam.items()}


def test_mergekit_gradients_take_their_first_value_after_the_layers(tiny_fam):
    """mergekit evaluates gradients at t = 0 for the final norm and lm_head (evomerge: t = 1); an
    imported config keeps mergekit's choice (head_t: 0), a native recipe keeps its own."""
    f = tiny_fam
    cfg = {"merge_method": "ties", "base_model": f["base"],
           "models": [{"model": f["expert1"], "parameters": {"weight": [1.0, 0.2], "density": 0.5}},
                      {"model": f["expert2"], "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}}]}
    imported = from_mergekit(cfg)
    assert imported.head_t == 0.0
    assert from_mergekit({**cfg, "models": [{"model": f["expert1"], "parameters": {"weight": 1.0}}]}).head_t is None
    got = _plan_params(imported)
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert got[name][0]["weight"] == [1.0, 0.5], name
    assert got["model.layers.2.mlp.up_proj.weight"][0] == {"weight": [0.2, 0.5], "density": [0.5, 0.9]}
    native = imported.model_copy(update={"head_t": None})
    own = _plan_params(native)
    assert own["lm_head.weight"][0]["weight"] == own["model.norm.weight"][0]["weight"] == [0.2, 0.5]
    assert own["model.embed_tokens.weight"][0]["weight"] == [1.0, 0.5]
    # head_t is part of the recipe format: validated, written, read back
    with pytest.raises(ConfigError, match="head_t"):
        parse_recipe(ties(head_t=1.5))
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe_to_dict(imported)))) == imported


def test_mergekit_export_pins_the_head_of_gradient_params(tiny_fam):
    """Exporting a recipe whose gradients put the head at t = 1 adds head rules, so mergekit
    (gradients at t = 0 there) merges every tensor with the recipe's values: the exported config,
    read back as mergekit reads it, plans the same parameters for every tensor."""
    f = tiny_fam
    recipe = parse_recipe({"method": "ties", "base": f["base"], "params": {"lambda": [0.5, 1.5], "density": 0.6, "rescale_l1": True},
                           "sources": [{"model": f["expert1"], "params": {"weight": [1.0, 0.2]}},
                                       {"model": f["expert2"], "params": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                                                                     {"filter": "norm", "value": [0.3, 0.6]},
                                                                                     {"value": 0.4}]}}]})
    mk = to_mergekit(recipe)
    assert mk["models"][0]["parameters"]["weight"][0] == {"filter": "lm_head", "value": 0.2}
    assert {"filter": "model.norm.", "value": 0.6} in mk["models"][1]["parameters"]["weight"]
    back = from_mergekit(yaml.safe_load(yaml.safe_dump(mk)))
    assert back.head_t == 0.0
    assert _plan_params(back) == _plan_params(recipe)


def test_tokenizer_section_roundtrip_and_refs(tmp_path):
    """A bare model reference keeps its form (recipe hashes of earlier studies are unchanged); the
    mapping form round-trips through YAML; the source model is one of the recipe's models."""
    r = parse_recipe(ties(tokenizer="t"))
    assert r.tokenizer == "t" and recipe_to_dict(r)["tokenizer"] == "t" and model_refs(r)[-1] == "t"
    block = {"source": "union", "tokens": {"<a>": {"source": "x", "force": True}, "<b>": {"source": {"kind": "zero"}},
                                           "<c>": {"source": {"kind": "model_token", "model": "y", "token_id": 3}}},
             "pad_to_multiple_of": 8, "chat_template": "llama3"}
    r = parse_recipe(ties(tokenizer=block))
    assert recipe_to_dict(r)["tokenizer"] == block and load_recipe(dump_recipe(r, tmp_path / "r.yaml")) == r
    assert model_refs(r) == ["b", "x", "y"]  # union names no model of its own
    assert model_refs(parse_recipe(ties(tokenizer={"source": "z"}))) == ["b", "x", "y", "z"]


@pytest.mark.parametrize("block, where, match", [
    ({"tokens": {"<a>": {}}}, "tokenizer", "need a tokenizer `source`"),
    ({"source": "base", "tokens": {"<a>": {"force": True}}}, "tokenizer.tokens.<a>", "needs a `source`"),
    ({"source": "base", "tokens": {"<a>": {"source": {"kind": "model_token", "model": "x"}}}},
     "tokenizer.tokens.<a>.source", "exactly one of `token`"),
    ({"source": "base", "tokens": {"<a>": {"source": {"kind": "rows"}}}}, "tokenizer.tokens.<a>.source",
     "expected a model reference"),
    ({"source": "base", "tokens": {"<a>": {"source": "elsewhere"}}}, "tokenizer.tokens['<a>'].source",
     "not one of the models"),
    ({"source": "base", "pad_to_multiple_of": 0}, "tokenizer.pad_to_multiple_of", "greater than or equal to 1"),
    ({"chat_template": "chatnl"}, "tokenizer.chat_template", "neither a known name"),
    ({"chat_template": "{% for m in messages %}"}, "tokenizer.chat_template", "not valid Jinja"),
    ({"source": "base", "colour": 1}, "tokenizer.colour", "unknown key"),
])
def test_tokenizer_section_errors(block, where, match):
    with pytest.raises(ConfigError) as info:
        parse_recipe(ties(tokenizer=block), source="r.yaml")
    assert [p.where for p in info.value.problems] == [f"r.yaml: {where}"]
    assert match in str(info.value)


def test_parse_recipe_refuses_mergekit_configs_and_the_loader_reads_them():
    from evomerge.loader import parse_config

    mk = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.raises(ConfigError, match="this is a mergekit config"):
        parse_recipe(mk)
    assert parse_config(mk) == from_mergekit(mk)


def test_no_import_cycle_between_recipe_and_mergekit_compat():
    """recipe.py reads only the evomerge format: it imports neither mergekit_compat nor the loader."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("evomerge", "recipe.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"evomerge.mergekit_compat", "evomerge.loader"} & names


def test_mergekit_multi_files_are_named(tmp_path):
    f = tmp_path / "multi.yaml"
    f.write_text("name: first\nmerge_method: linear\nmodels: [{model: a}, {model: b}]\n---\n"
                 "merge_method: slerp\nbase_model: first\nmodels: [{model: first}, {model: c}]\n"
                 "parameters: {t: 0.5}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    msg = str(info.value)
    assert "mergekit-multi file: 2 merges" in msg and "(first, document 2)" in msg and "one file per document" in msg


def test_mergekit_slice_keys_and_lora_refs():
    from evomerge.mergekit_compat import MergekitIgnoredWarning

    sl = {"sources": [{"model": "s", "layer_range": [0, 4]}, {"model": "x", "layer_range": [0, 4]}],
          "base_model": "s"}
    r = from_mergekit({"merge_method": "task_arithmetic", "base_model": "ignored", "slices": [sl]})
    assert r.base == "s" and r.base_layers == (0, 4) and [s.model for s in r.sources] == ["x"]
    with pytest.warns(MergekitIgnoredWarning, match=r"slices\[0\].residual_weight"):
        from_mergekit({"merge_method": "task_arithmetic", "base_model": "s", "slices": [sl | {"residual_weight": 0.5}]})
    with pytest.raises(ConfigError) as info:
        from_mergekit({"merge_method": "linear", "models": [{"model": "a+lora/adapter"}, {"model": "b"}],
                       "slices_extra": 1}, source="mk.yaml")
    assert "mk.yaml: models[0].model" in [p.where for p in info.value.problems]
    assert "LoRA adapter" in str(info.value)
    with pytest.raises(ConfigError, match=r"slices\[0\]: unknown key\(s\) \['colour'\]"):
        from_mergekit({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}],
                                                                  "colour": 1}]})
