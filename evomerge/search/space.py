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
mapping (``suite``, ``cache_dir``, ``target``: see :func:`evomerge.search.evaluation.evaluator_path_keys`).
The normalized mapping (``SearchSpace.data``, what a study folder's ``space.yaml`` holds) has every
one of them absolute, so a study works from any directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, EvomergeError, Problem
from evomerge.search.dfs import DFSSpace
from evomerge.search.objectives import COSTS, ModelSize, Objective, model_size
from evomerge.search.ps import ParamChoice, PSSpace

KINDS = ("ps", "dfs", "ps_dfs")
PYCMA = ("pycma", "cma")
OPTUNA_SAMPLERS = ("tpe", "cmaes", "nsgaii", "nsgaiii", "gp", "random")
PS_WINNER = "@ps"

_TOP = {"name", "description", "kind", "seed", "dtype", "ps", "dfs", "objectives", "optimizer",
        "evaluation", "multi_fidelity", "budget", "baselines"}
_PS = {"base", "sources", "method", "granularity", "modules", "params", "trials"}
_DFS = {"models", "repeats", "embed", "head", "scale", "first_layers", "last_layers", "max_depth", "trials"}
_OPT = {"name", "popsize", "sigma0", "seed", "options"}
_MF = {"enabled", "rungs", "promote"}
_BUDGET = {"trials", "timeout"}
_OBJ = {"metric", "cost", "direction", "weight"}


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


def resolve_ref(ref: str, base_dirs: list[Path] | None = None) -> str:
    """A local path made absolute (a relative one: against the first of ``base_dirs``, default the
    current directory, where it exists), else the reference unchanged (a hub id)."""
    if ref == PS_WINNER:
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p.resolve()) if p.exists() else ref
    for base in base_dirs or [Path.cwd()]:
        q = Path(base) / p
        if q.exists():
            return str(q.resolve())
    return ref


def resolve_path(value: str, base_dirs: list[Path] | None = None) -> str:
    """A file path made absolute: against the first of ``base_dirs`` (default the current directory)
    where it exists, else against the first one (a file or folder still to be created)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    bases = [Path(b) for b in (base_dirs or [Path.cwd()])]
    for base in bases:
        if (base / p).exists():
            return str((base / p).resolve())
    return os.path.normpath(os.path.abspath(bases[0] / p))


def resolve_evaluation(evaluation: dict[str, Any], base_dirs: list[Path] | None = None) -> dict[str, Any]:
    """The ``evaluation:`` mapping with the evaluator kind's file paths made absolute."""
    from evomerge.search.evaluation import evaluator_kind, evaluator_path_keys

    out = dict(evaluation)
    for key in evaluator_path_keys(evaluator_kind(out)):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = resolve_path(out[key], base_dirs)
    return out


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
    c = _Checker(source)
    objectives = _parse_objectives(c, data.get("objectives"))
    evaluation = data.get("evaluation")
    if not isinstance(evaluation, dict):
        c.add("evaluation", f"expected a mapping, got {evaluation!r}")
        evaluation = {}
    if c.problems:
        raise ConfigError(c.problems, source=source)
    return SpaceSummary(name=str(data.get("name") or path.stem), kind=str(data.get("kind", "ps")),
                        objectives=tuple(objectives), evaluation=resolve_evaluation(evaluation, base_dirs),
                        source=source)


