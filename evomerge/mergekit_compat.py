"""Read and write mergekit YAML configs, for the methods both tools share.

Reading keeps mergekit's behaviour: where a method's default differs between the tools, the
imported recipe states mergekit's value explicitly (``MERGEKIT_DEFAULTS``), so a mergekit config
merges to the same tensors (up to rounding: mergekit computes in the config's ``dtype``, evomerge
always in float32). Writing turns a recipe into a mergekit config where mergekit can express it,
including data-flow paths (as passthrough slices whose ``scale`` parameter folds the path's
scales into the output projections), and raises :class:`ConfigError` otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, Problem
from evomerge.recipe import (DataFlowRecipe, MergeRecipe, ParamRule, Recipe, StackRecipe, has_gradient,
                             model_refs, parse_recipe, resolve_param, stack_to_dataflow, tokenizer_spec)

SHARED_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                  "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough", "nuslerp",
                  "multislerp", "karcher", "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl")
# methods whose mergekit contract ignores the base: a `base_model` is one more input model there.
# linear keeps its earlier import rule (a `base_model` not listed under `models` is dropped); for
# karcher mergekit adds it to the inputs, weighted like the others, and so does the import.
BASE_AS_SOURCE = ("linear", "karcher")
# parameters mergekit accepts that change nothing in the result (memory/speed switches)
IGNORED_PARAMS = {"int8_mask"}
# method -> {param: value} set on import to keep mergekit's behaviour. mergekit's `rescale` restores
# each sparsified task vector's L1 norm; evomerge's default divides by the keep probability (as the
# DARE and DELLA papers do), so imported recipes switch `rescale_l1` on. All other defaults agree.
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    m: {"rescale_l1": True} for m in ("dare_ties", "dare_linear", "della", "della_linear", "ties",
                                      "breadcrumbs", "breadcrumbs_ties")
}
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template"}


def _lora_problems(data: dict[str, Any], at) -> list[Problem]:
    """mergekit's ``model+lora`` references (a LoRA adapter merged into its model first): refused."""
    refs = [("base_model", data.get("base_model"))]
    refs += [(f"models[{i}].model", m.get("model")) for i, m in enumerate(data.get("models") or [])
             if isinstance(m, dict)]
    for i, sl in enumerate(data.get("slices") or []):
        if isinstance(sl, dict):
            refs.append((f"slices[{i}].base_model", sl.get("base_model")))
            refs += [(f"slices[{i}].sources[{j}].model", s.get("model")) for j, s in enumerate(sl.get("sources") or [])
                     if isinstance(s, dict)]
    return [Problem(at(where), f"'{ref}' names a LoRA adapter to merge into its model ('model+lora'), which "
                    f"evomerge does not load", "merge the adapter into the model first (e.g. peft's "
                    "merge_and_unload, saved as safetensors) and name that folder")
            for where, ref in refs if isinstance(ref, str) and "+" in ref and not Path(ref).exists()]


def _params(raw: Any, where: str, problems: list[Problem]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(Problem(where, f"expected a mapping, got {raw!r}"))
        return {}
    return {k: v for k, v in raw.items() if k not in IGNORED_PARAMS}


MOE_KEYS = {"experts", "gate_mode", "experts_per_token", "shared_experts"}
# keys of an output slice; mergekit reads `residual_weight` nowhere (accepted, ignored: warned about)
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}


def is_mergekit_moe(data: Any) -> bool:
    """True for a mergekit-moe config (``experts`` / ``gate_mode`` keys)."""
    return isinstance(data, dict) and bool(MOE_KEYS & set(data))


