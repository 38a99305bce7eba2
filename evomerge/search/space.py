"""Search space YAML -> :class:`SearchSpace` (strict: every problem in the file reported at once).

A search space file::

    name: demo                       # optional (default: the file stem)
    kind: ps                         # ps | dfs | ps_dfs (PS, then DFS over the PS winner)
    seed: 0                          # optimizer seed and merge seed of stochastic methods
    dtype: float32                   # optional dtype of every candidate
    ps:                              # parameter space (kind ps, ps_dfs): see evomerge/search/ps.py
      base: evals/zoo/base           # needed by methods with a base (ties, dare_ties, ...)
      sources: [evals/zoo/a, {name: b, model: evals/zoo/b}]
      method: ties                   # or a list: a categorical choice among methods
      granularity: 2                 # layers per group; must divide the layer count (default: all)
      modules: [self_attn, mlp]      # optional: separate values per module filter (+ "other")
      params:                        # override the registry: {low, high} bounds, or a fixed value
        weight: {low: 0.0, high: 1.0}
        lambda: 1.0
      trials: 40                     # this stage's budget (kind ps_dfs)
    dfs:                             # data-flow space (kind dfs, ps_dfs): see evomerge/search/dfs.py
      models: [evals/zoo/a, {name: ps, model: "@ps"}]   # "@ps": the PS stage's winner (ps_dfs)
      repeats: 2
      embed: a                       # model giving embeddings (name; default the first)
      head: a                        # model giving final norm + head (default: embed)
      scale: {low: 0.5, high: 2.0}   # bounds of the W matrix entries, or false (all scales 1)
      first_layers: 1                # constraints (default 0, 0, none)
      last_layers: 1
      max_depth: 12
      trials: 40
    objectives:                      # one or more; several -> Pareto front
      - {metric: combined}           # a score the evaluator reports (maximize by default)
      - {cost: layers}               # params | layers (minimize by default); optional weight: w
    optimizer: {name: pycma, popsize: 8, sigma0: 0.25, options: {}}  # or tpe, cmaes, nsgaii, ...
    evaluation: {kind: suite, suite: evals/zoo_demo.yaml}           # given to the evaluator factory
    multi_fidelity: {enabled: auto, rungs: [0.25, 1.0], promote: 0.5}
    budget: {trials: 64, timeout: 10m}
    baselines: true                  # first score each source alone and the untuned default

Model references resolve like recipe references: relative paths against the current directory
(``base_dirs`` of :func:`load_space` changes that), and so do the file paths of the ``evaluation:``
mapping (``suite``, ``cache_dir``, ``target``: see :func:`evomerge.evaluate.evaluators.evaluator_path_keys`).
The normalized mapping (``SearchSpace.data``, what a study folder's ``space.yaml`` holds) has every
one of them absolute, so a study works from any directory.

The sections' parsers are in :mod:`evomerge.search.space_sections`, path resolution in
:mod:`evomerge.search.paths`; what a run checks beyond the file (the evaluator, the sampler, the
sources' compatibility) is in :mod:`evomerge.search.checks` (the ``checks`` hook of :func:`load_space`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, Problem
from evomerge.search.dfs import DFSSpace
from evomerge.search.objectives import ModelSize, Objective, model_size
from evomerge.search.paths import PS_WINNER, resolve_evaluation
from evomerge.search.ps import PSSpace
from evomerge.search.space_sections import Checker, parse_dfs, parse_objectives, parse_ps

KINDS = ("ps", "dfs", "ps_dfs")
PYCMA = ("pycma", "cma")
OPTUNA_SAMPLERS = ("tpe", "cmaes", "nsgaii", "nsgaiii", "gp", "random")

_TOP = {"name", "description", "kind", "seed", "dtype", "ps", "dfs", "objectives", "optimizer",
        "evaluation", "multi_fidelity", "budget", "baselines"}
_OPT = {"name", "popsize", "sigma0", "seed", "options"}
_MF = {"enabled", "rungs", "promote"}
_BUDGET = {"trials", "timeout"}


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "pycma"
    popsize: int | None = None
    sigma0: float = 0.25
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pycma(self) -> bool:
        return self.name in PYCMA


@dataclass(frozen=True)
class FidelityConfig:
    enabled: bool | str = "auto"  # True, False or "auto" (on when the search split is large)
    rungs: tuple[float, ...] = (0.25, 1.0)
    promote: float = 0.5
    auto_min_items: int = 400  # "auto" turns on at this many search items in all


@dataclass(frozen=True)
class SearchSpace:
    name: str
    kind: str
    objectives: tuple[Objective, ...]
    optimizer: OptimizerConfig
    evaluation: dict[str, Any]
    ps: PSSpace | None = None
    dfs: DFSSpace | None = None
    multi_fidelity: FidelityConfig = FidelityConfig()
    trials: int | None = None
    timeout: float | None = None
    stage_trials: dict[str, int] = field(default_factory=dict)
    baselines: bool = True
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # the normalized mapping (paths resolved)
    source: str = "<search space>"

    def stages(self) -> list[str]:
        return ["ps", "dfs"] if self.kind == "ps_dfs" else [self.kind]

    def stage_space(self, stage: str) -> PSSpace | DFSSpace:
        return self.ps if stage == "ps" else self.dfs


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds of ``"8h"``, ``"1h30m"``, ``"90s"``, ``"10m"`` or a number of seconds."""
    if text is None or isinstance(text, (int, float)) and not isinstance(text, bool):
        return None if text is None else float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise ConfigError(Problem("timeout", f"cannot read the duration {text!r}",
                                  "write it like 8h, 1h30m, 45m, 90s or a number of seconds"))
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(a) * unit[b] for a, b in parts)


