"""The merge-method registry: each method is a pure tensor function registered by name, with its
parameters declared once (per-source or global, default, valid range). Recipe validation, the
materializers and the search spaces all read these declarations; nothing else lists parameters.

Kernel calling convention (every registered function follows it)::

    fn(tensors: list[Tensor], base: Tensor | None, *, generator: torch.Generator | None, **params)
        -> Tensor (float32, same device and shape as the inputs)

* ``tensors`` are the sources' versions of one tensor (the base is *not* among them), any float dtype.
* ``base`` is the base model's version when the method ``needs_base``, or when it takes an
  ``optional_base`` and the recipe has one (else ``None``).
* per-source parameters arrive as ``list[float]`` aligned with ``tensors``; global ones as scalars.
* ``generator`` is a seeded ``torch.Generator`` on the tensors' device for stochastic methods.
* kernels compute in float32 on the inputs' device and return float32; the caller casts to the
  output dtype once (no double rounding).
"""

from __future__ import annotations

import functools
import inspect

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from evomerge.errors import ConfigError, Problem

Scope = Literal["source", "global"]
Kind = Literal["float", "bool", "int"]


@dataclass(frozen=True)
class ParamSpec:
    """Declaration of one method parameter.

    ``low``/``high`` bound valid values (inclusive, ``None`` = unbounded); ``search_low`` /
    ``search_high`` are the default search bounds when a search space does not set them;
    ``searchable`` is False for switches a search should not tune by default (e.g. ``normalize``).
    """

    name: str
    scope: Scope
    default: float | int | bool | None
    kind: Kind = "float"
    low: float | None = None
    high: float | None = None
    search_low: float | None = None
    search_high: float | None = None
    searchable: bool = True
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: Any, where: str) -> list[Problem]:
        """Problems with one concrete value (already resolved to a scalar)."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                return [Problem(where, f"expected true/false for '{self.name}', got {value!r}")]
            return []
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [Problem(where, f"expected a number for '{self.name}', got {value!r}")]
        if self.kind == "int" and int(value) != value:
            return [Problem(where, f"expected an integer for '{self.name}', got {value!r}")]
        if value != value:  # NaN
            return [Problem(where, f"'{self.name}' is NaN")]
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            rng = f"[{'-inf' if self.low is None else self.low}, {'inf' if self.high is None else self.high}]"
            return [Problem(where, f"'{self.name}'={value} is outside its valid range {rng}",
                            f"use a value in {rng}")]
        return []


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method."""

    name: str
    fn: Callable[..., Any]
    params: tuple[ParamSpec, ...]
    needs_base: bool
    stochastic: bool = False
    min_sources: int = 1
    max_sources: int | None = None
    doc: str = ""
    aliases: tuple[str, ...] = field(default=())
    optional_base: bool = False  # merges with or without a base (e.g. task vectors when given)
    # the task-vector methods' shared structure (evomerge.methods.task_vectors.TaskVectorMerge): trim,
    # sign election, rescale, normalize; the planned backends run it (None: other methods)
    task_vector: Any = None

    @property
    def takes_base(self) -> bool:
        """Whether a recipe of this method may name a base model (required or optional)."""
        return self.needs_base or self.optional_base

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def source_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "source")

    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    def __call__(self, tensors, base=None, *, generator=None, out_dtype=None, **params):
        """The merged tensor: float32, or ``out_dtype`` (one rounding of the float32 values; kernels
        with a ``out_dtype`` parameter round chunk by chunk instead of building a float32 tensor)."""
        if out_dtype is not None and _casts(self.fn):
            return self.fn(list(tensors), base, generator=generator, out_dtype=out_dtype, **params)
        out = self.fn(list(tensors), base, generator=generator, **params)
        return out if out_dtype is None else out.to(out_dtype)


@functools.lru_cache(maxsize=None)
def _casts(fn: Callable[..., Any]) -> bool:
    """Whether a kernel takes ``out_dtype`` (rounds its result itself)."""
    return "out_dtype" in inspect.signature(fn).parameters


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    params: tuple[ParamSpec, ...] | list[ParamSpec] = (),
    needs_base: bool,
    optional_base: bool = False,
    stochastic: bool = False,
    min_sources: int = 1,
    max_sources: int | None = None,
    aliases: tuple[str, ...] = (),
    task_vector: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a kernel under ``name`` (and ``aliases``) with its parameter declarations.
    ``optional_base`` (with ``needs_base=False``): the method takes a base when the recipe has one.
    ``task_vector``: the structure of a task-vector method (see :attr:`MethodSpec.task_vector`)."""
    if needs_base and optional_base:
        raise RuntimeError(f"merge method '{name}': needs_base and optional_base exclude each other")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = MethodSpec(
            name=name,
            fn=fn,
            params=tuple(params),
            needs_base=needs_base,
            stochastic=stochastic,
            min_sources=min_sources,
            max_sources=max_sources,
            doc=(fn.__doc__ or "").strip(),
            aliases=tuple(aliases),
            optional_base=optional_base,
            task_vector=task_vector,
        )
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise RuntimeError(f"merge method '{key}' registered twice")
            _REGISTRY[key] = spec
        return fn

    return deco


def method_names() -> list[str]:
    """Canonical names of all registered methods (aliases excluded), sorted."""
    _load_builtin()
    return sorted({spec.name for spec in _REGISTRY.values()})


def get_method(name: str, *, where: str = "method") -> MethodSpec:
    """The spec registered under ``name``; a :class:`ConfigError` listing the known names otherwise."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            Problem(where, f"unknown merge method '{name}'", f"use one of: {', '.join(method_names())}")
        ) from None


def _load_builtin() -> None:
    # Importing the package registers the built-in methods (each module registers itself).
    import evomerge.methods  # noqa: F401
