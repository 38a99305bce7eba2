"""Fused per-tensor merge kernels for the resident materializer.

Each kernel computes one output tensor from flat (1-D, contiguous) views of the resident inputs and
writes it into ``out`` (any float dtype) in place; it returns a 0-d bool tensor, True when every
value was finite. Numbers that change from candidate to candidate arrive in small device tensors
(``p`` float32, ``c`` int64), never as Python floats, so one compiled graph serves every candidate
of a given structure (method family, number of sources, switches) and every tensor size.

The arithmetic follows the reference kernels in :mod:`evomerge.methods` step by step (same
operations, same order, float32 throughout): ``delta = x - base``; trim (``delta * keep``, then
``/ keep_prob`` when rescaling); ``* weight``; TIES sign election and disjoint merge; ``* lambda``;
``+ base``; one rounding to the output dtype. Eager evaluation of these functions matches the
reference bit for bit; compiled (Inductor C++ / Triton) evaluation may contract a multiply and an
add into one fused multiply-add, which changes a result by at most about one float32 rounding step
before the cast to the output dtype.

Layout of ``p`` (float32): per source ``i`` the four values ``[weight, thr_hi, thr_lo, divisor]``
at ``4 * i``, then ``lambda`` and the normalization divisor at ``4 * n`` and ``4 * n + 1``
(divisor 1.0 means "do not divide": ``x / 1.0 == x`` exactly). Layout of ``c`` (int64): per source
``[cut_hi, cut_lo]``. A magnitude keep set is ``top(thr, cut) = (|d| > thr) | (|d| == thr & idx <= cut)``,
which is exactly the reference's top-k set when ``thr`` is the k-th largest ``|d|`` and ``cut`` the
flat index of the k-th entry in (magnitude descending, index ascending) order (see
:mod:`evomerge.resident.stats`). Modes: ``"none"`` (no trim), ``"thr"`` (``top(thr_hi, cut_hi)``),
``"band"`` (breadcrumbs: ``top(thr_hi, cut_hi) & ~top(thr_lo, cut_lo)``), ``"mask"`` (DARE: a
boolean mask per source, drawn by the caller).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

P_STRIDE = 4  # floats per source in ``p``


def _top(a: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return (a > thr) | ((a == thr) & (idx <= cut))


def _v(p, pl, i):
    """Value ``i`` of the parameters: a Python float eagerly (as the reference passes it; some
    kernels treat a Python-scalar operand specially, e.g. division by a reciprocal), else a 0-d tensor."""
    return pl[i] if pl is not None else p[i]


def _axpy(acc, x, p, i, pl):
    """``acc + p[i] * x``; eagerly (``pl``: the same values as Python floats) with ``torch.add(alpha=)``,
    the reference's operation, which some backends evaluate as one fused multiply-add."""
    return torch.add(acc, x, alpha=pl[i]) if pl is not None else acc + x * p[i]


def task_vector_merge(out, base, xs, masks, p, c, pl=None, *, mode: str, elect: bool, normalize: bool):
    """``base + lambda * merge_i(w_i * trim_i(x_i - base))`` into ``out``; see the module doc."""
    n = len(xs)
    b32 = base.float()
    idx = torch.arange(b32.shape[0], device=b32.device) if mode in ("thr", "band") else None
    wds = []
    for i in range(n):
        d = xs[i].float() - b32
        if mode != "none":
            if mode == "mask":
                keep = masks[i]
            else:
                a = d.abs()
                keep = _top(a, _v(p, pl, P_STRIDE * i + 1), c[2 * i], idx)
                if mode == "band":
                    keep = keep & ~_top(a, _v(p, pl, P_STRIDE * i + 2), c[2 * i + 1], idx)
            d = d * keep
            d = d / _v(p, pl, P_STRIDE * i + 3)
        wds.append(d)
    if elect:
        wds = [d * _v(p, pl, P_STRIDE * i) for i, d in enumerate(wds)]
        total = wds[0]
        for wd in wds[1:]:
            total = total + wd
        positive = total >= 0
        merged = torch.zeros_like(b32)
        divisor = torch.zeros_like(b32) if normalize else None
        for i, wd in enumerate(wds):
            agree = torch.where(positive, wd > 0, wd < 0)
            merged = merged + wd * agree
            if normalize:
                divisor = divisor + agree * _v(p, pl, P_STRIDE * i)
        if normalize:
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
        acc = merged
    else:
        acc = torch.zeros_like(b32)
        for i, d in enumerate(wds):
            acc = _axpy(acc, d, p, P_STRIDE * i, pl)
        acc = acc / _v(p, pl, P_STRIDE * n + 1)
    res = acc * _v(p, pl, P_STRIDE * n) + b32
    out.copy_(res)
    return torch.isfinite(res).all()


def linear_merge(out, xs, p, pl=None):
    """``sum_i w_i x_i`` into ``out`` (``p = [w_0 .. w_{n-1}]``, already divided by their sum when
    normalizing, zero weights left out, as the reference does)."""
    acc = xs[0].float() * _v(p, pl, 0)
    for i in range(1, len(xs)):
        acc = _axpy(acc, xs[i].float(), p, i, pl)
    out.copy_(acc)
    return torch.isfinite(acc).all()


def slerp_merge(out, base, x, p):
    """``base * c0 + x * c1`` into ``out`` (``p = [c0, c1]``, computed by the caller as the reference)."""
    res = torch.addcmul(base.float() * p[0], x.float(), p[1])  # the reference's two operations
    out.copy_(res)
    return torch.isfinite(res).all()


def scale_copy(out, x, p, pl=None):
    """``x * factor`` into ``out`` (data-flow scale folding; ``p = [factor]``)."""
    res = x.float() * _v(p, pl, 0)
    out.copy_(res)
    return torch.isfinite(res).all()


KERNELS: dict[str, Callable] = {
    "task_vector": task_vector_merge, "linear": linear_merge, "slerp": slerp_merge, "scale": scale_copy,
}


@functools.lru_cache(maxsize=None)
def get_kernel(name: str, fused: bool, **static) -> Callable:
    """The kernel ``name`` with its static switches bound; compiled with ``torch.compile`` when ``fused``."""
    fn = KERNELS[name]
    if static:
        fn = functools.partial(fn, **static)
    if not fused:
        return fn
    import torch._dynamo

    # every (structure, dtype, alignment) variant is its own graph; allow many before giving up
    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    state = {"fn": compiled}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as err:  # noqa: BLE001 - a backend that cannot compile: stay correct, eagerly
            if state["fn"] is fn:
                raise
            import warnings

            warnings.warn(f"torch.compile failed for the {name} kernel ({type(err).__name__}: "
                          f"{str(err)[:200]}); using the eager kernel", RuntimeWarning, stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    return run


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` (Triton on CUDA, a C++ compiler on CPU)."""
    try:
        if device.type == "cuda":
            import triton  # noqa: F401
            return True
        if device.type == "cpu":
            import shutil

            return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    except ImportError:
        return False
    return False
