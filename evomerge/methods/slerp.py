"""Spherical linear interpolation between the base and one source."""

from __future__ import annotations

import torch

from evomerge.methods.common import f32, resolve
from evomerge.methods.registry import ParamSpec, register_method

DOT_THRESHOLD = 0.9995  # |cos| above this: treat as colinear and interpolate linearly (as mergekit)
NORM_EPS = 1e-8  # a vector with norm <= this is not normalized for the angle (as mergekit)


@register_method(
    "slerp",
    params=(
        ParamSpec("t", "global", 0.5, low=0.0, high=1.0, search_low=0.0, search_high=1.0,
                  doc="interpolation position: 0 gives the base, 1 the source"),
    ),
    needs_base=True,
    min_sources=1,
    max_sources=1,
)
def slerp(tensors, base, *, generator=None, **params):
    """SLERP (Shoemake, 1985, "Animating rotation with quaternion curves"; as used by mergekit)
    between ``v0 = base`` and ``v1 = theta_1``, each tensor treated as one flat vector.

    ``cos = <v0/|v0|, v1/|v1|>`` (a vector with norm <= 1e-8 is used unnormalized, so a zero vector
    gives ``cos = 0``); if ``|cos| > 0.9995`` (DOT_THRESHOLD) the vectors are near-colinear and the
    result is ``(1 - t) v0 + t v1``; else with ``theta = arccos(cos)``:
    ``sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1``. The unnormalized
    vectors are interpolated (norms are not re-projected), exactly as mergekit.

    Parameters: ``t`` (global, in [0, 1], default 0.5; 0 gives the base, 1 the source).
    """
    p = resolve("slerp", tensors, base, generator, params)
    t = p["t"]
    v0, v1 = f32(base), f32(tensors[0])
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    one = torch.ones_like(n0)
    dot = torch.dot(v0.reshape(-1), v1.reshape(-1))
    dot = dot / torch.where(n0 > NORM_EPS, n0, one) / torch.where(n1 > NORM_EPS, n1, one)
    colinear = dot.abs() > DOT_THRESHOLD
    theta = torch.arccos(dot.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    safe = torch.where(colinear, one, sin_theta)
    c0 = torch.where(colinear, one * (1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(colinear, one * t, torch.sin(t * theta) / safe)
    out = v0 * c0  # new tensor (v0 may alias the caller's float32 input)
    return out.addcmul_(v1, c1)
