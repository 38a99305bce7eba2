"""Recipe -> tensors: a plan of output tensors, each computed from a few input tensors on demand.

``plan_recipe`` opens the models (headers only), checks that every input tensor exists with the
right shape, and returns a :class:`Plan` without reading any weights. ``merge_to_disk`` streams the
plan tensor by tensor into a :class:`~evomerge.checkpoint.CheckpointWriter` (peak memory: the
inputs of one output tensor plus its result); ``materialize_state_dict`` fills a dict in memory.
"""

from __future__ import annotations

import copy
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch

from evomerge.checkpoint import (TOKENIZER_CORE, Checkpoint, CheckpointWriter, TensorSpec, _problem_text,
                                 check_device, check_output_path, completeness_problems, has_tokenizer,
                                 layer_tensor_name, parse_size, split_layer_name)
from evomerge.dataflow import cumulative_scales, fold_factor
from evomerge.dtypes import TORCH_DTYPE_NAMES as DTYPE_NAMES, TORCH_DTYPES
from evomerge.errors import CheckpointError, ConfigError, IncompatibleModelsError, MergeError, Problem
from evomerge.methods import get_method, native
from evomerge.plan_tokenizer import TokenizerPlan, embedding_rows, plan_tokenizer, tokenizer_only_dir
from evomerge.recipe import (DataFlowRecipe, MergeRecipe, Recipe, StackRecipe, layer_t, recipe_to_yaml,
                             resolve_param, stack_to_dataflow, tokenizer_source_model)
from evomerge.recipe_sections import CALIBRATED_METHODS
from evomerge.vocab import vocab_tensor_names



@dataclass(frozen=True)
class TensorRef:
    """Input tensor ``name`` of the model the recipe calls ``model`` (a key of :attr:`Plan.models`)."""

    model: str
    name: str


