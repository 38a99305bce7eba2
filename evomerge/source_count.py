"""How many source models a merge method takes: one rule for recipes, search spaces and kernel calls.

A method declares ``min_sources`` and ``max_sources`` (None: no upper bound); the base model, when the
method has one, is not counted.
"""

from __future__ import annotations

from typing import Protocol


class _Counted(Protocol):
    name: str
    min_sources: int
    max_sources: int | None


def wanted_sources(spec: _Counted) -> str:
    """``"exactly 2"``, ``"at least 1"`` or ``"2 to 4"``."""
    low, high = spec.min_sources, spec.max_sources
    if high == low:
        return f"exactly {low}"
    return f"at least {low}" if high is None else f"{low} to {high}"


def source_count_problem(spec: _Counted, n: int) -> str | None:
    """None when ``spec`` takes ``n`` sources, else a message saying what it takes."""
    if n >= spec.min_sources and (spec.max_sources is None or n <= spec.max_sources):
        return None
    return (f"method '{spec.name}' takes {wanted_sources(spec)} source model(s) (the base not counted), "
            f"got {n}")