def load_space(path: str | Path, *, sizes: Callable[[str], ModelSize] = model_size,
               base_dirs: list[Path] | None = None,
               checks: Callable[[SpaceParts], list[Problem]] | None = None) -> SearchSpace:
    """Read and validate a search space YAML file (models are opened, headers only).

    ``base_dirs``: where relative paths are looked for, in order (default: the current directory).
    ``checks``: further checks (the evaluator, the sampler, the sources' tensors) whose problems
    are reported together with the file's own."""
    from evomerge.io_utils import load_yaml_file

    path = Path(path)
    data = load_yaml_file(path, "search space file")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return parse_space(data, source=str(path), sizes=sizes, base_dirs=base_dirs, checks=checks)


@dataclass(frozen=True)
class SpaceParts:
    """What :func:`parse_space` could parse, for the ``checks`` hook (None: that part is invalid)."""

    source: str
    kind: str
    objectives: list[Objective]
    optimizer: OptimizerConfig | None
    evaluation: dict[str, Any] | None
    ps: PSSpace | None
    dfs: DFSSpace | None
    complete: bool  # the file itself had no problem

    def stage_spaces(self) -> dict[str, PSSpace | DFSSpace]:
        out: dict[str, PSSpace | DFSSpace] = {}
        if self.ps is not None:
            out["ps"] = self.ps
        if self.dfs is not None:
            out["dfs"] = self.dfs
        return out


@dataclass(frozen=True)
class SpaceSummary:
    """The parts of a study's space that reading a study needs (no model is opened)."""

    name: str
    kind: str
    objectives: tuple[Objective, ...]
    evaluation: dict[str, Any]
    source: str


def load_space_summary(path: str | Path, *, base_dirs: list[Path] | None = None) -> SpaceSummary:
    """Name, kind, objectives and evaluation of a search space file, checked, without opening models
    (``status``, ``report`` and ``export`` work while a source model is missing or moved)."""
    from evomerge.io_utils import load_yaml_file

    path = Path(path)
    data = load_yaml_file(path, "search space file")
    source = str(path)
    if not isinstance(data, dict):
        raise ConfigError(Problem(source, f"a search space must be a mapping, got {type(data).__name__}"),
                          source=source)
    c = Checker(source)
    objectives = parse_objectives(c, data.get("objectives"))
    evaluation = data.get("evaluation")
    if not isinstance(evaluation, dict):
        c.add("evaluation", f"expected a mapping, got {evaluation!r}")
        evaluation = {}
    if c.problems:
        raise ConfigError(c.problems, source=source)
    return SpaceSummary(name=str(data.get("name") or path.stem), kind=str(data.get("kind", "ps")),
                        objectives=tuple(objectives), evaluation=resolve_evaluation(evaluation, base_dirs),
                        source=source)