@dataclass(frozen=True)
class TensorOp:
    """How one output tensor is built: everything :meth:`OutputTensor.compute` uses, resolved.

    Other executors (:mod:`evomerge.resident`) read it to build the same tensor their own way.

    * ``kind="merge"``: ``get_method(method)(sources, base, generator=g, **source_params,
      **global_params)``, the sources read in ``inputs`` order and ``base`` read from ``base``;
      ``g`` is a generator on the device seeded with ``seed`` when the method is stochastic.
      ``method`` is the canonical method name (aliases resolved); ``source_params`` maps each
      per-source parameter to one value per input, ``global_params`` each global parameter to its
      value, both resolved for this tensor (gradients, filters, defaults).
    * ``kind="copy"``: ``inputs[0]`` as stored (its own dtype) when ``scale == 1.0``, else
      ``inputs[0].float() * scale`` (data-flow scale folding; see :func:`evomerge.dataflow.fold_factor`).
    * ``vocab`` (token embedding / output head under a ``tokenizer:`` source whose rows differ from
      the models'): the loaded inputs and base are first realigned to the output vocabulary,
      ``vocab.apply({model: tensor})`` (:class:`evomerge.vocab.VocabOp`, float32), then merged or copied.
    * data-aware methods (regmean, fisher): ``source_params["stats"]`` holds one
      :class:`evomerge.calibration.StatRef` (or None) per input, the statistic the kernel reads.
    """

    kind: Literal["merge", "copy"]
    inputs: tuple[TensorRef, ...]          # merge: one per recipe source, in order; copy: exactly one
    base: TensorRef | None = None          # merge only
    method: str | None = None              # merge only
    source_params: Mapping[str, list] = field(default_factory=dict)
    global_params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None                # merge only: the per-tensor generator seed
    scale: float = 1.0                     # copy only
    vocab: Any = None                      # VocabOp: rows realigned by token before the op


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    op: TensorOp
    models: Mapping[str, Checkpoint] = field(repr=False, compare=False)  # the plan's models, by ref

    def refs(self) -> list[TensorRef]:
        """The tensors the op reads: ``inputs`` in order, then ``base``."""
        op = self.op
        return [*op.inputs, op.base] if op.base is not None else list(op.inputs)

    def load(self, device: torch.device, mapped: bool = False) -> list[torch.Tensor]:
        """The op's inputs on ``device`` as stored: ``inputs`` in order, then ``base``. ``mapped``:
        CPU tensors over memory maps of the files (:meth:`Checkpoint.map`: no read copy; drop them
        once used), moved to ``device`` when it is not the CPU."""
        refs = self.refs()
        if not mapped:
            return [self.models[r.model].read(r.name, device=device) for r in refs]
        out = [self.models[r.model].map(r.name) for r in refs]
        return out if device.type == "cpu" else [t.to(device) for t in out]

    def compute(self, device: torch.device, mapped: bool = False,
                out_dtype: torch.dtype | None = None, inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The tensor on ``device``: float32 (or a copy's stored dtype), or a merge rounded once to
        ``out_dtype``; see :class:`TensorOp`.

        ``mapped``: read the inputs as memory maps (see :meth:`load`); the result may then be a view
        of one (a copy), so write it out and drop it rather than keep it. ``inputs``: the tensors of
        :meth:`refs` already on ``device`` (resident executors), read instead of the files.
        """
        op = self.op
        loaded = self.load(device, mapped) if inputs is None else list(inputs)
        if op.vocab is not None:
            aligned = op.vocab.apply({r.model: t for r, t in zip(self.refs(), loaded)})
            loaded = [aligned[r.model] for r in self.refs()]
        if op.kind == "copy":
            t = loaded[0]
            return t if op.scale == 1.0 else t.float() * op.scale
        spec = get_method(op.method)
        tensors = loaded[:len(op.inputs)]
        base_t = loaded[len(op.inputs)] if op.base is not None else None
        del loaded
        gen = None
        if spec.stochastic:
            gen = torch.Generator(device=device)
            gen.manual_seed(op.seed)
        result = spec(tensors, base_t, generator=gen, out_dtype=out_dtype, **op.source_params,
                      **op.global_params)
        # CPU: one pass over the bits in native code; else one reduction instead of an elementwise
        # isfinite pass (20x cheaper on CPU), the exact check only when the sum is not finite (a
        # NaN/inf, or a float32 overflow of the sum). With ``out_dtype`` the rounded values are
        # checked (an overflow of float16 is caught too).
        finite = native.all_finite(result)
        if finite is None:
            finite = bool(torch.isfinite(result.sum(dtype=torch.float32))) or bool(torch.isfinite(result).all())
        if not finite:
            raise MergeError(self._non_finite_message(spec.name, device, mapped))
        return result

    def _non_finite_message(self, method: str, device: torch.device, mapped: bool) -> str:
        """Why a merge gave NaN/inf: an input that already holds them (a damaged model), else the
        recipe's numbers (weights overflowing the dtype)."""
        op = self.op
        refs = [*op.inputs, op.base] if op.base is not None else list(op.inputs)
        bad = []
        try:
            for r, t in zip(refs, self.load(device, mapped)):
                if not bool(torch.isfinite(t.float()).all()):
                    bad.append(f"model {r.model}, tensor '{r.name}'")
        except Exception:  # noqa: BLE001 - the diagnosis must not hide the error it explains
            bad = []
        if bad:
            return (f"merging output tensor '{self.name}' with method '{method}': input(s) already hold non-finite "
                    f"values, NaN or inf ({'; '.join(bad)}) (fix: re-download or replace the damaged model)")
        models = ", ".join(dict.fromkeys(r.model for r in refs))
        return (f"method '{method}' produced non-finite values (NaN or inf) for output tensor '{self.name}' (inputs from "
                f"{models}) (fix: check the recipe's weights and densities, e.g. weights that overflow the "
                f"output dtype; try --dtype float32)")


@dataclass
class Plan:
    recipe: Recipe
    config: dict
    tensors: list[OutputTensor]
    dtype: torch.dtype
    tokenizer_from: Path | None
    models: dict[str, Checkpoint] = field(default_factory=dict)
    tokenizer_ref: str | None = None  # the model (recipe reference) whose tokenizer is copied
    tokenizer: TokenizerPlan | None = None  # output vocabulary, realignment, chat template
    statistics: dict[str, Any] = field(default_factory=dict)  # data-aware merges: model -> StatsFile

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.shape, self.dtype) for t in self.tensors]


