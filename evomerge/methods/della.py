"""DELLA: magnitude-ranked random drop (MAGPRUNE), with (della) or without (della_linear) sign
election."""

from __future__ import annotations

from evomerge.methods.task_vectors import TaskVectorMerge, register_task_vector_method

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

DELLA = TaskVectorMerge("della", "sum", normalize=True, rescale=True)
DELLA_LINEAR = TaskVectorMerge("della", "none", normalize=False, rescale=True)

della = register_task_vector_method("della", DELLA, (
    """DELLA-Merging (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging
    through Magnitude-Based Sampling", arXiv:2406.11617): MAGPRUNE, then TIES sign election and
    disjoint merge: ``base + lambda * disjoint_merge_i(w_i * tau_i')``."""
    + _DOC_COMMON.format(normalize="default true")
))

della_linear = register_task_vector_method("della_linear", DELLA_LINEAR, (
    """DELLA MAGPRUNE (Deep et al., 2024, arXiv:2406.11617) with a plain weighted sum:
    ``base + lambda * sum_i w_i * tau_i'`` (divided by ``sum_i w_i`` when ``normalize``)."""
    + _DOC_COMMON.format(normalize="default false")
))
