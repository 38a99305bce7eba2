"""Parameter-space (PS) search: which numbers are searched, and params -> :class:`MergeRecipe`.

For every per-source parameter the chosen method declares (``weight``, ``density``, ...), a search
has one value per **source x layer group x module group**:

* layer groups: ``granularity`` layers per group (it must divide the layer count); one group (the
  default) gives a scalar. With ``G > 1`` groups the value is written as a gradient list with one
  point per layer, ``[v[i // granularity] for i in range(num_layers)]``, so that
  :func:`evomerge.recipe.resolve_param` (gradient point ``i`` sits at ``t = i / (n - 1)``) gives
  layer ``i`` exactly its group's value: piecewise constant, no interpolation between groups.
  Embeddings (``t = 0``) take the first group's value, the final norm and head (``t = 1``) the last's.
* control points (``control_points: k``, k >= 2, instead of groups): a float parameter takes ``k``
  values per source, written as a gradient list of ``k`` points: point ``j`` sits at
  ``t = j / (k - 1)`` and every layer between two points gets their linear interpolation
  (:func:`evomerge.recipe.resolve_param`), as mergekit-evolve parameterises layer-wise values. This
  is the smoothness prior across layers: neighbouring layers get close values, and ``k`` numbers
  per source are searched instead of one per layer (no penalty term is added to the objective).
  Integer and boolean parameters keep one value per source.
* module groups (optional ``modules: [self_attn, mlp]``): one value per filter plus one for
  ``other`` (embeddings, norms, head), written as ``{filter, value}`` rules in that order with a
  final catch-all rule.

Global parameters (``lambda``, ...) are searched as one scalar each. Which parameters exist, their
valid range and their default search bounds come from the method registry's :class:`ParamSpec`;
the search space YAML only overrides bounds (``{low, high}``) or fixes a value.

Dimension names: ``weight.<source>[.g<k>|.c<j>][.<module>]``, ``lambda``, and ``method`` (a categorical
choice when several methods are listed; the union of their parameters is searched and each decoded
recipe uses the parameters its method declares).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.methods import get_method
from evomerge.methods.registry import ParamSpec
from evomerge.recipe import MergeRecipe, ParamRule, SourceSpec
from evomerge.recipe_sections import CALIBRATED_METHODS
from evomerge.search.dims import Dim

OTHER = "other"


@dataclass(frozen=True)
class ParamChoice:
    """How one method parameter is handled: ``search`` within bounds, ``fixed`` value, or ``default``."""

    mode: str  # "search" | "fixed" | "default"
    low: float | None = None
    high: float | None = None
    value: Any = None


@dataclass(frozen=True)
class PSSpace:
    sources: tuple[tuple[str, str], ...]  # (name, model ref)
    base: str | None
    methods: tuple[str, ...]
    num_layers: int
    granularity: int  # layers per group
    modules: tuple[str, ...] = ()
    params: dict[str, ParamChoice] = field(default_factory=dict)  # resolved per parameter name
    dtype: str | None = None
    seed: int = 0
    calibration: Any = None  # CalibrationSpec: set on the recipes of data-aware methods (regmean, fisher)
    control_points: int | None = None  # k >= 2: float parameters interpolated between k points

    # ---------------------------------------------------------------- structure

    @property
    def groups(self) -> int:
        return self.num_layers // self.granularity

    def module_keys(self) -> tuple[str | None, ...]:
        return (*self.modules, OTHER) if self.modules else (None,)

    def param_specs(self) -> list[ParamSpec]:
        """Union of the methods' parameters, first declaration wins (by name)."""
        out: dict[str, ParamSpec] = {}
        for m in self.methods:
            for p in get_method(m).params:
                out.setdefault(p.name, p)
        return list(out.values())

    def dim_name(self, param: str, source: str, group: int, module: str | None, point: int | None = None) -> str:
        name = f"{param}.{source}"
        if point is not None:
            name += f".c{point}"
        elif self.groups > 1:
            name += f".g{group}"
        if module:
            name += f".{module}"
        return name

    def points(self, p: ParamSpec) -> int | None:
        """Control points of parameter ``p`` (None: one value per layer group)."""
        return self.control_points if self.control_points and p.kind == "float" else None

    def dims(self) -> list[Dim]:
        dims: list[Dim] = []
        if len(self.methods) > 1:
            dims.append(Dim("method", "categorical", choices=tuple(self.methods), default=self.methods[0]))
        for p in self.param_specs():
            choice = self.params.get(p.name)
            if choice is None or choice.mode != "search":
                continue
            kind = "categorical" if p.kind == "bool" else p.kind
            base = dict(kind=kind, low=float(choice.low if kind != "categorical" else 0),
                        high=float(choice.high if kind != "categorical" else 1),
                        choices=(False, True) if kind == "categorical" else (), default=p.default)
            if p.scope == "global":
                dims.append(Dim(p.name, **base))
                continue
            k = self.points(p)
            for src, _ in self.sources:
                for g in range(self.groups if k is None else 1):
                    for j in ([None] if k is None else range(k)):
                        for mod in self.module_keys():
                            dims.append(Dim(self.dim_name(p.name, src, g, mod, j), **base))
        return dims

    # ---------------------------------------------------------------- decoding

    def _assemble(self, p: ParamSpec, params: dict[str, Any], src: str | None) -> Any:
        def one(module: str | None) -> Any:
            if src is None:
                return _valid(p, params[p.name])
            if self.points(p):
                return [float(_valid(p, params[self.dim_name(p.name, src, 0, module, j)]))
                        for j in range(self.points(p))]
            vals = [_valid(p, params[self.dim_name(p.name, src, g, module)]) for g in range(self.groups)]
            if len(vals) == 1 or p.kind == "bool":
                return vals[0]
            return [float(vals[i // self.granularity]) for i in range(self.num_layers)]

        if src is None or not self.modules:
            return one(None)
        rules = [ParamRule(filter=m, value=one(m)) for m in self.modules]
        rules.append(ParamRule(filter=None, value=one(OTHER)))
        return rules

    def decode(self, params: dict[str, Any]) -> MergeRecipe:
        """The recipe of one point of this space (a pure function of ``params``)."""
        method = params.get("method", self.methods[0])
        spec = get_method(method)
        glob: dict[str, Any] = {}
        per_source: dict[str, dict[str, Any]] = {name: {} for name, _ in self.sources}
        for p in spec.params:
            choice = self.params.get(p.name, ParamChoice("default"))
            if choice.mode == "default":
                continue
            if p.scope == "global":
                glob[p.name] = choice.value if choice.mode == "fixed" else self._assemble(p, params, None)
            else:
                for src, _ in self.sources:
                    per_source[src][p.name] = (choice.value if choice.mode == "fixed"
                                               else self._assemble(p, params, src))
        return MergeRecipe(
            method=spec.name,
            base=self.base if spec.takes_base else None,
            sources=[SourceSpec(model=ref, params=per_source[name]) for name, ref in self.sources],
            params=glob, dtype=self.dtype, seed=self.seed,
            calibration=self.calibration if spec.name in CALIBRATED_METHODS else None,
        )

    def default_params(self) -> dict[str, Any]:
        """The untuned point: every searched parameter at its registry default (clipped to the bounds)."""
        return {d.name: d.default_value() for d in self.dims()}


def _valid(p: ParamSpec, value: Any) -> Any:
    """Clip a searched value into the parameter's valid range (bounds shared by several methods)."""
    if p.kind == "bool":
        return bool(value)
    v = float(value)
    if p.low is not None:
        v = max(v, p.low)
    if p.high is not None:
        v = min(v, p.high)
    return int(round(v)) if p.kind == "int" else v