def _shape_problems(data: dict[str, Any], at) -> list[Problem]:
    """Problems of the entries' shapes (``models`` / ``slices`` lists of mappings with their keys),
    found before any of them is read, so one bad entry never hides another."""
    problems: list[Problem] = []
    models, slices = data.get("models"), data.get("slices")
    if models is not None and not isinstance(models, list):
        problems.append(Problem(at("models"), f"expected a list of `- model: ...` entries, got {models!r}"))
    for i, m in enumerate(models if isinstance(models, list) else []):
        if not isinstance(m, dict) or "model" not in m:
            problems.append(Problem(at(f"models[{i}]"), "each entry needs a `model` key",
                                    "write `- model: path/or/hub-id`"))
        elif m.get("parameters") is not None and not isinstance(m["parameters"], dict):
            problems.append(Problem(at(f"models[{i}].parameters"), f"expected a mapping, got {m['parameters']!r}",
                                    "write `parameters: {weight: 0.5}`"))
        elif set(m) - {"model", "parameters"}:
            problems.append(Problem(at(f"models[{i}]"), f"unknown key(s) {sorted(set(m) - {'model', 'parameters'})}",
                                    "a models entry takes `model` and `parameters`"))
    if slices is not None and not isinstance(slices, list):
        problems.append(Problem(at("slices"), f"expected a list of slices, got {slices!r}"))
    for i, sl in enumerate(slices if isinstance(slices, list) else []):
        if isinstance(sl, dict) and set(sl) - SLICE_KEYS:
            problems.append(Problem(at(f"slices[{i}]"), f"unknown key(s) {sorted(set(sl) - SLICE_KEYS)}",
                                    f"a slice takes {', '.join(sorted(SLICE_KEYS))}"))
        srcs = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(srcs, list) or not srcs:
            problems.append(Problem(at(f"slices[{i}].sources"), "each slice needs a non-empty `sources` list"))
            continue
        for j, src in enumerate(srcs):
            where = at(f"slices[{i}].sources[{j}]")
            if not isinstance(src, dict) or "model" not in src:
                problems.append(Problem(where, "each source needs a `model` key"))
                continue
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in lr)):
                problems.append(Problem(f"{where}.layer_range", f"expected [start, end] integers, got {lr!r}"))
    return problems


