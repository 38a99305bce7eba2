"""Fused per-tensor merge kernels for the resident materializer.

Each kernel computes one output tensor from flat (1-D, contiguous) views of the resident inputs and
writes it into ``out`` (any float dtype) in place; it returns a 0-d bool tensor, True when every
value was finite. Numbers that change from candidate to candidate arrive in small device tensors
(``p`` float32, ``c`` int64), never as Python floats, so one compiled graph serves every candidate
of a given structure (method family, number of sources, switches) and every tensor size.

The arithmetic follows the reference kernels in :mod:`evomerge.methods` step by step (same
operations, same order, float32 throughout): ``delta = x - base``; trim (``delta * keep``, then
``/ keep_prob`` when rescaling); ``* weight``; TIES sign election and disjoint merge; ``* lambda``;
``+ base``; one rounding to the output dtype. Masking is a select (``where(keep, d, 0)``) instead of
the reference's multiply by a boolean (about 2x cheaper once compiled on CPU); the two differ only
in the sign of a dropped zero, which no later step can observe (a zero never agrees with the
elected sign and adds nothing to a sum that starts at +0). Eager evaluation of these functions
matches the reference bit for bit; compiled (Inductor C++ / Triton) evaluation may contract a multiply and an
add into one fused multiply-add, which changes a result by at most about one float32 rounding step
before the cast to the output dtype.

Layout of ``p`` (float32): per source ``i`` the four values ``[weight, t_hi, t_lo, divisor]``
at ``4 * i``, then ``lambda`` and the normalization divisor at ``4 * n`` and ``4 * n + 1``
(divisor 1.0 means "do not divide": ``x / 1.0 == x`` exactly). Trim modes (static):

* ``"none"``: no trim;
* ``"thr"`` (TIES): keep ``|d| >= t_hi``;
* ``"band"`` (breadcrumbs): keep ``|d| >= t_hi and not |d| >= t_lo``;
* ``"hash"`` (DARE): keep ``dare_uniform24((start + j + key_i) mod 2^32) < cutoff_i`` for entry ``j``,
  the counter-based masks of :mod:`evomerge.methods.sparsify`, computed in registers; ``c`` (int64)
  holds ``[start, key_0, cutoff_0, key_1, cutoff_1, ...]``.

A magnitude threshold is one float per source and segment: the caller cuts a tensor into contiguous
segments at the tie cuts of :mod:`evomerge.resident.stats` and passes, per segment, ``thr`` where
ties at ``thr`` are kept and the next float32 above ``thr`` where they are not, so ``>=`` selects
exactly the reference's top-k set with no index arithmetic in the kernel. ``-1`` keeps
everything, ``inf`` nothing. ``rescale`` (static) divides kept entries by ``divisor``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from evomerge.methods.sparsify import dare_uniform24

P_STRIDE = 4  # floats per source in ``p``

# CPU: Inductor picks serial or OpenMP-parallel code from the size seen at the *first* call, and a
# dynamic-shape graph first compiled for a small tensor (a norm, a short tie segment) then ran every
# later tensor on one thread (whole TIES candidate 478 -> 375 ms on the 349M bench with this switch)
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


def _v(p, pl, i):
    """Value ``i`` of the parameters: a Python float eagerly (as the reference passes it; some
    kernels treat a Python-scalar operand specially, e.g. division by a reciprocal), else a 0-d tensor."""
    return pl[i] if pl is not None else p[i]


def _axpy(acc, x, p, i, pl):
    """``acc + p[i] * x``; eagerly (``pl``: the same values as Python floats) with ``torch.add(alpha=)``,
    the reference's operation, which some backends evaluate as one fused multiply-add."""
    return torch.add(acc, x, alpha=pl[i]) if pl is not None else acc + x * p[i]


def task_vector_merge(out, base, xs, p, c, pl=None, *, mode: str, elect: bool, normalize: bool,
                      rescale: bool):
    """``base + lambda * merge_i(w_i * trim_i(x_i - base))`` into ``out``; see the module doc."""
    n = len(xs)
    b32 = base.float()
    if mode == "hash":
        idx = torch.arange(b32.shape[0], device=b32.device, dtype=torch.int64) + c[0]
    wds = []
    for i in range(n):
        d = xs[i].float() - b32
        if mode == "thr":
            d = torch.where(d.abs() >= _v(p, pl, P_STRIDE * i + 1), d, 0.0)
        elif mode == "band":
            a = d.abs()
            d = torch.where((a >= _v(p, pl, P_STRIDE * i + 1)) & ~(a >= _v(p, pl, P_STRIDE * i + 2)), d, 0.0)
        elif mode == "hash":
            u = dare_uniform24((idx + c[1 + 2 * i]).to(torch.int32))
            d = torch.where(u < c[2 + 2 * i].to(torch.int32), d, 0.0)
        if rescale:
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
            merged = merged + torch.where(agree, wd, 0.0)
            if normalize:
                divisor = divisor + torch.where(agree, _v(p, pl, P_STRIDE * i), 0.0)
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
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
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
