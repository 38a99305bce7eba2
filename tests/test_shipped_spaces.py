"""Every shipped search space against the shipped demo zoo: checked as a run checks it (file,
evaluator, sampler, sources), its untuned point and random points decode, and the layer-wise
values of control-point spaces interpolate as documented."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evomerge.recipe import resolve_param
from evomerge.search import dims as D
from evomerge.search.checks import check_space

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped spaces name the zoo relative to the repository root


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_passes_every_check_and_decodes(path):
    space, probe = check_space(path)
    assert space.name == path.stem
    metrics = set(probe.metric_names())
    assert all(o.key in metrics for o in space.objectives if o.kind == "metric")
    rng = random.Random(0)
    for stage in space.stages():
        sp = space.stage_space(stage)
        if stage == "dfs" and space.kind == "ps_dfs":
            continue  # its models include the PS winner, merged when the stage starts
        dims = sp.dims()
        default = sp.default_params()
        assert set(default) == {d.name for d in dims}
        for d in dims:  # the untuned point lies inside the box
            v = default[d.name]
            assert v in d.choices if d.kind == "categorical" else d.low <= v <= d.high
        sp.decode(default)
        for _ in range(3):
            sp.decode(D.decode(dims, [rng.random() for _ in dims]))


def test_control_points_interpolate_across_layers():
    path = REPO / "search_spaces" / "compose.yaml"
    space, _ = check_space(path)
    ps = space.ps
    assert ps.control_points and ps.control_points >= 2
    k, n = ps.control_points, ps.num_layers
    names = [d.name for d in ps.dims()]
    for src, _ in ps.sources:
        assert [f"weight.{src}.c{j}" for j in range(k)] == [x for x in names if x.startswith(f"weight.{src}.")]
    params = ps.default_params()
    vals = {f"weight.{src}.c{j}": 0.1 * (j + 1) + 0.5 * i for i, (src, _) in enumerate(ps.sources) for j in range(k)}
    params.update(vals)
    recipe = ps.decode(params)
    for i, (src, _) in enumerate(ps.sources):
        w = recipe.sources[i].params["weight"]
        assert w == pytest.approx([vals[f"weight.{src}.c{j}"] for j in range(k)])
        for layer in range(n):  # layer t = layer / (n - 1) between the two points around it
            t = layer / (n - 1)
            pos = t * (k - 1)
            lo = min(int(pos), k - 2)
            frac = pos - lo
            want = (1 - frac) * w[lo] + frac * w[lo + 1]
            got = resolve_param(w, f"model.layers.{layer}.mlp.up_proj.weight", t)
            assert got == pytest.approx(want, abs=1e-12)


def test_the_compositional_space_optimizes_compose():
    space, _ = check_space(REPO / "search_spaces" / "compose.yaml")
    assert [o.key for o in space.objectives] == ["compose"]
    assert {Path(ref).name for _, ref in space.ps.sources} == {"expert_arith", "expert_cipher"}