def from_mergekit(data: dict[str, Any], *, source: str = "<mergekit config>") -> Recipe:
    """Convert a mergekit config mapping into an evomerge recipe (validated). Every problem of the
    file is reported at once."""
    problems: list[Problem] = []
    at = lambda key: f"{source}: {key}"  # noqa: E731
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(Problem(at(key), f"unknown mergekit key '{key}'",
                                    f"mergekit-yaml keys evomerge reads: {', '.join(sorted(_TOP_KEYS))}"))
    shape = _shape_problems(data, at)
    problems += shape
    method = data.get("merge_method")
    if method not in SHARED_METHODS:
        problems.append(Problem(at("merge_method"), f"mergekit method '{method}' is not supported by evomerge",
                                f"supported: {', '.join(SHARED_METHODS)}"))
    if data.get("modules"):
        problems.append(Problem(at("modules"), "multi-module mergekit configs are not supported"))
    base = data.get("base_model")
    slices = data.get("slices") if isinstance(data.get("slices"), list) else []
    if len(slices) == 1 and isinstance(slices[0], dict) and slices[0].get("base_model"):
        base = slices[0]["base_model"]  # a slice's base_model overrides the top-level one (mergekit's rule)
    problems += _lora_problems(data, at)
    tokenizer = _tokenizer_section(data, base, method, at, problems)
    dtype = data.get("out_dtype") or data.get("dtype")
    gparams = _params(data.get("parameters"), at("parameters"), problems)
    if shape:  # the entries cannot be read; everything else found so far is reported with them
        raise ConfigError(problems, source=source)

    out: dict[str, Any]
    if data.get("models"):
        sources = []
        for i, m in enumerate(data["models"]):
            if m["model"] == base and method not in BASE_AS_SOURCE:
                continue  # mergekit passes the base separately to every base-using method
            sources.append({"model": m["model"], "params": _params(m.get("parameters"),
                                                                   at(f"models[{i}].parameters"), problems)})
        if method == "karcher" and base and all(m["model"] != base for m in data["models"]):
            sources.append({"model": base, "params": {}})
        out = {"kind": "merge", "method": method, "sources": sources, "params": gparams}
        if base and method not in BASE_AS_SOURCE:
            out["base"] = base
    elif data.get("slices"):
        slices = data["slices"]
        _warn_slice_keys(slices, method, at)
        if method == "passthrough":
            stack, factors = [], []
            for i, sl in enumerate(slices):
                srcs = sl.get("sources", []) if isinstance(sl, dict) else []
                if len(srcs) != 1:
                    problems.append(Problem(at(f"slices[{i}].sources"), "a passthrough slice takes one source"))
                    continue
                factors.append(_folded_factor((srcs[0].get("parameters") or {}).get("scale"),
                                              at(f"slices[{i}].sources[0].parameters.scale"), problems))
                if sl.get("parameters"):
                    problems.append(Problem(at(f"slices[{i}].parameters"), "slice-level parameters of a "
                                            "passthrough merge are not imported", "remove them"))
                stack.append({"model": srcs[0]["model"], "layers": list(srcs[0]["layer_range"])})
            out = {"kind": "stack", "slices": stack}
            if problems:
                raise ConfigError(problems, source=source)
            if any(f != 1.0 for f in factors):
                out = _stack_with_factors(stack, factors)
        elif len(slices) == 1:
            sl = slices[0]
            sources = []
            base_layers = None
            for i, s in enumerate(sl.get("sources", [])):
                if s["model"] == base:
                    base_layers = list(s["layer_range"])
                    if method not in BASE_AS_SOURCE:
                        continue
                sources.append({"model": s["model"], "layers": list(s["layer_range"]),
                                "params": _params(s.get("parameters"), at(f"slices[0].sources[{i}]"), problems)})
            out = {"kind": "merge", "method": method, "sources": sources,
                   "params": {**gparams, **_params(sl.get("parameters"), at("slices[0].parameters"), problems)}}
            if base and method not in BASE_AS_SOURCE:
                out["base"] = base
                if base_layers:
                    out["base_layers"] = base_layers
        else:
            problems.append(Problem(at("slices"), f"several output slices are supported only for passthrough "
                                    f"(got {len(slices)} slices with '{method}')",
                                    "merge each slice separately, or use a stack recipe"))
            raise ConfigError(problems, source=source)
    else:
        problems.append(Problem(at("models"), "a mergekit config needs `models` or `slices`"))
        raise ConfigError(problems, source=source)
    if problems:
        raise ConfigError(problems, source=source)
    if out["kind"] == "merge":
        _drop_ignored(out, method, at)
        for k, v in MERGEKIT_DEFAULTS.get(method, {}).items():
            if k not in out["params"] and not any(k in s["params"] for s in out["sources"]):
                out["params"][k] = v
        if method == "passthrough" and len(out["sources"]) == 1 and "scale" in out["sources"][0]["params"]:
            out["params"]["scale"] = out["sources"][0]["params"].pop("scale")
    if dtype:
        out["dtype"] = dtype
    if tokenizer:
        out["tokenizer"] = tokenizer
    recipe = parse_recipe(out, source=source)
    if isinstance(recipe, MergeRecipe) and _gradients(recipe):
        # mergekit evaluates gradients at t = 0 for the tensors after the layers (final norm, head)
        recipe = recipe.model_copy(update={"head_t": 0.0})
    return recipe


TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}


