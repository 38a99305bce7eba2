"""End to end: recipes -> checkpoints on tiny Llama / Mistral / Qwen2 families, load and generate."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main as cli_main
from evomerge.errors import CheckpointError, IncompatibleModelsError
from evomerge.materialize import materialize_state_dict, merge_to_disk
from evomerge.recipe import dump_recipe, parse_recipe
from evomerge.tiny import build_tiny_family, build_tiny_model


def read_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return {k: str(v) for k, v in build_tiny_family(root, arch="llama", n_experts=3, noise=0.05, seed=1).items()}


def generate(path, n=4):
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("abc", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + n
    return model


@pytest.mark.parametrize("arch", ["llama", pytest.param("mistral", marks=pytest.mark.slow), "qwen2"])
def test_ties_merge_loads_and_generates(tmp_path, arch):
    fam = {k: str(v) for k, v in build_tiny_family(tmp_path / "f", arch=arch, n_experts=2, noise=0.05).items()}
    recipe = parse_recipe({"method": "ties", "base": fam["base"], "dtype": "bfloat16",
                           "sources": [{"model": fam["expert1"], "params": {"weight": 0.6, "density": 0.5}},
                                       {"model": fam["expert2"], "params": {"weight": 0.4, "density": 0.7}}]})
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert (out / "recipe.yaml").is_file() and (out / "config.json").is_file()
    model = generate(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    # every output tensor equals the registered kernel applied to the inputs (plumbing check)
    from evomerge.methods import get_method

    ins = [read_all(tmp_path / "f" / n) for n in ("expert1", "expert2")]
    base = read_all(tmp_path / "f" / "base")
    merged = read_all(out)
    assert set(merged) == set(base)
    ties = get_method("ties")
    for name in list(merged)[:6]:
        want = ties([ins[0][name], ins[1][name]], base[name], weight=[0.6, 0.4], density=[0.5, 0.7],
                    **{p.name: p.default for p in ties.global_params()}).to(torch.bfloat16)
        assert torch.equal(merged[name], want), name


def test_linear_gradient_and_filters_match_hand_formula(tmp_path, family):
    recipe = parse_recipe({"method": "linear", "params": {"normalize": False},
                           "sources": [{"model": family["expert1"],
                                        "params": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]},
                                                              {"value": 0.25}]}},
                                       {"model": family["expert2"], "params": {"weight": 0.5}}]})
    _, sd = materialize_state_dict(recipe, dtype="float32")
    a, b = read_all(__import__("pathlib").Path(family["expert1"])), read_all(__import__("pathlib").Path(family["expert2"]))
    n = json.load(open(f"{family['base']}/config.json"))["num_hidden_layers"]
    for name, tensor in sd.items():
        if ".mlp." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            w = layer / (n - 1)  # gradient [0, 1] over layers
        else:
            w = 0.25
        torch.testing.assert_close(tensor, w * a[name].float() + 0.5 * b[name].float(), rtol=1e-6, atol=1e-6)


def test_one_source_weight_one_is_a_copy(tmp_path, family):
    recipe = parse_recipe({"method": "linear", "sources": [{"model": family["expert2"], "params": {"weight": 1.0}}]})
    out = merge_to_disk(recipe, tmp_path / "copy", progress=False)
    src, got = read_all(__import__("pathlib").Path(family["expert2"])), read_all(out)
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)


def test_stack_layer_count_and_layer_types(tmp_path):
    fam = build_tiny_family(tmp_path / "q", arch="qwen2", n_experts=1, num_layers=4)
    recipe = parse_recipe({"kind": "stack", "slices": [{"model": str(fam["base"]), "layers": [0, 3]},
                                                       {"model": str(fam["expert1"]), "layers": [1, 4]}]})
    out = merge_to_disk(recipe, tmp_path / "stack", progress=False, shard_size="200KB")
    cfg = json.load(open(out / "config.json"))
    assert cfg["num_hidden_layers"] == 6 and len(cfg["layer_types"]) == 6
    assert (out / "model.safetensors.index.json").is_file()
    got, e1 = read_all(out), read_all(fam["expert1"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.norm.weight"], e1["model.norm.weight"])
    # the streamed copies (views of reused read buffers until written) equal the in-memory result
    _, want = materialize_state_dict(recipe)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    generate(out)


def test_plan_ops_describe_each_tensor(family):
    """Each planned tensor carries its resolved recipe (the resident path executes only that)."""
    from evomerge.materialize import TensorRef, plan_recipe

    e1, e2, base = family["expert1"], family["expert2"], family["base"]
    recipe = parse_recipe({"method": "dare_ties", "base": base, "base_layers": [1, 3], "seed": 7,
                           "params": {"density": 0.5},
                           "sources": [{"model": e1, "layers": [0, 2], "params": {"weight": [0.0, 1.0]}},
                                       {"model": e2, "layers": [1, 3], "params": {"weight": 0.5}}]})
    plan = plan_recipe(recipe)
    ops = {t.name: t.op for t in plan.tensors}
    op = ops["model.layers.1.mlp.up_proj.weight"]
    assert (op.kind, op.method) == ("merge", "dare_ties")
    assert op.inputs == (TensorRef(e1, "model.layers.1.mlp.up_proj.weight"),
                         TensorRef(e2, "model.layers.2.mlp.up_proj.weight"))
    assert op.base == TensorRef(base, "model.layers.2.mlp.up_proj.weight")
    assert op.source_params["weight"] == [1.0, 0.5] and op.source_params["density"] == [0.5, 0.5]
    assert op.global_params["lambda"] == 1.0 and isinstance(op.seed, int)
    assert op.seed != ops["model.layers.0.mlp.up_proj.weight"].seed

    flow = plan_recipe(parse_recipe({"kind": "dataflow", "embed": base, "head": e1,
                                     "path": [{"model": e2, "layer": 2, "scale": 1.0},
                                              {"model": base, "layer": 0, "scale": 2.0}]}))
    ops = {t.name: t.op for t in flow.tensors}
    assert all(op.kind == "copy" and len(op.inputs) == 1 and op.method is None for op in ops.values())
    assert ops["model.embed_tokens.weight"].inputs == (TensorRef(base, "model.embed_tokens.weight"),)
    assert ops["model.norm.weight"].inputs == (TensorRef(e1, "model.norm.weight"),)
    assert ops["model.layers.0.mlp.up_proj.weight"].inputs == (TensorRef(e2, "model.layers.2.mlp.up_proj.weight"),)
    assert ops["model.layers.1.mlp.up_proj.weight"].inputs == (TensorRef(base, "model.layers.0.mlp.up_proj.weight"),)
    assert {op.scale for op in ops.values()} > {1.0}  # the second layer's scale is folded somewhere


def _reference_logits(model, scales, ids):
    """Forward of an unfolded stack that multiplies each layer's input stream by its scale."""
    hooks = []
    for layer, s in zip(model.model.layers, scales):
        def pre(mod, args, kwargs, s=s):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"] * s
            return args, kwargs
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dataflow_scales_fold_exactly(tmp_path, arch):
    fam = {k: str(v) for k, v in build_tiny_family(tmp_path / "f", arch=arch, n_experts=1, noise=0.2).items()}
    path = [(fam["base"], 0, 1.0), (fam["expert1"], 1, 1.7), (fam["base"], 1, 0.6), (fam["expert1"], 2, 1.3),
            (fam["expert1"], 3, 0.8), (fam["base"], 3, 1.0)]
    steps = [{"model": m, "layer": i, "scale": s} for m, i, s in path]
    folded = merge_to_disk(parse_recipe({"kind": "dataflow", "embed": fam["base"], "head": fam["expert1"],
                                         "path": steps}), tmp_path / "folded", progress=False)
    plain = merge_to_disk(parse_recipe({"kind": "dataflow", "embed": fam["base"], "head": fam["expert1"],
                                        "path": [dict(s, scale=1.0) for s in steps]}), tmp_path / "plain",
                          progress=False)
    ids = torch.randint(0, 30, (2, 12))
    ref = _reference_logits(AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32),
                            [s for _, _, s in path], ids)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(folded, dtype=torch.float32)(ids).logits
        unscaled = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)(ids).logits
    # equal up to float32 rounding and the norms' epsilon
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert (unscaled - ref).abs().max() > 1e-2  # the scales matter, so the check above can fail