def open_models(refs: list[str]) -> dict[str, Checkpoint]:
    """Open each model (headers only) and check its tensors against its config
    (:meth:`Checkpoint.verify`), so a damaged model is refused before anything is computed."""
    models = {}
    for ref in dict.fromkeys(refs):
        ck = Checkpoint.open(ref)
        ck.verify()
        models[ref] = ck
    return models


def _torch_dtype(name: str | None, fallback: Checkpoint) -> torch.dtype:
    if name:
        return TORCH_DTYPES[name]
    cfg_dtype = fallback.config.get("dtype") or fallback.config.get("torch_dtype")
    if cfg_dtype in TORCH_DTYPES:
        return TORCH_DTYPES[cfg_dtype]
    first = fallback.names[0]
    dt = fallback.dtype(first)
    return dt if dt in DTYPE_NAMES else torch.float32


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _is_pre_weight(name: str) -> bool:
    """Embedding-side tensors (gradient position 0, taken from the `embed` model in a stack)."""
    return "embed" in name or name.startswith("wte") or ".wte." in name or ".wpe." in name


def _output_names(ref: Checkpoint) -> list[str]:
    """Tensor names written for a model like ``ref`` (tied lm_head left out, as transformers does)."""
    return list(ref.names)


def _fix_layer_config(config: dict, layer_sources: list[tuple[dict, int]]) -> dict:
    """Output config for a model whose layer k is layer ``i`` of a model with config ``cfg``."""
    out = copy.deepcopy(config)
    out["num_hidden_layers"] = len(layer_sources)
    if "layer_types" in config:
        out["layer_types"] = [cfg.get("layer_types", config["layer_types"])[i] for cfg, i in layer_sources]
    if "max_window_layers" in config and isinstance(config["max_window_layers"], int):
        out["max_window_layers"] = min(config["max_window_layers"], len(layer_sources))
    return out


# ----------------------------------------------------------------------------------------------
# parameter-space merges


def _vocab_names(ref: Checkpoint, tp: TokenizerPlan) -> set[str]:
    """The tensors realigned to the output vocabulary (none when the models' rows already are it)."""
    if tp.realign is None or tp.identity:
        return set()
    return vocab_tensor_names(list(ref.names), ref.embedding_name, embedding_rows(ref), ref.shape)


def _set_vocab_size(config: dict, tp: TokenizerPlan, names: set[str]) -> None:
    if names:
        config["vocab_size"] = tp.realign.rows
        if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
            config["text_config"]["vocab_size"] = tp.realign.rows