def _tokenizer_section(data: dict[str, Any], base: Any, method: Any, at, problems: list[Problem]) -> Any:
    """The recipe's ``tokenizer:`` section for mergekit's ``tokenizer_source`` / ``tokenizer`` /
    ``chat_template`` keys. mergekit's ``base`` is its ``base_model``: kept as ``base`` where the
    recipe has that base, else named explicitly (linear and karcher read the base as a source).
    A ``tokenizer`` block without ``source`` gets mergekit's default, ``union``."""
    src, block, template = data.get("tokenizer_source"), data.get("tokenizer"), data.get("chat_template")
    if src is not None and block is not None:
        problems.append(Problem(at("tokenizer"), "both `tokenizer_source` and `tokenizer` are set (mergekit refuses "
                                "this too)", "keep one: `tokenizer: {source: ...}` holds the source as well"))
        return None
    if block is not None and not isinstance(block, dict):
        problems.append(Problem(at("tokenizer"), f"expected a mapping with keys {sorted(TOKENIZER_KEYS)}, got {block!r}"))
        return None
    out: dict[str, Any] = {}
    if block is not None:
        for k in set(block) - TOKENIZER_KEYS:
            problems.append(Problem(at(f"tokenizer.{k}"), f"unknown key '{k}'",
                                    f"mergekit's tokenizer block takes {', '.join(sorted(TOKENIZER_KEYS))}"))
        out = {k: v for k, v in block.items() if k in TOKENIZER_KEYS and v is not None}
        out.setdefault("source", "union")
    elif src is not None:
        out["source"] = src
    if out.get("source") == "base" and base and method in BASE_AS_SOURCE:
        out["source"] = base  # the recipe has no base: name mergekit's
    if template is not None:
        out["chat_template"] = template
    return out or None


class MergekitIgnoredWarning(UserWarning):
    """A key of a mergekit config that mergekit accepts and ignores; evomerge drops it and says so."""


def _warn_slice_keys(slices: list, method: str, at) -> None:
    """Slice keys mergekit accepts without effect: ``residual_weight`` (read nowhere), and a slice's
    ``base_model`` where the method takes no base (passthrough) or there are several slices."""
    import warnings

    for i, sl in enumerate(slices):
        if not isinstance(sl, dict):
            continue
        if sl.get("residual_weight") is not None:
            warnings.warn(f"{at(f'slices[{i}].residual_weight')}: mergekit reads `residual_weight` nowhere (it "
                          f"accepts and ignores it); evomerge drops it", MergekitIgnoredWarning, stacklevel=4)
        if sl.get("base_model") and (method == "passthrough" or len(slices) > 1):
            warnings.warn(f"{at(f'slices[{i}].base_model')}: {method} takes no base model here; evomerge drops it",
                          MergekitIgnoredWarning, stacklevel=4)


def _drop_ignored(out: dict[str, Any], method: str, at) -> None:
    """Drop parameters ``method`` does not take (mergekit passes every parameter to every method and
    each reads only its own, so e.g. a ``weight`` given to ``slerp`` or ``model_stock`` sources has no
    effect there): one warning each, naming where it was. evomerge's own recipes stay strict."""
    import warnings

    from evomerge.methods.registry import get_method

    spec = get_method(method)
    known = {p.name for p in spec.source_params()} | {p.name for p in spec.global_params()}
    dropped = [(f"parameters.{k}", k) for k in out["params"] if k not in known]
    for k in [k for _, k in dropped]:
        del out["params"][k]
    for i, src in enumerate(out["sources"]):
        for k in [k for k in src["params"] if k not in known]:
            dropped.append((f"{src['model']}: parameters.{k}", k))
            del src["params"][k]
    for where, k in dropped:
        warnings.warn(f"{at(where)}: mergekit's {method} does not use '{k}' (it accepts and ignores it); "
                      f"evomerge drops it", MergekitIgnoredWarning, stacklevel=3)


def _gradients(recipe: MergeRecipe) -> bool:
    return any(has_gradient(v) for v in [*recipe.params.values(), *(v for s in recipe.sources for v in s.params.values())])


# Filters (substrings, as mergekit matches them) that select the tensors after the layers, with a
# name each selects, of the architectures evomerge targets: llama, mistral, qwen2/3, gemma
# (model.norm), phi (final_layernorm), gpt2-style (ln_f), and every output head (lm_head).
HEAD_FILTERS = {"lm_head": "lm_head.weight", "model.norm.": "model.norm.weight",
                "final_layernorm": "model.final_layernorm.weight", "ln_f.": "transformer.ln_f.weight"}


