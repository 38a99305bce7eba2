"""Optuna's joint samplers model the stage's parameters although the baselines (a source alone has
no parameters) are completed trials of the same study."""

from __future__ import annotations

import pytest
from test_search_support import family, ps_space, target_model, write_space

from evomerge.search import start_search
from evomerge.search.report import open_study


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler_world")
    fam = family(root / "fam")
    return fam, target_model(fam, root / "target")


def test_optuna_cmaes_samples_jointly_from_the_untuned_point(tmp_path, world):
    fam, target = world
    space = ps_space(fam, target, optimizer={"name": "cmaes", "seed": 0, "sigma0": 0.1},
                     budget={"trials": 6}, baselines=True)
    start_search(write_space(tmp_path / "s.yaml", space), tmp_path / "study", progress=False, report=False)
    _, _, studies = open_study(tmp_path / "study")
    trials = studies["ps"].get_trials()
    assert any(t.user_attrs.get("label", "").startswith("source") and not t.params for t in trials)
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    assert len(search) == 6
    # every search trial was proposed by CMA-ES (its generation recorded), the first included
    assert all(any("generation" in k for k in t.system_attrs) for t in search)
    # x0 is the untuned point (every weight 1.0 in [0, 1]): sigma 0.1 keeps the first proposals near it
    first = search[0].params
    assert all(v > 0.6 for k, v in first.items() if k.startswith("weight"))