def _plan_merge(recipe: MergeRecipe, models: dict[str, Checkpoint], tok_dir: Path | None = None,
                device: str = "cpu") -> Plan:
    spec = get_method(recipe.method)
    base = models[recipe.base] if recipe.base else None
    sources = [models[s.model] for s in recipe.sources]
    ref = base or sources[0]
    problems: list[str] = []
    ranged = any(s.layers for s in recipe.sources)
    tp = plan_tokenizer(recipe, models, tok_dir)
    vnames = _vocab_names(ref, tp)
    if not ranged:
        from evomerge.checkpoint import check_compatible

        check_compatible({r: models[r] for r in dict.fromkeys(([recipe.base] if recipe.base else [])
                                                               + [s.model for s in recipe.sources])},
                         vocab_names=vnames)
    n_out = (recipe.sources[0].layers[1] - recipe.sources[0].layers[0]) if ranged else ref.num_layers
    base_off = recipe.base_layers[0] if recipe.base_layers else 0
    if ranged:
        for s, ck in zip(recipe.sources, sources):
            if s.layers[1] > ck.num_layers:
                problems.append(f"{s.model}: layer range {list(s.layers)} exceeds its {ck.num_layers} layers")
        if base and base_off + n_out > base.num_layers:
            problems.append(f"{recipe.base}: base_layers exceed its {base.num_layers} layers")

    def input_name(name: str, k: int) -> str:
        """Name of output tensor ``name`` in input ``k`` (k = -1: base)."""
        parts = split_layer_name(name)
        if parts is None or not ranged:
            return name
        prefix, i, suffix = parts
        off = base_off if k < 0 else recipe.sources[k].layers[0]
        return layer_tensor_name(prefix, off + i, suffix)

    src_specs = spec.source_params()
    glob_specs = spec.global_params()
    out: list[OutputTensor] = []
    calibrated: list[tuple[dict, tuple[TensorRef, ...]]] = []  # filled once the plan is known to be sound
    names = [n for n in _output_names(ref)
             if (split_layer_name(n) is None or split_layer_name(n)[1] < n_out)]
    ref_k = -1 if base else 0
    for name in names:
        if not ref.has(input_name(name, ref_k)):
            problems.append(f"{ref.ref}: tensor '{input_name(name, ref_k)}' is missing")
            continue
        shape = ref.shape(input_name(name, ref_k))
        realigned = name in vnames
        if realigned:  # the output's rows; each input keeps its own
            shape = (tp.realign.rows, *shape[1:])
        srcs = tuple(TensorRef(s.model, input_name(name, k)) for k, s in enumerate(recipe.sources))
        base_in = TensorRef(recipe.base, input_name(name, -1)) if base else None
        for r in srcs + ((base_in,) if base_in else ()):
            ck, nm = models[r.model], r.name
            if not ck.has(nm):
                problems.append(f"{ck.ref}: tensor '{nm}' is missing")
            elif realigned and tuple(ck.shape(nm))[1:] != tuple(shape)[1:]:
                problems.append(f"{ck.ref}: tensor '{nm}' has shape {list(ck.shape(nm))}, expected [*, "
                                f"{', '.join(map(str, shape[1:]))}]")
            elif not realigned and tuple(ck.shape(nm)) != tuple(shape):
                problems.append(f"{ck.ref}: tensor '{nm}' has shape {list(ck.shape(nm))}, expected {list(shape)}")
        parts = split_layer_name(name)
        t = layer_t(parts[1] if parts else None, n_out, is_head=not _is_pre_weight(name), head_t=recipe.head_t)
        per_source = {}
        for p in src_specs:
            vals = []
            for s in recipe.sources:
                v = resolve_param(s.params[p.name], name, t) if p.name in s.params else None
                if v is None and p.name in recipe.params:
                    v = resolve_param(recipe.params[p.name], name, t)
                vals.append(p.default if v is None else v)
            per_source[p.name] = vals
        glob = {}
        for p in glob_specs:
            v = resolve_param(recipe.params[p.name], name, t) if p.name in recipe.params else None
            glob[p.name] = p.default if v is None else v
        if spec.name in CALIBRATED_METHODS:
            calibrated.append((per_source, srcs))
        vop = tp.realign.op(tuple(dict.fromkeys(r.model for r in srcs + ((base_in,) if base_in else ()))),
                            f"tensor '{name}'") if realigned else None
        op = TensorOp("merge", srcs, base_in, spec.name, per_source, glob, _seed_for(recipe.seed, name), vocab=vop)
        out.append(OutputTensor(name, tuple(shape), op, models))
    if problems:
        raise IncompatibleModelsError("the models cannot be merged as the recipe asks:\n  - "
                                      + "\n  - ".join(problems[:50])
                                      + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""))
    # the statistics run the models on the calibration data (minutes): only for a plan without problems
    stats = _statistics(recipe, spec.name, models, device, vnames)
    for per_source, srcs in calibrated:
        per_source["stats"] = [stats[r.model].ref(r.name) for r in srcs]
    config = copy.deepcopy(ref.config)
    if ranged:
        src_cfg = [(sources[0].config, recipe.sources[0].layers[0] + i) for i in range(n_out)]
        config = _fix_layer_config(config, src_cfg)
    _set_vocab_size(config, tp, vnames)
    return Plan(recipe, config, out, _torch_dtype(recipe.dtype, ref), tp.folder, models, tokenizer_ref=tp.ref,
                tokenizer=tp, statistics=stats)


