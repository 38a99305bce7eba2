"""Optimizers: pycma CMA-ES (ask/tell, state kept in the study) and Optuna samplers by name.

**pycma.** Every dimension is scaled to ``[0, 1]`` (see :mod:`evomerge.search.dims`), so ``sigma0``
is a fraction of each range and the bounds are ``[0, 1]``. ``x0`` is the untuned point. pycma draws
its samples from a private ``numpy.random.RandomState(seed)`` (option ``randn``) instead of numpy's
global generator, so nothing else in the process can change its proposals. After every told
generation the pickled ``CMAEvolutionStrategy`` (random state included) is stored base64-encoded in
the study's system attribute ``evomerge:cma_state``. So a run killed at any moment and resumed asks
exactly the generation an uninterrupted run would have asked: with a fixed seed, the very same
candidates.

**Optuna samplers** by name: ``tpe``, ``cmaes`` (Optuna's CmaEsSampler, needs the ``cmaes`` package,
single objective only; it starts at the untuned point, like pycma, with ``sigma0`` of the box), ``nsgaii``, ``nsgaiii``, ``gp``, ``random``. ``optimizer.options`` are passed
as keyword arguments to the sampler's constructor (``popsize`` maps to ``population_size`` /
``popsize``). Their state is derived from the storage; on resume they are reseeded with
``seed + finished trials`` so they do not repeat their first proposals.
"""

from __future__ import annotations

import base64
import inspect
import pickle
from typing import Any

import numpy as np
import optuna

from evomerge.errors import ConfigError, Problem
from evomerge.search.space import OptimizerConfig
from evomerge.search.study import get_attr, set_attr

CMA_STATE = "cma_state"
_QUIET = {"verb_log": 0, "verbose": -9, "verb_disp": 0}


def pycma_option_problem(cfg: OptimizerConfig, where: str) -> Problem | None:
    """The problem of ``optimizer.options`` naming options pycma does not know (located at ``where``)."""
    import cma

    bad = [k for k in cfg.options if k not in cma.CMAOptions()]
    if not bad:
        return None
    return Problem(where, f"unknown pycma option(s): {', '.join(map(str, bad))}",
                   "see `python -c 'import cma; print(cma.CMAOptions())'`")


def pycma_options(cfg: OptimizerConfig) -> dict[str, Any]:
    """The options a :class:`cma.CMAEvolutionStrategy` of ``cfg`` is built with."""
    # a private RandomState (pickled with the strategy), not numpy's global one: nothing else
    # drawing random numbers can change the proposals, and a resumed run continues the stream
    rng = np.random.RandomState(cfg.seed)
    opts = {**cfg.options, "bounds": [0.0, 1.0], "seed": float("nan"), "randn": rng.randn, **_QUIET}
    if cfg.popsize:
        opts["popsize"] = cfg.popsize
    return opts


class PyCMA:
    """pycma ask/tell over the unit cube, persisted in the study after every ``tell``."""

    def __init__(self, study: optuna.Study, n_dims: int, cfg: OptimizerConfig, x0: list[float]):
        import cma

        self.study = study
        state = get_attr(study, CMA_STATE)
        if state is not None:
            self.es, self.generation = _load(state)
            if self.es.N != n_dims:
                raise ConfigError(Problem("optimizer", f"the stored CMA-ES state has {self.es.N} dimensions, "
                                          f"the search space {n_dims}", "resume with the study's own space.yaml"))
            return
        problem = pycma_option_problem(cfg, "optimizer.options")
        if problem is not None:
            raise ConfigError(problem)
        opts = pycma_options(cfg)
        if n_dims < 2:
            raise ConfigError(Problem("optimizer.name", f"pycma needs at least 2 search dimensions, the space has "
                                      f"{n_dims}", "search more parameters, or use tpe / random"))
        self.es = cma.CMAEvolutionStrategy(list(x0), cfg.sigma0, opts)
        self.generation = 0
        self._save()

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    def ask(self) -> tuple[int, list[list[float]]]:
        """``(generation number, candidates)``; the same answer every time until :meth:`tell`."""
        xs = self.es.ask()
        return self.generation + 1, [list(map(float, x)) for x in xs]

    def tell(self, generation: int, xs: list[list[float]], fitness: list[float]) -> None:
        """Tell a generation's fitness (minimized) and store the new state."""
        if generation != self.generation + 1:
            raise RuntimeError(f"told generation {generation}, expected {self.generation + 1}")
        self.es.tell([np.asarray(x) for x in xs], list(fitness))
        self.generation = generation
        self._save()

    def stop(self) -> dict[str, Any]:
        return dict(self.es.stop())

    def _save(self) -> None:
        blob = base64.b64encode(pickle.dumps((self.es, self.generation))).decode("ascii")
        set_attr(self.study, CMA_STATE, blob)


