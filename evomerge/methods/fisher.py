"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher information."""

from __future__ import annotations

import torch

from evomerge.methods.registry import ParamSpec, register_method
from evomerge.methods.regmean import WEIGHT, stat_tensor, weighted_mean

EPSILON = ParamSpec("epsilon", "global", 1e-8, low=0.0, searchable=False,
                    doc="floor of every Fisher value (keeps parameters that no data reaches averaged)")


@register_method("fisher", params=(WEIGHT, EPSILON), needs_base=False, min_sources=1)
def fisher(tensors, base=None, *, generator=None, weight, epsilon, stats=None):
    """Fisher merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging",
    arXiv:2111.09832).

    Each parameter entry is the average of the sources' entries weighted by their diagonal Fisher
    information on the calibration data (times the per-source weight ``w_i``):

        theta* = sum_i w_i F^_i theta_i / sum_i w_i F^_i,   F^_i = max(F_i, epsilon)

    where ``F_i`` is the mean over the calibration texts of the squared gradient of the text's
    log-likelihood under source ``i`` (labels sampled from the model, or the text's own tokens: see
    ``calibration.labels``). The floor ``epsilon`` keeps entries with no Fisher mass in any source
    at their weighted average (with ``epsilon`` 0 such entries fall back to it explicitly). Equal
    Fishers give the weighted average. Computed in float32.

    Parameters: ``weight`` (per source, >= 0, default 1), ``epsilon`` (>= 0, default 1e-8).
    ``stats``: per source, this tensor's diagonal Fisher (from the recipe's ``calibration:`` data).
    """
    device = tensors[0].device
    fishers = [stat_tensor(s, device) for s in (stats or [None] * len(tensors))]
    if any(f is None for f in fishers):
        return weighted_mean(tensors, list(weight), "fisher")
    num = torch.zeros(tensors[0].shape, dtype=torch.float32, device=device)
    den = torch.zeros_like(num)
    for x, f, w in zip(tensors, fishers, weight):
        if not w:
            continue
        fw = f.float().clamp_min(epsilon).mul_(w)
        num.addcmul_(fw, x.float())
        den.add_(fw)
    if bool((den > 0).all()):
        return num.div_(den)
    # entries no source has Fisher mass for (epsilon 0): their weighted average
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       weighted_mean(tensors, list(weight), "fisher"))