def _statistics(recipe: MergeRecipe, method: str, models: dict[str, Checkpoint], device: str,
                vnames: set[str]) -> dict[str, Any]:
    """Data-aware methods: each source's statistics on the recipe's calibration data (computed once,
    cached on disk; :func:`evomerge.calibration.source_statistics`)."""
    if method not in CALIBRATED_METHODS:
        return {}
    if vnames:
        raise IncompatibleModelsError(f"method '{method}' merges with per-source statistics, which are not realigned "
                                      "to new embedding rows; the recipe's `tokenizer:` section realigns them "
                                      "(different vocabularies, added `tokens` or `pad_to_multiple_of`) (fix: merge "
                                      "sources that share a tokenizer without a tokenizer section, or use another "
                                      "method)")
    from evomerge.calibration import source_statistics

    return {s.model: source_statistics(models[s.model], recipe.calibration, CALIBRATED_METHODS[method], device=device)
            for s in recipe.sources}


# ----------------------------------------------------------------------------------------------
# layer stacks and data-flow paths


def _plan_dataflow(recipe: DataFlowRecipe, models: dict[str, Checkpoint], tok_dir: Path | None = None) -> Plan:
    head_ref = recipe.head or recipe.embed
    embed, head = models[recipe.embed], models[head_ref]
    problems: list[str] = []
    arch = {ck.config.get("model_type") for ck in models.values()}
    if len(arch) > 1:
        raise IncompatibleModelsError(f"a layer path needs models of one architecture; got model types "
                                      f"{sorted(map(str, arch))} ({', '.join(models)})")
    model_type = embed.config.get("model_type", "")
    cum = cumulative_scales([s.scale for s in recipe.path])
    # per-layer tensor suffixes, from the first step's model
    out: list[OutputTensor] = []
    tied_out = head is embed and bool(embed.tie_word_embeddings)
    layer_prefix = None
    pre, post = [], []
    for name in embed.names:
        parts = split_layer_name(name)
        if parts is None and _is_pre_weight(name):
            pre.append(name)
        elif parts is not None:
            layer_prefix = parts[0]
    for name in head.names:
        if split_layer_name(name) is None and not _is_pre_weight(name):
            post.append(name)
    if not tied_out and head.has("lm_head.weight") and "lm_head.weight" not in post:
        post.append("lm_head.weight")
    if layer_prefix is None:
        raise MergeError(f"{recipe.embed}: found no decoder layers (no tensor named '<prefix>.layers.N.*')")

    tp = plan_tokenizer(recipe, models, tok_dir)
    vnames = _vocab_names(embed, tp) | _vocab_names(head, tp)

    def copier(ref: str, nm: str, out_name: str, factor: float = 1.0) -> OutputTensor:
        shape = tuple(models[ref].shape(nm))
        vop = None
        if nm in vnames and shape[0] == embedding_rows(models[ref]):  # realigned to the output's rows
            vop, shape = tp.realign.op((ref,), f"tensor '{nm}'"), (tp.realign.rows, *shape[1:])
        op = TensorOp("copy", (TensorRef(ref, nm),), scale=factor, vocab=vop)
        return OutputTensor(out_name, shape, op, models)

    out.extend(copier(recipe.embed, nm, nm) for nm in pre)
    layer_sources = []
    for k, step in enumerate(recipe.path):
        ck = models[step.model]
        if step.layer >= ck.num_layers:
            problems.append(f"path[{k}]: {step.model} has {ck.num_layers} layers, no layer {step.layer}")
            continue
        layer_sources.append((ck.config, step.layer))
        for nm in ck.names:
            parts = split_layer_name(nm)
            if parts is None or parts[1] != step.layer:
                continue
            prefix, _, suffix = parts
            factor = fold_factor(model_type, suffix, cum[k])
            out.append(copier(step.model, nm, layer_tensor_name(layer_prefix, k, suffix), factor))
    out.extend(copier(head_ref, nm, nm) for nm in post)
    # every layer must have the same tensor set and shapes as the embed model's layers
    ref_layer = {split_layer_name(n)[2]: embed.shape(n) for n in embed.names
                 if split_layer_name(n) and split_layer_name(n)[1] == 0}
    for k, step in enumerate(recipe.path):
        ck = models[step.model]
        got = {split_layer_name(n)[2]: ck.shape(n) for n in ck.names
               if split_layer_name(n) and split_layer_name(n)[1] == step.layer}
        if not got:
            problems.append(f"path[{k}]: {step.model} has no tensors for layer {step.layer} (its config says "
                            f"{ck.num_layers} layers)")
        elif got != ref_layer:
            diff = sorted(set(got.items()) ^ set(ref_layer.items()))[:3]
            problems.append(f"path[{k}]: layer {step.layer} of {step.model} differs from {recipe.embed}'s "
                            f"layers (e.g. {diff})")
    if head is not embed and head.vocab_size != embed.vocab_size and not vnames:
        problems.append(f"vocabularies differ: {recipe.embed} has {embed.vocab_size} tokens, "
                        f"{recipe.head} has {head.vocab_size}")
    if problems:
        raise IncompatibleModelsError("the layer path cannot be built:\n  - " + "\n  - ".join(problems))
    config = _fix_layer_config(embed.config, layer_sources)
    config["tie_word_embeddings"] = tied_out
    _set_vocab_size(config, tp, vnames)
    return Plan(recipe, config, out, _torch_dtype(recipe.dtype, embed), tp.folder, models, tokenizer_ref=tp.ref,
                tokenizer=tp)


