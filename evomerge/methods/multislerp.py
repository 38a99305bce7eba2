"""Multi-SLERP: a weighted spherical average of several models (or of their task vectors)."""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, MergeError, Problem
from evomerge.methods.common import F32, f32, resolve, task_vector, weight_param
from evomerge.methods.registry import ParamSpec, register_method


@register_method(
    "multislerp",
    params=(
        weight_param(),
        ParamSpec("normalize_weights", "global", True, kind="bool", searchable=False,
                  doc="divide the weights by their sum"),
        ParamSpec("eps", "global", 1e-8, low=0.0, searchable=False,
                  doc="numerical guard added to the norms (as mergekit)"),
    ),
    needs_base=False,
    optional_base=True,
    min_sources=1,
)
def multislerp(tensors, base=None, *, generator=None, **params):
    """Multi-SLERP (mergekit's ``multislerp``; C. Goddard, "multislerp: wow what a cool idea",
    goddard.blog/posts/multislerp-wow-what-a-cool-idea):
    barycentric interpolation on the hypersphere through the tangent space at the weighted mean,
    each tensor one flat vector.

    ``v_i = theta_i`` (or ``theta_i - base`` with a base, added back at the end); weights ``w_i``
    divided by ``sum_i w_i`` when ``normalize_weights``. ``u_i = v_i / (|v_i| + eps)``;
    ``m = sum_i w_i u_i``, ``mu = m / |m|``; tangent vectors ``g_i = u_i - <u_i, mu> mu``,
    ``g = sum_i w_i g_i``; exponential map back to the sphere with ``n = |g| + eps``:
    ``r = cos(n) mu + sin(n) / n * g``; result ``(sum_i w_i |v_i|) * r``.

    One source: that source, unchanged (the base and the weight are not used). If ``|m| < eps``
    (weights balancing antipodal vectors): with two sources the linear ``w_1 v_1 + w_2 v_2``, with
    more an error.

    Parameters: ``weight`` (per source, default 1), ``normalize_weights`` (global, default true; the
    weights must then not sum to 0), ``eps`` (global, default 1e-8).
    """
    p = resolve("multislerp", tensors, base, generator, params)
    if len(tensors) == 1:
        return tensors[0].to(F32, copy=True)
    weights = p["weight"]
    eps = p["eps"]
    if p["normalize_weights"]:
        total = float(sum(weights))
        if total == 0.0:
            raise ConfigError(Problem("method 'multislerp': params.weight",
                                      f"weights {weights} sum to 0; cannot normalize",
                                      "change the weights or set normalize_weights: false"))
        weights = [w / total for w in weights]
    base32 = f32(base) if base is not None else None
    vs = [(task_vector(x, base32) if base32 is not None else f32(x)).reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(v) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = torch.zeros_like(units[0])
    for u, w in zip(units, weights):
        mean.add_(u, alpha=w)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < eps:
        if len(tensors) != 2:
            raise MergeError("multislerp: the weighted sum of the unit vectors is zero (antipodal "
                             "vectors whose weights balance out); change the weights")
        out = vs[0] * weights[0]
        out.add_(vs[1], alpha=weights[1])
    else:
        mean.div_(mean_norm)
        tangent = torch.zeros_like(mean)
        for u, w in zip(units, weights):
            g = u - torch.dot(u, mean) * mean
            tangent.add_(g, alpha=w)
        n = torch.linalg.vector_norm(tangent) + eps
        out = mean.mul_(torch.cos(n)).add_(tangent * (torch.sin(n) / n))
        out.mul_(sum(nrm * w for nrm, w in zip(norms, weights)))
    out = out.reshape(tensors[0].shape)
    return out if base32 is None else out.add_(base32)
