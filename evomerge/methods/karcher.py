"""Karcher mean: the weighted Riemannian (geodesic) mean of the models' directions on the sphere."""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, Problem
from evomerge.methods.common import F32, f32, resolve
from evomerge.methods.registry import ParamSpec, register_method


@register_method(
    "karcher",
    params=(
        ParamSpec("weight", "source", 1.0, low=0.0, search_low=0.0, search_high=1.0,
                  doc="weight of this model in the mean (normalized to sum to 1; mergekit: equal)"),
        ParamSpec("max_iter", "global", 10, kind="int", low=0, searchable=False,
                  doc="Riemannian gradient steps at most"),
        ParamSpec("tol", "global", 1e-5, low=0.0, searchable=False,
                  doc="convergence tolerance (tangent norm), and the norm below which a model is "
                  "left out of the direction"),
    ),
    needs_base=False,
    min_sources=1,
)
def karcher(tensors, base=None, *, generator=None, **params):
    """Karcher mean (Karcher, 1977, "Riemannian center of mass and mollifier smoothing"; as a merge
    method: mergekit's ``karcher``, arXiv:2603.04972), each tensor one flat vector.

    ``a_i = w_i / sum_j w_j``; ``n_i = |theta_i|``, ``u_i = theta_i / n_i``. Models with
    ``n_i <= tol`` are left out of the direction (their ``a_i`` renormalized over the rest; all left
    out: the result is 0). Start ``mu = sum a_i u_i / |...|`` (the first kept ``u_i`` if that norm is
    below ``tol``), then up to ``max_iter`` times: ``theta_i = arccos(clamp(<mu, u_i>, -1, 1))``,
    ``g = sum_{theta_i >= tol} a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu)``; stop when
    ``|g| < tol``, else ``mu = cos(|g|) mu + sin(|g|) g / |g|``, renormalized. Result
    ``(sum_i a_i n_i) mu`` (the weighted mean norm, over all models). One source: that source.

    Parameters: ``weight`` (per source, default 1, >= 0, not all 0; mergekit weighs all models
    equally), ``max_iter`` (global, default 10), ``tol`` (global, default 1e-5).
    """
    p = resolve("karcher", tensors, None, generator, params)
    if len(tensors) == 1:
        return tensors[0].to(F32, copy=True)
    total = float(sum(p["weight"]))
    if total <= 0.0:
        raise ConfigError(Problem("method 'karcher': params.weight", f"weights {p['weight']} sum to 0",
                                  "give at least one model a positive weight"))
    alphas = [w / total for w in p["weight"]]
    tol = p["tol"]
    shape = tensors[0].shape
    xs = [f32(x).reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    kept = [i for i, n in enumerate(norms) if float(n) > tol]
    if not kept:
        return torch.zeros(shape, dtype=F32, device=tensors[0].device)
    kept_total = sum(alphas[i] for i in kept)
    a = [alphas[i] / kept_total for i in kept]
    units = [xs[i] / norms[i] for i in kept]
    mu = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mu.add_(u, alpha=ai)
    mu_norm = torch.linalg.vector_norm(mu)
    mu = units[0].clone() if float(mu_norm) < tol else mu.div_(mu_norm)
    for _ in range(p["max_iter"]):
        g = torch.zeros_like(mu)
        for ai, u in zip(a, units):
            cos = torch.dot(mu, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            g.add_((u - cos * mu).mul_(ai * theta / torch.sin(theta)))
        g_norm = torch.linalg.vector_norm(g)
        if float(g_norm) < tol:
            break
        mu = mu.mul_(torch.cos(g_norm)).add_(g.mul_(torch.sin(g_norm) / g_norm))
        unit_norm = torch.linalg.vector_norm(mu)
        if float(unit_norm) > tol:
            mu.div_(unit_norm)
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return mu.mul_(scale).reshape(shape)
