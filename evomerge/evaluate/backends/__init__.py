"""Scoring backends: how a candidate's model becomes the two scoring primitives (``loglik`` and
``generate``) of :mod:`evomerge.evaluate.engine`.

* ``hf`` (:mod:`.hf`): the transformers model itself, batched forwards in this process.
* ``vllm`` (:mod:`.vllm`): a vLLM engine started once per model shape; every candidate's tensors
  are pushed into it in place. Needs the vLLM extra.

:func:`make_backend` builds one from a name and options; :func:`backend_problems` checks them.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.errors import Problem
from evomerge.evaluate.backends.hf import HFLM, HFBackend

BACKENDS = ("hf", "vllm")


def backend_problems(name: Any, options: Any, where: str, *, check_installed: bool = True) -> list[Problem]:
    """Problems of a backend name (at ``where``) and its options (at ``where``'s sibling ``vllm``)."""
    from evomerge.evaluate.backends import vllm as vllm_backend

    if name not in BACKENDS:
        return [Problem(where, f"unknown backend {name!r}", f"use one of: {', '.join(BACKENDS)}")]
    options_at = where.rsplit(".", 1)[0] + ".vllm" if "." in where else "vllm"
    if name != "vllm":
        if options:
            return [Problem(options_at, "vLLM options are given but the backend is not vllm",
                            "choose the vllm backend (backend: vllm, --backend vllm), or remove the vLLM options")]
        return []
    problems = vllm_backend.option_problems(options, options_at)
    if check_installed:
        missing = vllm_backend.vllm_missing()
        if missing:
            problems.append(Problem(where, missing))
    return problems


def make_backend(name: str = "hf", options: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
    """The backend called ``name`` (``hf`` or ``vllm``) with its options, for models on ``device``."""
    if name == "hf":
        return HFBackend()
    if name == "vllm":
        from evomerge.evaluate.backends.vllm import VllmBackend

        return VllmBackend(options, device)
    raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "HFBackend", "HFLM", "backend_problems", "make_backend"]
