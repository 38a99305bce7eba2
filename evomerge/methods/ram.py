"""RAM: task vectors summed where one model changes an entry, averaged where several do
(ram), with the unique entries of each model scaled up by its overlap ratio (ramplus_tl)."""

from __future__ import annotations

import torch

from evomerge.methods.common import f32, resolve, task_vector
from evomerge.methods.registry import ParamSpec, register_method

EPSILON = ParamSpec(
    "epsilon", "global", 1e-5, low=0.0, searchable=False,
    doc="a task-vector entry counts as changed when its magnitude exceeds this",
)


def ram_merge(tensors, base, epsilon: float, *, r: float = 0.0, alpha: float = 0.0) -> torch.Tensor:
    """``base`` plus, per entry, the changed entries' task vectors: the one there is (times
    ``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)``), or their mean."""
    base32 = f32(base)
    tvs = [task_vector(x, base32) for x in tensors]
    changed = [tv.abs() > epsilon for tv in tvs]
    count = torch.zeros_like(base32, dtype=torch.int32)
    for c in changed:
        count.add_(c)
    unique = count == 1
    overlap = count > 1
    merged = torch.zeros_like(base32)
    for tv, c in zip(tvs, changed):
        lam = 1.0
        if r != 0.0:
            shared_n = int((c & overlap).sum())
            unique_n = int((c & unique).sum())
            lam = 1.0 + r * min(max(shared_n / max(unique_n, epsilon), 0.0), alpha)
        merged.add_(torch.where(c & unique, tv * lam, torch.where(c & overlap, tv / count.clamp(min=1), 0.0)))
    return merged.add_(base32)


_DOC_COMMON = """

    Per tensor, with task vectors ``tau_i = theta_i - base``: entry ``j`` of model ``i`` is changed
    when ``|tau_ij| > epsilon``; ``c_j`` counts the models that change it. Where ``c_j = 1`` the
    changing model's ``{unique}``, where ``c_j > 1`` the mean of the ``c_j`` changed entries, where
    ``c_j = 0`` nothing (entries within ``epsilon`` of the base are dropped). ``merged = base + that``.
    """


def ram(tensors, base, *, generator=None, **params):
    p = resolve("ram", tensors, base, generator, params)
    return ram_merge(tensors, base, p["epsilon"])


def ramplus_tl(tensors, base, *, generator=None, **params):
    p = resolve("ramplus_tl", tensors, base, generator, params)
    return ram_merge(tensors, base, p["epsilon"], r=p["r"], alpha=p["alpha"])


ram.__doc__ = (
    """RAM, Reinforced Agent Merging (arXiv:2601.13572; as mergekit's ``ram``): shared changes are
    averaged, unique ones kept whole, instead of diluting unique changes as a mean would."""
    + _DOC_COMMON.format(unique="tau_ij")
    + """
    Parameters: ``epsilon`` (global, default 1e-5).
    """
)
ramplus_tl.__doc__ = (
    """RAM+ tensor-local (arXiv:2601.13572; as mergekit's ``ramplus_tl``): RAM with each model's unique
    entries scaled by ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, ``rho_i = shared_i / max(unique_i,
    epsilon)``, where ``shared_i`` / ``unique_i`` count model ``i``'s changed entries of the tensor that
    other models also change / that only it changes."""
    + _DOC_COMMON.format(unique="lambda_i tau_ij")
    + """
    Parameters: ``r`` (global, default 0.1), ``alpha`` (global, default 0.2), ``epsilon`` (global,
    default 1e-5).
    """
)

register_method("ram", params=(EPSILON,), needs_base=True, min_sources=1)(ram)
register_method(
    "ramplus_tl",
    params=(
        ParamSpec("r", "global", 0.1, low=0.0, search_low=0.0, search_high=0.5,
                  doc="strength of the boost of each model's unique entries"),
        ParamSpec("alpha", "global", 0.2, low=0.0, search_low=0.0, search_high=1.0,
                  doc="cap of the overlap ratio shared/unique in the boost"),
        EPSILON,
    ),
    needs_base=True,
    min_sources=1,
)(ramplus_tl)
