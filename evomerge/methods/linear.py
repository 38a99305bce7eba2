"""Linear merge (model soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import ConfigError, Problem
from evomerge.methods import backends, native
from evomerge.methods.common import F32, cast_out, normalize_param, resolve, weight_param
from evomerge.methods.registry import register_method


@register_method(
    "linear",
    params=(weight_param(), normalize_param(True)),
    needs_base=False,
    min_sources=1,
)
def linear(tensors, base=None, *, generator=None, out_dtype=None, **params):
    """Linear merge / model soup (Wortsman et al., 2022, "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time", arXiv:2203.05482).

    ``merged = sum_i w_i * theta_i``, divided by ``sum_i w_i`` when ``normalize``. No base model
    (a ``base`` argument is ignored; list the base among the sources to include it).

    Parameters: ``weight`` (per source, default 1), ``normalize`` (default true; the weights must
    then not sum to 0).
    """
    return run_linear(tensors, generator=generator, out_dtype=out_dtype, **params).tensor


def linear_weights(p: dict) -> list[tuple[int, float]]:
    """``(source, weight)`` of the sources a linear merge adds, in order: weights divided by their sum
    when normalizing, zero weights left out. A :class:`ConfigError` when normalizing weights that
    sum to ~0."""
    weights = p["weight"]
    total = float(sum(weights))
    if p["normalize"] and abs(total) < 1e-8:
        raise ConfigError(Problem(
            "method 'linear': params.weight", f"weights {weights} sum to {total:g}; cannot normalize",
            "change the weights or set normalize: false",
        ))
    if p["normalize"]:
        weights = [w / total for w in weights]
    return [(i, w) for i, w in enumerate(weights) if w != 0]


def run_linear(tensors: Sequence[torch.Tensor], *, generator=None, out_dtype: torch.dtype | None = None,
               backend: str | None = None, **params) -> backends.MergeResult:
    """The linear merge of one tensor, rounded once to ``out_dtype`` (default float32), by the backend
    :func:`~evomerge.methods.backends.choose_backend` picks (or ``backend``)."""
    p = resolve("linear", tensors, None, generator, params)
    kept = [(tensors[i], w) for i, w in linear_weights(p)]
    out_dtype = out_dtype or F32
    req = backends.KernelRequest("linear", tuple(x for x, _ in kept) or tuple(tensors[:1]), len(kept),
                                 planned=bool(kept), out_dtype=out_dtype)
    chosen = backends.choose_backend(req, backend)
    if chosen != "reference":
        xs = [backends.flat(x) for x, _ in kept]
        out = torch.empty(xs[0].numel(), dtype=out_dtype, device=xs[0].device)
        if chosen == "native":
            job = native.linear_job(out, xs, [w for _, w in kept])
            ok = job is not None and native.run([job])[0]
        else:
            ok = bool(backends.run_linear(out, xs, [w for _, w in kept], chosen))
        if ok:  # else the loop below defines the non-finite case
            return backends.MergeResult(out.view(tensors[0].shape), chosen)
    return backends.MergeResult(cast_out(reference_linear(tensors[0], kept), out_dtype), "reference")


def reference_linear(like: torch.Tensor, kept: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum_i w_i x_i`` over ``kept`` in float32, whole tensors (zeros like ``like`` for none)."""
    # same-dtype float32 arithmetic: on CPU a mixed bf16 -> f32 add_ is several times slower than
    # converting into a scratch buffer and adding float32 to float32
    acc = scratch = None
    for x, w in kept:
        if acc is None:
            acc = x.to(F32, copy=True)
            if w != 1:
                acc.mul_(w)
            continue
        if x.dtype != F32:
            scratch = torch.empty_like(acc) if scratch is None else scratch
            x = scratch.copy_(x)
        acc.add_(x, alpha=w)
    if acc is None:
        acc = torch.zeros(like.shape, dtype=F32, device=like.device)
    return acc
