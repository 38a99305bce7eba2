"""Task arithmetic: a weighted sum of task vectors (the task-vector family without trim or election)."""

from __future__ import annotations

from evomerge.methods.task_vectors import TaskVectorMerge, register_task_vector_method

TASK_ARITHMETIC = TaskVectorMerge("none", "none", normalize=False)

task_arithmetic = register_task_vector_method("task_arithmetic", TASK_ARITHMETIC, """Task arithmetic (Ilharco
    et al., 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089).

    ``merged = base + lambda * sum_i w_i * (theta_i - base)``; with ``normalize`` the sum is divided
    by ``sum_i w_i`` (skipped when that is ~0).

    Parameters: ``weight`` (per source, default 1; negative values subtract a task vector: task
    negation / bias removal), ``lambda`` (global scaling, default 1), ``normalize`` (default false).
    """)