class _Checker:
    def __init__(self, source: str, base_dirs: list[Path] | None = None):
        self.source = source
        self.base_dirs = base_dirs
        self.problems: list[Problem] = []

    def add(self, where: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(f"{self.source}: {where}", message, hint))

    def mapping(self, value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(where, f"expected a mapping, got {value!r}")
            return {}
        for key in value:
            if key not in allowed:
                self.add(f"{where}.{key}" if where else str(key), f"unknown key '{key}'",
                         f"allowed keys here: {', '.join(sorted(allowed))}")
        return value

    def integer(self, value: Any, where: str, low: int = 0) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.add(where, f"expected an integer >= {low}, got {value!r}")
            return None
        return value

    def number(self, value: Any, where: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(where, f"expected a number, got {value!r}")
            return None
        return float(value)


def _named_models(c: _Checker, items: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        c.add(where, f"expected a non-empty list of models, got {items!r}",
              "list model paths, or {name, model} mappings")
        return []
    out: list[tuple[str, str]] = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            name, ref = (Path(it).name or it).replace(".", "_"), it
        elif isinstance(it, dict):
            c.mapping(it, f"{where}[{i}]", {"name", "model"})
            ref = it.get("model")
            name = str(it.get("name") or (Path(str(ref)).name if ref else f"m{i}"))
            if not isinstance(ref, str):
                c.add(f"{where}[{i}].model", "required key 'model' (a path or hub id) is missing")
                continue
        else:
            c.add(f"{where}[{i}]", f"expected a model path or {{name, model}}, got {it!r}")
            continue
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            c.add(f"{where}[{i}].name", f"model name {name!r} may only use letters, digits, _ and -",
                  "set `name:` explicitly")
        out.append((name, resolve_ref(ref, c.base_dirs)))
    names = [n for n, _ in out]
    for n in sorted({n for n in names if names.count(n) > 1}):
        c.add(where, f"model name '{n}' is used twice", "give the models distinct `name:` values")
    return out


def _sizes(c: _Checker, refs: list[str], where: str, sizes: Callable[[str], ModelSize],
           extra: dict[str, ModelSize] | None = None) -> list[ModelSize] | None:
    out = []
    failed = False
    for ref in refs:
        if extra and ref in extra:
            out.append(extra[ref])
            continue
        try:
            out.append(sizes(ref))
        except EvomergeError as err:  # every model that cannot be opened, not just the first
            rel = not Path(ref).expanduser().is_absolute() and not Path(ref).expanduser().exists()
            c.add(where, f"cannot open model {ref}: {err}",
                  f"relative model paths are read from the current directory, {Path.cwd()}" if rel else None)
            failed = True
    if failed:
        return None
    types = {s.model_type for s in out}
    if len(types) > 1:
        listing = ", ".join(f"{s.ref} ({s.model_type})" for s in out)
        c.add(where, f"sources of different architectures: {listing}",
              "merge only models of one architecture (the same model_type)")
        return None
    return out


def _parse_ps(c: _Checker, raw: dict, seed: int, dtype: str | None, sizes) -> tuple[PSSpace | None, list[ModelSize]]:
    from evomerge.methods import get_method

    raw = c.mapping(raw, "ps", _PS)
    sources = _named_models(c, raw.get("sources"), "ps.sources")
    base = resolve_ref(raw["base"], c.base_dirs) if isinstance(raw.get("base"), str) else None
    if raw.get("base") is not None and base is None:
        c.add("ps.base", f"expected a model path, got {raw['base']!r}")
    methods_raw = raw.get("method", "ties")
    methods_raw = methods_raw if isinstance(methods_raw, list) else [methods_raw]
    specs = []
    for i, m in enumerate(methods_raw):
        try:
            specs.append(get_method(str(m), where=f"{c.source}: ps.method"))
        except ConfigError as err:
            c.problems += err.problems
    declared = {}
    for s in specs:
        for p in s.params:
            declared.setdefault(p.name, []).append(p)
        if s.needs_base and base is None:
            c.add("ps.base", f"method '{s.name}' needs a base model", "add `base: <path>` under ps")
        n = len(sources)
        if n and (n < s.min_sources or s.max_sources is not None and n > s.max_sources):
            c.add("ps.sources", f"method '{s.name}' takes {s.min_sources}..{s.max_sources or 'any'} "
                  f"sources, got {n}")
    choices: dict[str, ParamChoice] = {}
    user = c.mapping(raw.get("params"), "ps.params", set(declared) | set(raw.get("params") or {}))
    for name, val in user.items():
        where = f"ps.params.{name}"
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            c.add(where, f"unknown parameter '{name}' for method(s) {', '.join(s.name for s in specs)}",
                  f"known parameters: {known}")
            continue
        p = declared[name][0]
        if isinstance(val, dict):
            c.mapping(val, where, {"low", "high"})
            lo, hi = val.get("low", p.search_low), val.get("high", p.search_high)
            if lo is None or hi is None:
                c.add(where, f"'{name}' has no default search bounds", "set both low and high")
                continue
            lo, hi = c.number(lo, f"{where}.low"), c.number(hi, f"{where}.high")
            if lo is None or hi is None:
                continue
            if lo > hi:
                c.add(where, f"bounds reversed: low {lo} > high {hi}", "swap them")
            for q in declared[name]:
                for b, label in ((lo, "low"), (hi, "high")):
                    for prob in q.check(int(b) if q.kind == "int" else b, f"{c.source}: {where}.{label}"):
                        c.problems.append(prob)
            choices[name] = ParamChoice("search", lo, hi)
        else:
            for q in declared[name]:
                c.problems += q.check(val, f"{c.source}: {where}")
            choices[name] = ParamChoice("fixed", value=val)
    for name, ps_ in declared.items():
        if name in choices:
            continue
        p = ps_[0]
        if p.searchable and p.search_low is not None and p.search_high is not None:
            lo = min(q.search_low for q in ps_ if q.search_low is not None)
            hi = max(q.search_high for q in ps_ if q.search_high is not None)
            choices[name] = ParamChoice("search", lo, hi)
        elif p.required:
            c.add(f"ps.params.{name}", f"required parameter '{name}' is neither searched nor fixed",
                  f"set `{name}: <value>` or `{name}: {{low: .., high: ..}}`")
        else:
            choices[name] = ParamChoice("default")
    modules = raw.get("modules") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        c.add("ps.modules", f"expected a list of tensor-name filters, got {modules!r}",
              "e.g. [self_attn, mlp]")
        modules = []
    gran = c.integer(raw.get("granularity"), "ps.granularity", low=1)
    msizes = _sizes(c, ([base] if base else []) + [r for _, r in sources], "ps.sources", sizes) \
        if sources else None
    if not msizes or not specs:
        return None, msizes or []
    layers = {s.num_layers for s in msizes}
    if len(layers) > 1:
        c.add("ps.sources", f"sources have different layer counts {sorted(layers)}",
              "a parameter-space merge needs models with the same layers")
        return None, msizes
    n = layers.pop()
    gran = gran or n
    if n % gran:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        c.add("ps.granularity", f"granularity {gran} does not divide the layer count {n}",
              f"use one of {divisors}")
        return None, msizes
    space = PSSpace(sources=tuple(sources), base=base, methods=tuple(s.name for s in specs), num_layers=n,
                    granularity=gran, modules=tuple(modules), params=choices, dtype=dtype, seed=seed)
    return space, msizes


def _parse_dfs(c: _Checker, raw: dict, dtype: str | None, sizes, ps_size: ModelSize | None) -> DFSSpace | None:
    raw = c.mapping(raw, "dfs", _DFS)
    models = _named_models(c, raw.get("models"), "dfs.models")
    if any(ref == PS_WINNER for _, ref in models) and ps_size is None:
        c.add("dfs.models", "'@ps' (the PS winner) is only allowed in a kind: ps_dfs space")
        return None
    repeats = c.integer(raw.get("repeats", 1), "dfs.repeats", low=1) or 1
    names = [n for n, _ in models]
    idx = {}
    for key in ("embed", "head"):
        val = raw.get(key, raw.get("embed") if key == "head" else None)
        if val is None:
            idx[key] = 0
        elif val in names:
            idx[key] = names.index(val)
        else:
            c.add(f"dfs.{key}", f"'{val}' is not one of the models ({', '.join(names)})")
            idx[key] = 0
    scale = raw.get("scale", {})
    bounds: tuple[float, float] | None = (0.5, 2.0)
    if scale is False:
        bounds = None
    else:
        scale = c.mapping(scale, "dfs.scale", {"low", "high"})
        lo, hi = c.number(scale.get("low", 0.5), "dfs.scale.low"), c.number(scale.get("high", 2.0), "dfs.scale.high")
        if lo is not None and hi is not None:
            if lo > hi:
                c.add("dfs.scale", f"bounds reversed: low {lo} > high {hi}", "swap them")
            if lo <= 0:
                c.add("dfs.scale.low", f"scales must be positive, got low {lo}", "use e.g. low: 0.5")
            bounds = (lo, hi)
    first = c.integer(raw.get("first_layers", 0), "dfs.first_layers") or 0
    last = c.integer(raw.get("last_layers", 0), "dfs.last_layers") or 0
    depth = c.integer(raw.get("max_depth"), "dfs.max_depth", low=1)
    if not models:
        return None
    extra = {PS_WINNER: ps_size} if ps_size else None
    msizes = _sizes(c, [r for _, r in models], "dfs.models", sizes, extra)
    if msizes is None:
        return None
    layers = tuple(s.num_layers for s in msizes)
    if first > layers[idx["embed"]] or last > layers[idx["head"]]:
        c.add("dfs", "first_layers/last_layers exceed the embed/head model's layer count")
        return None
    if depth is not None and depth < first + last:
        c.add("dfs.max_depth", f"max_depth {depth} is smaller than first_layers + last_layers")
    return DFSSpace(models=tuple(models), layers=layers, repeats=repeats, embed=idx["embed"], head=idx["head"],
                    scale=bounds, first_layers=first, last_layers=last, max_depth=depth, dtype=dtype)


def _parse_objectives(c: _Checker, raw: Any) -> list[Objective]:
    raw = raw if raw is not None else [{"metric": "combined"}]
    if not isinstance(raw, list) or not raw:
        c.add("objectives", f"expected a non-empty list, got {raw!r}", "e.g. [{metric: combined}]")
        return []
    out = []
    for i, o in enumerate(raw):
        where = f"objectives[{i}]"
        if isinstance(o, str):
            o = {"cost": o[5:]} if o.startswith("cost:") else {"metric": o}
        o = c.mapping(o, where, _OBJ)
        if ("metric" in o) == ("cost" in o):
            c.add(where, "give exactly one of `metric: <score name>` or `cost: params|layers`")
            continue
        kind = "metric" if "metric" in o else "cost"
        key = str(o[kind])
        if kind == "cost" and key not in COSTS:
            c.add(f"{where}.cost", f"unknown cost '{key}'", f"use one of {', '.join(COSTS)}")
        direction = o.get("direction", "maximize" if kind == "metric" else "minimize")
        if direction not in ("maximize", "minimize"):
            c.add(f"{where}.direction", f"expected maximize or minimize, got {direction!r}")
        w = o.get("weight")
        if w is not None:
            w = c.number(w, f"{where}.weight")
        out.append(Objective(key if kind == "metric" else f"cost:{key}", kind, key, direction, w))
    names = [o.name for o in out]
    for n in sorted({n for n in names if names.count(n) > 1}):
        c.add("objectives", f"objective '{n}' is listed twice")
    if sum(o.weight is not None for o in out) not in (0, len(out)):
        c.add("objectives", "weights must be set on every objective or on none",
              "weights combine the objectives into one scalar")
    return out


def parse_space(data: Any, *, source: str = "<search space>",
                sizes: Callable[[str], ModelSize] = model_size, base_dirs: list[Path] | None = None,
                checks: Callable[[SpaceParts], list[Problem]] | None = None) -> SearchSpace:
    """Validate a search-space mapping; raises :class:`ConfigError` listing every problem (those of
    the ``checks`` hook, when given, included: see :func:`load_space`)."""
    c = _Checker(source, base_dirs)
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
    objectives = _parse_objectives(c, data.get("objectives"))
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
            ps, sizes_ps = _parse_ps(c, data["ps"], seed, dtype, sizes)
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
            dfs = _parse_dfs(c, data["dfs"], dtype, sizes, ps_size)
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


# ------------------------------------------------------------------------------------- sources


_COMPAT_HINT = ("merge only models of one architecture and size (e.g. fine-tunes of one base): remove or "
                "replace the model that differs")


def source_problems(parts: SpaceParts) -> list[Problem]:
    """Every stage's models checked against each other from their headers (no weights read): a PS
    stage's base and sources must share architecture, tensor names and shapes and vocabulary; a DFS
    stage's models must have layers of the embed model's tensor names and shapes, and the embed and
    head models one vocabulary. Each problem names the models and the tensor."""
    from evomerge.checkpoint import Checkpoint, check_compatible

    problems: list[Problem] = []
    opened: dict[str, Checkpoint] = {}

    def ck(ref: str, where: str) -> Checkpoint | None:
        if ref not in opened:
            try:
                opened[ref] = Checkpoint.open(ref)
            except EvomergeError as err:
                problems.append(Problem(f"{parts.source}: {where}", f"cannot open model {ref}: {err}"))
                return None
        return opened[ref]

    ps = parts.ps
    if ps is not None:
        models: dict[str, Checkpoint] = {}
        for label, ref, where in ([(f"base ({ps.base})", ps.base, "ps.base")] if ps.base else []) + [
                (f"{name} ({ref})", ref, "ps.sources") for name, ref in ps.sources]:
            c = ck(ref, where)
            if c is not None:
                models[label] = c
        try:
            check_compatible(models)
        except EvomergeError as err:
            lines = [ln[4:] for ln in str(err).splitlines() if ln.startswith("  - ")]
            by_model: dict[str, list[str]] = {}
            for line in lines:
                label = next((m for m in models if line.startswith(m + ": ")), "")
                by_model.setdefault(label, []).append(line[len(label) + 2:] if label else line)
            first = next(iter(models), "")
            for label, details in by_model.items() or {"": [str(err)]}.items():
                problems.append(Problem(f"{parts.source}: ps.sources", _mismatch(label, first, details), _COMPAT_HINT))
    dfs = parts.dfs
    if dfs is not None:
        stand_in = (ps.base or ps.sources[0][1]) if ps is not None else None  # the PS winner's shape
        cks: list[tuple[str, Checkpoint]] = []
        for name, ref in dfs.models:
            real = stand_in if ref == PS_WINNER else ref
            c = ck(real, "dfs.models") if real is not None else None
            cks.append((f"{name} ({ref})" if ref != PS_WINNER else f"{name} (the PS winner, shaped like {real})", c))
        if all(c is not None for _, c in cks):
            problems += _dfs_problems(parts.source, dfs, cks)
    return problems


def _mismatch(label: str, ref_label: str, details: list[str], shown: int = 4) -> str:
    """One message per model that does not fit: its first differences, and how many more."""
    # check_compatible's "... and N more tensor differences" line counts in the total
    more = 0
    kept = []
    for d in details:
        if d.startswith("... and ") and d.split()[2].isdigit():
            more += int(d.split()[2])
        else:
            kept.append(d)
    text = "; ".join(kept[:shown])
    more += max(len(kept) - shown, 0)
    if more:
        text += f"; and {more} more difference(s)"
    head = f"model {label} does not fit {ref_label}" if label else "the models do not fit together"
    return f"{head}: {text}"


def _layer_map(ck, layer: int) -> dict[str, tuple[int, ...]]:
    from evomerge.checkpoint import split_layer_name

    out = {}
    for n in ck.names:
        parts = split_layer_name(n)
        if parts is not None and parts[1] == layer:
            out[parts[2]] = tuple(ck.shape(n))
    return out


def _dfs_problems(source: str, dfs: DFSSpace, cks: list[tuple[str, Any]]) -> list[Problem]:
    problems: list[Problem] = []
    where = f"{source}: dfs.models"
    embed_label, embed = cks[dfs.embed]
    head_label, head = cks[dfs.head]
    ref = _layer_map(embed, 0)
    for label, c in cks:
        mine: list[str] = []
        for layer in range(c.num_layers):
            got = _layer_map(c, layer)
            for suffix in sorted(set(got) | set(ref)):
                if suffix not in ref:
                    mine.append(f"its layer {layer} has tensor '{suffix}', they do not")
                elif suffix not in got:
                    mine.append(f"its layer {layer} lacks tensor '{suffix}'")
                elif got[suffix] != ref[suffix]:
                    mine.append(f"layer {layer} tensor '{suffix}' has shape {list(got[suffix])}, theirs "
                                f"{list(ref[suffix])}")
            if mine:
                break  # the first layer that differs says enough
        if mine:
            problems.append(Problem(where, _mismatch(label, f"the layers of {embed_label} (the embed model)", mine),
                                    _COMPAT_HINT))
    if head is not embed and head.vocab_size != embed.vocab_size:
        problems.append(Problem(f"{source}: dfs.head", f"vocabularies differ: {embed_label} (embed) has "
                                f"{embed.vocab_size} tokens, {head_label} (head) has {head.vocab_size}",
                                "use embed and head models with one tokenizer"))
    return problems
