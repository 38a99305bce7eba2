"""The parsers of a search space file's sections (``ps:``, ``dfs:``, ``objectives:``) and the
:class:`Checker` that collects their problems, for :func:`evomerge.search.space.parse_space`.

Each parser adds every problem it finds to the checker (located as ``<file>: <section.key>``) and
returns what it could build (None when the section is invalid), so that a file's problems are
reported at once. Model references are made absolute (:func:`~evomerge.search.paths.resolve_ref`)
and their headers read through ``sizes`` (no weights are read).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, EvomergeError, Problem
from evomerge.search.dfs import DFSSpace
from evomerge.search.objectives import COSTS, ModelSize, Objective
from evomerge.search.paths import PS_WINNER, resolve_ref
from evomerge.search.ps import ParamChoice, PSSpace

_PS = {"base", "sources", "method", "granularity", "modules", "params", "trials"}
_DFS = {"models", "repeats", "embed", "head", "scale", "first_layers", "last_layers", "max_depth", "trials"}
_OBJ = {"metric", "cost", "direction", "weight"}


class Checker:
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


def _named_models(c: Checker, items: Any, where: str) -> list[tuple[str, str]]:
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


def _sizes(c: Checker, refs: list[str], where: str, sizes: Callable[[str], ModelSize],
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


def parse_ps(c: Checker, raw: dict, seed: int, dtype: str | None, sizes) -> tuple[PSSpace | None, list[ModelSize]]:
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
    for name, ps_ in declared.items():
        scopes = {q.scope for q in ps_}
        if len(scopes) > 1 and name in choices and choices[name].mode == "search":
            owners = ", ".join(f"{s.name} ({q.scope})" for s in specs for q in s.params if q.name == name)
            c.add(f"ps.params.{name}", f"'{name}' is per source in some methods and global in others "
                  f"({owners}); one search dimension cannot serve both",
                  f"fix `{name}: <value>`, or search these methods in separate spaces")
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


def parse_dfs(c: Checker, raw: dict, dtype: str | None, sizes, ps_size: ModelSize | None) -> DFSSpace | None:
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


def parse_objectives(c: Checker, raw: Any) -> list[Objective]:
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
