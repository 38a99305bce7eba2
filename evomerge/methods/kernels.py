"""The torch merge kernels: one function per planned merge, run eagerly or under ``torch.compile``.

Each kernel computes a range of one output tensor from flat (1-D) views of its inputs and writes it
into ``out`` (any float dtype) in place; it returns a 0-d bool tensor, True when every float32
value was finite. Everything a kernel needs arrives as a :class:`~evomerge.methods.plan.TensorPlan`
and a :class:`~evomerge.methods.plan.Segment` (Python numbers): under ``torch.compile`` numbers are
not specialized (``specialize_float`` / ``specialize_int`` off, ``dynamic=True``), so one graph serves
every candidate of one structure (live sources, trim variant, switches), every value and size.

The arithmetic is the reference's (:mod:`evomerge.methods.task_vectors`) step by step, float32
throughout: ``d = x - base``; trim; ``/ divisor``; ``* weight``; TIES sign election and disjoint
merge, or a sum; ``* lambda``; ``+ base``; one rounding to the output dtype. Masking is a select
(``where(keep, d, 0)``) instead of the reference's multiply by a boolean (about 2x cheaper once
compiled on CPU); the two differ only in the sign of a dropped zero, which no later step observes (a
zero never agrees with the elected sign and adds nothing to a sum that starts at +0). Eager
evaluation matches the reference bit for bit (Python floats, as the reference passes them; its sums
with ``torch.add(alpha=)``); compiled code may contract a multiply and an add into one fused
multiply-add, which changes a value by at most about one float32 rounding before the final cast.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from collections.abc import Callable, Sequence

import torch

from evomerge.methods.plan import Segment, TensorPlan
from evomerge.methods.sparsify import dare_uniform24

# CPU: Inductor picks serial or OpenMP-parallel code from the size seen at the *first* call, and a
# dynamic-shape graph first compiled for a small tensor (a norm, a short tie segment) then ran every
# later tensor on one thread (whole TIES candidate 478 -> 375 ms on the 349M bench with this switch)
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


def _axpy(acc: torch.Tensor, x: torch.Tensor, w: float) -> torch.Tensor:
    """``acc + w * x``: eagerly ``torch.add(alpha=)``, the reference's operation (a fused multiply-add
    on CPU); compiled, a multiply and an add (which Inductor may contract)."""
    return acc + x * w if torch.compiler.is_compiling() else torch.add(acc, x, alpha=w)


def task_vector_kernel(out: torch.Tensor, base: torch.Tensor, xs: Sequence[torch.Tensor], plan: TensorPlan,
                       seg: Segment) -> torch.Tensor:
    """Entries ``seg.start .. seg.end - 1`` of ``plan`` (``out``, ``base``, ``xs``: those entries of
    the output, the base and the live sources, in plan order)."""
    b = base.float()
    mode = plan.mode
    if mode == "hash":
        idx = torch.arange(b.shape[0], device=b.device, dtype=torch.int64) + seg.start
    ds = []
    for i, src in enumerate(plan.sources):
        d = xs[i].float() - b
        if mode == "thr":
            d = torch.where(d.abs() >= seg.keep[i], d, 0.0)
        elif mode == "band":
            a = d.abs()
            d = torch.where((a >= seg.keep[i]) & ~(a >= seg.drop[i]), d, 0.0)
        elif mode == "hash" and src.dare is not None:
            u = dare_uniform24((idx + src.dare.key).to(torch.int32))  # the counter, mod 2^32
            d = torch.where(u < src.dare.cutoff, d, 0.0)
        if plan.rescale:
            d = d / src.divisor
        ds.append(d)
    if plan.elect:
        wds = [d * src.weight for d, src in zip(ds, plan.sources)]
        total = torch.zeros_like(b)
        for wd in wds:
            total = total + wd
        positive = total >= 0
        merged = torch.zeros_like(b)
        divisor = torch.zeros_like(b) if plan.normalize else None
        for wd, src in zip(wds, plan.sources):
            agree = torch.where(positive, wd > 0, wd < 0)
            merged = merged + torch.where(agree, wd, 0.0)
            if divisor is not None:
                divisor = divisor + torch.where(agree, src.weight, 0.0)
        if divisor is not None:
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
        acc = merged
    else:
        acc = torch.zeros_like(b)
        for d, src in zip(ds, plan.sources):
            acc = _axpy(acc, d, src.weight)
        acc = acc / plan.norm_div
    res = acc * plan.lam + b
    out.copy_(res)
    return torch.isfinite(res).all()


def linear_kernel(out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i x_i`` into ``out`` (``weights`` already divided by their sum when normalizing, zero
    weights left out, as the reference does): ``x_0 * w_0``, then ``+ w_i x_i`` in source order."""
    acc = xs[0].float() * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        acc = _axpy(acc, x.float(), w)
    out.copy_(acc)
    return torch.isfinite(acc).all()


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
