"""Merge methods, one module each; importing this package registers them all."""

from evomerge.methods.registry import MethodSpec, ParamSpec, get_method, method_names, register_method

# Each import registers its method(s) with the registry.
from evomerge.methods import (  # noqa: E402,F401  isort: skip
    linear,
    task_arithmetic,
    ties,
    dare,
    breadcrumbs,
    della,
    slerp,
    model_stock,
    passthrough,
    nuslerp,
    multislerp,
    karcher,
    nearswap,
    sce,
    arcee_fusion,
    ram,
    regmean,
    fisher,
)

from evomerge.methods.backends import MergeResult, merge  # noqa: E402  isort: skip

__all__ = ["MergeResult", "MethodSpec", "ParamSpec", "get_method", "merge", "method_names", "register_method"]
