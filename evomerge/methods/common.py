"""Shared parameter declarations and the argument check every kernel runs first.

Parameters are declared once, in the ``register_method`` call of each method; kernels take
``**params`` and call :func:`resolve`, which fills defaults from those declarations, expands
per-source scalars to lists, and validates counts, shapes and ranges. So a kernel can never
disagree with its declaration, and a kernel called directly (tests, benchmarks) is checked the
same way a recipe is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from evomerge.errors import ConfigError, MergeError, Problem
from evomerge.methods.registry import ParamSpec, get_method
from evomerge.source_count import source_count_problem

F32 = torch.float32

# ---------------------------------------------------------------- shared declarations


def weight_param(*, search_low: float = 0.0, search_high: float = 1.0, doc: str = "") -> ParamSpec:
    """Per-source weight; any real value is valid (negative weights subtract a task vector)."""
    return ParamSpec(
        "weight", "source", 1.0, search_low=search_low, search_high=search_high,
        doc=doc or "weight of this source (negative values subtract its task vector)",
    )


def density_param(*, search_low: float = 0.1, search_high: float = 1.0, doc: str = "") -> ParamSpec:
    return ParamSpec(
        "density", "source", 1.0, low=0.0, high=1.0, search_low=search_low, search_high=search_high,
        doc=doc or "fraction of task-vector entries kept (1 keeps all)",
    )


LAMBDA = ParamSpec(
    "lambda", "global", 1.0, search_low=0.5, search_high=1.5,
    doc="scaling of the merged task vector: base + lambda * merged_delta",
)


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize", "global", default, kind="bool", searchable=False,
        doc="divide the weighted sum by the sum of the weights (with sign election: of the "
        "weights of the sources agreeing with the elected sign, per entry)",
    )


def rescale_param(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale", "global", default, kind="bool", searchable=False,
        doc="rescale the kept entries of each sparsified task vector: divide by the keep "
        "probability (DARE/DELLA papers; density for deterministic trims), or match the L1 norm "
        "when rescale_l1 is set",
    )


RESCALE_L1 = ParamSpec(
    "rescale_l1", "global", False, kind="bool", searchable=False,
    doc="when rescale is on, scale each sparsified task vector so its L1 norm is unchanged "
    "(mergekit's current 'rescale' semantics) instead of dividing by the keep probability",
)


# ---------------------------------------------------------------- argument check


def resolve(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    generator: torch.Generator | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Validate one kernel call and return its parameters with defaults filled in.

    Per-source parameters come back as ``list[float]`` (a scalar is broadcast to every source),
    global ones as scalars. Raises :class:`ConfigError` (all problems at once) for unknown or
    out-of-range parameters and wrong source counts, :class:`MergeError` for shape mismatches or a
    missing generator.
    """
    spec = get_method(method)
    where = f"method '{method}'"
    problems: list[Problem] = []
    n = len(tensors)
    if (wrong := source_count_problem(spec, n)) is not None:
        problems.append(Problem(where, wrong, "list the right number of sources for this method"))
    if spec.needs_base and base is None:
        problems.append(Problem(where, "needs a base model, none was given", "set 'base:' in the recipe"))
    unknown = sorted(set(params) - {p.name for p in spec.params})
    for name in unknown:
        known = ", ".join(p.name for p in spec.params) or "none"
        problems.append(Problem(f"{where}: params.{name}", f"unknown parameter '{name}'",
                                f"parameters of {method}: {known}"))

    out: dict[str, Any] = {}
    for p in spec.params:
        value = params.get(p.name, p.default)
        if value is None:
            problems.append(Problem(f"{where}: params.{p.name}", f"'{p.name}' is required",
                                    f"set '{p.name}'"))
            continue
        if p.scope == "source":
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                problems.append(Problem(f"{where}: params.{p.name}",
                                        f"got {len(values)} values of '{p.name}' for {n} sources",
                                        "give one value per source, in source order"))
                continue
            found = [q for i, v in enumerate(values) for q in p.check(v, f"{where}: sources[{i}].{p.name}")]
            problems += found
            if not found:
                out[p.name] = [_cast(p, v) for v in values]
        else:
            found = p.check(value, f"{where}: params.{p.name}")
            problems += found
            if not found:
                out[p.name] = _cast(p, value)
    if problems:
        raise ConfigError(problems)

    shapes = {tuple(t.shape) for t in tensors}
    if base is not None and spec.takes_base:
        shapes.add(tuple(base.shape))
    if len(shapes) > 1:
        listed = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise MergeError(f"{method}: tensors to merge differ in shape (sources: {listed}"
                         + (f"; base: {tuple(base.shape)})" if base is not None else ")")
                         + "; all models must share one architecture")
    for t in [*tensors, *([base] if base is not None and spec.takes_base else [])]:
        if not t.is_floating_point():
            raise MergeError(f"{method}: cannot merge a {t.dtype} tensor; only float tensors are merged")
    if spec.stochastic:
        if generator is None:
            raise MergeError(f"{method} is stochastic and needs a seeded torch.Generator "
                             "(pass generator=torch.Generator(device).manual_seed(seed))")
        device = tensors[0].device
        if torch.device(generator.device).type != device.type:
            raise MergeError(f"{method}: the generator is on {generator.device} but the tensors are on "
                             f"{device}; create the generator on the tensors' device")
    return out


def _cast(p: ParamSpec, v: Any) -> Any:
    if p.kind == "bool":
        return bool(v)
    if p.kind == "int":
        return int(v)
    return float(v)


def cast_out(t: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    """A kernel's float32 result in the requested output dtype (``None``: unchanged)."""
    return t if out_dtype is None else t.to(out_dtype)


def f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 on its device; the same object when it already is (never modify it in place)."""
    return t.to(F32)


def task_vector(x: torch.Tensor, base32: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor ``x - base``.

    ``x`` is converted to float32 first and the subtraction runs float32 - float32: on CPU a
    mixed-dtype ``torch.sub`` is 2-3x slower than the conversion plus a same-dtype subtraction.
    """
    delta = x.to(F32, copy=True)
    return delta.sub_(base32)
