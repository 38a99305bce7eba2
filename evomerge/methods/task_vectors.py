"""The task-vector merges, declared once: trim, elect, rescale, combine.

Task arithmetic, TIES, DARE, breadcrumbs and DELLA (and their linear / sign-electing forms) are one
formula with switches::

    tau_i  = theta_i - base                                  (float32)
    tau_i' = trim_i(tau_i) / divisor_i                       (rescale: divisor_i = density_i)
    merged = base + lambda * combine_i(w_i * tau_i')

A method declares its switches on its spec (:class:`TaskVectorMerge`, ``MethodSpec.task_vector``);
its parameters follow from them (:meth:`TaskVectorMerge.params`) and so does every way of computing
it: the reference pipeline below (:func:`reference_merge`, the definition) and the planned backends
(:mod:`evomerge.methods.plan`, :mod:`evomerge.methods.backends`), chosen by
:func:`~evomerge.methods.backends.choose_backend`. :func:`run_task_vector` runs one tensor and says
which backend computed it.

Trims: ``none``; ``magnitude`` (TIES: the top ``floor(density * numel)`` by magnitude, ties by flat
index); ``band`` (breadcrumbs: drop the top ``floor(gamma * numel)``, keep the next
``floor(density * numel)``); ``dare`` (keep each entry with probability ``density``, from the
counter-based hash); ``della`` (MAGPRUNE: keep probabilities ranked by magnitude, Bernoulli draws
from the seeded generator; reference only). Sign election: ``none`` (a weighted sum, divided by
``sum_i w_i`` when ``normalize``) or ``sum`` (TIES: the sign of ``sum_i w_i tau_i'``, disjoint merge,
divided per entry by the agreeing weights when ``normalize``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from evomerge.errors import ConfigError, Problem
from evomerge.methods import backends
from evomerge.methods.common import (
    LAMBDA, RESCALE_L1, cast_out, density_param, f32, normalize_param, rescale_param, resolve, task_vector,
    weight_param,
)
from evomerge.methods.plan import build_plan, live_sources, top_cuts_by_counting
from evomerge.methods.registry import MethodSpec, ParamSpec, get_method, register_method
from evomerge.methods.sparsify import (
    apply_mask_, dare_key, dare_mask, disjoint_merge, generator_seed, keep_count, outlier_mask, rank_keep_probs,
    top_k_mask,
)

Trim = Literal["none", "magnitude", "band", "dare", "della"]
Elect = Literal["none", "sum"]

GAMMA = ParamSpec(
    "gamma", "source", 0.01, low=0.0, high=1.0, search_low=0.0, search_high=0.1,
    doc="fraction of the largest-magnitude task-vector entries dropped as outliers (the paper's beta)",
)
EPSILON = ParamSpec(
    "epsilon", "source", 0.15, low=0.0, high=0.5, search_low=0.0, search_high=0.15,
    doc="half-width of the keep-probability range [density - epsilon, density + epsilon]",
)


@dataclass(frozen=True)
class TaskVectorMerge:
    """The switches of one task-vector method (see module doc): ``trim``, sign ``elect``ion, and the
    defaults of its ``normalize`` and ``rescale`` parameters. ``lambda`` scales every merged task
    vector; ``rescale_l1`` (trimming methods) turns ``rescale`` into an L1-norm match."""

    trim: Trim
    elect: Elect
    normalize: bool
    rescale: bool = False

    @property
    def stochastic(self) -> bool:
        return self.trim in ("dare", "della")

    def params(self) -> tuple[ParamSpec, ...]:
        """The method's parameter declarations: weight, [density, gamma | epsilon], lambda,
        normalize, [rescale, rescale_l1]."""
        if self.trim == "none":
            return weight_param(), LAMBDA, normalize_param(self.normalize)
        density = density_param(search_low=0.2, search_high=0.8) if self.trim == "della" else density_param()
        extra = {"band": (GAMMA,), "della": (EPSILON,)}.get(self.trim, ())
        return (weight_param(), density, *extra, LAMBDA, normalize_param(self.normalize),
                rescale_param(self.rescale), RESCALE_L1)

    def planned(self, p: dict[str, Any] | None = None) -> bool:
        """Whether the merge (with resolved parameters ``p``) has a planned form: every trim but
        DELLA's, without ``rescale_l1``."""
        return self.trim != "della" and not (p and p.get("rescale") and p.get("rescale_l1"))

    def check(self, method: str, p: dict[str, Any]) -> None:
        """Checks beyond each parameter's range: DELLA's ``density +- epsilon`` must lie in (0, 1]
        for every pruned source (0 < density < 1)."""
        if self.trim != "della":
            return
        problems = []
        for i, (d, e) in enumerate(zip(p["density"], p["epsilon"])):
            if 0.0 < d < 1.0 and not (d - e > 0.0 and d + e <= 1.0):
                problems.append(Problem(
                    f"method '{method}': sources[{i}]",
                    f"density={d} with epsilon={e} gives keep probabilities [{d - e:g}, {d + e:g}], "
                    "outside (0, 1]",
                    f"use epsilon < {min(d, 1.0 - d):g} (at most min(density, 1 - density))",
                ))
        if problems:
            raise ConfigError(problems)


