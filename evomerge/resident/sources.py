"""Loading models into memory once, and materializing candidates into resident targets.

:class:`ResidentSources` holds every tensor of a few models on a device (in its stored dtype) and
writes candidate recipes in place into a resident transformers model or a dict of preallocated
tensors: each output tensor is planned (:mod:`evomerge.resident.planning`) and run
(:mod:`evomerge.resident.running`) with nothing the size of a model allocated per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.errors import MergeError
from evomerge.materialize import Plan, TensorRef, plan_recipe
from evomerge.methods.kernels import compile_available
from evomerge.recipe import Recipe, model_refs, tokenizer_source_model
from evomerge.resident.planning import Planner, target_view
from evomerge.resident.running import run_jobs


@dataclass
class Materialized:
    """A candidate written into ``target``; ``backends``: output tensor -> what computed it (one of
    :data:`evomerge.methods.backends.BACKENDS`, ``copy`` for a stored tensor copied, ``compute`` for
    a tensor the plan computes itself)."""

    target: Any
    backends: dict[str, str]

    def count(self, backend: str) -> int:
        """How many output tensors ``backend`` computed."""
        return sum(1 for b in self.backends.values() if b == backend)


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ResidentSources:
    """Models held in device memory for repeated in-place materialization (see the package doc)."""

    def __init__(self, models: dict[str, Checkpoint], tensors: dict[str, dict[str, torch.Tensor]],
                 host: dict[str, dict[str, torch.Tensor]], device: torch.device, fused: bool,
                 stats: bool, native: bool = True):
        self.models, self.tensors, self.host = models, tensors, host
        self.device, self.fused, self.use_stats = device, fused, stats
        self.native = native and device.type == "cpu"  # when native.available() at run time
        self.planner = Planner(self)
        self._targets: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}
        self._models_by_shape: dict[tuple, torch.nn.Module] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, refs: list[str], *, base: str | None = None, device: str | torch.device = "cpu",
             keep_dtype: bool = True, fused: bool | None = None, stats: bool = True, native: bool = True,
             models: Mapping[str, Checkpoint] | None = None) -> "ResidentSources":
        """Read every tensor of ``refs`` (and ``base``) onto ``device``.

        ``keep_dtype=False`` stores float32 copies (more memory, same results). ``fused=None``
        compiles the torch kernels when ``torch.compile`` can (a C++ compiler on CPU, Triton on CUDA).
        ``native`` (CPU): task-vector and linear tensors go to the native C kernel
        (:mod:`evomerge.methods.native`; bit-exact with the reference) when it builds, whatever
        ``fused`` says (the rule: :func:`evomerge.methods.backends.choose_backend`).
        ``stats`` enables the TIES/breadcrumbs rank orders (4 bytes per parameter per source, on
        the host, computed on first use); without them thresholds are found by a counting pass.
        """
        device = _device(device)
        all_refs = list(dict.fromkeys(([base] if base else []) + list(refs)))
        opened = {r: (models[r] if models and r in models else Checkpoint.open(r)) for r in all_refs}
        tensors, host = {}, {}
        for ref, ck in opened.items():
            tensors[ref], host[ref] = {}, {}
            for name in ck.names:
                t = ck.read(name, device="cpu")
                if not keep_dtype and t.is_floating_point():
                    t = t.float()
                dev = t.to(device)
                tensors[ref][name] = dev
                if device.type != "cpu" and stats:
                    host[ref][name] = t  # thresholds are read from host copies (no device sync)
            if ck.tie_word_embeddings and ck.has("lm_head.weight") and "lm_head.weight" not in ck.names:
                tensors[ref]["lm_head.weight"] = tensors[ref][ck.embedding_name]
                if host[ref]:
                    host[ref]["lm_head.weight"] = host[ref][ck.embedding_name]
        if fused is None:
            fused = compile_available(device)
        return cls(opened, tensors, host if device.type != "cpu" else tensors, device, fused, stats, native)

    @classmethod
    def from_tensors(cls, models: Mapping[str, Checkpoint], tensors: Mapping[str, Mapping[str, torch.Tensor]],
                     *, device: str | torch.device, fused: bool | None = None,
                     stats: bool = True, native: bool = True) -> "ResidentSources":
        """Wrap tensors already on ``device`` (``tensors[ref][name]``, every name of ``models[ref]``);
        ``models`` give names, shapes and configs for planning. Benchmarks use it to skip disk."""
        device = _device(device)
        dev = {r: dict(d) for r, d in tensors.items()}
        host = dev if device.type == "cpu" else (
            {r: {n: t.cpu() for n, t in d.items()} for r, d in dev.items()} if stats else {})
        if fused is None:
            fused = compile_available(device)
        return cls(dict(models), dev, host, device, fused, stats, native)

    def drop_models(self) -> None:
        """Forget the reusable candidate models and their state dicts (after an out-of-memory error)."""
        self._models_by_shape.clear()
        self._targets.clear()

    def nbytes(self) -> int:
        """Bytes of resident device tensors (shared tied tensors counted once)."""
        seen = {t.data_ptr(): t.numel() * t.element_size() for d in self.tensors.values() for t in d.values()}
        return sum(seen.values())

    def stats_nbytes(self) -> int:
        """Bytes of rank-order statistics held (host)."""
        return self.planner.stats_nbytes()

    def tensor(self, r: TensorRef) -> torch.Tensor:
        """The resident tensor ``r`` (on the device)."""
        tensors = self.tensors.get(r.model)
        if tensors is None:
            raise MergeError(f"{r.model} is not resident; load it with ResidentSources.load")
        return tensors[r.name]

    def host_tensor(self, r: TensorRef) -> torch.Tensor:
        """``r`` on the host (the device tensor itself on CPU)."""
        return self.host[r.model][r.name]

    # ------------------------------------------------------------------ targets

    def plan(self, recipe: Recipe) -> Plan:
        missing = [r for r in model_refs(recipe) if r not in self.models and r != tokenizer_source_model(recipe)]
        if missing:
            raise MergeError(f"recipe reads models that are not resident: {', '.join(missing)}; "
                             f"resident: {', '.join(self.models)}")
        return plan_recipe(recipe, dict(self.models), device=str(self.device))

    def model_for(self, recipe: Recipe, plan: Plan | None = None) -> torch.nn.Module:
        """A transformers causal LM on the device shaped like ``recipe``'s output, reused for every
        recipe of the same config (DFS candidates of another depth get another model)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        plan = plan or self.plan(recipe)
        cfg = {k: v for k, v in plan.config.items() if k not in ("dtype", "torch_dtype")}
        key = (repr(sorted(cfg.items(), key=lambda kv: kv[0])), plan.dtype)
        model = self._models_by_shape.get(key)
        if model is None:
            config = AutoConfig.for_model(**cfg)
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
            model.eval().requires_grad_(False)
            self._models_by_shape[key] = model
        return model

    def empty_state_dict(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Preallocated output tensors for ``recipe`` (a new dict of new tensors: keep and reuse it)."""
        plan = self.plan(recipe)
        return {t.name: torch.empty(t.shape, dtype=plan.dtype, device=self.device) for t in plan.tensors}

    def _target_dict(self, target) -> dict[str, torch.Tensor]:
        if isinstance(target, torch.nn.Module):
            hit = self._targets.get(id(target))
            if hit is None or hit[0] is not target:
                hit = (target, dict(target.state_dict()))
                self._targets[id(target)] = hit
            return hit[1]
        return target

    # ------------------------------------------------------------------ materialization

    def materialize(self, recipe: Recipe, target: torch.nn.Module | dict[str, torch.Tensor] | None = None,
                    *, check_finite: bool = True) -> Materialized:
        """Write ``recipe``'s merged tensors into ``target`` in place; returns it with the backend
        that computed each tensor.

        ``target``: a transformers model or a dict name -> tensor on the device (shapes of the
        recipe's output; dtype normally the recipe's, else each value is cast once); ``None`` uses
        :meth:`model_for`. Raises :class:`MergeError` when a value is not finite (as the reference).
        """
        plan = self.plan(recipe)
        if target is None:
            target = self.model_for(recipe, plan)
        dst = self._target_dict(target)
        jobs = [self.planner.job(ot, target_view(ot, dst, self.device)) for ot in plan.tensors]
        return Materialized(target, run_jobs(jobs, self, check_finite=check_finite))

    def materialize_into(self, recipe: Recipe, target: torch.nn.Module | dict[str, torch.Tensor] | None = None,
                         *, check_finite: bool = True) -> torch.nn.Module | dict[str, torch.Tensor]:
        """:meth:`materialize`, returning only the target."""
        return self.materialize(recipe, target, check_finite=check_finite).target
