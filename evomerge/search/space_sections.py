"""What a search space's sections mean beyond their format: the ``ps:`` section against the method
registry and the models' headers, the ``dfs:`` section against its models' layers, and the
objectives as :class:`~evomerge.search.objectives.Objective` s, for
:func:`evomerge.search.space.parse_space`.

Each builder takes a section already validated by :mod:`evomerge.search.space_file`, adds every
problem it finds to a :class:`Findings` (located as ``<file>: <section.key>``) and returns what it
could build (None when the section is unusable), so that a file's problems are reported at once.
Model references are made absolute (:func:`~evomerge.search.paths.resolve_ref`) and their headers
read through ``sizes`` (no weights are read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from evomerge.errors import ConfigError, EvomergeError, Problem
from evomerge.search.dfs import DFSSpace
from evomerge.search.objectives import ModelSize, Objective
from evomerge.search.paths import PS_WINNER, resolve_path, resolve_ref
from evomerge.search.ps import ParamChoice, PSSpace
from evomerge.search.space_file import Bounds, DFSSection, ObjectiveEntry, PSSection, named_models
from evomerge.source_count import source_count_problem


class Findings:
    """The problems of one file, each located at ``<source>: <key>``."""

    def __init__(self, source: str, base_dirs: list[Path] | None = None, problems: list[Problem] | None = None):
        self.source = source
        self.base_dirs = base_dirs
        self.problems: list[Problem] = list(problems or [])

    def add(self, key: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(f"{self.source}: {key}", message, hint))


def _resolved(found: Findings, entries) -> list[tuple[str, str]]:
    return [(name, resolve_ref(ref, found.base_dirs)) for name, ref in named_models(entries)]


def _sizes(found: Findings, refs: list[str], key: str, sizes: Callable[[str], ModelSize],
           known: dict[str, ModelSize] | None = None) -> list[ModelSize] | None:
    """Every model's size (None when one cannot be opened, or they differ in architecture)."""
    out = []
    failed = False
    for ref in refs:
        if known and ref in known:
            out.append(known[ref])
            continue
        try:
            out.append(sizes(ref))
        except EvomergeError as err:  # every model that cannot be opened, not just the first
            rel = not Path(ref).expanduser().is_absolute() and not Path(ref).expanduser().exists()
            found.add(key, f"cannot open model {ref}: {err}",
                      f"relative model paths are read from the current directory, {Path.cwd()}" if rel else None)
            failed = True
    if failed:
        return None
    types = {s.model_type for s in out}
    if len(types) > 1:
        listing = ", ".join(f"{s.ref} ({s.model_type})" for s in out)
        found.add(key, f"sources of different architectures: {listing}",
                  "merge only models of one architecture (the same model_type)")
        return None
    return out


# ------------------------------------------------------------------------------------------ ps


def parse_ps(found: Findings, section: PSSection, seed: int, dtype: str | None,
             sizes: Callable[[str], ModelSize]) -> tuple[PSSpace | None, list[ModelSize]]:
    """The PS space of a valid ``ps:`` section, and the sizes of its base and sources."""
    from evomerge.methods import get_method

    sources = _resolved(found, section.sources)
    base = resolve_ref(section.base, found.base_dirs) if section.base is not None else None
    specs = []
    for method in section.methods:
        try:
            specs.append(get_method(method, where=f"{found.source}: ps.method"))
        except ConfigError as err:
            found.problems += err.problems
    declared: dict = {}
    for spec in specs:
        for param in spec.params:
            declared.setdefault(param.name, []).append(param)
        if spec.needs_base and base is None:
            found.add("ps.base", f"method '{spec.name}' needs a base model", "add `base: <path>` under ps")
        wrong_count = source_count_problem(spec, len(sources))
        if wrong_count:
            found.add("ps.sources", wrong_count, "list the number of sources the method takes")
    choices = _param_choices(found, section, specs, declared)
    gran = section.granularity
    msizes = _sizes(found, ([base] if base else []) + [ref for _, ref in sources], "ps.sources", sizes)
    if not msizes or not specs:
        return None, msizes or []
    layers = {s.num_layers for s in msizes}
    if len(layers) > 1:
        found.add("ps.sources", f"sources have different layer counts {sorted(layers)}",
                  "a parameter-space merge needs models with the same layers")
        return None, msizes
    n = layers.pop()
    if section.control_points and gran not in (None, n):
        found.add("ps.control_points", "control_points and granularity both set the layer-wise values",
                  "keep one: control_points (interpolated) or granularity (piecewise constant)")
        return None, msizes
    gran = gran or n
    if n % gran:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        found.add("ps.granularity", f"granularity {gran} does not divide the layer count {n}", f"use one of {divisors}")
        return None, msizes
    space = PSSpace(sources=tuple(sources), base=base, methods=tuple(s.name for s in specs), num_layers=n,
                    granularity=gran, modules=tuple(section.modules), params=choices, dtype=dtype, seed=seed,
                    control_points=section.control_points,
                    calibration=_calibration(found, section, specs))
    return space, msizes


def _calibration(found: Findings, section: PSSection, specs: list):
    """The section's ``calibration`` with its file made absolute; a problem when a data-aware method
    has none, or when no listed method uses it."""
    from evomerge.recipe_sections import CALIBRATED_METHODS

    cal, aware = section.calibration, [s.name for s in specs if s.name in CALIBRATED_METHODS]
    if aware and cal is None:
        found.add("ps.calibration", f"method(s) {', '.join(aware)} compute statistics on calibration data; none is named",
                  "add `calibration: {suite: <suite.yaml>, split: search}` or `{jsonl: <file>, field: prompt}` under ps")
    if cal is not None and not aware:
        found.add("ps.calibration", "no listed method uses calibration data",
                  f"remove it (data-aware methods: {', '.join(CALIBRATED_METHODS)})")
    if cal is None:
        return None
    key = "suite" if cal.suite is not None else "jsonl"
    return cal.model_copy(update={key: resolve_path(getattr(cal, key), found.base_dirs)})


