"""Optimizers: pycma state persistence in a real SQLite study, and Optuna samplers by name."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from evomerge.errors import ConfigError
from evomerge.search.optimizers import PyCMA, make_sampler
from evomerge.search.space import OptimizerConfig


def sphere(x, opt=(0.2, 0.7, 0.4)):
    return float(sum((a - b) ** 2 for a, b in zip(x, opt)))


_STORAGES: dict = {}


def make_study(folder, name="s"):
    """The study ``name`` in ``folder``'s SQLite file, through one storage object per file (a reload
    reads the state back from the database, as a new process would)."""
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'cma.db'}"
    storage = _STORAGES.setdefault(url, optuna.storages.RDBStorage(url))
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True)


def proposals(cma: PyCMA, generations: int, *, reload=None, noise=False):
    out = []
    for _ in range(generations):
        if reload is not None:
            cma = reload()  # a fresh process would rebuild it from the storage
        if noise:
            np.random.seed(len(out))  # other code drawing from numpy's global generator
            np.random.rand(17)
        gen, xs = cma.ask()
        out.append((gen, [list(x) for x in xs]))
        cma.tell(gen, xs, [sphere(x) for x in xs])
    return out, cma


def test_pycma_state_in_the_study_reproduces_an_uninterrupted_run(tmp_path):
    cfg = OptimizerConfig(name="pycma", popsize=5, sigma0=0.3, seed=11)
    x0 = [0.5, 0.5, 0.5]
    straight, cma = proposals(PyCMA(make_study(tmp_path / "a"), 3, cfg, x0), 20, noise=True)
    assert sphere(cma.es.result.xbest) < 1e-3  # it optimizes
    # rebuilt from the storage before every generation, with numpy's global generator disturbed
    reload = lambda: PyCMA(make_study(tmp_path / "b"), 3, cfg, x0)  # noqa: E731
    reloaded, _ = proposals(reload(), 20, noise=True, reload=reload)
    assert reloaded == straight
    other, _ = proposals(PyCMA(make_study(tmp_path / "c"), 3, OptimizerConfig(popsize=5, sigma0=0.3, seed=12), x0), 1)
    assert other[0] != straight[0]  # the seed matters


def test_pycma_refuses_unknown_options_and_a_wrong_dimension(tmp_path):
    with pytest.raises(ConfigError, match="unknown pycma option"):
        PyCMA(make_study(tmp_path), 3, OptimizerConfig(options={"popsise": 4}), [0.5] * 3)
    PyCMA(make_study(tmp_path, "t"), 3, OptimizerConfig(), [0.5] * 3)
    with pytest.raises(ConfigError, match="3 dimensions"):
        PyCMA(make_study(tmp_path, "t"), 4, OptimizerConfig(), [0.5] * 4)


@pytest.mark.parametrize("name,cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("nsgaii", "NSGAIISampler"),
                                      ("nsgaiii", "NSGAIIISampler"), ("gp", "GPSampler")])
def test_optuna_samplers_by_name(name, cls):
    s = make_sampler(OptimizerConfig(name=name, popsize=6), n_objectives=2 if name.startswith("nsga") else 1)
    assert type(s).__name__ == cls


def test_sampler_options_are_checked():
    s = make_sampler(OptimizerConfig(name="tpe", options={"n_startup_trials": 3}), n_objectives=1)
    assert type(s).__name__ == "TPESampler"
    with pytest.raises(ConfigError, match="TPESampler has no option"):
        make_sampler(OptimizerConfig(name="tpe", options={"n_startups": 3}), n_objectives=1)
    with pytest.raises(ConfigError, match="does not support multi-objective"):
        make_sampler(OptimizerConfig(name="cmaes"), n_objectives=2)
