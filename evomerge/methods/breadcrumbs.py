"""Model Breadcrumbs: drop the largest (outliers) and the smallest entries of each task vector."""

from __future__ import annotations

from evomerge.methods.task_vectors import TaskVectorMerge, register_task_vector_method

_DOC_COMMON = """

    Per source and tensor, with ``N = numel``: ``n_top = floor(gamma * N)`` largest-magnitude entries
    of ``tau_i = theta_i - base`` are dropped, the next ``floor(density * N)`` are kept, the rest
    (smallest) dropped; when ``n_top + floor(density * N) > N`` fewer outliers are dropped so that
    the density is met (so ``density = 1`` keeps everything). Ties are ranked by flat index.

    Parameters: ``weight`` (per source, default 1), ``density`` (per source, fraction kept, default
    1), ``gamma`` (per source, fraction of outliers dropped, default 0.01), ``lambda`` (default 1),
    ``normalize`` (default false), ``rescale`` / ``rescale_l1`` (default false).
    """

BREADCRUMBS = TaskVectorMerge("band", "none", normalize=False)
BREADCRUMBS_TIES = TaskVectorMerge("band", "sum", normalize=False)

breadcrumbs = register_task_vector_method("breadcrumbs", BREADCRUMBS, (
    """Model Breadcrumbs (Davari & Belilovsky, 2023, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks", arXiv:2312.06795): ``base + lambda * sum_i w_i * mask_i * tau_i``
    (divided by ``sum_i w_i`` when ``normalize``)."""
    + _DOC_COMMON
))

breadcrumbs_ties = register_task_vector_method("breadcrumbs_ties", BREADCRUMBS_TIES, (
    """Model Breadcrumbs masks (Davari & Belilovsky, 2023, arXiv:2312.06795) followed by TIES sign
    election and disjoint merge (Yadav et al., 2023): ``base + lambda * disjoint_merge_i(w_i *
    mask_i * tau_i)``."""
    + _DOC_COMMON
))
