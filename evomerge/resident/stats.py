"""Per-tensor magnitude statistics of task vectors, computed once per (source, base) pair.

For one tensor with task vector ``d = x - base`` (float32) the statistic is its *rank order*:
the flat indices of ``|d|`` sorted by (magnitude descending, flat index ascending), i.e. a stable
descending argsort, stored as int32 on the host (4 bytes per parameter per source). With it the
reference's exact top-k set (:func:`evomerge.methods.sparsify.top_k_mask`: ``k = int(density *
numel)``, ties at the threshold broken by lowest flat index) is, for any ``k``, without sorting or
scanning again::

    q = order[k - 1]                 # flat index of the k-th kept entry
    thr = |x[q] - base[q]|           # the k-th largest magnitude (recomputed from two elements)
    keep = (|d| > thr) | (|d| == thr & flat_index <= q)

Entries equal to ``thr`` appear in ``order`` in ascending index order, so exactly those with index
``<= q`` are among the first ``k``: the kept count is exactly ``k`` (no approximation).
"""

from __future__ import annotations

import math

import torch

INF = math.inf


def rank_order(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Stable descending argsort of ``|x - base|`` (float32), as an int32 CPU tensor."""
    a = torch.sub(x.reshape(-1), base.reshape(-1).float()).abs_()
    order = torch.sort(a, descending=True, stable=True).indices
    return order.to(torch.int32).cpu()


def top_cut(order: torch.Tensor, x_host: torch.Tensor, base_host: torch.Tensor, k: int) -> tuple[float, int]:
    """``(thr, cut)`` describing the top-``k`` set (see module doc); ``k = 0`` keeps nothing,
    ``k >= numel`` everything. ``cut = numel`` when no entry beyond the ``k``-th ties with it (then
    the set is simply ``|d| >= thr``)."""
    n = order.numel()
    if k <= 0:
        return INF, -1
    if k >= n:
        return -1.0, n
    at = order[k - 1:k + 1].long()  # the k-th entry and the one after it
    q, nxt = at.tolist()
    thr, after = (x_host.reshape(-1)[at].float() - base_host.reshape(-1)[at].float()).abs().tolist()
    if after != thr:
        return thr, n  # no tie beyond the k-th: every entry >= thr is kept
    return thr, q
