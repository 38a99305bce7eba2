"""Task arithmetic, and the task-vector pipeline shared by TIES, DARE, breadcrumbs and DELLA."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from evomerge.methods.common import LAMBDA, f32, normalize_param, resolve, task_vector, weight_param
from evomerge.methods.registry import register_method
from evomerge.methods.sparsify import disjoint_merge

# sparsifier(i, delta) -> delta: sparsifies source i's float32 task vector (may work in place)
Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    elect: bool = False,
    sparsify: Sparsifier | None = None,
) -> torch.Tensor:
    """``base + lam * merge_i(w_i * sparsify(theta_i - base))`` in float32 on the inputs' device.

    ``merge`` is a plain sum (divided by ``sum_i w_i`` when ``normalize``, unless that is ~0), or with
    ``elect`` the TIES sign election + disjoint merge (:func:`~evomerge.methods.sparsify.disjoint_merge`).
    Without election only one task vector is alive at a time.
    """
    base32 = f32(base)
    if not elect:
        acc = torch.zeros_like(base32)
        for i, (x, w) in enumerate(zip(tensors, weights)):
            if w == 0 and sparsify is None:
                continue  # (with a sparsifier, still run it so random streams do not depend on weights)
            delta = task_vector(x, base32)
            if sparsify is not None:
                delta = sparsify(i, delta)
            acc.add_(delta, alpha=w)
            del delta
        total = float(sum(weights))
        if normalize and abs(total) >= 1e-8:
            acc.div_(total)
    else:
        weighted = []
        for i, (x, w) in enumerate(zip(tensors, weights)):
            delta = task_vector(x, base32)
            if sparsify is not None:
                delta = sparsify(i, delta)
            weighted.append(delta.mul_(w))
        acc = disjoint_merge(weighted, list(weights), normalize=normalize)
        del weighted
    if lam != 1.0:
        acc.mul_(lam)
    return acc.add_(base32)


@register_method(
    "task_arithmetic",
    params=(
        weight_param(),
        LAMBDA,
        normalize_param(False),
    ),
    needs_base=True,
    min_sources=1,
)
def task_arithmetic(tensors, base, *, generator=None, **params):
    """Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089).

    ``merged = base + lambda * sum_i w_i * (theta_i - base)``; with ``normalize`` the sum is divided
    by ``sum_i w_i`` (skipped when that is ~0).

    Parameters: ``weight`` (per source, default 1; negative values subtract a task vector: task
    negation / bias removal), ``lambda`` (global scaling, default 1), ``normalize`` (default false).
    """
    p = resolve("task_arithmetic", tensors, base, generator, params)
    return merge_task_vectors(tensors, base, p["weight"], lam=p["lambda"], normalize=p["normalize"])
