"""Model Stock: interpolate the sources' mean towards the base by the angle between task vectors."""

from __future__ import annotations

import torch

from evomerge.methods.common import f32, resolve, task_vector
from evomerge.methods.registry import ParamSpec, register_method

NORM_PRODUCT_EPS = 1e-6  # |tau_i| * |tau_j| is clamped to at least this (as mergekit)


@register_method(
    "model_stock",
    params=(
        ParamSpec("filter_wise", "global", False, kind="bool", searchable=False,
                  doc="compute the ratio per row (per output filter) instead of per tensor"),
    ),
    needs_base=True,
    min_sources=2,
)
def model_stock(tensors, base, *, generator=None, **params):
    """Model Stock (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned models",
    arXiv:2403.19522).

    With ``N >= 2`` sources and task vectors ``tau_i = theta_i - base``: ``cos`` is the mean over
    pairs ``i < j`` of ``<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6)`` (clamped to [-1, 1]);
    ``t = N cos / (1 + (N - 1) cos)``; ``merged = t * mean_i(theta_i) + (1 - t) * base``
    (= ``base + t * mean_i tau_i``). Per tensor by default; with ``filter_wise`` per row (last dim;
    a 1-D tensor is one row). Where ``1 + (N - 1) cos`` is exactly 0, ``t`` is taken as 0 (base).

    Parameters: ``filter_wise`` (global, default false).
    """
    p = resolve("model_stock", tensors, base, generator, params)
    base32 = f32(base)
    shape = base32.shape
    cols = shape[-1] if (p["filter_wise"] and base32.dim() >= 1) else base32.numel()
    deltas = [task_vector(x, base32).reshape(-1, cols) for x in tensors]
    n = len(deltas)
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cos_sum = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.linalg.vecdot(deltas[i], deltas[j], dim=-1)
            cos_sum.add_((dot / (norms[i] * norms[j]).clamp_min(NORM_PRODUCT_EPS)).clamp_(-1.0, 1.0))
    cos = cos_sum.div_(n * (n - 1) / 2)
    den = 1.0 + (n - 1) * cos
    t = torch.where(den == 0, torch.zeros_like(cos), n * cos / torch.where(den == 0, 1.0, den))
    mean = deltas[0]
    for d in deltas[1:]:
        mean.add_(d)
    mean.mul_(t.unsqueeze(-1) / n)
    return mean.reshape(shape).add_(base32)