def _param_choices(found: Findings, section: PSSection, specs: list, declared: dict) -> dict[str, ParamChoice]:
    """How every declared parameter is handled: the file's bounds or value, else the registry's."""
    choices: dict[str, ParamChoice] = {}
    for name, setting in section.params.items():
        key = f"ps.params.{name}"
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            found.add(key, f"unknown parameter '{name}' for method(s) {', '.join(s.name for s in specs)}",
                      f"known parameters: {known}")
            continue
        params = declared[name]
        if not isinstance(setting, Bounds):
            for param in params:
                found.problems += param.check(setting, f"{found.source}: {key}")
            choices[name] = ParamChoice("fixed", value=setting)
            continue
        low = setting.low if setting.low is not None else params[0].search_low
        high = setting.high if setting.high is not None else params[0].search_high
        if low is None or high is None:
            found.add(key, f"'{name}' has no default search bounds", "set both low and high")
            continue
        if low > high:
            found.add(key, f"bounds reversed: low {low} > high {high}", "swap them")
        for param in params:
            for bound, label in ((low, "low"), (high, "high")):
                found.problems += param.check(int(bound) if param.kind == "int" else bound,
                                              f"{found.source}: {key}.{label}")
        choices[name] = ParamChoice("search", low, high)
    for name, params in declared.items():
        if name in choices:
            continue
        first = params[0]
        if first.searchable and first.search_low is not None and first.search_high is not None:
            low = min(q.search_low for q in params if q.search_low is not None)
            high = max(q.search_high for q in params if q.search_high is not None)
            choices[name] = ParamChoice("search", low, high)
        elif first.required:
            found.add(f"ps.params.{name}", f"required parameter '{name}' is neither searched nor fixed",
                      f"set `{name}: <value>` or `{name}: {{low: .., high: ..}}`")
        else:
            choices[name] = ParamChoice("default")
    for name, params in declared.items():
        if len({q.scope for q in params}) > 1 and name in choices and choices[name].mode == "search":
            owners = ", ".join(f"{s.name} ({q.scope})" for s in specs for q in s.params if q.name == name)
            found.add(f"ps.params.{name}", f"'{name}' is per source in some methods and global in others "
                      f"({owners}); one search dimension cannot serve both",
                      f"fix `{name}: <value>`, or search these methods in separate spaces")
    return choices


# ----------------------------------------------------------------------------------------- dfs


def parse_dfs(found: Findings, section: DFSSection, dtype: str | None, sizes: Callable[[str], ModelSize],
              ps_size: ModelSize | None) -> DFSSpace | None:
    """The DFS space of a valid ``dfs:`` section (``ps_size``: the PS winner's, in a ps_dfs space)."""
    models = _resolved(found, section.models)
    if any(ref == PS_WINNER for _, ref in models) and ps_size is None:
        found.add("dfs.models", "'@ps' (the PS winner) is only allowed in a kind: ps_dfs space")
        return None
    names = [name for name, _ in models]
    index = {}
    for key in ("embed", "head"):
        value = section.embed if key == "embed" else (section.head if section.head is not None else section.embed)
        if value is None:
            index[key] = 0
        elif value in names:
            index[key] = names.index(value)
        else:
            found.add(f"dfs.{key}", f"'{value}' is not one of the models ({', '.join(names)})",
                      f"name one of them in `{key}:`")
            index[key] = 0
    first, last, depth = section.first_layers, section.last_layers, section.max_depth
    if depth is not None and depth < first + last:
        found.add("dfs.max_depth", f"max_depth {depth} is smaller than first_layers + last_layers ({first + last})")
    msizes = _sizes(found, [ref for _, ref in models], "dfs.models", sizes,
                    {PS_WINNER: ps_size} if ps_size else None)
    if msizes is None:
        return None
    layers = tuple(s.num_layers for s in msizes)
    if first > layers[index["embed"]] or last > layers[index["head"]]:
        found.add("dfs", f"first_layers/last_layers ({first}/{last}) exceed the embed/head model's layer count "
                  f"({layers[index['embed']]}/{layers[index['head']]})")
        return None
    return DFSSpace(models=tuple(models), layers=layers, repeats=section.repeats, embed=index["embed"],
                    head=index["head"], scale=section.scale_bounds, first_layers=first, last_layers=last,
                    max_depth=depth, dtype=dtype)


# ---------------------------------------------------------------------------------- objectives


def parse_objectives(found: Findings, entries: list[ObjectiveEntry]) -> list[Objective]:
    """The objectives of a valid ``objectives:`` list (names unique, weights on all or none)."""
    out = []
    for entry in entries:
        kind = "metric" if entry.metric is not None else "cost"
        key = entry.metric if kind == "metric" else entry.cost
        direction = entry.direction or ("maximize" if kind == "metric" else "minimize")
        weight = None if entry.weight is None else float(entry.weight)
        out.append(Objective(key if kind == "metric" else f"cost:{key}", kind, key, direction, weight))
    names = [o.name for o in out]
    for name in sorted({n for n in names if names.count(n) > 1}):
        found.add("objectives", f"objective '{name}' is listed twice", "list each objective once")
    if sum(o.weight is not None for o in out) not in (0, len(out)):
        found.add("objectives", "weights must be set on every objective or on none",
                  "weights combine the objectives into one scalar")
    return out
