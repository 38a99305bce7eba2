"""In-memory candidate materialization: every source resident on the device, each candidate
written in place into a preallocated model.

A search evaluates thousands of merges of the same few models. :class:`ResidentSources` reads
those models once (every tensor, on the device, in its stored dtype), and
:meth:`ResidentSources.materialize_into` writes a candidate recipe into the parameters of a
resident target model (or a dict of preallocated tensors) with one fused kernel launch per output
tensor: the sources and base are read once, the output written once, accumulation in float32, and
nothing the size of a model is allocated per candidate.

* Recipe resolution (per-tensor parameters, gradients, filters, layer ranges, seeds, data-flow
  scale folding) is exactly :func:`evomerge.materialize.plan_recipe`'s: the plan is built against
  the resident checkpoints (headers only) and each output tensor's resolved
  :class:`~evomerge.materialize.TensorOp` (method, inputs, parameters, seed, scale) is executed here.
* TIES / breadcrumbs thresholds come from per-(source, base) rank orders computed once
  (:mod:`evomerge.resident.stats`), so the exact top-k set of any density costs a few element
  reads. Where a tie group at a threshold is only partly kept, the tensor is cut into contiguous
  segments at the tie cut, and each segment keeps ``|d| >= t`` with its own ``t`` (the threshold,
  or the next float32 above it): the exact set, with no index arithmetic in the kernel.
* DARE masks come from the counter-based generator of :mod:`evomerge.methods.sparsify`, computed
  inside the kernel from (seed, source, flat index): no random stream, no mask in memory, and the
  same masks as the reference on every device.
* Fast paths: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs(_ties), slerp,
  stacks and data-flow paths. Every other method (della, model_stock, passthrough, rescale_l1, and
  nuslerp, multislerp, karcher, nearswap, sce, arcee_fusion, ram, ramplus_tl: any method not in
  ``FAST_METHODS``) runs its registered reference kernel on the resident tensors (exact; one
  tensor's temporaries at a time).

Exactness: with ``fused=False`` the kernels run eagerly and give the reference's tensors (bit for
bit for the deterministic and DARE paths with the same seed, see tests/test_resident.py); with
``fused=True`` they are compiled with ``torch.compile`` (Triton on CUDA, C++ on CPU), which may fuse
a multiply-add and so differ from the reference by about one float32 rounding before the final
cast (one output-dtype ulp at most, rarely).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.errors import MergeError
from evomerge.materialize import OutputTensor, Plan, TensorRef, plan_recipe
from evomerge.methods import get_method, native
from evomerge.methods.common import resolve
from evomerge.methods.slerp import DOT_THRESHOLD, NORM_EPS
from evomerge.methods.sparsify import DARE_BITS, dare_cutoff, dare_key, keep_count, outlier_counts
from evomerge.recipe import Recipe, model_refs
from evomerge.resident.kernels import compile_available, get_kernel
from evomerge.resident.stats import INF, HostValues, rank_order, top_cut

# method -> (trim mode, sign election); see evomerge.resident.kernels
TASK_VECTOR_METHODS = {
    "task_arithmetic": ("none", False),
    "ties": ("thr", True),
    "dare_ties": ("hash", True),
    "dare_linear": ("hash", False),
    "breadcrumbs": ("band", False),
    "breadcrumbs_ties": ("band", True),
}
FAST_METHODS = (*TASK_VECTOR_METHODS, "linear", "slerp")


class _Job:
    __slots__ = ("kind", "name", "out", "args", "static", "p", "c", "tv")

    def __init__(self, kind, name, out, args=(), static=None, p=(), c=(), tv=None):
        self.kind, self.name, self.out, self.args = kind, name, out, args
        self.static, self.p, self.c, self.tv = static or {}, list(p), list(c), tv


class _TaskVector:
    """One task-vector tensor before it is cut into launches: flat sources and base, the kernel's
    static switches, per-source weights, rescale divisors and ``(hi, lo)`` tie cuts
    (``(thr, cut)``: entries with index <= cut keep ties at ``thr``), ``[lambda, norm_div]`` and,
    for DARE, ``[start, key_0, cutoff_0, ...]``."""

    __slots__ = ("xs", "base", "static", "weights", "divs", "cuts", "tail", "hash")

    def __init__(self, xs, base, static, weights, divs, cuts, tail, hash_):
        self.xs, self.base, self.static, self.weights = xs, base, static, weights
        self.divs, self.cuts, self.tail, self.hash = divs, cuts, tail, hash_


class ResidentSources:
    """Models held in device memory for repeated in-place materialization (see module doc)."""

    def __init__(self, models: dict[str, Checkpoint], tensors: dict[str, dict[str, torch.Tensor]],
                 host: dict[str, dict[str, torch.Tensor]], device: torch.device, fused: bool,
                 stats: bool, native: bool = True):
        self.models, self.tensors, self.host = models, tensors, host
        self.device, self.fused, self.use_stats = device, fused, stats
        self.native = native and device.type == "cpu"  # when native.available() at run time
        self._orders: dict[tuple, Any] = {}               # (source ref, base ref) -> rank order
        self._values: dict[TensorRef, HostValues] = {}    # host tensors' single-entry readers
        self._slerp: dict[tuple, tuple] = {}              # (source ref, base ref) -> (n0, n1, dot)
        self._targets: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}
        self._models_by_shape: dict[tuple, torch.nn.Module] = {}
        self._gen = torch.Generator(device=device)
        self.last_native_tensors = 0  # tensors the last candidate computed with the native CPU kernel

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, refs: list[str], *, base: str | None = None, device: str | torch.device = "cpu",
             keep_dtype: bool = True, fused: bool | None = None, stats: bool = True, native: bool = True,
             models: Mapping[str, Checkpoint] | None = None) -> "ResidentSources":
        """Read every tensor of ``refs`` (and ``base``) onto ``device``.

        ``keep_dtype=False`` stores float32 copies (more memory, same results). ``fused=None``
        compiles the torch kernels when ``torch.compile`` can (a C++ compiler on CPU, Triton on CUDA).
        ``native`` (CPU): task-vector tensors (task arithmetic, TIES, DARE, breadcrumbs) go to the
        native C kernel (:mod:`evomerge.methods.native`; bit-exact with the reference) when it
        builds, whatever ``fused`` says.
        ``stats`` enables the TIES/breadcrumbs rank orders (4 bytes per parameter per source, on
        the host, computed on first use); without them thresholds are found by selection.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
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
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
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

    def _tensor(self, r: TensorRef) -> torch.Tensor:
        tensors = self.tensors.get(r.model)
        if tensors is None:
            raise MergeError(f"{r.model} is not resident; load it with ResidentSources.load")
        return tensors[r.name]

    def _host(self, r: TensorRef) -> torch.Tensor:
        return self.host[r.model][r.name]

    # ------------------------------------------------------------------ targets

    def plan(self, recipe: Recipe) -> Plan:
        missing = [r for r in model_refs(recipe) if r not in self.models and r != recipe.tokenizer]
        if missing:
            raise MergeError(f"recipe reads models that are not resident: {', '.join(missing)}; "
                             f"resident: {', '.join(self.models)}")
        return plan_recipe(recipe, dict(self.models))

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

    def materialize_into(self, recipe: Recipe, target: torch.nn.Module | dict[str, torch.Tensor] | None = None,
                         *, check_finite: bool = True) -> torch.nn.Module | dict[str, torch.Tensor]:
        """Write ``recipe``'s merged tensors into ``target`` in place and return it.

        ``target``: a transformers model or a dict name -> tensor on the device (shapes of the
        recipe's output; dtype normally the recipe's, else each value is cast once); ``None`` uses
        :meth:`model_for`. Raises :class:`MergeError` when a value is not finite (as the reference).
        """
        plan = self.plan(recipe)
        if target is None:
            target = self.model_for(recipe, plan)
        dst = self._target_dict(target)
        jobs = [j for ot in plan.tensors for j in self._jobs(ot, dst)]
        self._run(jobs, check_finite)
        return target

    def _out(self, ot: OutputTensor, dst: dict[str, torch.Tensor]) -> torch.Tensor:
        out = dst.get(ot.name)
        if out is None:
            raise MergeError(f"target has no tensor '{ot.name}' (the recipe's output has {ot.shape})")
        if tuple(out.shape) != tuple(ot.shape) or out.device != self.device or not out.is_contiguous():
            raise MergeError(f"target tensor '{ot.name}' is {tuple(out.shape)} on {out.device}; "
                             f"expected a contiguous {ot.shape} tensor on {self.device}")
        return out.view(-1)

    def _jobs(self, ot: OutputTensor, dst: dict[str, torch.Tensor]) -> list[_Job]:
        """The kernel launches that write ``ot``: one, or one per segment (magnitude trims)."""
        out, op = self._out(ot, dst), ot.op
        if op.kind == "copy":  # data-flow / stack layer: a copy, maybe scaled (folded)
            src = self._tensor(op.inputs[0]).view(-1)
            if op.scale == 1.0:
                return [_Job("copy", ot.name, out, (src,))]
            return [_Job("scale", ot.name, out, (src,), p=[op.scale])]
        spec, seed = get_method(op.method), op.seed
        xs = [self._tensor(r) for r in op.inputs]
        base = self._tensor(op.base) if op.base is not None else None
        params = {**op.source_params, **op.global_params}
        ref_job = _Job("ref", ot.name, out, (spec, xs, base, params, seed))
        if spec.name not in FAST_METHODS:
            return [ref_job]
        p = resolve(spec.name, xs, base, self._gen if spec.stochastic else None, params)
        if spec.name == "linear":
            return [self._linear_job(ot.name, out, xs, p) or ref_job]
        if spec.name == "slerp":
            return [self._slerp_job(ot.name, out, xs[0], base, op.inputs[0], op.base, p["t"])]
        if p.get("rescale") and p.get("rescale_l1"):
            return [ref_job]
        return self._task_vector_job(ot.name, out, spec.name, xs, base, op.inputs, op.base, p, seed)

    def _linear_job(self, name, out, xs, p) -> _Job | None:
        total = float(sum(p["weight"]))
        if p["normalize"] and abs(total) < 1e-8:
            return None  # the reference raises the explanatory ConfigError
        weights = [w / total for w in p["weight"]] if p["normalize"] else p["weight"]
        kept = [(x, w) for x, w in zip(xs, weights) if w != 0]  # the reference skips w = 0
        if not kept:
            return None
        return _Job("linear", name, out, ([x.view(-1) for x, _ in kept],), p=[w for _, w in kept])

    def _task_vector_job(self, name, out, method, xs, base, srcs, base_ref, p, seed) -> list[_Job]:
        """One task-vector job; :meth:`_run` sends it to the native CPU kernel whole, or to the torch
        kernels cut into segments at the tie cuts (:meth:`_segments`)."""
        mode, elect = TASK_VECTOR_METHODS[method]
        n, numel = len(xs), base.numel()
        dens = p.get("density", [1.0] * n)
        if all(d >= 1.0 for d in dens):
            mode = "none"
        rescale = p.get("rescale", False)
        divs = [d if (d < 1.0 and rescale and d > 0) else 1.0 for d in dens]
        cuts: list[tuple[tuple[float, int], tuple[float, int]]] = []  # per source: (hi, lo) (thr, cut)
        for i, d in enumerate(dens):
            hi, lo = native.KEEP_ALL
            if mode in ("thr", "band") and d < 1.0:
                refs = (srcs[i], base_ref)
                if mode == "thr":
                    hi = self._top_cut(refs, xs[i], base, keep_count(numel, d))
                else:
                    n_top, n_keep = outlier_counts(numel, d, p["gamma"][i])
                    hi = self._top_cut(refs, xs[i], base, n_top + n_keep)
                    lo = self._top_cut(refs, xs[i], base, n_top)
            cuts.append((hi, lo))
        total = float(sum(p["weight"]))
        norm_div = total if (not elect and p["normalize"] and abs(total) >= 1e-8) else 1.0
        static = dict(mode=mode, elect=elect, normalize=bool(elect and p["normalize"]),
                      rescale=any(v != 1.0 for v in divs))
        tv = _TaskVector([x.view(-1) for x in xs], base.view(-1), static, list(p["weight"]), divs, cuts,
                         [p["lambda"], norm_div], [])
        if mode == "hash":
            tv.hash = [0] + [v for i, d in enumerate(dens)
                             for v in (dare_key(seed, i), dare_cutoff(d) if d < 1.0 else 1 << DARE_BITS)]
        return [_Job("task_vector", name, out, tv=tv)]

    @staticmethod
    def _segments(j: _Job) -> list[_Job]:
        """A task-vector job as torch kernel launches: one per segment between tie cuts, each with
        per-source thresholds (ties at a threshold kept up to the cut: ``thr`` before it, the next
        float32 above ``thr`` after it), so ``|d| >= t`` selects exactly the top-k set."""
        tv, numel = j.tv, j.out.numel()
        if tv.static["mode"] == "hash":
            pv = [v for w, dv in zip(tv.weights, tv.divs) for v in (w, -1.0, INF, dv)] + tv.tail
            return [_Job("task_vector", j.name, j.out, (tv.xs, tv.base), tv.static, pv, tv.hash)]
        bounds = sorted({c + 1 for hl in tv.cuts for _, c in hl if 0 <= c + 1 < numel} | {0, numel})
        jobs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            pv = []
            for (hi, lo), w, dv in zip(tv.cuts, tv.weights, tv.divs):
                pv += [w, hi[0] if e - 1 <= hi[1] else native.next_up(hi[0]),
                       lo[0] if e - 1 <= lo[1] else native.next_up(lo[0]), dv]
            jobs.append(_Job("task_vector", j.name, j.out[s:e], ([x[s:e] for x in tv.xs], tv.base[s:e]),
                             tv.static, pv + tv.tail))
        return jobs

    @staticmethod
    def _native_job(j: _Job) -> "native.Job | None":
        """A task-vector job as one entry of the native CPU kernel's job list (``None``: not supported)."""
        tv = j.tv
        return native.task_vector_job(j.out, tv.base, tv.xs, mode=tv.static["mode"], elect=tv.static["elect"],
                                      normalize=tv.static["normalize"], weights=tv.weights, divs=tv.divs,
                                      lam=tv.tail[0], norm_div=tv.tail[1], cuts=tv.cuts, hash_=tv.hash)

    def _values_of(self, r: TensorRef) -> HostValues:
        hv = self._values.get(r)
        if hv is None:
            hv = self._values[r] = HostValues(self._host(r))
        return hv

    def _top_cut(self, refs: tuple[TensorRef, TensorRef], x, base, k: int) -> tuple[float, int]:
        numel = x.numel()
        if k <= 0:
            return INF, -1
        if k >= numel:
            return -1.0, numel
        if self.use_stats:
            order = self._orders.get(refs)
            if order is None:
                order = self._orders[refs] = rank_order(x, base)
            return top_cut(order, self._values_of(refs[0]), self._values_of(refs[1]), k)
        # no stats: exact selection on the device (the reference's kthvalue/topk), plus the tie cut
        from evomerge.methods.sparsify import magnitude_threshold

        a = torch.sub(x.reshape(-1), base.reshape(-1).float()).abs_()
        thr = magnitude_threshold(a, k)
        above = int((a > thr).sum())
        ties = torch.nonzero(a == thr).view(-1)
        if ties.numel() == k - above:
            return float(thr), numel  # every tie is kept
        return float(thr), int(ties[k - above - 1])

    def _slerp_job(self, name, out, x, base, src_ref, base_ref, t) -> _Job:
        key = (src_ref, base_ref)
        red = self._slerp.get(key)
        if red is None:  # |v0|, |v1|, <v0, v1>: independent of t, computed once as the reference does
            v0, v1 = base.float(), x.float()
            red = (torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1),
                   torch.dot(v0.reshape(-1), v1.reshape(-1)))
            self._slerp[key] = red = tuple(r.cpu() for r in red)  # c0, c1 are computed on the host
        n0, n1, dot = red
        one = torch.ones_like(n0)
        dot = dot / torch.where(n0 > NORM_EPS, n0, one) / torch.where(n1 > NORM_EPS, n1, one)
        colinear = dot.abs() > DOT_THRESHOLD
        theta = torch.arccos(dot.clamp(-1.0, 1.0))
        safe = torch.where(colinear, one, torch.sin(theta))
        c0 = torch.where(colinear, one * (1.0 - t), torch.sin((1.0 - t) * theta) / safe)
        c1 = torch.where(colinear, one * t, torch.sin(t * theta) / safe)
        return _Job("slerp", name, out, (base.view(-1), x.view(-1)), p=[c0, c1])

    # ------------------------------------------------------------------ execution

    def _params(self, jobs: list[_Job]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """All jobs' ``p`` / ``c`` values in one float32 and one int64 device tensor (one copy)."""
        pf, cf, po, co = [], [], [], []
        for j in jobs:
            po.append(len(pf))
            co.append(len(cf))
            pf += j.p
            cf += j.c
        pt = torch.tensor([float(v) for v in pf], dtype=torch.float32)
        ct = torch.tensor(cf, dtype=torch.int64)
        if self.device.type != "cpu":
            pt = pt.pin_memory().to(self.device, non_blocking=True)
            ct = ct.pin_memory().to(self.device, non_blocking=True)
        return pt, ct, po, co

    def _run(self, jobs: list[_Job], check_finite: bool) -> None:
        flags: list[tuple[str, torch.Tensor | bool]] = []
        native_jobs, torch_jobs = [], []
        use_native = self.native and native.available()
        for j in jobs:
            if j.kind != "task_vector":
                torch_jobs.append(j)
                continue
            nj = self._native_job(j) if use_native else None
            if nj is None:
                torch_jobs += self._segments(j)
            else:
                native_jobs.append((j.name, nj))
        self.last_native_tensors = len(native_jobs)
        if native_jobs:  # every native tensor in one call, largest first (work items in job order)
            native_jobs.sort(key=lambda t: -t[1].numel)
            flags += zip([name for name, _ in native_jobs], native.run([nj for _, nj in native_jobs]))
        # largest first: on CPU, interleaving tiny kernels (norms) with large ones measured 1.6x
        # slower over a whole model than running the tiny ones last (OpenMP thread wake-ups)
        torch_jobs.sort(key=lambda j: -j.out.numel())
        pt, ct, po, co = self._params(torch_jobs)
        with torch.no_grad():
            for j, p0, c0 in zip(torch_jobs, po, co):
                p = pt[p0:p0 + len(j.p)] if j.p else None
                c = ct[c0:c0 + len(j.c)] if j.c else None
                pl = None if self.fused else j.p  # Python floats, as the reference passes them
                if j.kind == "copy":
                    j.out.copy_(j.args[0])
                elif j.kind == "ref":
                    flags.append((j.name, self._run_reference(j)))
                elif j.kind == "task_vector":
                    fn = get_kernel("task_vector", self.fused, **j.static)
                    flags.append((j.name, fn(j.out, j.args[1], j.args[0], p, c, pl)))
                elif j.kind == "linear":
                    flags.append((j.name, get_kernel("linear", self.fused)(j.out, j.args[0], p, pl)))
                elif j.kind == "slerp":
                    flags.append((j.name, get_kernel("slerp", self.fused)(j.out, *j.args, p)))
                elif j.kind == "scale":
                    flags.append((j.name, get_kernel("scale", self.fused)(j.out, j.args[0], p, pl)))
        if check_finite and flags:
            ok = torch.stack([torch.as_tensor(f).reshape(()) for _, f in flags])
            if not bool(ok.all()):
                bad = next(name for (name, _), f in zip(flags, ok.tolist()) if not f)
                raise MergeError(f"the merge produced non-finite values for tensor '{bad}'; check the "
                                 "recipe's weights and densities")

    def _run_reference(self, j: _Job) -> torch.Tensor:
        spec, xs, base, params, seed = j.args
        gen = None
        if spec.stochastic:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        result = spec(xs, base, generator=gen, **params)
        j.out.copy_(result.view(-1))
        return torch.isfinite(result).all()

    def stats_nbytes(self) -> int:
        return sum(o.nbytes for o in self._orders.values())


__all__ = ["ResidentSources", "FAST_METHODS", "TASK_VECTOR_METHODS"]
