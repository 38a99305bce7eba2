"""Per-tensor magnitude statistics of task vectors, computed once per (source, base) pair.

For one tensor with task vector ``d = x - base`` (float32) the statistic is its *rank order*:
the flat indices of ``|d|`` sorted by (magnitude descending, flat index ascending), i.e. a stable
descending argsort, stored as an int32 numpy array on the host (4 bytes per parameter per source). With it the
reference's exact top-k set (:func:`evomerge.methods.sparsify.top_k_mask`: ``k = int(density *
numel)``, ties at the threshold broken by lowest flat index) is, for any ``k``, without sorting or
scanning again::

    q = order[k - 1]                 # flat index of the k-th kept entry
    thr = |x[q] - base[q]|           # the k-th largest magnitude (recomputed from two elements)
    keep = (|d| > thr) | (|d| == thr & flat_index <= q)      # TopCut(thr, last=q)

Entries equal to ``thr`` appear in ``order`` in ascending index order, so exactly those with index
``<= q`` are among the first ``k``: the kept count is exactly ``k`` (no approximation).
"""

from __future__ import annotations

import numpy as np
import torch

from evomerge.methods.plan import TopCut


def rank_order(x: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """Stable descending argsort of ``|x - base|`` (float32), as an int32 numpy array (host): on CPU
    a radix sort in the native kernel (:func:`evomerge.methods.native.rank_order`, ~6x faster than
    torch's stable sort), else ``torch.sort``."""
    from evomerge.methods import native

    order = native.rank_order(x.reshape(-1), base.reshape(-1)) if x.device.type == "cpu" else None
    if order is not None:
        return order
    a = torch.sub(x.reshape(-1), base.reshape(-1).float()).abs_()
    order = torch.sort(a, descending=True, stable=True).indices
    return order.to(torch.int32).cpu().numpy()


class HostValues:
    """Float32 values of single entries of a host tensor, read through a numpy view (a torch index
    costs microseconds; a TIES candidate reads two entries per tensor and source)."""

    __slots__ = ("arr", "bf16")

    def __init__(self, t: torch.Tensor):
        flat = t.reshape(-1)
        self.bf16 = flat.dtype == torch.bfloat16
        self.arr = (flat.view(torch.int16) if self.bf16 else flat).numpy()

    def f32(self, i: int) -> np.float32:
        v = self.arr[i]
        if self.bf16:  # the bfloat16 bits are the high half of the float32's
            return np.array([(int(v) & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0]
        return np.float32(v)


def top_cut(order: np.ndarray, x_host: torch.Tensor | HostValues, base_host: torch.Tensor | HostValues,
            k: int) -> TopCut:
    """The top-``k`` set (``0 < k < numel``) as a :class:`~evomerge.methods.plan.TopCut` ``(thr, last)``
    (see module doc); ``last = numel - 1`` when no entry beyond the ``k``-th ties with it."""
    n = len(order)
    if not 0 < k < n:
        raise ValueError(f"top_cut needs 0 < k < {n}, got {k}")
    xv = x_host if isinstance(x_host, HostValues) else HostValues(x_host)
    bv = base_host if isinstance(base_host, HostValues) else HostValues(base_host)
    q, nxt = int(order[k - 1]), int(order[k])  # the k-th entry and the one after it
    thr = abs(xv.f32(q) - bv.f32(q))  # float32 arithmetic, as the kernels compute |x - base|
    if abs(xv.f32(nxt) - bv.f32(nxt)) != thr:
        return TopCut(float(thr), n - 1)  # no tie beyond the k-th: every entry >= thr is kept
    return TopCut(float(thr), q)
