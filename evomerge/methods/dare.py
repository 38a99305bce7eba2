"""DARE: random drop and rescale of task vectors, with (dare_ties) or without (dare_linear) TIES
sign election."""

from __future__ import annotations

from evomerge.methods.common import (
    F32, LAMBDA, cast_out, RESCALE_L1, density_param, normalize_param, rescale_param, resolve, weight_param,
)
from evomerge.methods.fused import fused_elect_merge, fusable
from evomerge.methods.registry import register_method
from evomerge.methods.sparsify import apply_mask_, dare_key, dare_mask, generator_seed
from evomerge.methods.task_arithmetic import merge_task_vectors


def dare_masks(densities, generator, shape, device) -> list:
    """Keep masks per source (``None`` where ``density >= 1``: nothing dropped), drawn from the
    counter-based generator of :mod:`evomerge.methods.sparsify` with ``generator``'s seed."""
    seed = generator_seed(generator)
    return [dare_mask(shape, d, dare_key(seed, i), device) if d < 1.0 else None
            for i, d in enumerate(densities)]


def dare_sparsifier(densities, generator, *, rescale: bool, rescale_l1: bool):
    """Sparsifier keeping each entry with probability ``density`` (masks from ``generator``'s seed)."""
    seed = generator_seed(generator)

    def run(i, delta):
        density = densities[i]
        if density >= 1.0:
            return delta
        mask = dare_mask(delta.shape, density, dare_key(seed, i), delta.device)
        return apply_mask_(delta, mask, rescale=rescale, rescale_l1=rescale_l1, keep_prob=density)

    return run


def _params(normalize: bool):
    return (
        weight_param(),
        density_param(),
        LAMBDA,
        normalize_param(normalize),
        rescale_param(True),
        RESCALE_L1,
    )


_DOC_COMMON = """

    Per source: ``tau_i = theta_i - base``; ``m_i ~ Bernoulli(density_i)`` per entry, from the
    counter-based generator of :mod:`evomerge.methods.sparsify` keyed by the passed ``generator``'s
    seed and the source's position (the same masks on every device, whatever the chunking);
    ``tau_i' = m_i * tau_i / density_i`` (``rescale``, the paper's ``1 / (1 - p)`` with drop rate
    ``p = 1 - density``), so ``E[tau_i'] = tau_i``. ``density_i = 1`` skips the drop (no random draws).

    Parameters: ``weight`` (per source, default 1), ``density`` (per source, keep probability,
    default 1), ``lambda`` (default 1), ``normalize`` ({normalize}), ``rescale`` (default true),
    ``rescale_l1`` (default false: with it, rescale restores each task vector's L1 norm instead,
    mergekit's current behaviour).
    """


def dare_ties(tensors, base, *, generator=None, out_dtype=None, **params):
    p = resolve("dare_ties", tensors, base, generator, params)
    if fusable(tensors, base) and not (p["rescale"] and p["rescale_l1"]):
        seed = generator_seed(generator)  # the masks of dare_sparsifier
        dare = [(dare_key(seed, i), d) if d < 1.0 else None for i, d in enumerate(p["density"])]
        probs = [d if p["rescale"] and kd is not None and d > 0 else None for d, kd in zip(p["density"], dare)]
        out = fused_elect_merge(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                                keep_probs=probs, dare=dare, out_dtype=out_dtype or F32)
        if out is not None:
            return out
        masks = dare_masks(p["density"], generator, base.shape, base.device)

        def sp(i, delta):  # non-finite task vectors: the plain pipeline, with the masks drawn above
            if masks[i] is None:
                return delta
            return apply_mask_(delta, masks[i], rescale=p["rescale"], rescale_l1=False,
                               keep_prob=p["density"][i])

        return cast_out(merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"],
                                           normalize=p["normalize"], elect=True, sparsify=sp), out_dtype)
    sp = dare_sparsifier(p["density"], generator, rescale=p["rescale"], rescale_l1=p["rescale_l1"])
    return cast_out(merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                                       elect=True, sparsify=sp), out_dtype)


def dare_linear(tensors, base, *, generator=None, **params):
    p = resolve("dare_linear", tensors, base, generator, params)
    sp = dare_sparsifier(p["density"], generator, rescale=p["rescale"], rescale_l1=p["rescale_l1"])
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"],
                              elect=False, sparsify=sp)


dare_ties.__doc__ = (
    """DARE-TIES (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", arXiv:2311.03099), drop-and-rescale followed by TIES sign
    election and disjoint merge: ``base + lambda * disjoint_merge_i(w_i * tau_i')``."""
    + _DOC_COMMON.format(normalize="default false, as mergekit; true gives the TIES disjoint mean")
)
dare_linear.__doc__ = (
    """DARE (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", arXiv:2311.03099) with a plain weighted sum:
    ``base + lambda * sum_i w_i * tau_i'`` (divided by ``sum_i w_i`` when ``normalize``)."""
    + _DOC_COMMON.format(normalize="default false")
)

register_method("dare_ties", params=_params(False), needs_base=True, stochastic=True)(dare_ties)
register_method("dare_linear", params=_params(False), needs_base=True, stochastic=True)(dare_linear)
