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
      control_points: 3              # or: float values at 3 points, interpolated across layers
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
    multi_fidelity: {enabled: auto, rungs: [0.25, 1.0], promote: 0.5}   # estimator: anchors | irt, anchors: 24
    budget: {trials: 64, timeout: 10m}
    baselines: true                  # first score each source alone and the untuned default
    # or, with ensembles scored beside the merges (models: source names, base, or model folders):
    # baselines: {merges: true, fusion: [{method: logit}, {method: panel, judge: base}]}
    selection: {top_k: 5}            # re-scored on the validation sample to name the winner

Model references resolve like recipe references: relative paths against the current directory
(``base_dirs`` of :func:`load_space` changes that), and so do the file paths of the ``evaluation:``
mapping (``suite``, ``cache_dir``, ``target``: see :func:`evomerge.evaluate.evaluators.evaluator_path_keys`).
The normalized mapping (``SearchSpace.data``, what a study folder's ``space.yaml`` holds) has every
one of them absolute, so a study works from any directory.

The file's format (every key, type, range and default) is the model in
:mod:`evomerge.search.space_file`; what the sections mean beyond their format (the method registry,
the models' headers) is checked in :mod:`evomerge.search.space_sections`, path resolution is in
:mod:`evomerge.search.paths`; what a run checks beyond the file (the evaluator, the sampler, the
sources' compatibility) is in :mod:`evomerge.search.checks` (the ``checks`` hook of :func:`load_space`).
Every problem names the file, the key and, for a file, the key's line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, Problem
from evomerge.search.dfs import DFSSpace
from evomerge.search.objectives import ModelSize, Objective, model_size
from evomerge.search.paths import PS_WINNER, resolve_evaluation, resolve_ref
from evomerge.search.ps import PSSpace
from evomerge.search.space_file import KINDS, OPTUNA_SAMPLERS, PYCMA, SpaceFile, parse_duration
from evomerge.search.space_sections import Findings, parse_dfs, parse_objectives, parse_ps
from evomerge.strict import Lines, locate, validate_all

__all__ = ["KINDS", "OPTUNA_SAMPLERS", "PYCMA", "FidelityConfig", "OptimizerConfig", "SearchSpace", "SpaceParts",
           "SpaceSummary", "load_space", "load_space_summary", "parse_duration", "parse_space"]


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
    estimator: str | None = None  # "anchors" | "irt": the first rung predicts from anchors (evomerge.search.estimator)
    anchors: int = 24
    reference: int = 16


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
    baselines: bool = True  # the untuned default and each source alone
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # the normalized mapping (paths resolved)
    source: str = "<search space>"
    selection: Any = None  # the ``selection:`` section (top_k); None: the defaults
    fusion_baselines: tuple = ()  # FusionRecipe of ``baselines: {fusion: [...]}`` (evomerge.fusion.study)

    def stages(self) -> list[str]:
        return ["ps", "dfs"] if self.kind == "ps_dfs" else [self.kind]

    def stage_space(self, stage: str) -> PSSpace | DFSSpace:
        return self.ps if stage == "ps" else self.dfs


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


def load_space(path: str | Path, *, sizes: Callable[[str], ModelSize] = model_size,
               base_dirs: list[Path] | None = None,
               checks: Callable[[SpaceParts], list[Problem]] | None = None) -> SearchSpace:
    """Read and validate a search space YAML file (models are opened, headers only).

    ``base_dirs``: where relative paths are looked for, in order (default: the current directory).
    ``checks``: further checks (the evaluator, the sampler, the sources' tensors) whose problems
    are reported together with the file's own."""
    data, lines, source = _read(path)
    return parse_space(data, source=source, sizes=sizes, base_dirs=base_dirs, checks=checks, lines=lines)


def _read(path: str | Path) -> tuple[Any, Lines, str]:
    from evomerge.io_utils import load_yaml_document

    path = Path(path)
    data, lines, _ = load_yaml_document(path, "search space file")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return data, lines, str(path)


def _validated(data: Any, source: str) -> tuple[SpaceFile | None, list[Problem]]:
    if not isinstance(data, dict):
        raise ConfigError(Problem(source, f"a search space must be a mapping, got {type(data).__name__}"),
                          source=source)
    return validate_all(SpaceFile, data, source=source)


def load_space_summary(path: str | Path, *, base_dirs: list[Path] | None = None) -> SpaceSummary:
    """Name, kind, objectives and evaluation of a search space file, checked, without opening models
    (``status``, ``report`` and ``export`` work while a source model is missing or moved)."""
    data, lines, source = _read(path)
    model, problems = _validated(data, source)
    found = Findings(source, base_dirs, problems)
    objectives = parse_objectives(found, model.objectives) if model is not None else []
    evaluation = _evaluation(found, data.get("evaluation"), base_dirs)
    if found.problems:
        raise ConfigError(locate(found.problems, source, lines), source=source)
    return SpaceSummary(name=model.name, kind=model.kind, objectives=tuple(objectives),
                        evaluation=evaluation or {}, source=source)


def _evaluation(found: Findings, evaluation: Any, base_dirs: list[Path] | None) -> dict[str, Any] | None:
    """The ``evaluation:`` mapping with its paths resolved (None when it is not one); the evaluator
    checks its own keys (see :mod:`evomerge.search.checks`)."""
    if not isinstance(evaluation, dict):
        found.add("evaluation", f"expected a mapping (e.g. {{kind: suite, suite: path}}), got {evaluation!r}",
                  "say how candidates are scored: {kind: suite, suite: evals/zoo_demo.yaml}")
        return None
    if not isinstance(evaluation.get("kind", ""), str):
        found.add("evaluation.kind", f"expected an evaluator kind name, got {evaluation['kind']!r}",
                  "e.g. kind: suite")
        return None
    return resolve_evaluation(evaluation, base_dirs)


def parse_space(data: Any, *, source: str = "<search space>",
                sizes: Callable[[str], ModelSize] = model_size, base_dirs: list[Path] | None = None,
                checks: Callable[[SpaceParts], list[Problem]] | None = None,
                lines: Lines | None = None) -> SearchSpace:
    """Validate a search-space mapping; raises :class:`ConfigError` listing every problem (those of
    the ``checks`` hook, when given, included: see :func:`load_space`). ``lines``: where each key
    is in the file (see :func:`evomerge.io_utils.yaml_key_lines`), to name the lines."""
    model, problems = _validated(data, source)
    if model is None:
        raise ConfigError(locate(problems, source, lines), source=source)
    found = Findings(source, base_dirs, problems)
    broken = [p.where[len(source) + 2:] for p in problems]

    def intact(key: str) -> bool:
        """No problem of the file's format at ``key``, inside it or around it."""
        return not any(b == key or b.startswith(key + ".") or b.startswith(key + "[") or key.startswith(b + ".")
                       for b in broken)

    kind, seed, dtype = model.kind, model.seed, model.dtype
    objectives = parse_objectives(found, model.objectives) if intact("objectives") else []
    opt = model.optimizer
    optimizer = OptimizerConfig(name=opt.name, popsize=opt.popsize, sigma0=float(opt.sigma0),
                                seed=opt.seed if opt.seed is not None else seed, options=dict(opt.options))
    if intact("optimizer.name"):
        multi = _several_unweighted(data.get("objectives"))
        if multi and optimizer.is_pycma:
            found.add("optimizer.name", "pycma CMA-ES optimizes one value; got several unweighted objectives",
                      "set `weight:` on every objective, or use nsgaii / tpe for a Pareto front")
        if multi and optimizer.name == "cmaes":
            found.add("optimizer.name", "Optuna's CmaEsSampler does not support multi-objective studies",
                      "use nsgaii, nsgaiii, tpe or gp, or set `weight:` on every objective")
    mf = model.multi_fidelity
    fidelity = FidelityConfig(enabled=mf.enabled, rungs=tuple(mf.rungs), promote=mf.promote, estimator=mf.estimator,
                              anchors=mf.anchors, reference=mf.reference)
    evaluation = _evaluation(found, data.get("evaluation"), base_dirs)
    ps = dfs = None
    stage_trials: dict[str, int] = {}
    uses = set(kind.split("_")) if intact("kind") else set()
    for section in ("ps", "dfs"):
        if section in uses and data.get(section) is None:
            found.add(section, f"kind {kind} needs a `{section}:` section")
        elif section not in uses and section in data and intact("kind"):
            found.add(section, f"a `{section}:` section is not used by kind {kind}", "remove it or change kind")
    ps_sizes: list[ModelSize] = []
    if "ps" in uses and model.ps is not None:
        ps, ps_sizes = parse_ps(found, model.ps, seed, dtype if intact("dtype") else None, sizes)
        if model.ps.trials is not None:
            stage_trials["ps"] = model.ps.trials
    if "dfs" in uses and model.dfs is not None:
        ps_size = None
        if kind == "ps_dfs":  # the PS winner has the sources' shape (PS section invalid: check the rest)
            ps_size = ps_sizes[-1] if ps is not None else ModelSize(PS_WINNER, "?", 1, (0,), 0)
        dfs = parse_dfs(found, model.dfs, dtype if intact("dtype") else None, sizes, ps_size)
        if model.dfs.trials is not None:
            stage_trials["dfs"] = model.dfs.trials
    merges, fused = _baselines(found, model.baselines, ps, dfs, evaluation) if intact("baselines") else (True, ())
    if checks is not None:
        parts = SpaceParts(source=source, kind=kind, objectives=list(objectives), optimizer=optimizer,
                           evaluation=evaluation, ps=ps, dfs=dfs, complete=not found.problems)
        found.problems += checks(parts)
    if found.problems:
        raise ConfigError(locate(found.problems, source, lines), source=source)
    return SearchSpace(name=model.name, kind=kind, objectives=tuple(objectives), optimizer=optimizer,
                       evaluation=dict(evaluation), ps=ps, dfs=dfs, multi_fidelity=fidelity,
                       trials=model.budget.trials, timeout=model.budget.timeout, stage_trials=stage_trials,
                       baselines=merges, seed=seed, data=_normalized(data, model.name, evaluation, ps, dfs, fused),
                       source=source, selection=model.selection, fusion_baselines=fused)


FUSION_EVALUATORS = ("suite", "lmeval")


def _baselines(found: Findings, raw: Any, ps: PSSpace | None, dfs: DFSSpace | None,
               evaluation: dict[str, Any] | None) -> tuple[bool, tuple]:
    """(merge baselines on, fusion baselines) of ``baselines:``; a fusion entry's models name the
    stage's sources (``base`` included) or model folders."""
    if isinstance(raw, bool):
        return raw, ()
    from evomerge.fusion.study import parse_baselines

    if ps is not None:
        sources = list(ps.sources) + ([("base", ps.base)] if ps.base else [])
    elif dfs is not None:
        sources = [(n, r) for n, r in dfs.models if r != PS_WINNER]
    else:
        sources = []
    merges, fused, problems = parse_baselines(raw, f"{found.source}: baselines", sources,
                                              lambda ref: resolve_ref(ref, found.base_dirs))
    found.problems += problems
    kind = (evaluation or {}).get("kind", "suite")
    if fused and evaluation is not None and kind not in FUSION_EVALUATORS:
        found.add("baselines.fusion", f"fusion baselines are scored by the suite and lmeval evaluators, not by "
                  f"evaluation kind {kind!r}", "use evaluation kind suite or lmeval, or drop the fusion entries")
    if evaluation is not None and evaluation.get("backend") == "vllm":
        for i, recipe in enumerate(fused):
            if recipe.method == "logit":
                found.add(f"baselines.fusion[{i}]", "a logit ensemble needs every source's next-token "
                          "log-probabilities at each step, which the vllm backend does not give",
                          "use backend hf for this study, or a panel / moa entry")
    return merges, fused


def _several_unweighted(objectives: Any) -> bool:
    """Whether the ``objectives:`` list (as written: an entry may be invalid) has several objectives
    not all weighted (a Pareto front, not one scalar)."""
    if not isinstance(objectives, list) or len(objectives) < 2:
        return False
    return not all(isinstance(o, dict) and o.get("weight") is not None for o in objectives)


def _normalized(data: dict[str, Any], name: str, evaluation: dict[str, Any], ps: PSSpace | None,
                dfs: DFSSpace | None, fused: tuple = ()) -> dict[str, Any]:
    """The file's mapping with its name set and every path absolute (a study's ``space.yaml``)."""
    out = dict(data)
    out["name"] = name
    if fused:
        from evomerge.fusion.study import baseline_entry

        out["baselines"] = {"merges": out["baselines"].get("merges", True),
                            "fusion": [baseline_entry(r) for r in fused]}
    out["evaluation"] = dict(evaluation)
    if ps is not None:
        out["ps"] = {**out["ps"], "sources": [{"name": n, "model": r} for n, r in ps.sources]}
        if ps.base:
            out["ps"]["base"] = ps.base
    if dfs is not None:
        out["dfs"] = {**out["dfs"], "models": [{"name": n, "model": r} for n, r in dfs.models]}
    return out