def parse_space(data: Any, *, source: str = "<search space>",
                sizes: Callable[[str], ModelSize] = model_size, base_dirs: list[Path] | None = None,
                checks: Callable[[SpaceParts], list[Problem]] | None = None) -> SearchSpace:
    """Validate a search-space mapping; raises :class:`ConfigError` listing every problem (those of
    the ``checks`` hook, when given, included: see :func:`load_space`)."""
    c = Checker(source, base_dirs)
    if not isinstance(data, dict):
        raise ConfigError(Problem(source, f"a search space must be a mapping, got {type(data).__name__}"),
                          source=source)
    data = dict(data)
    c.mapping(data, "", _TOP)
    name_ = data.get("name", "study")
    if isinstance(name_, (int, float)) and not isinstance(name_, bool):
        name_ = str(name_)
    if not isinstance(name_, str) or not name_.strip() or "/" in name_ or "\\" in name_ or name_ in (".", ".."):
        c.add("name", f"expected a study name without '/' (it names the Optuna study and the default "
              f"folder results/<name>), got {name_!r}", "e.g. name: my-search")
        name_ = "study"
    data["name"] = name_
    kind = data.get("kind", "ps")
    if not isinstance(kind, str) or kind not in KINDS:
        c.add("kind", f"unknown kind {kind!r}", f"use one of {', '.join(KINDS)}")
        kind = str(kind)
    seed = c.integer(data.get("seed", 0), "seed") or 0
    dtype = data.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        c.add("dtype", f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16")
    objectives = parse_objectives(c, data.get("objectives"))
    opt = c.mapping(data.get("optimizer", {}), "optimizer", _OPT)
    name = str(opt.get("name", "pycma")).lower()
    if name not in PYCMA + OPTUNA_SAMPLERS:
        c.add("optimizer.name", f"unknown optimizer {name!r}", f"use one of {', '.join(PYCMA + OPTUNA_SAMPLERS)}")
    sigma0 = c.number(opt.get("sigma0", 0.25), "optimizer.sigma0") or 0.25
    if not 0 < sigma0 <= 1:
        c.add("optimizer.sigma0", f"sigma0 {sigma0} is outside (0, 1]",
              "sigma0 is in unit-cube coordinates (every dimension scaled to [0, 1])")
    options = opt.get("options") or {}
    if not isinstance(options, dict):
        c.add("optimizer.options", f"expected a mapping, got {options!r}")
        options = {}
    optimizer = OptimizerConfig(name=name, popsize=c.integer(opt.get("popsize"), "optimizer.popsize", low=2),
                                sigma0=sigma0, seed=c.integer(opt.get("seed", seed), "optimizer.seed") or 0,
                                options=dict(options))
    multi = len(objectives) > 1 and not all(o.weight is not None for o in objectives)
    if multi and optimizer.is_pycma:
        c.add("optimizer.name", "pycma CMA-ES optimizes one value; got several unweighted objectives",
              "set `weight:` on every objective, or use nsgaii / tpe for a Pareto front")
    if multi and name == "cmaes":
        c.add("optimizer.name", "Optuna's CmaEsSampler does not support multi-objective studies",
              "use nsgaii, nsgaiii, tpe or gp, or set `weight:` on every objective")
    mf = c.mapping(data.get("multi_fidelity", {}), "multi_fidelity", _MF)
    enabled = mf.get("enabled", "auto")
    if enabled not in (True, False, "auto"):
        c.add("multi_fidelity.enabled", f"expected true, false or auto, got {enabled!r}")
    rungs = mf.get("rungs", [0.25, 1.0])
    if (not isinstance(rungs, list) or not rungs or any(isinstance(r, bool) or not isinstance(r, (int, float))
                                                         for r in rungs)
            or any(not 0 < r <= 1 for r in rungs) or sorted(set(rungs)) != list(rungs) or rungs[-1] != 1):
        c.add("multi_fidelity.rungs", f"expected increasing fractions in (0, 1] ending with 1, got {rungs!r}")
        rungs = [1.0]
    promote = c.number(mf.get("promote", 0.5), "multi_fidelity.promote") or 0.5
    if not 0 < promote <= 1:
        c.add("multi_fidelity.promote", f"expected a fraction in (0, 1], got {promote}")
    fidelity = FidelityConfig(enabled=enabled, rungs=tuple(float(r) for r in rungs), promote=promote)
    budget = c.mapping(data.get("budget", {}), "budget", _BUDGET)
    trials = c.integer(budget.get("trials"), "budget.trials", low=1)
    try:
        timeout = parse_duration(budget.get("timeout"))
    except ConfigError as err:
        c.add("budget.timeout", err.problems[0].message, err.problems[0].hint)
        timeout = None
    if timeout is not None and not timeout > 0:
        c.add("budget.timeout", f"expected a positive duration, got {budget.get('timeout')!r}",
              "e.g. 8h, 45m; leave it out for no time limit")
        timeout = None
    evaluation = data.get("evaluation")
    evaluation_ok = isinstance(evaluation, dict)
    if not evaluation_ok:
        c.add("evaluation", f"expected a mapping (e.g. {{kind: suite, suite: path}}), got {evaluation!r}")
        evaluation = {}
    elif not isinstance(evaluation.get("kind", ""), str):
        c.add("evaluation.kind", f"expected an evaluator kind name, got {evaluation['kind']!r}")
        evaluation_ok = False
    else:
        evaluation = resolve_evaluation(evaluation, base_dirs)
    baselines = data.get("baselines", True)
    if not isinstance(baselines, bool):
        c.add("baselines", f"expected true or false, got {baselines!r}")
    ps = dfs = None
    stage_trials = {}
    if kind in ("ps", "ps_dfs"):
        if not isinstance(data.get("ps"), dict):
            c.add("ps", f"kind {kind} needs a `ps:` section")
        else:
            ps, sizes_ps = parse_ps(c, data["ps"], seed, dtype, sizes)
            if data["ps"].get("trials") is not None:
                stage_trials["ps"] = c.integer(data["ps"]["trials"], "ps.trials", low=1) or 1
    if kind in ("dfs", "ps_dfs"):
        if not isinstance(data.get("dfs"), dict):
            c.add("dfs", f"kind {kind} needs a `dfs:` section")
        else:
            ps_size = None
            if kind == "ps_dfs" and ps is not None:
                ps_size = sizes_ps[-1]
            elif kind == "ps_dfs":
                ps_size = ModelSize(PS_WINNER, "?", 1, (0,), 0)  # PS section invalid: check the rest
            dfs = parse_dfs(c, data["dfs"], dtype, sizes, ps_size)
            if data["dfs"].get("trials") is not None:
                stage_trials["dfs"] = c.integer(data["dfs"]["trials"], "dfs.trials", low=1) or 1
    for other in ({"ps", "dfs"} - set(kind.split("_"))) if kind in KINDS else ():
        if other in data:
            c.add(other, f"a `{other}:` section is not used by kind {kind}", "remove it or change kind")
    if checks is not None:
        parts = SpaceParts(source=source, kind=kind, objectives=list(objectives), optimizer=optimizer,
                           evaluation=evaluation if evaluation_ok else None, ps=ps, dfs=dfs,
                           complete=not c.problems)
        c.problems += checks(parts)
    if c.problems:
        raise ConfigError(c.problems, source=source)
    normalized = dict(data)
    normalized["evaluation"] = dict(evaluation)
    for sec, space, key in (("ps", ps, "sources"), ("dfs", dfs, "models")):
        if space is not None:
            section = dict(normalized[sec])
            section[key] = [{"name": n, "model": r} for n, r in (space.sources if sec == "ps" else space.models)]
            if sec == "ps" and space.base:
                section["base"] = space.base
            normalized[sec] = section
    return SearchSpace(name=name_, kind=kind, objectives=tuple(objectives),
                       optimizer=optimizer, evaluation=dict(evaluation), ps=ps, dfs=dfs,
                       multi_fidelity=fidelity, trials=trials, timeout=timeout, stage_trials=stage_trials,
                       baselines=bool(baselines), seed=seed, data=normalized, source=source)