def register_task_vector_method(name: str, decl: TaskVectorMerge, doc: str) -> Callable[..., torch.Tensor]:
    """Register ``name`` as a task-vector method with switches ``decl`` and docstring ``doc``; returns
    its kernel (``fn(tensors, base, *, generator=None, out_dtype=None, **params)``)."""

    def fn(tensors, base, *, generator=None, out_dtype=None, **params):
        return run_task_vector(get_method(name), tensors, base, generator=generator, out_dtype=out_dtype,
                               **params).tensor

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    register_method(name, params=decl.params(), needs_base=True, stochastic=decl.stochastic,
                    task_vector=decl)(fn)
    return fn


# ---------------------------------------------------------------- running one tensor


def run_task_vector(spec: MethodSpec, tensors: Sequence[torch.Tensor], base: torch.Tensor, *,
                    generator: torch.Generator | None = None, out_dtype: torch.dtype | None = None,
                    backend: str | None = None, **params) -> backends.MergeResult:
    """``spec``'s merge of one tensor, rounded once to ``out_dtype`` (default float32), by the
    backend :func:`~evomerge.methods.backends.choose_backend` picks (or ``backend``). A planned
    backend whose result is not finite hands the tensor to the reference pipeline, which defines
    that case (and is then reported)."""
    decl = spec.task_vector
    p = resolve(spec.name, tensors, base, generator, params)
    decl.check(spec.name, p)
    out_dtype = out_dtype or torch.float32
    planned = decl.planned(p)
    live = live_sources(decl.trim, p, base.numel()) if planned else range(len(tensors))
    req = backends.KernelRequest("task_vector", (*(tensors[i] for i in live), base), len(live), planned=planned,
                                 out_dtype=out_dtype)
    chosen = backends.choose_backend(req, backend)
    if chosen != "reference":
        seed = generator_seed(generator) if decl.stochastic else None
        plan = build_plan(decl.trim, decl.elect != "none", p, base.numel(), seed, top_cuts_by_counting(tensors, base))
        out = backends.compute_plan(plan, base, tensors, chosen, out_dtype) if plan is not None else None
        if out is not None:
            return backends.MergeResult(out, chosen)
    return backends.MergeResult(cast_out(reference_merge(decl, p, tensors, base, generator), out_dtype), "reference")


# ---------------------------------------------------------------- the reference pipeline

# sparsifier(i, delta) -> delta: sparsifies source i's float32 task vector (may work in place)
Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]


def reference_merge(decl: TaskVectorMerge, p: dict[str, Any], tensors: Sequence[torch.Tensor], base: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """The merge by the reference pipeline (float32, whole tensors), from resolved parameters ``p``."""
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                              elect=decl.elect != "none", sparsify=sparsifier(decl.trim, p, generator))


def sparsifier(trim: Trim, p: dict[str, Any], generator: torch.Generator | None) -> Sparsifier | None:
    """The reference trim of each source's task vector (``None`` for ``trim="none"``)."""
    if trim == "none":
        return None
    dens, rescale, l1 = p["density"], p["rescale"], p["rescale_l1"]
    seed = generator_seed(generator) if trim == "dare" else None

    def run(i, delta):
        d = dens[i]
        if d >= 1.0:
            return delta  # nothing is dropped at density 1 (no random draws, no outliers)
        keep_prob = d
        if trim == "magnitude":
            mask = top_k_mask(delta.abs(), keep_count(delta.numel(), d))
        elif trim == "band":
            mask = outlier_mask(delta.abs(), d, p["gamma"][i])
        elif trim == "dare":
            mask = dare_mask(delta.shape, d, dare_key(seed, i), delta.device)
        else:  # della
            if d <= 0.0:
                return delta.zero_()
            keep_prob = rank_keep_probs(delta, d, p["epsilon"][i])
            mask = torch.bernoulli(keep_prob, generator=generator).to(torch.bool)
        return apply_mask_(delta, mask, rescale=rescale, rescale_l1=l1, keep_prob=keep_prob)

    return run


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    elect: bool = False,
    sparsify: Sparsifier | None = None,
) -> torch.Tensor:
    """``base + lam * merge_i(w_i * sparsify(theta_i - base))`` in float32 on the inputs' device.

    ``merge`` is a plain sum (divided by ``sum_i w_i`` when ``normalize``, unless that is ~0), or with
    ``elect`` the TIES sign election + disjoint merge (:func:`~evomerge.methods.sparsify.disjoint_merge`).
    Without election only one task vector is alive at a time.
    """
    base32 = f32(base)
    if not elect:
        acc = torch.zeros_like(base32)
        for i, (x, w) in enumerate(zip(tensors, weights)):
            if w == 0 and sparsify is None:
                continue  # (with a sparsifier, still run it so random streams do not depend on weights)
            delta = task_vector(x, base32)
            if sparsify is not None:
                delta = sparsify(i, delta)
            acc.add_(delta, alpha=w)
            del delta
        total = float(sum(weights))
        if normalize and abs(total) >= 1e-8:
            acc.div_(total)
    else:
        weighted = []
        for i, (x, w) in enumerate(zip(tensors, weights)):
            delta = task_vector(x, base32)
            if sparsify is not None:
                delta = sparsify(i, delta)
            weighted.append(delta.mul_(w))
        acc = disjoint_merge(weighted, list(weights), normalize=normalize)
        del weighted
    if lam != 1.0:
        acc.mul_(lam)
    return acc.add_(base32)
