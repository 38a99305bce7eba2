"""DARE: random drop and rescale of task vectors, with (dare_ties) or without (dare_linear) TIES
sign election."""

from __future__ import annotations

from evomerge.methods.task_vectors import TaskVectorMerge, register_task_vector_method

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

DARE_TIES = TaskVectorMerge("dare", "sum", normalize=False, rescale=True)
DARE_LINEAR = TaskVectorMerge("dare", "none", normalize=False, rescale=True)

dare_ties = register_task_vector_method("dare_ties", DARE_TIES, (
    """DARE-TIES (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", arXiv:2311.03099), drop-and-rescale followed by TIES sign
    election and disjoint merge: ``base + lambda * disjoint_merge_i(w_i * tau_i')``."""
    + _DOC_COMMON.format(normalize="default false, as mergekit; true gives the TIES disjoint mean")
))

dare_linear = register_task_vector_method("dare_linear", DARE_LINEAR, (
    """DARE (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", arXiv:2311.03099) with a plain weighted sum:
    ``base + lambda * sum_i w_i * tau_i'`` (divided by ``sum_i w_i`` when ``normalize``)."""
    + _DOC_COMMON.format(normalize="default false")
))
