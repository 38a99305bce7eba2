"""Arcee Fusion: take the secondary model's values only where their importance is an outlier."""

from __future__ import annotations

import torch

from evomerge.methods.common import F32, f32, resolve, task_vector
from evomerge.methods.registry import register_method

PROB_EPS = 1e-8  # added to both softmax distributions before the KL divergence (as mergekit)
QUANTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5


def quantiles(x: torch.Tensor, qs=QUANTILES) -> list[torch.Tensor]:
    """Order statistics of flat ``x``: entry ``floor(q * (n - 1))`` (0-based, product in float32) of
    the sorted values for each ``q``."""
    flat = x.reshape(-1)
    idx = (torch.tensor(qs, dtype=F32) * (flat.numel() - 1)).long().tolist()
    return [torch.kthvalue(flat, i + 1).values for i in idx]


@register_method("arcee_fusion", params=(), needs_base=True, min_sources=1, max_sources=1)
def arcee_fusion(tensors, base, *, generator=None, **params):
    """Arcee Fusion (Arcee AI, 2025, mergekit's ``arcee_fusion``): keep the base, except where the
    secondary model's change is important enough.

    Per row (last dim; a 1-D tensor is one row): ``P = softmax(theta_1) + 1e-8``, ``Q = softmax(base)
    + 1e-8``, ``KL = sum P log(P / Q)``. Importance ``s = |theta_1 - base| * KL`` (of the entry's row).
    With ``q1, m, q3`` the 25/50/75% order statistics of ``s`` over the tensor (sorted entry
    ``floor(q (n - 1))``), the threshold is ``m + 1.5 (q3 - q1)`` and
    ``merged = base + [s >= threshold] (theta_1 - base)``.

    mergekit estimates the quantiles of tensors over 10^6 entries from a random sample of 10^6
    entries; evomerge always uses the exact order statistics (deterministic; the same where
    mergekit does not sample).

    Parameters: none.
    """
    resolve("arcee_fusion", tensors, base, generator, params)
    shape = base.shape
    base32, x = f32(base).reshape(-1, *shape[-1:]), f32(tensors[0]).reshape(-1, *shape[-1:])
    delta = task_vector(x, base32)
    p = torch.softmax(x, dim=-1).add_(PROB_EPS)
    q = torch.softmax(base32, dim=-1).add_(PROB_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    importance = delta.abs().mul_(kl)
    q1, median, q3 = quantiles(importance)
    threshold = median + IQR_FACTOR * (q3 - q1)
    delta.mul_(importance >= threshold)
    return delta.add_(base32).reshape(shape)
