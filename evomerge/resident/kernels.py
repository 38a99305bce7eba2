"""The resident materializer's own torch kernels: SLERP and scaled copies.

The task-vector and linear kernels are the methods layer's (:mod:`evomerge.methods.kernels`, run by
:mod:`evomerge.methods.backends`); the two here follow the same conventions: flat views in, ``out``
written in place (any float dtype), a 0-d all-finite flag returned, numbers as Python values or 0-d
tensors (not specialized under ``torch.compile``), one rounding to the output dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from evomerge.methods.kernels import compile_available, compiled, finite

__all__ = ["KERNELS", "compile_available", "get_kernel", "scale_copy", "slerp_merge"]


def slerp_merge(out: torch.Tensor, base: torch.Tensor, x: torch.Tensor, c0: torch.Tensor,
                c1: torch.Tensor) -> torch.Tensor:
    """``base * c0 + x * c1`` into ``out`` (0-d float32 ``c0``, ``c1`` on the device, computed by the
    caller as the reference computes them)."""
    res = torch.addcmul(base.float() * c0, x.float(), c1)  # the reference's two operations
    out.copy_(res)
    return finite(res)


def scale_copy(out: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x * factor`` into ``out`` (data-flow scale folding)."""
    res = x.float() * factor
    out.copy_(res)
    return finite(res)


KERNELS: dict[str, Callable] = {"slerp": slerp_merge, "scale": scale_copy}


def get_kernel(name: str, backend: str) -> Callable:
    """The kernel ``name`` for ``backend``: eager for ``torch``, under ``torch.compile`` for ``compiled``."""
    return compiled(KERNELS[name], name) if backend == "compiled" else KERNELS[name]
