"""Dtype names: the one table of the floating-point dtypes a recipe, a search space, an evaluation
mapping and the command line accept, their short aliases, and the torch dtypes they stand for.

``DTYPE_NAMES`` are the canonical names (``float32``, ``bfloat16``, ``float16``); ``DTYPES`` maps every
accepted spelling (aliases ``fp32``, ``bf16``, ``fp16`` included) to its canonical name.
``TORCH_DTYPES`` (canonical name -> ``torch.dtype``) and ``TORCH_DTYPE_NAMES`` (its inverse) import
torch on first use, so reading a config does not load torch.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import Problem

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES = {**{name: name for name in DTYPE_NAMES}, **DTYPE_ALIASES}
DTYPE_HINT = "use float32, bfloat16 or float16"


def canonical_dtype(name: Any) -> str | None:
    """The canonical name of ``name`` (an alias resolved), or None when it names no dtype."""
    return DTYPES.get(name) if isinstance(name, str) else None


def dtype_message(name: Any) -> str:
    return f"unknown dtype {name!r}"


def dtype_problem(value: Any, where: str) -> Problem | None:
    """The problem of a ``dtype:`` value (None when it names a dtype; aliases are accepted)."""
    if canonical_dtype(value) is not None:
        return None
    return Problem(where, dtype_message(value), DTYPE_HINT)


def __getattr__(name: str) -> Any:
    if name in ("TORCH_DTYPES", "TORCH_DTYPE_NAMES"):
        import torch

        table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        globals()["TORCH_DTYPES"] = table
        globals()["TORCH_DTYPE_NAMES"] = {dtype: key for key, dtype in table.items()}
        return globals()[name]
    raise AttributeError(f"module 'evomerge.dtypes' has no attribute {name!r}")
