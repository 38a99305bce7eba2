"""RegMean: merging linear layers by regression on their inputs."""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError, MergeError, Problem
from evomerge.methods.registry import ParamSpec, register_method

WEIGHT = ParamSpec("weight", "source", 1.0, low=0.0, search_low=0.0, search_high=1.0,
                   doc="weight of this source's Gram matrix (and of its parameters in the plain averages)")
ALPHA = ParamSpec("alpha", "global", 0.9, low=0.0, high=1.0, search_low=0.0, search_high=0.95,
                  doc="scale of the Gram matrices' off-diagonal entries (the paper's reduction; 1: none, "
                      "solvable only when the calibration data spans every input direction)")


def stat_tensor(value, device: torch.device) -> torch.Tensor | None:
    """A kernel's ``stats`` entry as a tensor on ``device``: a tensor, a
    :class:`~evomerge.calibration.StatRef` (read, cached) or None."""
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else value.to(device)
    return value.load(device)


def weighted_mean(tensors, weights: list[float], what: str) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` in float32: the linear merge with normalized weights (its
    kernels), for the tensors a data-aware method has no statistics for."""
    from evomerge.methods.linear import run_linear

    if not float(sum(weights)) > 0:
        raise ConfigError(Problem(f"method '{what}': params.weight", f"the weights {weights} do not sum to a "
                                  f"positive number", "give non-negative weights, at least one positive"))
    return run_linear(tensors, weight=list(weights), normalize=True).tensor


@register_method("regmean", params=(WEIGHT, ALPHA), needs_base=False, min_sources=1)
def regmean(tensors, base=None, *, generator=None, weight, alpha, stats=None):
    """RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    arXiv:2212.09849).

    For a linear layer ``y = W x`` (``W``: out x in) with ``G_i = X_i^T X_i / N`` the Gram matrix of
    the layer's inputs when source ``i`` runs the calibration texts, the merged weight minimizes
    ``sum_i w_i ||X_i W^T - X_i W_i^T||^2`` over the sources:

        W* = (sum_i w_i G~_i)^-1 (sum_i w_i G~_i W_i^T), transposed,
        G~_i = alpha * G_i + (1 - alpha) * diag(G_i)

    (``alpha`` < 1 shrinks the off-diagonal entries, the paper's regularizing reduction; the
    diagonal keeps the system solvable). Every other tensor (embeddings, norms, biases) is the
    weighted average ``sum_i w_i theta_i / sum_i w_i``. With one source the result is that source;
    with equal Gram matrices it is the weighted average. The system is solved in float64, the
    result returned in float32.

    Parameters: ``weight`` (per source, >= 0, default 1), ``alpha`` (in [0, 1], default 0.9).
    ``stats``: per source, the Gram matrix of this tensor's layer (from the recipe's
    ``calibration:`` data; None for tensors that are not linear-layer weights).
    """
    device = tensors[0].device
    grams = [stat_tensor(s, device) for s in (stats or [None] * len(tensors))]
    if any(g is None for g in grams) or tensors[0].dim() != 2 or not float(sum(weight)) > 0:
        return weighted_mean(tensors, list(weight), "regmean")  # (the last case: a clear error)
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    b = torch.zeros((tensors[0].shape[1], tensors[0].shape[0]), dtype=torch.float64, device=device)
    for x, g, w in zip(tensors, grams, weight):
        if not w:
            continue
        g = g.double()
        if alpha != 1.0:
            g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        a += w * g
        b += w * (g @ x.double().T)
    if alpha == 1.0:  # without the reduction the summed Gram matrix is singular when the data spans
        # fewer directions than the layer has inputs; rounded float32 Grams then solve to garbage
        eig = torch.linalg.eigvalsh(a)
        if not eig[0] > 1e-10 * eig[-1]:
            raise MergeError(f"regmean: the summed Gram matrix of a {list(tensors[0].shape)} layer is singular "
                             f"(condition number above 1e10): its calibration inputs span too few directions "
                             f"(fix: alpha < 1, or more calibration data)")
    try:
        solved = torch.linalg.solve(a, b)
    except RuntimeError as e:  # torch.linalg.LinAlgError: a singular system
        raise MergeError(f"regmean: the summed Gram matrix of a {list(tensors[0].shape)} layer is singular ({e}); "
                         "its inputs span too few directions (fix: alpha < 1, or more calibration data)") from None
    return solved.T.float().contiguous()
