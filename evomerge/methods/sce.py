"""SCE: select the high-variance entries of the task vectors, calculate per-model weights from
their energy, erase the entries that disagree with the elected sign."""

from __future__ import annotations

import torch

from evomerge.methods.common import f32, resolve, task_vector
from evomerge.methods.registry import ParamSpec, register_method
from evomerge.methods.sparsify import elect_sign, top_k_mask

WEIGHT_SUM_EPS = 1e-6  # energies summing below this: equal weights (as mergekit)
DIVISOR_FLOOR = 1e-6   # per-entry weight sums are clamped to at least this (as mergekit)


@register_method(
    "sce",
    params=(
        ParamSpec("select_topk", "global", 1.0, low=0.0, high=1.0, search_low=0.1, search_high=1.0,
                  doc="fraction of the entries with non-zero variance across the task vectors that "
                  "are kept (the highest-variance ones); 1 keeps all"),
    ),
    needs_base=True,
    min_sources=1,
)
def sce(tensors, base, *, generator=None, **params):
    """SCE (Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990; as
    mergekit's ``sce``), per tensor, with task vectors ``tau_i = theta_i - base``:

    * Select: with ``select_topk < 1``, keep only the ``k = floor(select_topk * nnz)`` entries
      (product in float32, as mergekit) of largest variance
      ``var_j = mean_i (tau_ij - mean_i tau_ij)^2`` across the models (``nnz``: entries with non-zero
      variance; ties at the threshold by lowest flat index), zeroing the rest in every ``tau_i``
      (``select_topk = 0``: all).
    * Calculate: ``e_i = mean_j tau_ij^2``, ``w_i = e_i / sum_k e_k`` (equal weights ``1/N`` when
      ``sum_k e_k < 1e-6``).
    * Erase: the elected sign is that of ``sum_i tau_ij`` (+ where 0); ``agree_ij`` where ``tau_ij`` has
      it (zeros never agree).

    ``merged = base + sum_i agree_i w_i tau_i / max(sum_i agree_i w_i, 1e-6)`` per entry.

    Parameters: ``select_topk`` (global, in [0, 1], default 1).
    """
    p = resolve("sce", tensors, base, generator, params)
    base32 = f32(base)
    tvs = torch.stack([task_vector(x, base32) for x in tensors])
    topk = p["select_topk"]
    if topk < 1.0:
        var = torch.var(tvs, dim=0, unbiased=False)
        nnz = torch.count_nonzero(var)
        k = min(int(nnz), int(nnz * topk))  # the product in float32, as mergekit
        mask = top_k_mask(var.abs_(), k) if k > 0 else torch.zeros_like(var, dtype=torch.bool)
        tvs.mul_(mask)
        del var, mask
    energy = tvs.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    weights = energy / total if abs(total) >= WEIGHT_SUM_EPS else torch.full_like(energy, 1.0 / len(tensors))
    positive = elect_sign(list(tvs))
    merged = torch.zeros_like(base32)
    divisor = torch.zeros_like(base32)
    for tv, w in zip(tvs, weights):
        agreeing = torch.where(positive, tv > 0, tv < 0).to(base32.dtype).mul_(w)
        merged.addcmul_(tv, agreeing)
        divisor.add_(agreeing)
    merged.div_(divisor.clamp_min_(DIVISOR_FLOOR))
    return merged.add_(base32)
