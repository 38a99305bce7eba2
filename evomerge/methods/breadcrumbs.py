"""Model Breadcrumbs: drop the largest (outliers) and the smallest entries of each task vector."""

from __future__ import annotations

from evomerge.methods.common import (
    LAMBDA, RESCALE_L1, density_param, normalize_param, rescale_param, resolve, weight_param,
)
from evomerge.methods.registry import ParamSpec, register_method
from evomerge.methods.sparsify import apply_mask_, outlier_mask
from evomerge.methods.task_arithmetic import merge_task_vectors

GAMMA = ParamSpec(
    "gamma", "source", 0.01, low=0.0, high=1.0, search_low=0.0, search_high=0.1,
    doc="fraction of the largest-magnitude task-vector entries dropped as outliers (the paper's beta)",
)

_PARAMS = (
    weight_param(),
    density_param(),
    GAMMA,
    LAMBDA,
    normalize_param(False),
    rescale_param(False),
    RESCALE_L1,
)


def breadcrumbs_sparsifier(densities, gammas, *, rescale: bool, rescale_l1: bool):
    def run(i, delta):
        if densities[i] >= 1.0:
            return delta  # nothing can be dropped at density 1 (no outliers either)
        mask = outlier_mask(delta.abs(), densities[i], gammas[i])
        return apply_mask_(delta, mask, rescale=rescale, rescale_l1=rescale_l1, keep_prob=densities[i])

    return run


_DOC_COMMON = """

    Per source and tensor, with ``N = numel``: ``n_top = floor(gamma * N)`` largest-magnitude entries
    of ``tau_i = theta_i - base`` are dropped, the next ``floor(density * N)`` are kept, the rest
    (smallest) dropped; when ``n_top + floor(density * N) > N`` fewer outliers are dropped so that
    the density is met (so ``density = 1`` keeps everything). Ties are ranked by flat index.

    Parameters: ``weight`` (per source, default 1), ``density`` (per source, fraction kept, default
    1), ``gamma`` (per source, fraction of outliers dropped, default 0.01), ``lambda`` (default 1),
    ``normalize`` (default false), ``rescale`` / ``rescale_l1`` (default false).
    """


def breadcrumbs(tensors, base, *, generator=None, **params):
    p = resolve("breadcrumbs", tensors, base, generator, params)
    sp = breadcrumbs_sparsifier(p["density"], p["gamma"], rescale=p["rescale"], rescale_l1=p["rescale_l1"])
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                              elect=False, sparsify=sp)


def breadcrumbs_ties(tensors, base, *, generator=None, **params):
    p = resolve("breadcrumbs_ties", tensors, base, generator, params)
    sp = breadcrumbs_sparsifier(p["density"], p["gamma"], rescale=p["rescale"], rescale_l1=p["rescale_l1"])
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                              elect=True, sparsify=sp)


breadcrumbs.__doc__ = (
    """Model Breadcrumbs (Davari & Belilovsky, 2023, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks", arXiv:2312.06795): ``base + lambda * sum_i w_i * mask_i * tau_i``
    (divided by ``sum_i w_i`` when ``normalize``)."""
    + _DOC_COMMON
)
breadcrumbs_ties.__doc__ = (
    """Model Breadcrumbs masks (Davari & Belilovsky, 2023, arXiv:2312.06795) followed by TIES sign
    election and disjoint merge (Yadav et al., 2023): ``base + lambda * disjoint_merge_i(w_i *
    mask_i * tau_i)``."""
    + _DOC_COMMON
)

register_method("breadcrumbs", params=_PARAMS, needs_base=True)(breadcrumbs)
register_method("breadcrumbs_ties", params=_PARAMS, needs_base=True)(breadcrumbs_ties)
