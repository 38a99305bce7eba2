"""Which kernel computes a merge, chosen in one place (:func:`choose_backend`), and running a plan.

Backends (each reports its name in the :class:`MergeResult` it returns):

* ``reference``: the method's whole-tensor float32 pipeline, any method on any device; the
  definition every other backend reproduces.
* ``torch``: :mod:`evomerge.methods.kernels` eagerly; on CPU over ranges of at most :data:`CHUNK`
  entries, so the float32 temporaries stay in cache. The reference's float32 operations in its
  order: the same bits.
* ``compiled``: the same kernels under ``torch.compile`` (Inductor C++ on CPU, Triton on CUDA), one
  launch per tie-cut segment; within about one float32 rounding of the reference before the cast.
* ``native``: :mod:`evomerge.methods.native` (C, CPU): the same bits as the reference.

Every backend rounds the float32 result once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.errors import MergeError
from evomerge.methods import kernels, native
from evomerge.methods.common import F32
from evomerge.methods.plan import TensorPlan

BACKENDS = ("native", "compiled", "torch", "reference")  # in order of preference
FUSED_MIN = 1 << 15  # entries: below this a single tensor's planning costs more than it saves
CHUNK = 1 << 17  # entries per range of the eager torch kernels on CPU (a few 512 KiB buffers in L2/L3)
KINDS = ("task_vector", "linear", "slerp", "scale")  # what the planned kernels compute
NATIVE_KINDS = ("task_vector", "linear")


class BackendUnavailable(MergeError):
    """A requested backend cannot compute this merge here."""


@dataclass(frozen=True)
class MergeResult:
    """A merged tensor and the backend that computed it."""

    tensor: torch.Tensor
    backend: str


@dataclass(frozen=True)
class KernelRequest:
    """What a merge needs from a backend.

    ``tensors``: everything the kernel reads and writes (live sources, base, a preallocated
    output); ``sources``: how many live sources; ``planned``: the merge has a planned form (task
    vectors: not DELLA's ranked random drop, not ``rescale_l1``; a reference-only method: False);
    ``batched``: part of a resident candidate (the native kernel takes all of its tensors in one
    call; no size floor); ``compile``: the caller compiles its torch kernels; ``native``: the
    caller allows the native kernel; ``out_dtype``: the result's dtype."""

    kind: str
    tensors: tuple[torch.Tensor, ...]
    sources: int
    planned: bool = True
    batched: bool = False
    compile: bool = False
    native: bool = True
    out_dtype: torch.dtype = F32


def _capable(backend: str, req: KernelRequest) -> bool:
    """Whether ``backend`` can compute ``req`` here at all."""
    if backend == "reference":
        return req.kind != "scale"
    if not req.planned or req.kind not in KINDS:
        return False
    if backend == "native":
        return (req.kind in NATIVE_KINDS and req.native and 1 <= req.sources <= native.MAX_SOURCES
                and req.out_dtype in native.DTYPES and native.readable(*req.tensors) and native.available())
    if backend == "compiled":
        return kernels.compile_available(req.tensors[0].device)
    return backend == "torch"


def _worth(backend: str, req: KernelRequest) -> bool:
    """Whether ``backend`` pays for ``req`` (the preference part of the rule)."""
    if backend == "compiled":
        return req.compile
    if backend in ("native", "torch"):
        t = req.tensors[0]
        return req.batched or (t.device.type == "cpu" and t.numel() >= FUSED_MIN)
    return True


def choose_backend(req: KernelRequest, want: str | None = None) -> str:
    """The backend for ``req``; the rule, in order:

    1. ``native`` when it can run the merge (CPU, contiguous float32/bfloat16/float16 tensors,
       1..8 live sources, a planned form, the library builds, ``EVOMERGE_NATIVE`` is not 0 and the
       caller allows it) and a planned kernel pays: the tensor belongs to a resident candidate, or
       it is a CPU tensor of at least :data:`FUSED_MIN` entries;
    2. ``compiled`` when the caller compiles (resident ``fused=True``) and ``torch.compile`` works
       for the device;
    3. ``torch`` when a planned kernel pays (as in 1.);
    4. ``reference``.

    ``want`` names a backend to use instead of the rule (tests, benchmarks); a
    :class:`BackendUnavailable` error when it cannot compute ``req`` here.
    """
    if want is not None:
        if want not in BACKENDS:
            raise ValueError(f"unknown merge backend '{want}'; one of {', '.join(BACKENDS)}")
        if not _capable(want, req):
            raise BackendUnavailable(f"the '{want}' backend cannot compute this {req.kind} merge here")
        return want
    return next(b for b in BACKENDS if _worth(b, req) and _capable(b, req))


def kernel(name: str, backend: str):
    """The torch kernel ``name`` for ``backend`` (``torch``: eager, ``compiled``: under torch.compile)."""
    fn = {"task_vector": kernels.task_vector_kernel, "linear": kernels.linear_kernel}[name]
    return kernels.compiled(fn, name) if backend == "compiled" else fn


def run_plan(plan: TensorPlan, out: torch.Tensor, base: torch.Tensor, xs: Sequence[torch.Tensor],
             backend: str) -> torch.Tensor:
    """``plan`` into the flat ``out`` with the torch kernels of ``backend`` (``torch`` or
    ``compiled``) from flat ``base`` and the live sources ``xs`` (plan order); returns the 0-d
    all-finite flag. One launch per tie-cut segment, and eagerly on CPU ranges of :data:`CHUNK`."""
    fn = kernel("task_vector", backend)
    chunk, ws = (CHUNK, {}) if backend == "torch" and out.device.type == "cpu" else (None, None)
    ok = None
    for seg in plan.segments(chunk):
        s, e = seg.start, seg.end
        flag = fn(out[s:e], base[s:e], [x[s:e] for x in xs], plan, seg, ws)
        ok = flag if ok is None else ok & flag
    return ok if ok is not None else torch.tensor(True)


def run_linear(out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float],
               backend: str) -> torch.Tensor:
    """``sum_i w_i x_i`` into the flat ``out`` with the torch kernels of ``backend`` (ranges of
    :data:`CHUNK` eagerly on CPU); returns the 0-d all-finite flag."""
    fn = kernel("linear", backend)
    n = out.numel()
    chunk, ws = (CHUNK, {}) if backend == "torch" and out.device.type == "cpu" else (max(n, 1), None)
    ok = torch.tensor(True)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        ok = ok & fn(out[s:e], [x[s:e] for x in xs], weights, ws)
    return ok


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a flat contiguous tensor (a view when it already is contiguous)."""
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def compute_plan(plan: TensorPlan, base: torch.Tensor, xs: Sequence[torch.Tensor], backend: str,
                 out_dtype: torch.dtype) -> torch.Tensor | None:
    """One tensor of ``plan`` (shape of ``base``) by ``backend`` (not ``reference``), rounded once
    to ``out_dtype``; ``xs``: every source (the plan picks the live ones). ``None`` when a value is
    not finite (the reference pipeline defines that case)."""
    bf = flat(base)
    live = [flat(xs[s.index]) for s in plan.sources]
    out = torch.empty(bf.numel(), dtype=out_dtype, device=bf.device)
    if backend == "native":
        job = native.task_vector_job(out, bf, live, plan)
        ok = job is not None and native.run([job])[0]
    else:
        ok = bool(run_plan(plan, out, bf, live, backend))
    return out.view(base.shape) if ok else None


def merge(method, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
          generator: torch.Generator | None = None, out_dtype: torch.dtype | None = None,
          backend: str | None = None, **params) -> MergeResult:
    """One tensor merged by ``method`` (a name or spec), as ``get_method(method)(...)`` computes it,
    with the backend that computed it; ``backend`` forces one (see :func:`choose_backend`).
    Methods without planned kernels have only the ``reference`` backend."""
    from evomerge.methods.linear import run_linear
    from evomerge.methods.registry import get_method
    from evomerge.methods.task_vectors import run_task_vector

    spec = get_method(method) if isinstance(method, str) else method
    kw = dict(generator=generator, out_dtype=out_dtype, backend=backend, **params)
    if spec.task_vector is not None:
        return run_task_vector(spec, tensors, base, **kw)
    if spec.name == "linear":
        return run_linear(tensors, **kw)
    if backend not in (None, "reference"):
        raise BackendUnavailable(f"merge method '{spec.name}' has only the reference backend")
    return MergeResult(spec(tensors, base, generator=generator, out_dtype=out_dtype, **params), "reference")