def _head_pinned(v: Any, head_t: float) -> Any:
    """A gradient parameter as mergekit YAML whose value on the tensors after the layers is the
    recipe's (at ``head_t``; mergekit would take the gradient's first value): one rule per head
    filter with that value, then the parameter as it was."""
    out = [{"filter": f, "value": val} for f, name in HEAD_FILTERS.items()
           if (val := resolve_param(v, name, head_t)) is not None]
    rest = _value_out(v)
    return out + (rest if isinstance(v[0], ParamRule) else [{"value": rest}])


def _value_out(v: Any) -> Any:
    if isinstance(v, list) and v and isinstance(v[0], ParamRule):
        return [({"filter": r.filter} if r.filter else {}) | {"value": _value_out(r.value)} for r in v]
    return v


def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a mergekit config mapping; :class:`ConfigError` where mergekit cannot express it."""
    out: dict[str, Any] = {}
    if isinstance(recipe, MergeRecipe):
        if recipe.method not in SHARED_METHODS:
            raise ConfigError(Problem("method", f"mergekit has no method '{recipe.method}'"))
        out["merge_method"] = recipe.method
        recipe = _mergekit_rescale(recipe)
        weights = [s.params.get("weight", 1.0) for s in recipe.sources]
        if recipe.method == "karcher" and any(w != weights[0] for w in weights):
            raise ConfigError(Problem("sources.weight", "mergekit's karcher weighs all models equally; this "
                                      "recipe gives them different weights", "export in evomerge format"))
        head_t = 1.0 if recipe.head_t is None else recipe.head_t

        def param_out(v: Any) -> Any:
            return _head_pinned(v, head_t) if head_t != 0.0 and has_gradient(v) else _value_out(v)

        if recipe.base:
            out["base_model"] = recipe.base
        if any(s.layers for s in recipe.sources):
            srcs = [{"model": s.model, "layer_range": list(s.layers)}
                    | ({"parameters": {k: param_out(v) for k, v in s.params.items()}} if s.params else {})
                    for s in recipe.sources]
            if recipe.base:
                srcs.append({"model": recipe.base, "layer_range": list(recipe.base_layers or recipe.sources[0].layers)})
            out["slices"] = [{"sources": srcs}]
        else:
            out["models"] = [{"model": s.model}
                             | ({"parameters": {k: param_out(v) for k, v in s.params.items()}} if s.params else {})
                             for s in recipe.sources]
        if recipe.params:
            out["parameters"] = {k: param_out(v) for k, v in recipe.params.items()}
    else:
        path = stack_to_dataflow(recipe) if isinstance(recipe, StackRecipe) else recipe
        out["merge_method"] = "passthrough"
        out["slices"] = _path_slices(path)
        head = path.head or path.embed
        if path.embed != path.path[0].model or head != path.path[-1].model:
            raise ConfigError(Problem("embed/head", "mergekit passthrough takes the embeddings from the first "
                                      "slice's model and the head from the last slice's model; this recipe "
                                      "takes them elsewhere", "export in evomerge format instead"))
    if recipe.dtype:
        # evomerge computes in float32 and rounds once to the output dtype; mergekit computes in
        # `dtype` (bfloat16 arithmetic loses most of a task vector's bits) and writes `out_dtype`
        out["dtype"] = "float32"
        if recipe.dtype != "float32":
            out["out_dtype"] = recipe.dtype
    out.update(_tokenizer_out(recipe))
    return out


def _tokenizer_out(recipe: Recipe) -> dict[str, Any]:
    """mergekit's keys for the recipe's ``tokenizer:`` section. ``base`` in a recipe without a base
    model is its first model (mergekit would pick any of its models), so it is named."""
    spec = tokenizer_spec(recipe)
    if spec is None:
        return {}
    out: dict[str, Any] = {}
    source = spec.source
    if source == "base" and not getattr(recipe, "base", None):
        source = model_refs(recipe)[0]
    if spec.tokens or spec.pad_to_multiple_of:
        block = spec.model_dump(mode="json", exclude_none=True, exclude={"chat_template"})
        block["tokens"] = {t: {k: v for k, v in ts.items() if not (k == "force" and v is False)}
                           for t, ts in block.get("tokens", {}).items()}
        out["tokenizer"] = {k: v for k, v in (block | {"source": source}).items() if v not in ({}, None)}
    elif source is not None:
        out["tokenizer_source"] = source
    if spec.chat_template is not None:
        out["chat_template"] = spec.chat_template
    return out


def _path_slices(path: DataFlowRecipe) -> list[dict[str, Any]]:
    """Group a layer path into runs of consecutive layers of one model with one folded factor."""
    from evomerge.dataflow import RESIDUAL_WRITERS, cumulative_scales

    cum = cumulative_scales([s.scale for s in path.path])
    slices: list[dict[str, Any]] = []
    run_start = 0
    for k in range(1, len(path.path) + 1):
        prev = path.path[k - 1]
        if k < len(path.path):
            cur = path.path[k]
            if cur.model == prev.model and cur.layer == prev.layer + 1 and cum[k] == cum[k - 1]:
                continue
        first = path.path[run_start]
        sl: dict[str, Any] = {"sources": [{"model": first.model, "layer_range": [first.layer, prev.layer + 1]}]}
        if cum[run_start] != 1.0:
            factor = 1.0 / cum[run_start]
            writers = sorted({w.split(".")[1] for arch in RESIDUAL_WRITERS.values() for w in arch})
            sl["sources"][0]["parameters"] = {"scale": [{"filter": w, "value": factor} for w in writers]
                                              + [{"value": 1.0}]}
        slices.append(sl)
        run_start = k
    return slices


def _folded_factor(scale: Any, where: str, problems: list[Problem]) -> float:
    """The factor of a passthrough ``scale`` that multiplies only the residual writers, as written by
    :func:`to_mergekit`: ``[{filter: o_proj, value: f}, {filter: down_proj, value: f}, {value: 1}]``."""
    if scale is None or scale == 1 or scale == 1.0:
        return 1.0
    if isinstance(scale, list):
        rules = {r.get("filter"): r.get("value") for r in scale if isinstance(r, dict)}
        vals = {rules.get("o_proj"), rules.get("down_proj")}
        if set(rules) == {"o_proj", "down_proj", None} and rules[None] == 1 and len(vals) == 1:
            f = vals.pop()
            if isinstance(f, (int, float)) and f > 0:
                return float(f)
    problems.append(Problem(where, f"only residual-writer scales (o_proj/down_proj, default 1) are imported; "
                            f"got {scale!r}", "remove the scale parameter or express it as a dataflow recipe"))
    return 1.0


def _stack_with_factors(stack: list[dict[str, Any]], factors: list[float]) -> dict[str, Any]:
    """A data-flow recipe whose cumulative scales reproduce per-slice residual-writer factors."""
    path, prev_c = [], 1.0
    for sl, f in zip(stack, factors):
        c = 1.0 / f
        for j, layer in enumerate(range(*sl["layers"])):
            path.append({"model": sl["model"], "layer": layer, "scale": (c / prev_c) if j == 0 else 1.0})
        prev_c = c
    return {"kind": "dataflow", "path": path, "embed": stack[0]["model"], "head": stack[-1]["model"]}


def _mergekit_rescale(recipe: MergeRecipe) -> MergeRecipe:
    """Drop ``rescale_l1`` (mergekit's rescale is always the L1 one); refuse what mergekit cannot do."""
    from evomerge.methods import get_method

    spec = get_method(recipe.method)
    if spec.param("rescale_l1") is None:
        return recipe
    rescale = recipe.params.get("rescale", spec.param("rescale").default)
    l1 = recipe.params.get("rescale_l1", spec.param("rescale_l1").default)
    if rescale and not l1:
        raise ConfigError(Problem("params.rescale", f"this {recipe.method} recipe rescales kept entries by "
                                  "1/keep-probability, which mergekit cannot express (its rescale restores "
                                  "the L1 norm)", "set `rescale_l1: true` (mergekit's behaviour) or "
                                  "`rescale: false`, or export in evomerge format"))
    params = {k: v for k, v in recipe.params.items() if k != "rescale_l1"}
    return recipe.model_copy(update={"params": params})
