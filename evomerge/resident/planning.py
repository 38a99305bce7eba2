"""Planning a resident candidate: each output tensor of a recipe's :class:`~evomerge.materialize.Plan`
becomes one :class:`TensorJob` that names its kernel, the backend chosen for it
(:func:`~evomerge.methods.backends.choose_backend`, the one rule) and everything the kernel reads.

* Task-vector methods (``MethodSpec.task_vector``) get a :class:`~evomerge.methods.plan.TensorPlan`.
  Magnitude cuts (TIES, breadcrumbs) come from per-(source, base) rank orders computed once
  (:mod:`evomerge.resident.stats`): the exact top-k set of any density costs a few element reads.
  Without statistics they are found by :func:`~evomerge.methods.plan.find_top_cuts`. DARE masks are
  hashed inside the kernels from (seed, source, flat index): no random stream, no mask in memory.
* Linear: its live weights; SLERP: its two coefficients (norms and dot product cached per source);
  data-flow copies: a copy or a scaled copy.
* Everything else (DELLA, ``rescale_l1``, model stock, passthrough, nuslerp, ... any method without
  planned kernels), and a tensor whose plan cannot be made (a nan task vector), runs the method's
  registered kernel on the resident tensors: a ``reference`` job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from evomerge.errors import MergeError
from evomerge.materialize import OutputTensor, TensorRef
from evomerge.methods import get_method, method_names
from evomerge.methods.backends import KernelRequest, choose_backend
from evomerge.methods.common import resolve
from evomerge.methods.linear import linear_weights
from evomerge.methods.plan import Request, TensorPlan, TopCut, build_plan, find_top_cuts, live_sources
from evomerge.methods.slerp import DOT_THRESHOLD, NORM_EPS
from evomerge.resident.stats import HostValues, rank_order, top_cut


def fast_methods() -> tuple[str, ...]:
    """The methods whose tensors run planned kernels (the others run their reference kernel)."""
    return tuple(n for n in method_names() if n in ("linear", "slerp")
                 or (get_method(n).task_vector is not None and get_method(n).task_vector.planned()))


@dataclass
class TensorJob:
    """How one output tensor is written into ``out`` (its flat target).

    ``kind``: ``copy``, ``scale``, ``slerp``, ``linear``, ``task_vector``, ``reference`` (the method's
    registered kernel) or ``compute`` (the plan's own :meth:`OutputTensor.compute`, e.g. rows
    realigned to another vocabulary); ``backend``: what computes it. ``inputs``: flat tensors
    (task_vector: the base, then the live sources in plan order; linear: the live sources; slerp:
    base, source; copy / scale: the source); ``values``: linear weights, SLERP coefficients or the
    scale factor; ``call``: a reference job's ``(spec, xs, base, params, seed)``, a compute job's
    output tensor."""

    name: str
    kind: str
    backend: str
    out: torch.Tensor
    inputs: tuple[torch.Tensor, ...] = ()
    plan: TensorPlan | None = None
    values: tuple = ()
    call: Any = None


class Planner:
    """Jobs for the output tensors of one :class:`ResidentSources`, with the per-source caches that
    make planning cheap from the second candidate on (rank orders, single-entry readers, SLERP
    reductions)."""

    def __init__(self, sources):
        self.sources = sources
        self._orders: dict[tuple, Any] = {}  # (source ref, base ref) -> rank order
        self._values: dict[TensorRef, HostValues] = {}  # host tensors' single-entry readers
        self._slerp: dict[tuple, tuple] = {}  # (source ref, base ref) -> (n0, n1, dot)
        self._gen = torch.Generator(device=sources.device)  # only for resolve's checks

    def stats_nbytes(self) -> int:
        return sum(o.nbytes for o in self._orders.values())

    def job(self, ot: OutputTensor, out: torch.Tensor) -> TensorJob:
        """The job writing ``ot`` into the flat ``out``."""
        rs, op = self.sources, ot.op
        if op.vocab is not None:  # rows realigned to another vocabulary: the plan's own computation
            return TensorJob(ot.name, "compute", "compute", out, call=ot)
        if op.kind == "copy":  # data-flow / stack layer: a copy, maybe scaled (folded)
            src = rs.tensor(op.inputs[0]).view(-1)
            if op.scale == 1.0:
                return TensorJob(ot.name, "copy", "copy", out, (src,))
            return TensorJob(ot.name, "scale", self._choose("scale", (out, src), 1), out, (src,), values=(op.scale,))
        spec, seed = get_method(op.method), op.seed
        xs = [rs.tensor(r) for r in op.inputs]
        base = rs.tensor(op.base) if op.base is not None else None
        params = {**op.source_params, **op.global_params}
        reference = TensorJob(ot.name, "reference", "reference", out, call=(spec, xs, base, params, seed))
        decl = spec.task_vector
        if spec.name not in ("linear", "slerp") and not (decl is not None and decl.planned()):
            return reference
        p = resolve(spec.name, xs, base, self._gen if spec.stochastic else None, params)
        if spec.name == "linear":
            kept = linear_weights(p)  # raises the reference's error for weights summing to 0
            if not kept:
                return reference
            live = tuple(xs[i].view(-1) for i, _ in kept)
            return TensorJob(ot.name, "linear", self._choose("linear", (out, *live), len(live)), out, live,
                       values=tuple(w for _, w in kept))
        if spec.name == "slerp":
            return self._slerp_job(ot.name, out, xs[0], base, op.inputs[0], op.base, p["t"])
        if not decl.planned(p):
            return reference
        numel = base.numel()
        live = [xs[i] for i in live_sources(decl.trim, p, numel)]
        refs = [(r, op.base) for r in op.inputs]
        plan = build_plan(decl.trim, decl.elect != "none", p, numel, seed,
                          lambda requests: self._top_cuts(refs, xs, base, requests))
        if plan is None:
            return reference
        inputs = (base.view(-1), *(xs[s.index].view(-1) for s in plan.sources))
        return TensorJob(ot.name, "task_vector", self._choose("task_vector", (out, base, *live), len(live)), out,
                   inputs, plan=plan)

    def _choose(self, kind: str, tensors: tuple[torch.Tensor, ...], sources: int) -> str:
        rs = self.sources
        return choose_backend(KernelRequest(kind, tensors, sources, batched=True, compile=rs.fused,
                                            native=rs.native, out_dtype=tensors[0].dtype))

    def _values_of(self, r: TensorRef) -> HostValues:
        hv = self._values.get(r)
        if hv is None:
            hv = self._values[r] = HostValues(self.sources.host_tensor(r))
        return hv

    def _top_cuts(self, refs: list[tuple[TensorRef, TensorRef]], xs: list[torch.Tensor], base: torch.Tensor,
                  requests: list[Request]) -> dict[Request, TopCut] | None:
        """The top-k sets of ``requests`` from the rank orders (computed on first use), or by a
        counting pass without statistics."""
        if not self.sources.use_stats:
            return find_top_cuts(xs, base, requests)
        out = {}
        for i, k in requests:
            order = self._orders.get(refs[i])
            if order is None:
                order = self._orders[refs[i]] = rank_order(xs[i], base)
            out[i, k] = top_cut(order, self._values_of(refs[i][0]), self._values_of(refs[i][1]), k)
        return out

    def _slerp_job(self, name, out, x, base, src_ref, base_ref, t) -> TensorJob:
        key = (src_ref, base_ref)
        red = self._slerp.get(key)
        if red is None:  # |v0|, |v1|, <v0, v1>: independent of t, computed once as the reference does
            v0, v1 = base.float(), x.float()
            red = (torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1),
                   torch.dot(v0.reshape(-1), v1.reshape(-1)))
            self._slerp[key] = red = tuple(r.cpu() for r in red)  # c0, c1 are computed on the host
        n0, n1, dot = red
        one = torch.ones_like(n0)
        dot = dot / torch.where(n0 > NORM_EPS, n0, one) / torch.where(n1 > NORM_EPS, n1, one)
        colinear = dot.abs() > DOT_THRESHOLD
        theta = torch.arccos(dot.clamp(-1.0, 1.0))
        safe = torch.where(colinear, one, torch.sin(theta))
        c0 = torch.where(colinear, one * (1.0 - t), torch.sin((1.0 - t) * theta) / safe)
        c1 = torch.where(colinear, one * t, torch.sin(t * theta) / safe)
        inputs = (base.view(-1), x.view(-1))
        return TensorJob(name, "slerp", self._choose("slerp", (out, *inputs), 1), out, inputs, values=(c0, c1))


def target_view(ot: OutputTensor, dst: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """``ot``'s tensor in the target ``dst``, flat; a :class:`MergeError` when it is missing or unfit."""
    out = dst.get(ot.name)
    if out is None:
        raise MergeError(f"target has no tensor '{ot.name}' (the recipe's output has {ot.shape})")
    if tuple(out.shape) != tuple(ot.shape) or out.device != device or not out.is_contiguous():
        raise MergeError(f"target tensor '{ot.name}' is {tuple(out.shape)} on {out.device}; "
                         f"expected a contiguous {ot.shape} tensor on {device}")
    return out.view(-1)
