"""Linear merge (model soups)."""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, Problem
from evomerge.methods import native
from evomerge.methods.common import F32, cast_out, normalize_param, resolve, weight_param
from evomerge.methods.fused import fusable
from evomerge.methods.registry import register_method

# entries per chunk: fewer, larger ops than the TIES pipeline's (2 buffers of 2 MiB stay in L3);
# measured 0.52 ns/entry at 2^19 vs 1.0-1.2 at 2^17 for 3 bf16 sources on 2 cores
CHUNK = 1 << 19


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
    p = resolve("linear", tensors, None, generator, params)
    weights = p["weight"]
    total = float(sum(weights))
    if p["normalize"] and abs(total) < 1e-8:
        raise ConfigError(Problem(
            "method 'linear': params.weight", f"weights {weights} sum to {total:g}; cannot normalize",
            "change the weights or set normalize: false",
        ))
    if p["normalize"]:
        weights = [w / total for w in weights]
    kept = [(x, w) for x, w in zip(tensors, weights) if w != 0]
    if kept and fusable([x for x, _ in kept], kept[0][0]):
        out = _native(kept, out_dtype or F32)
        return out if out is not None else _chunked(kept, out_dtype or F32)
    # same-dtype float32 arithmetic: on CPU a mixed bf16 -> f32 add_ is several times slower than
    # converting into a scratch buffer and adding float32 to float32
    acc = scratch = None
    for x, w in zip(tensors, weights):
        if w == 0:
            continue
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
        acc = torch.zeros(tensors[0].shape, dtype=F32, device=tensors[0].device)
    return cast_out(acc, out_dtype)


def _native(kept: list, out_dtype: torch.dtype) -> torch.Tensor | None:
    """The loop above in one call of the native C kernel (:mod:`evomerge.methods.native`, the same
    float32 operations in the same order, so the same bits). ``None`` when it cannot run here or an
    output is not finite (the torch loop then defines that case)."""
    if not native.available():
        return None
    xs = [x if x.is_contiguous() else x.contiguous() for x, _ in kept]
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    job = native.linear_job(out, xs, [w for _, w in kept])
    if job is None or not native.run([job])[0]:
        return None
    return out


def _chunked(kept: list, out_dtype: torch.dtype) -> torch.Tensor:
    """The loop above, chunk by chunk (CPU): the float32 conversions stay in cache instead of
    streaming whole-tensor temporaries through memory, and each chunk is rounded to ``out_dtype``
    as it is done. The same operations per entry, so the same values."""
    shape = kept[0][0].shape
    xs = [(x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1), w) for x, w in kept]
    n = xs[0][0].numel()
    out = torch.empty(n, dtype=out_dtype)
    scratch = torch.empty(min(n, CHUNK), dtype=F32)
    accbuf = torch.empty(min(n, CHUNK), dtype=F32) if out_dtype != F32 else None
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        acc = out[s:e] if accbuf is None else accbuf[:e - s]
        for j, (x, w) in enumerate(xs):
            if j == 0:
                acc.copy_(x[s:e])
                if w != 1:
                    acc.mul_(w)
                continue
            acc.add_(x[s:e] if x.dtype == F32 else scratch[:e - s].copy_(x[s:e]), alpha=w)
        if accbuf is not None:
            out[s:e].copy_(acc)
    return out.view(shape)
