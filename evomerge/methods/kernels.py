"""The torch merge kernels: one function per planned merge, run eagerly or under ``torch.compile``.

Each kernel computes a range of one output tensor from flat (1-D) views of its inputs and writes it
into ``out`` (any float dtype) in place; it returns a 0-d bool tensor, True when every float32
value was finite (:func:`finite`). Everything a kernel needs arrives as a
:class:`~evomerge.methods.plan.TensorPlan` and a :class:`~evomerge.methods.plan.Segment` (Python
numbers): under ``torch.compile`` numbers are not specialized (``specialize_float`` /
``specialize_int`` off, ``dynamic=True``), so one graph serves every candidate of one structure
(live sources, trim variant, switches), every value and size. The kernels work in place on buffers
of their own, so an eager chunk loop can hand them the same buffers chunk after chunk (a workspace,
:func:`_buf`) and compiled code fuses them away.

The arithmetic is the reference's (:mod:`evomerge.methods.task_vectors`) step by step, float32
throughout: ``d = x - base``; trim; ``/ divisor``; ``* weight``; TIES sign election and disjoint
merge, or a sum; ``* lambda``; ``+ base``; one rounding to the output dtype. A magnitude trim is a
select (``hardshrink``) where the reference multiplies by a boolean mask; the two differ only in the
sign of a dropped zero, which no later step observes (a zero never agrees with the elected sign and
adds nothing to a sum that starts at +0). Eager evaluation matches the reference bit for bit (Python
floats, as the reference passes them; its sums with ``torch.add(alpha=)``); compiled code may
contract a multiply and an add into one fused multiply-add, which changes a value by at most about
one float32 rounding before the final cast.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from collections.abc import Callable, Sequence

import torch

from evomerge.methods.plan import Segment, TensorPlan
from evomerge.methods.sparsify import dare_uniform24_

# CPU: Inductor picks serial or OpenMP-parallel code from the size seen at the *first* call, and a
# dynamic-shape graph first compiled for a small tensor (a norm, a short tie segment) then ran every
# later tensor on one thread (whole TIES candidate 478 -> 375 ms on the 349M bench with this switch)
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


Workspace = dict  # reusable buffers of an eager chunk loop: fresh temporaries cost page faults


def _buf(ws: Workspace | None, key, like: torch.Tensor, dtype: torch.dtype = torch.float32,
         fill: float | None = None) -> torch.Tensor:
    """A tensor of ``like``'s length and ``dtype`` for the kernel to write (``fill``: holding that
    value): from the workspace ``ws`` (eager chunk loops reuse it across chunks; glibc returned freed
    512 KiB temporaries to the OS, and faulting them in again cost a third of an eager TIES merge),
    or new (compiled kernels)."""
    n = like.shape[0]
    if ws is None:
        got = torch.empty(n, dtype=dtype, device=like.device)
        return got if fill is None else got.fill_(fill)
    got = ws.get(key)
    if got is None or got.shape[0] < n:
        got = ws[key] = torch.empty(n, dtype=dtype, device=like.device)
        if fill is not None:
            got.fill_(fill)
    return got[:n]


def finite(res: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """0-d bool: every value of ``res`` is finite. ``res - res`` is 0 for finite values and nan for
    inf and nan, so its sum is exact (no overflow) and ~9x cheaper on CPU than ``isfinite().all()``."""
    return torch.isfinite(torch.sub(res, res, out=_buf(ws, "finite", res)).sum())


def _axpy_(acc: torch.Tensor, x: torch.Tensor, w: float) -> torch.Tensor:
    """``acc += w * x``: eagerly ``torch.add(alpha=)``, the reference's operation (a fused
    multiply-add on CPU); compiled, a multiply and an add (which Inductor may contract)."""
    return acc.add_(x * w) if torch.compiler.is_compiling() else acc.add_(x, alpha=w)


def task_vector_kernel(out: torch.Tensor, base: torch.Tensor, xs: Sequence[torch.Tensor], plan: TensorPlan,
                       seg: Segment, ws: Workspace | None = None) -> torch.Tensor:
    """Entries ``seg.start .. seg.end - 1`` of ``plan`` (``out``, ``base``, ``xs``: those entries of
    the output, the base and the live sources, in plan order; ``ws``: see :func:`_buf`).

    Every step is one elementwise op that CPU eager runs vectorized, in place on the kernel's own
    buffers (``torch.where`` with a data-dependent mask ran ~25x slower per entry): a magnitude trim
    is ``hardshrink`` (keeps ``|d| > s``, else +0), a breadcrumbs band the difference of two, a DARE
    drop a multiply by the mask (as the reference). The election is the reference's, bit for bit:
    with ``s = sign(total)`` (``total`` summed from +0, so never -0), ``relu(s * w d)`` is ``|w d|``
    where ``w d`` agrees and +0 elsewhere; agreeing terms share one sign, so their sum times ``s`` is
    the reference's sum (rounding is symmetric in sign), and the ``sign`` of each term (0 or 1)
    selects the agreeing weights for the divisor."""
    b = base if base.dtype == torch.float32 else _buf(ws, "base", base).copy_(base)  # never written
    hashed = plan.mode == "hash"
    if hashed:
        idx = ws.get("idx") if ws is not None else None
        if idx is None or idx.shape[0] < b.shape[0]:  # 0, 1, 2, ...: made once per workspace
            idx = torch.arange(b.shape[0], device=b.device, dtype=torch.int64)
            if ws is not None:
                ws["idx"] = idx
        idx = idx[:b.shape[0]]
        wide, counter = _buf(ws, "wide", b, torch.int64), _buf(ws, "counter", b, torch.int32)
        scratch, keep = _buf(ws, "scratch", b, torch.int32), _buf(ws, "keep", b, torch.bool)
    ds = []
    for i, src in enumerate(plan.sources):
        d = _buf(ws, ("d", i), b).copy_(xs[i]).sub_(b)
        if seg.drop[i] is not None:
            dropped = torch.hardshrink(d, seg.drop[i], out=_buf(ws, "dropped", b))
        if seg.keep[i] is not None:
            torch.hardshrink(d, seg.keep[i], out=d)
        if seg.drop[i] is not None:
            d.sub_(dropped)
        if hashed and src.dare is not None:
            counter.copy_(torch.add(idx, seg.start + src.dare.key, out=wide))  # the counter, mod 2^32
            d.mul_(torch.lt(dare_uniform24_(counter, scratch), src.dare.cutoff, out=keep))
        if plan.rescale:
            d.div_(src.divisor)
        ds.append(d)
    acc = _buf(ws, "acc", b).zero_()
    if plan.elect:
        total = _buf(ws, "total", b).zero_()
        for d, src in zip(ds, plan.sources):
            total.add_(d.mul_(src.weight))  # d is now w d
        sign = torch.copysign(_buf(ws, "one", b, fill=1.0), total, out=total)  # +1 where the sum is >= 0
        divisor = _buf(ws, "divisor", b).zero_() if plan.normalize else None
        for wd, src in zip(ds, plan.sources):
            agreeing = wd.mul_(sign).relu_()
            acc.add_(agreeing)
            if divisor is not None:
                _axpy_(divisor, agreeing.sign_(), src.weight)
        acc.mul_(sign)
        if divisor is not None and plan.nonnegative:  # a 0 divisor: no source agrees, acc is 0 there
            acc.div_(divisor.clamp_min_(torch.finfo(torch.float32).tiny))
        elif divisor is not None:
            acc.div_(divisor.add_(torch.eq(divisor, 0, out=_buf(ws, "zero", b, torch.bool))))  # 1: none agrees
    else:
        for d, src in zip(ds, plan.sources):
            _axpy_(acc, d, src.weight)
        acc.div_(plan.norm_div)
    res = acc.mul_(plan.lam).add_(b)
    out.copy_(res)
    return finite(res, ws)


def linear_kernel(out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float],
                  ws: Workspace | None = None) -> torch.Tensor:
    """``sum_i w_i x_i`` into ``out`` (``weights`` already divided by their sum when normalizing, zero
    weights left out, as the reference does): ``x_0 * w_0``, then ``+ w_i x_i`` in source order."""
    acc = _buf(ws, "acc", out).copy_(xs[0]).mul_(weights[0])
    for x, w in zip(xs[1:], weights[1:]):
        _axpy_(acc, x if x.dtype == torch.float32 else _buf(ws, "x", out).copy_(x), w)
    out.copy_(acc)
    return finite(acc, ws)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, name: str) -> Callable:
    """``fn`` under ``torch.compile`` (dynamic shapes, full graph); a backend that cannot compile
    it warns once and runs ``fn`` eagerly from then on (same values within rounding, slower)."""
    import torch._dynamo

    # every (structure, dtype, alignment) variant is its own graph; allow many before giving up
    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
    state = {"fn": torch.compile(fn, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as err:  # noqa: BLE001 - a backend that cannot compile: stay correct, eagerly
            if state["fn"] is fn:
                raise
            warnings.warn(f"torch.compile failed for the {name} kernel ({type(err).__name__}: "
                          f"{str(err)[:200]}); using the eager kernel", RuntimeWarning, stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    return run


@functools.lru_cache(maxsize=None)
def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` (Triton on CUDA, a C++ compiler on CPU)."""
    try:
        if device.type == "cuda":
            import triton  # noqa: F401
            return True
        if device.type == "cpu":
            return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    except ImportError:
        return False
    return False
