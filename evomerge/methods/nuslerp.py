"""NuSLERP: spherical interpolation of two models by their weights, optionally of their task vectors."""

from __future__ import annotations

import torch

from evomerge.methods.common import f32, resolve, task_vector, weight_param
from evomerge.methods.registry import ParamSpec, register_method

UNIT_EPS = 1e-7       # |x| is clamped to at least this before normalizing (as mergekit)
COLINEAR_EPS = 1e-8   # colinear when 1 - cos^2 <= COLINEAR_EPS^2 (as mergekit)
WEIGHT_SUM_EPS = 1e-6  # |w_1 + w_2| below this: t = 0.5 (as mergekit)


def sphere_interp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """A new float32 tensor: SLERP from ``v0`` (t = 0) to ``v1`` (t = 1) of the unnormalized vectors,
    over the whole tensor (``flatten``), along dim 0 (``row_wise``: one vector per index of the other
    dims), or along the last dim (one vector per row)."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(UNIT_EPS)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(UNIT_EPS)
    cos = ((a / na) * (b / nb)).sum(dim=-1, keepdim=True).clamp_(-1.0, 1.0)
    colinear = (1.0 - cos * cos) <= COLINEAR_EPS ** 2
    theta = torch.arccos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = torch.sin((1.0 - t) * theta) * a
    out.add_(torch.sin(t * theta) * b).div_(torch.sin(theta))
    out = torch.where(colinear, (1.0 - t) * a + t * b, out)
    if row_wise and not flatten and v0.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register_method(
    "nuslerp",
    params=(
        weight_param(doc="relative weight of this model: t = w_2 / (w_1 + w_2)"),
        ParamSpec("nuslerp_flatten", "global", True, kind="bool", searchable=False,
                  doc="treat each tensor as one flat vector (else one vector per row, or per column "
                  "with nuslerp_row_wise)"),
        ParamSpec("nuslerp_row_wise", "global", False, kind="bool", searchable=False,
                  doc="without nuslerp_flatten: interpolate the vectors along dim 0 instead of the rows"),
    ),
    needs_base=False,
    optional_base=True,
    min_sources=2,
    max_sources=2,
)
def nuslerp(tensors, base=None, *, generator=None, **params):
    """NuSLERP (mergekit's generalized SLERP; Shoemake, 1985, "Animating rotation with quaternion
    curves", for the interpolation): two models, each with a weight, and an optional base.

    ``t = w_2 / (w_1 + w_2)`` (0.5 when ``|w_1 + w_2| < 1e-6``). Without a base ``v_i = theta_i``; with
    one, the task vectors ``v_i = theta_i - base`` are interpolated and the base added back. For
    each vector (the whole tensor with ``nuslerp_flatten``, else each row, or each vector along dim 0
    with ``nuslerp_row_wise``): ``cos = <v_1/max(|v_1|, 1e-7), v_2/max(|v_2|, 1e-7)>`` clamped to
    [-1, 1], ``theta = arccos(cos)``, and ``(sin((1 - t) theta) v_1 + sin(t theta) v_2) / sin(theta)``;
    where ``1 - cos^2 <= 1e-16`` (colinear) ``(1 - t) v_1 + t v_2``. A zero vector gives ``cos = 0``
    (a quarter turn). The unnormalized vectors are interpolated, as mergekit does.

    Parameters: ``weight`` (per source, default 1; only the ratio matters), ``nuslerp_flatten``
    (global, default true), ``nuslerp_row_wise`` (global, default false).
    """
    p = resolve("nuslerp", tensors, base, generator, params)
    w1, w2 = p["weight"]
    t = 0.5 if abs(w1 + w2) < WEIGHT_SUM_EPS else w2 / (w1 + w2)
    if base is None:
        return sphere_interp(t, f32(tensors[0]), f32(tensors[1]), flatten=p["nuslerp_flatten"],
                             row_wise=p["nuslerp_row_wise"])
    base32 = f32(base)
    out = sphere_interp(t, task_vector(tensors[0], base32), task_vector(tensors[1], base32),
                        flatten=p["nuslerp_flatten"], row_wise=p["nuslerp_row_wise"])
    return out.add_(base32)