def fixed_space(cls: type, space: dict[str, optuna.distributions.BaseDistribution]) -> type:
    """``cls`` whose joint ("relative") search space is the stage's own ``space``.

    Optuna's CMA-ES, GP and NSGA samplers model together the parameters every completed trial shares
    (the intersection of their distributions). A stage's baselines are completed trials too, and a
    source scored alone has no parameters: the intersection is empty and every parameter falls back
    to independent random sampling. The stage's space is known beforehand, so the sampler is given it
    (CMA-ES keeps its numeric dimensions, as it does itself); trials outside it still do not enter the
    samplers' models (CMA-ES and NSGA use only the trials they proposed)."""
    from optuna.distributions import FloatDistribution, IntDistribution

    numeric_only = issubclass(cls, optuna.samplers.CmaEsSampler)

    def infer_relative_search_space(self, study, trial):
        return {name: d for name, d in space.items()
                if not d.single() and (not numeric_only or isinstance(d, (FloatDistribution, IntDistribution)))}

    return type(cls.__name__, (cls,), {"infer_relative_search_space": infer_relative_search_space,
                                       "__module__": __name__, "__doc__": cls.__doc__})


def _load(blob: str):
    return pickle.loads(base64.b64decode(blob.encode("ascii")))


def make_sampler(cfg: OptimizerConfig, *, n_objectives: int, seed_offset: int = 0,
                 x0: dict[str, Any] | None = None,
                 search_space: dict[str, optuna.distributions.BaseDistribution] | None = None
                 ) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``cfg.name`` asks for (for pycma: a random sampler that only stores trials).
    ``x0``: the untuned point, where Optuna's CMA-ES starts (its numeric dimensions; without it the
    sampler starts at the middle of the box). ``search_space``: the stage's distributions, the joint
    space of the samplers that model parameters together (see :func:`fixed_space`)."""
    seed = cfg.seed + seed_offset
    s = optuna.samplers
    if cfg.name in ("pycma", "cma"):
        return s.RandomSampler(seed=seed)
    if cfg.name == "cmaes":
        if n_objectives > 1:
            raise ConfigError(Problem("optimizer.name", "Optuna's CmaEsSampler does not support "
                                      "multi-objective studies", "use nsgaii, tpe or gp, or weight the objectives"))
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(Problem("optimizer.name", "sampler 'cmaes' needs the `cmaes` package",
                                      "pip install cmaes, or use optimizer name pycma")) from None
    classes = {"tpe": s.TPESampler, "cmaes": s.CmaEsSampler, "nsgaii": s.NSGAIISampler,
               "nsgaiii": s.NSGAIIISampler, "gp": s.GPSampler, "random": s.RandomSampler}
    cls = classes[cfg.name]
    if search_space is not None and cfg.name in ("cmaes", "gp", "nsgaii", "nsgaiii"):
        cls = fixed_space(cls, search_space)
    kwargs: dict[str, Any] = {"seed": seed}
    sig = inspect.signature(cls)
    if cfg.popsize:
        for key in ("population_size", "popsize"):
            if key in sig.parameters:
                kwargs[key] = cfg.popsize
    if cfg.name == "cmaes":
        kwargs.setdefault("sigma0", cfg.sigma0)
        numeric = {k: v for k, v in (x0 or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            kwargs["x0"] = numeric
    kwargs.update(cfg.options)
    bad = [k for k in kwargs if k not in sig.parameters]
    if bad:
        allowed = ", ".join(p for p in sig.parameters if p != "seed")
        raise ConfigError(Problem("optimizer.options", f"{cls.__name__} has no option(s) {', '.join(bad)}",
                                  f"known options: {allowed}"))
    try:
        import warnings

        with warnings.catch_warnings():  # NSGAIIISampler, GPSampler: "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(Problem("optimizer.options", f"{cls.__name__}: {err}")) from None
