"""DELLA: magnitude-ranked random drop (MAGPRUNE), with (della) or without (della_linear) sign
election."""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, Problem
from evomerge.methods.common import (
    LAMBDA, RESCALE_L1, density_param, normalize_param, rescale_param, resolve, weight_param,
)
from evomerge.methods.registry import ParamSpec, register_method
from evomerge.methods.sparsify import apply_mask_, rank_keep_probs
from evomerge.methods.task_arithmetic import merge_task_vectors

EPSILON = ParamSpec(
    "epsilon", "source", 0.15, low=0.0, high=0.5, search_low=0.0, search_high=0.15,
    doc="half-width of the keep-probability range [density - epsilon, density + epsilon]",
)


def _params(normalize: bool):
    return (
        weight_param(),
        density_param(search_low=0.2, search_high=0.8),
        EPSILON,
        LAMBDA,
        normalize_param(normalize),
        rescale_param(True),
        RESCALE_L1,
    )


def check_della(method: str, densities, epsilons) -> None:
    """``density +- epsilon`` must lie in (0, 1] for every source that is pruned (0 < density < 1)."""
    problems = []
    for i, (d, e) in enumerate(zip(densities, epsilons)):
        if 0.0 < d < 1.0 and not (d - e > 0.0 and d + e <= 1.0):
            problems.append(Problem(
                f"method '{method}': sources[{i}]",
                f"density={d} with epsilon={e} gives keep probabilities [{d - e:g}, {d + e:g}], "
                "outside (0, 1]",
                f"use epsilon < {min(d, 1.0 - d):g} (at most min(density, 1 - density))",
            ))
    if problems:
        raise ConfigError(problems)


def della_sparsifier(densities, epsilons, generator, *, rescale: bool, rescale_l1: bool):
    def run(i, delta):
        density, eps = densities[i], epsilons[i]
        if density >= 1.0:
            return delta
        if density <= 0.0:
            return delta.zero_()
        probs = rank_keep_probs(delta, density, eps)
        mask = torch.bernoulli(probs, generator=generator).to(torch.bool)
        return apply_mask_(delta, mask, rescale=rescale, rescale_l1=rescale_l1, keep_prob=probs)

    return run


_DOC_COMMON = """

    MAGPRUNE, per source: within each row of ``tau_i = theta_i - base`` (a 1-D tensor is one row;
    for >2-D tensors ranks run along dim 1, as mergekit), entries are ranked by magnitude and get
    keep probabilities ``p`` spread linearly over ``[density - epsilon, density + epsilon]``
    (largest magnitude -> highest), ``m ~ Bernoulli(p)`` from the passed seeded ``generator``, and
    ``tau_i' = m * tau_i / p`` (``rescale``, so ``E[tau_i'] = tau_i``). ``density = 1`` skips the step,
    ``density = 0`` drops the whole task vector; otherwise ``density +- epsilon`` must lie in (0, 1].

    Parameters: ``weight``, ``density`` (default 1), ``epsilon`` (default 0.15) per source;
    ``lambda`` (default 1), ``normalize`` ({normalize}), ``rescale`` (default true), ``rescale_l1``
    (default false; with it rescale restores each task vector's L1 norm, mergekit's current
    behaviour).
    """


def della(tensors, base, *, generator=None, **params):
    p = resolve("della", tensors, base, generator, params)
    check_della("della", p["density"], p["epsilon"])
    sp = della_sparsifier(p["density"], p["epsilon"], generator, rescale=p["rescale"],
                          rescale_l1=p["rescale_l1"])
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                              elect=True, sparsify=sp)


def della_linear(tensors, base, *, generator=None, **params):
    p = resolve("della_linear", tensors, base, generator, params)
    check_della("della_linear", p["density"], p["epsilon"])
    sp = della_sparsifier(p["density"], p["epsilon"], generator, rescale=p["rescale"],
                          rescale_l1=p["rescale_l1"])
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                              elect=False, sparsify=sp)


della.__doc__ = (
    """DELLA-Merging (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging
    through Magnitude-Based Sampling", arXiv:2406.11617): MAGPRUNE, then TIES sign election and
    disjoint merge: ``base + lambda * disjoint_merge_i(w_i * tau_i')``."""
    + _DOC_COMMON.format(normalize="default true")
)
della_linear.__doc__ = (
    """DELLA MAGPRUNE (Deep et al., 2024, arXiv:2406.11617) with a plain weighted sum:
    ``base + lambda * sum_i w_i * tau_i'`` (divided by ``sum_i w_i`` when ``normalize``)."""
    + _DOC_COMMON.format(normalize="default false")
)

register_method("della", params=_params(True), needs_base=True, stochastic=True)(della)
register_method("della_linear", params=_params(False), needs_base=True, stochastic=True)(della_linear)
