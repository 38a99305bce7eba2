"""Passthrough: copy one source."""

from __future__ import annotations

from evomerge.methods.common import F32, resolve
from evomerge.methods.registry import ParamSpec, register_method


@register_method(
    "passthrough",
    params=(
        ParamSpec("scale", "global", 1.0, search_low=0.0, search_high=1.0, searchable=False,
                  doc="multiplier applied to the copied tensor"),
    ),
    needs_base=False,
    min_sources=1,
    max_sources=1,
)
def passthrough(tensors, base=None, *, generator=None, **params):
    """Passthrough (no paper; mergekit's ``passthrough``): ``merged = scale * theta_1`` for exactly one
    source; used for layer stacking and to copy a tensor unchanged.

    Parameters: ``scale`` (global, default 1).
    """
    p = resolve("passthrough", tensors, None, generator, params)
    out = tensors[0].to(F32, copy=True)
    if p["scale"] != 1.0:
        out.mul_(p["scale"])
    return out