# ----------------------------------------------------------------------------------------------
# entry points


def plan_recipe(recipe: Recipe, models: dict[str, Checkpoint] | None = None, *, device: str = "cpu") -> Plan:
    """Open the recipe's models (headers only), check them, and plan every output tensor.

    ``models``: already opened models by reference (resident executors); a tokenizer source that is
    not among them is read from its folder. ``device``: where a data-aware method's statistics are
    computed when the on-disk cache does not hold them yet."""
    from evomerge.recipe import model_refs

    refs = model_refs(recipe)
    src = tokenizer_source_model(recipe)
    tok_dir = tokenizer_only_dir(recipe, refs)
    if models is None:
        models = open_models([r for r in refs if tok_dir is None or r != src])
    elif src is not None and src not in models:
        tok_dir = Path(src).expanduser()
    if isinstance(recipe, MergeRecipe):
        return _plan_merge(recipe, models, tok_dir, device)
    if isinstance(recipe, StackRecipe):
        recipe = stack_to_dataflow(recipe)
    return _plan_dataflow(recipe, models, tok_dir)


def check_merged(plan: Plan) -> None:
    """Raise :class:`MergeError` unless the planned output is complete: its config (layer count,
    sizes, tying) matches its tensors (:func:`~evomerge.checkpoint.completeness_problems`)."""
    problems = completeness_problems(plan.config, {t.name: t.shape for t in plan.tensors})
    if problems:
        raise MergeError(_problem_text("the merged model would not be complete: its config.json would disagree "
                                       "with its tensors", problems,
                                       "check the recipe's layer ranges and models; nothing was written"))


def check_tokenizer_source(plan: Plan) -> None:
    """Raise :class:`CheckpointError` unless the model whose tokenizer a merge copies has one: the
    merged checkpoint could not be scored or used without it."""
    if plan.tokenizer_from is not None and has_tokenizer(plan.tokenizer_from):
        return
    files = ", ".join(TOKENIZER_CORE)
    where = f" in {plan.tokenizer_from}" if plan.tokenizer_from is not None else ""
    if tokenizer_source_model(plan.recipe):
        raise CheckpointError(
            f"the recipe's tokenizer source {tokenizer_source_model(plan.recipe)} has no tokenizer files ({files}){where}, so "
            f"the merged model could not be evaluated or used (fix: set the recipe's `tokenizer:` key to a "
            f"model folder that has a tokenizer, e.g. the base the sources were fine-tuned from)")
    raise CheckpointError(
        f"model {plan.tokenizer_ref}, whose tokenizer a merge copies (the recipe's base, else its first source "
        f"or embed model), has no tokenizer files ({files}){where}, so the merged model could not be evaluated "
        f"or used (fix: add `tokenizer: <model folder with a tokenizer>` to the recipe, or copy the tokenizer "
        f"files into {plan.tokenizer_ref})")


