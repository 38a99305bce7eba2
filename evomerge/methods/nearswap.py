"""NearSwap: take the secondary model's value where it is close to the base's."""

from __future__ import annotations

from evomerge.methods.common import f32, resolve
from evomerge.methods.registry import ParamSpec, register_method

DIFF_FLOOR = 1e-6  # |base - theta| is clamped to at least this (as mergekit)


@register_method(
    "nearswap",
    params=(
        ParamSpec("t", "global", 1e-4, low=0.0, search_low=0.0, search_high=1e-2,
                  doc="closeness scale: entries with |base - theta| <= t are swapped whole, farther "
                  "ones interpolated by t / |base - theta|"),
    ),
    needs_base=True,
    min_sources=1,
    max_sources=1,
)
def nearswap(tensors, base, *, generator=None, **params):
    """NearSwap (mergekit's ``nearswap``; alchemonaut, "QuartetAnemoi-70B-t0.0001", Hugging Face model
    card, 2024): interpolate the base toward the secondary model entry by entry, the more the closer
    the two are.

    ``w = clamp(t / max(|base - theta_1|, 1e-6), 0, 1)`` per entry; ``merged = w theta_1 + (1 - w) base``.
    Entries within ``t`` of each other take ``theta_1``; far ones stay near the base.

    Parameters: ``t`` (global, >= 0, default 1e-4, the value the method was introduced with;
    mergekit has no default).
    """
    p = resolve("nearswap", tensors, base, generator, params)
    a, b = f32(base), f32(tensors[0])
    w = (p["t"] / (a - b).abs_().clamp_min_(DIFF_FLOOR)).clamp_(0.0, 1.0)
    out = w * b
    return out.add_(w.neg_().add_(1.0).mul_(a))
