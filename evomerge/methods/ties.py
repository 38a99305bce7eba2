"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from evomerge.methods.common import (
    F32, LAMBDA, cast_out, RESCALE_L1, density_param, normalize_param, rescale_param, resolve, weight_param,
)
from evomerge.methods.fused import fused_elect_merge, fusable
from evomerge.methods.registry import register_method
from evomerge.methods.sparsify import apply_mask_, keep_count, top_k_mask
from evomerge.methods.task_arithmetic import merge_task_vectors


def magnitude_sparsifier(densities, *, rescale: bool, rescale_l1: bool):
    """Sparsifier keeping the top ``density`` fraction of each task vector by magnitude."""

    def run(i, delta):
        density = densities[i]
        if density >= 1.0:
            return delta
        k = keep_count(delta.numel(), density)
        return apply_mask_(delta, top_k_mask(delta.abs(), k), rescale=rescale, rescale_l1=rescale_l1,
                           keep_prob=density)

    return run


@register_method(
    "ties",
    params=(
        weight_param(),
        density_param(),
        LAMBDA,
        normalize_param(True),
        rescale_param(False),
        RESCALE_L1,
    ),
    needs_base=True,
)
def ties(tensors, base, *, generator=None, out_dtype=None, **params):
    """TIES-merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging
    Models", arXiv:2306.01708).

    Per source: ``tau_i = theta_i - base``, trimmed to its ``k_i = floor(density_i * numel)``
    largest-magnitude entries (per tensor; ties at the threshold by lowest flat index). Then with
    ``d_i = w_i * trim(tau_i)``: elected sign ``s = sign(sum_i d_i)`` (+ where the sum is 0);
    ``merged = sum_i [sign(d_i) == s] d_i``, divided per entry by ``sum_i [sign(d_i) == s] w_i`` when
    ``normalize`` (disjoint mean; 1 where no source agrees). Result ``base + lambda * merged``.

    Parameters: ``weight`` (per source, default 1), ``density`` (per source, fraction kept,
    default 1 = no trim; the paper uses 0.2), ``lambda`` (default 1), ``normalize`` (default true),
    ``rescale`` (default false; divides kept entries by density, or with ``rescale_l1`` restores
    the L1 norm of each trimmed task vector).
    """
    p = resolve("ties", tensors, base, generator, params)
    if fusable(tensors, base) and not (p["rescale"] and p["rescale_l1"]):
        probs = [d if p["rescale"] and 0.0 < d < 1.0 else None for d in p["density"]]
        out = fused_elect_merge(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                                densities=p["density"], keep_probs=probs, out_dtype=out_dtype or F32)
        if out is not None:
            return out
    sp = magnitude_sparsifier(p["density"], rescale=p["rescale"], rescale_l1=p["rescale_l1"])
    return cast_out(merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                                       elect=True, sparsify=sp), out_dtype)
