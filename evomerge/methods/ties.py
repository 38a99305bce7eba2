"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from evomerge.methods.task_vectors import TaskVectorMerge, register_task_vector_method

TIES = TaskVectorMerge("magnitude", "sum", normalize=True, rescale=False)

ties = register_task_vector_method("ties", TIES, """TIES-merging (Yadav et al., 2023, "TIES-Merging:
    Resolving Interference When Merging Models", arXiv:2306.01708).

    Per source: ``tau_i = theta_i - base``, trimmed to its ``k_i = floor(density_i * numel)``
    largest-magnitude entries (per tensor; ties at the threshold by lowest flat index). Then with
    ``d_i = w_i * trim(tau_i)``: elected sign ``s = sign(sum_i d_i)`` (+ where the sum is 0);
    ``merged = sum_i [sign(d_i) == s] d_i``, divided per entry by ``sum_i [sign(d_i) == s] w_i`` when
    ``normalize`` (disjoint mean; 1 where no source agrees). Result ``base + lambda * merged``.

    Parameters: ``weight`` (per source, default 1), ``density`` (per source, fraction kept,
    default 1 = no trim; the paper uses 0.2), ``lambda`` (default 1), ``normalize`` (default true),
    ``rescale`` (default false; divides kept entries by density, or with ``rescale_l1`` restores
    the L1 norm of each trimmed task vector).
    """)