def iter_tensors(plan: Plan, device: str | torch.device = "cpu", progress: bool = False,
                 mapped: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in the plan's dtype, one at a time.

    ``mapped``: read inputs as memory maps (no read copy); for streaming writers that drop each
    yielded tensor once written (a copy may be a view of a shard's mapping).
    """
    device = torch.device(device)
    items = plan.tensors
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="merging", unit="tensor", dynamic_ncols=True)
    for t in items:
        yield t.name, t.compute(device, mapped, out_dtype=plan.dtype).to(plan.dtype)


def merge_to_disk(recipe: Recipe, out_dir: str | Path, *, device: str = "cpu", dtype: str | None = None,
                  shard_size: str | int = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Materialize ``recipe`` as a Hugging Face checkpoint at ``out_dir`` (atomic: temp dir + rename).

    Checked before any tensor is computed: the options (device, dtype, shard size), the output path
    (:func:`~evomerge.checkpoint.check_output_path`), every model against its config
    (:meth:`~evomerge.checkpoint.Checkpoint.verify`), the tokenizer source, and the planned output's
    config against its tensors (:func:`check_merged`). A failure leaves ``out_dir`` as it was.
    """
    device = check_device(device)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConfigError(Problem("dtype (--dtype)", f"unknown dtype {dtype!r}", f"use one of {', '.join(TORCH_DTYPES)}"))
    shard_bytes = parse_size(shard_size, "shard size (--shard-size)")
    out = check_output_path(out_dir, overwrite=overwrite)
    _check_out_is_no_input(recipe, out)
    plan = plan_recipe(recipe, device=device)
    if dtype:
        plan.dtype = TORCH_DTYPES[dtype]
    check_tokenizer_source(plan)
    check_merged(plan)
    config = dict(plan.config)
    config["dtype"] = DTYPE_NAMES[plan.dtype]
    config.pop("torch_dtype", None)
    text = recipe_to_yaml(recipe)
    with tempfile.TemporaryDirectory(prefix="evomerge-tokenizer-") as tmp:
        # the output tokenizer first (built when the vocabulary or the chat template changes)
        tok_from = plan.tokenizer.write(Path(tmp)) if plan.tokenizer is not None else plan.tokenizer_from
        writer = CheckpointWriter(out_dir, plan.specs(), shard_size=shard_bytes, overwrite=overwrite,
                                  metadata={"evomerge_recipe": text})
        with writer:
            for name, tensor in iter_tensors(plan, device, progress, mapped=True):
                writer.write(name, tensor)
            return writer.finish(config=config, tokenizer_from=tok_from, extra_files={"recipe.yaml": text})


def _check_out_is_no_input(recipe: Recipe, out: Path) -> None:
    """Refuse an output folder that is (or holds) a model the recipe reads: --overwrite would replace it."""
    from evomerge.recipe import model_refs

    real = os.path.realpath(out)
    for ref in model_refs(recipe):
        path = Path(ref).expanduser()
        if path.exists() and (os.path.realpath(path) == real or os.path.realpath(path).startswith(real + os.sep)):
            raise CheckpointError(f"output folder {out} is (or holds) model {ref}, which the recipe reads; replacing "
                                  f"it would destroy an input (fix: choose another output path)")


def materialize_state_dict(recipe: Recipe, *, device: str = "cpu", dtype: str | None = None,
                           models: dict[str, Checkpoint] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The merged model's config and state dict, in memory (tied lm_head left out)."""
    plan = plan_recipe(recipe, models, device=device)
    if dtype:
        plan.dtype = TORCH_DTYPES[dtype]
    return plan.config, dict(iter_tensors(plan, device))
