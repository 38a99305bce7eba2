"""In-memory candidate materialization: every source resident on the device, each candidate
written in place into a preallocated model.

A search evaluates thousands of merges of the same few models. :class:`ResidentSources` reads
those models once (every tensor, on the device, in its stored dtype), and
:meth:`ResidentSources.materialize` writes a candidate recipe into the parameters of a resident
target model (or a dict of preallocated tensors): the sources and base are read once, the output
written once, accumulation in float32, and nothing the size of a model is allocated per candidate.

* ``sources``: loading, targets, :meth:`~ResidentSources.materialize` (returns a
  :class:`Materialized`: the target and the backend that computed each tensor).
* ``planning``: each output tensor of :func:`evomerge.materialize.plan_recipe`'s plan (recipe
  resolution is exactly the streaming path's) becomes one job with its backend, chosen by the one
  rule (:func:`evomerge.methods.backends.choose_backend`); TIES / breadcrumbs cuts come from
  per-source rank orders (``stats``).
* ``running``: the native CPU kernel takes every native job of a candidate in one call; torch
  kernels (eager, or compiled with ``fused``) run the rest.

Exactness: the native and eager kernels give the reference's tensors bit for bit (DARE masks with
the same seed included); compiled kernels (``fused=True`` where the native kernel does not run:
CUDA, or ``native=False``) may fuse a multiply-add and so differ from the reference by about one
float32 rounding before the final cast (one output-dtype ulp at most, rarely). Methods without
planned kernels (DELLA, ``rescale_l1``, model stock, passthrough, nuslerp, ...) run their reference
kernel on the resident tensors (exact; one tensor's temporaries at a time).
"""

from evomerge.resident.planning import fast_methods
from evomerge.resident.sources import Materialized, ResidentSources

FAST_METHODS = fast_methods()

__all__ = ["FAST_METHODS", "Materialized", "ResidentSources"]