def test_incompatible_models_refused_before_writing(tmp_path):
    a = build_tiny_model(tmp_path / "a", arch="llama", hidden_size=64)
    b = build_tiny_model(tmp_path / "b", arch="llama", hidden_size=32, num_attention_heads=4,
                         num_key_value_heads=2)
    recipe = parse_recipe({"method": "linear", "sources": [{"model": str(a), "params": {"weight": 1.0}},
                                                           {"model": str(b), "params": {"weight": 1.0}}]})
    with pytest.raises(IncompatibleModelsError) as info:
        merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert str(b) in str(info.value) or "shape" in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


@pytest.mark.slow
def test_cli_merge_errors_and_overwrite(tmp_path, family, capsys):
    recipe = parse_recipe({"method": "task_arithmetic", "base": family["base"],
                           "sources": [{"model": family["expert1"], "params": {"weight": 1.0}},
                                       {"model": family["expert3"], "params": {"weight": -0.5}}]})
    rfile = dump_recipe(recipe, tmp_path / "r.yaml")
    out = tmp_path / "out"
    assert cli_main(["merge", str(rfile), str(out), "-q"]) == 0
    assert cli_main(["merge", str(rfile), str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["merge", str(rfile), str(out), "-q", "--overwrite", "--dtype", "float16"]) == 0
    assert json.load(open(out / "config.json"))["dtype"] == "float16"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nsources: [{model: nowhere, params: {weight: 1}}]\nextra: 1\n")
    assert cli_main(["merge", str(bad), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "extra" in err and "base" in err
    missing = tmp_path / "m.yaml"
    missing.write_text(f"method: linear\nsources: [{{model: {tmp_path / 'nope'}, params: {{weight: 1}}}}]\n")
    assert cli_main(["merge", str(missing), str(tmp_path / "o3")]) == 2
    # a real process: exit status and message
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(bad), str(tmp_path / "o4")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr
    # a successful merge exits fast (no interpreter teardown) with status 0 and a complete output
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(rfile), str(tmp_path / "o5")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "wrote" in proc.stderr
    _, want = materialize_state_dict(recipe)
    got = read_all(tmp_path / "o5")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_missing_model_is_a_checkpoint_error(tmp_path):
    recipe = parse_recipe({"method": "linear", "sources": [{"model": str(tmp_path / "nope"), "params": {"weight": 1}}]})
    with pytest.raises(CheckpointError):
        merge_to_disk(recipe, tmp_path / "out", progress=False)


def test_merged_config_must_match_merged_tensors(tmp_path, family):
    """check_merged: the written config may not say more layers than the tensors hold."""
    from evomerge.errors import MergeError
    from evomerge.materialize import check_merged, plan_recipe

    recipe = parse_recipe({"method": "linear", "sources": [{"model": family["expert1"], "params": {"weight": 1}}]})
    plan = plan_recipe(recipe)
    check_merged(plan)
    plan.config = {**plan.config, "num_hidden_layers": plan.config["num_hidden_layers"] + 2}
    with pytest.raises(MergeError, match=r"(?s)would not be complete.*num_hidden_layers = \d+, but the tensors hold"):
        check_merged(plan)


def test_non_finite_input_is_named(tmp_path, family):
    """A source already holding NaN: the error names the model and the tensor, nothing is written."""
    import shutil

    from safetensors.torch import save_file

    from evomerge.errors import MergeError

    bad = tmp_path / "nan"
    shutil.copytree(family["expert1"], bad)
    t = read_all(bad)
    t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    recipe = parse_recipe({"method": "linear", "sources": [{"model": str(bad), "params": {"weight": 0.5}},
                                                           {"model": family["expert2"], "params": {"weight": 0.5}}]})
    with pytest.raises(MergeError, match=rf"model {bad}, tensor 'model.layers.1.mlp.down_proj.weight'"):
        merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_merge_to_disk_checks_options_before_any_work(tmp_path, family):
    from evomerge.errors import ConfigError

    recipe = parse_recipe({"method": "linear", "sources": [{"model": family["expert1"], "params": {"weight": 1}}]})
    for kw, word in (({"device": "tpu"}, "device"), ({"dtype": "float8"}, "dtype"), ({"shard_size": "lots"}, "shard")):
        with pytest.raises(ConfigError, match=word):
            merge_to_disk(recipe, tmp_path / "out", progress=False, **kw)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile is a file"):
        merge_to_disk(recipe, tmp_path / "afile" / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_layer_path_step_without_tensors(tmp_path, family):
    """Models handed in unchecked (the search's own cache): a path step on a layer the model's files
    lack is a clear error, not a model with fewer layers than its config says."""
    import shutil

    from safetensors.torch import save_file

    from evomerge.checkpoint import Checkpoint
    from evomerge.materialize import plan_recipe

    short = tmp_path / "short"
    shutil.copytree(family["expert1"], short)
    t = {k: v for k, v in read_all(short).items() if ".layers.3." not in k}
    save_file(t, str(short / "model.safetensors"), metadata={"format": "pt"})
    recipe = parse_recipe({"kind": "dataflow", "embed": str(short),
                           "path": [{"model": str(short), "layer": i} for i in range(4)]})
    with pytest.raises(IncompatibleModelsError, match=r"path\[3\]: .*short has no tensors for layer 3"):
        plan_recipe(recipe, models={str(short): Checkpoint.open(short)})
    with pytest.raises(CheckpointError, match=r"num_hidden_layers = 4, but the tensors hold 3"):
        plan_recipe(recipe)  # opened here: checked against its config first
