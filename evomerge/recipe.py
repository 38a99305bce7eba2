"""Merge recipes: what to build, as strict YAML.

Three kinds, told apart by ``kind`` (default ``merge``):

* ``merge`` (parameter space): one method over sources that share an architecture, with per-source
  and global parameters. A parameter value is a number / bool, a list of numbers (a *gradient*,
  interpolated linearly over the output layers: layer ``i`` of ``n`` sits at ``t = i / (n - 1)``,
  embeddings at ``t = 0``, final norm and head at ``t = 1``, as in mergekit), or a list of
  ``{filter, value}`` rules matched in order as substrings of the tensor name (``filter`` omitted or
  ``"*"`` matches everything). A per-source parameter set under the top-level ``params`` is the
  default for every source. ``layers: [start, end]`` on a source takes that half-open layer range
  of it; all sources (and ``base_layers``) then need the same length, which becomes the output's
  layer count.
* ``stack`` (franken-merge): an ordered list of ``{model, layers: [start, end]}`` slices; the output
  has the slices' layers in order; embeddings from ``embed`` (default the first slice's model),
  final norm and head from ``head`` (default the last slice's model).
* ``dataflow`` (Sakana DFS): an ordered ``path`` of ``{model, layer, scale}`` steps; ``scale``
  multiplies the residual stream entering that layer. Materialized as a plain checkpoint by folding
  the scales into the output projections (see :mod:`evomerge.dataflow`).

Every kind takes an optional ``tokenizer:`` section (a model reference, or a mapping with
``source``, ``tokens``, ``pad_to_multiple_of``, ``chat_template``; see
:mod:`evomerge.recipe_sections`); a ``merge`` with a data-aware method (``regmean``, ``fisher``)
takes a ``calibration:`` section naming its data.

Model references are local paths (relative paths resolve against the current directory, as in
mergekit) or hub ids. This module reads the evomerge format only; :func:`evomerge.loader.load_recipe`
reads a file in either format (mergekit YAML detected by ``merge_method``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, Problem
from evomerge.io_utils import atomic_write_text
from evomerge.source_count import source_count_problem
from evomerge.recipe_sections import (CALIBRATED_METHODS, TOKENIZER_KEYWORDS, UNION_TAGS, CalibrationSpec,
                                      TokenizerField, TokenizerSpec)

FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = Union[StrictBool, float]


class ParamRule(_Strict):
    """``{filter: "mlp", value: 0.3}``: applies to tensors whose name contains ``filter``."""

    filter: str | None = None
    value: Union[StrictBool, float, list[float]]


ParamValue = Union[StrictBool, float, list[float], list[ParamRule]]

_PARAM_SHAPES = ("a number, true/false, a list of numbers (a gradient over layers) or a list of "
                 "{filter, value} rules")


def _coerce_param(value: Any) -> ParamValue:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, ParamRule):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if all(isinstance(v, (dict, ParamRule)) for v in value):
            rules = []
            for i, v in enumerate(value):
                if isinstance(v, ParamRule):
                    rules.append(v)
                    continue
                extra = set(v) - {"filter", "value"}
                if extra or "value" not in v:
                    raise ValueError(f"rule [{i}] must have keys filter (optional) and value, got "
                                     f"{sorted(v)}")
                rules.append(ParamRule(filter=v.get("filter"), value=_coerce_param(v["value"])))
            return rules
    raise ValueError(f"expected {_PARAM_SHAPES}, got {value!r}")


def _coerce_params(params: Any) -> dict[str, ParamValue]:
    if not isinstance(params, dict):
        raise ValueError(f"expected a mapping of parameter name to value, got {params!r}")
    out, errors = {}, []
    for k, v in params.items():
        try:
            out[str(k)] = _coerce_param(v)
        except ValueError as err:
            errors.append(f"'{k}': {err}")
    if errors:
        raise ValueError("; ".join(errors))
    return out


def _check_range(rng: tuple[int, int] | None) -> tuple[int, int] | None:
    if rng is not None and (rng[0] < 0 or rng[1] <= rng[0]):
        raise ValueError(f"layer range [{rng[0]}, {rng[1]}] is empty or negative; use [start, end) "
                         "with 0 <= start < end")
    return rng


class SourceSpec(_Strict):
    model: str
    params: dict[str, Any] = Field(default_factory=dict)
    layers: tuple[int, int] | None = None

    _p = field_validator("params", mode="before")(classmethod(lambda cls, v: _coerce_params(v)))
    _l = field_validator("layers")(classmethod(lambda cls, v: _check_range(v)))


class _RecipeCommon(_Strict):
    evomerge: Literal[1] = FORMAT_VERSION
    dtype: str | None = None
    tokenizer: TokenizerField | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}'; use one of float32, bfloat16, float16")
        return DTYPES[v]


class MergeRecipe(_RecipeCommon):
    kind: Literal["merge"] = "merge"
    method: str
    base: str | None = None
    base_layers: tuple[int, int] | None = None
    sources: list[SourceSpec] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    # gradient position of the non-layer tensors after the layers (final norm, lm_head); None: 1.
    # mergekit evaluates them at 0, so configs imported from mergekit with a gradient carry 0
    head_t: float | None = Field(default=None, ge=0.0, le=1.0)
    calibration: CalibrationSpec | None = None  # data-aware methods (regmean, fisher) only

    _p = field_validator("params", mode="before")(classmethod(lambda cls, v: _coerce_params(v)))
    _h = field_validator("head_t")(classmethod(lambda cls, v: None if v == 1.0 else v))  # 1 is the default
    _l = field_validator("base_layers")(classmethod(lambda cls, v: _check_range(v)))


class StackSlice(_Strict):
    model: str
    layers: tuple[int, int]

    _l = field_validator("layers")(classmethod(lambda cls, v: _check_range(v)))


class StackRecipe(_RecipeCommon):
    kind: Literal["stack"]
    slices: list[StackSlice] = Field(min_length=1)
    embed: str | None = None
    head: str | None = None


class PathStep(_Strict):
    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"scale must be a finite positive number, got {v}")
        return v


class DataFlowRecipe(_RecipeCommon):
    kind: Literal["dataflow"]
    path: list[PathStep] = Field(min_length=1)
    embed: str
    head: str | None = None


Recipe = Union[MergeRecipe, StackRecipe, DataFlowRecipe]
_RecipeField = Annotated[Recipe, Field(discriminator="kind")]


class _Envelope(BaseModel):
    recipe: _RecipeField


# ----------------------------------------------------------------------------------------------
# parsing and validation


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part in UNION_TAGS:
            continue  # tags of the tokenizer section's unions
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("merge", "stack", "dataflow") and not out:
            continue  # discriminator tag pydantic puts in front
        else:
            out += ("." if out else "") + str(part)
    return out or "<top>"


def _pydantic_problems(err: ValidationError, source: str) -> list[Problem]:
    problems = []
    seen = set()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p != "recipe")
        key = _loc(loc)
        if key in seen:
            continue
        seen.add(key)
        msg = e["msg"].removeprefix("Value error, ")
        hint = None
        if e["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'"
            hint = "remove it or check its spelling against the recipe format in README.md"
        elif e["type"] == "missing":
            msg = f"required key '{loc[-1]}' is missing"
        elif e["type"] == "union_tag_invalid" and key == "<top>":
            msg = f"unknown recipe kind {(e.get('input') or {}).get('kind')!r}"
            hint = "use kind: merge, stack or dataflow"
        problems.append(Problem(f"{source}: {key}", msg, hint))
    return problems


def parse_recipe(data: Any, *, source: str = "<recipe>") -> Recipe:
    """Validate an evomerge recipe mapping; raises :class:`ConfigError` listing every problem found.
    (mergekit configs: :func:`evomerge.loader.parse_config`.)"""
    if not isinstance(data, dict):
        raise ConfigError(Problem(source, f"a recipe must be a mapping, got {type(data).__name__}"),
                          source=source)
    if "merge_method" in data:
        raise ConfigError(Problem(source, "this is a mergekit config (it has `merge_method`), not an evomerge recipe",
                                  "read it with evomerge.loader.parse_config / load_recipe, which convert it"),
                          source=source)
    data = dict(data)
    data.setdefault("kind", "merge")
    try:
        recipe = _Envelope(recipe=data).recipe
    except ValidationError as err:
        problems = _pydantic_problems(err, source)
        # report the semantic problems too: retry once without the offending keys
        pruned = _prune(data, [e["loc"] for e in err.errors()])
        try:
            retry = _Envelope(recipe=pruned).recipe
        except ValidationError:
            pass
        else:
            seen = {p.where for p in problems}
            problems += [p for p in validate_recipe(retry, source=source) if p.where not in seen]
        raise ConfigError(problems, source=source) from None
    problems = validate_recipe(recipe, source=source)
    if problems:
        raise ConfigError(problems, source=source)
    return recipe


def _prune(data: dict, locs: list[tuple]) -> dict:
    """A deep copy of ``data`` without the keys that failed validation (for a second, semantic pass)."""
    import copy

    out = copy.deepcopy(data)
    for loc in locs:
        loc = [p for p in loc if p not in ("recipe", out.get("kind"), *UNION_TAGS)]
        node = out
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict) and loc and loc[-1] in node:
            del node[loc[-1]]
    return out


def _value_problems(spec, value: ParamValue, where: str) -> list[Problem]:
    """Check every concrete number a parameter value can take."""
    if isinstance(value, list) and value and isinstance(value[0], ParamRule):
        out = []
        for i, rule in enumerate(value):
            out += _value_problems(spec, rule.value, f"{where}[{i}].value")
        return out
    if isinstance(value, list):
        if spec.kind == "bool":
            return [Problem(where, f"'{spec.name}' is a switch; a gradient list is not allowed")]
        if not value:
            return [Problem(where, "empty gradient list")]
        out = []
        for i, v in enumerate(value):
            out += spec.check(v, f"{where}[{i}]")
        return out
    if spec.kind != "bool" and isinstance(value, float) and value.is_integer() and spec.kind == "int":
        value = int(value)
    return spec.check(value, where)


def validate_recipe(recipe: Recipe, *, source: str = "<recipe>") -> list[Problem]:
    """Semantic checks that need the method registry; returns the problems (empty when valid)."""
    problems: list[Problem] = []
    at = lambda key: f"{source}: {key}"  # noqa: E731
    if isinstance(recipe, MergeRecipe):
        from evomerge.methods import get_method

        try:
            spec = get_method(recipe.method, where=at("method"))
        except ConfigError as err:
            return err.problems
        n = len(recipe.sources)
        if spec.needs_base and not recipe.base:
            problems.append(Problem(at("base"), f"method '{spec.name}' needs a base model",
                                    "add `base: <path of the model the sources were fine-tuned from>`"))
        if not spec.takes_base and recipe.base:
            problems.append(Problem(at("base"), f"method '{spec.name}' takes no base model",
                                    "remove `base`, or list it under sources"))
        if (wrong := source_count_problem(spec, n)) is not None:
            problems.append(Problem(at("sources"), wrong, "list the right number of sources for this method"))
        for name, value in recipe.params.items():
            p = spec.param(name)
            if p is None:
                problems.append(Problem(at(f"params.{name}"), f"method '{spec.name}' has no parameter '{name}'",
                                        "known: " + (", ".join(q.name for q in spec.params) or "none")))
            else:
                problems += _value_problems(p, value, at(f"params.{name}"))
        lengths = []
        for i, src in enumerate(recipe.sources):
            for name, value in src.params.items():
                p = spec.param(name)
                where = at(f"sources[{i}].params.{name}")
                if p is None:
                    problems.append(Problem(where, f"method '{spec.name}' has no parameter '{name}'",
                                            "known: " + (", ".join(q.name for q in spec.params) or "none")))
                elif p.scope == "global":
                    problems.append(Problem(where, f"'{name}' is a global parameter of '{spec.name}'",
                                            "move it to the top-level `params`"))
                else:
                    problems += _value_problems(p, value, where)
            for p in spec.source_params():
                if p.required and p.name not in src.params and p.name not in recipe.params:
                    problems.append(Problem(at(f"sources[{i}].params"),
                                            f"required parameter '{p.name}' is missing",
                                            "set it per source or under the top-level params"))
            if src.layers:
                lengths.append(src.layers[1] - src.layers[0])
        for p in spec.global_params():
            if p.required and p.name not in recipe.params:
                problems.append(Problem(at("params"), f"required parameter '{p.name}' is missing"))
        if recipe.base_layers:
            lengths.append(recipe.base_layers[1] - recipe.base_layers[0])
        if lengths and (len(set(lengths)) > 1 or len(lengths) < n + (1 if recipe.base else 0)):
            problems.append(Problem(at("sources"), "layer ranges must be given for every source"
                                    + (" and base_layers" if recipe.base else "") + " with equal lengths",
                                    f"got lengths {lengths}"))
        problems += _calibration_problems(recipe, spec.name, at)
    problems += _tokenizer_problems(recipe, at)
    return problems


def _calibration_problems(recipe: MergeRecipe, method: str, at) -> list[Problem]:
    cal = recipe.calibration
    if method in CALIBRATED_METHODS and cal is None:
        return [Problem(at("calibration"), f"method '{method}' computes statistics on calibration data; none is named",
                        "add `calibration: {suite: <suite.yaml>, split: search}` or `calibration: {jsonl: <file>, "
                        "field: prompt}`")]
    if method not in CALIBRATED_METHODS and cal is not None:
        return [Problem(at("calibration"), f"method '{method}' uses no calibration data",
                        f"remove `calibration` (data-aware methods: {', '.join(CALIBRATED_METHODS)})")]
    if cal is not None and method != "fisher" and cal.labels is not None:
        return [Problem(at("calibration.labels"), "`labels` chooses the Fisher's labels; it is for method 'fisher'",
                        "remove it")]
    return []


def _tokenizer_problems(recipe: Recipe, at) -> list[Problem]:
    """A ``tokens`` rule must take its row from a model whose embedding / head rows the recipe reads."""
    spec = tokenizer_spec(recipe)
    if spec is None or not spec.tokens:
        return []
    rows = set(vocab_models(recipe))
    problems = []
    for tok, ts in spec.tokens.items():
        src = ts.source
        model = src if isinstance(src, str) else getattr(src, "model", None)
        if model is not None and model not in rows:
            problems.append(Problem(at(f"tokenizer.tokens[{tok!r}].source"), f"model {model} is not one of the models "
                                    f"whose embedding and head rows the recipe reads ({', '.join(sorted(rows))})",
                                    "name one of them"))
    return problems


# ----------------------------------------------------------------------------------------------
# parameter resolution


def layer_t(layer: int | None, num_layers: int, *, is_head: bool = False, head_t: float | None = None) -> float:
    """Position of a tensor on the gradient axis: layers at i/(n-1), embeddings 0, head/final norm
    ``head_t`` (default 1)."""
    if layer is None:
        return (1.0 if head_t is None else head_t) if is_head else 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _interp(values: list[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def has_gradient(value: ParamValue) -> bool:
    """Whether ``value`` varies over the layers (a list of numbers, or a rule holding one)."""
    if isinstance(value, list) and value:
        return any(isinstance(r.value, list) for r in value) if isinstance(value[0], ParamRule) else True
    return False


def resolve_param(value: ParamValue, tensor_name: str, t: float) -> float | bool | None:
    """Concrete value of ``value`` for one tensor at gradient position ``t``; None if no rule matches."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if value and isinstance(value[0], ParamRule):
        for rule in value:
            if rule.filter in (None, "*") or rule.filter in tensor_name:
                return resolve_param(rule.value, tensor_name, t)
        return None
    return _interp(list(value), t)


# ----------------------------------------------------------------------------------------------
# conversions and output


def stack_to_dataflow(recipe: StackRecipe) -> DataFlowRecipe:
    """A stack is a data-flow path with unit scales."""
    steps = [PathStep(model=sl.model, layer=i) for sl in recipe.slices for i in range(*sl.layers)]
    return DataFlowRecipe(kind="dataflow", path=steps, embed=recipe.embed or recipe.slices[0].model,
                          head=recipe.head or recipe.slices[-1].model, dtype=recipe.dtype,
                          tokenizer=recipe.tokenizer)


def tokenizer_spec(recipe: Recipe) -> TokenizerSpec | None:
    """The recipe's ``tokenizer:`` section as a mapping (a bare model reference is ``{source: ref}``)."""
    tok = recipe.tokenizer
    return TokenizerSpec(source=tok) if isinstance(tok, str) else tok


def tokenizer_source_model(recipe: Recipe) -> str | None:
    """The model the ``tokenizer:`` section names as its source (not ``base`` / ``union``), if any."""
    spec = tokenizer_spec(recipe)
    if spec is None or spec.source is None or spec.source in TOKENIZER_KEYWORDS:
        return None
    return spec.source


def vocab_models(recipe: Recipe) -> list[str]:
    """The models whose token embedding / output head the recipe reads: a merge's base and sources,
    a stack's or path's embed and head models."""
    if isinstance(recipe, MergeRecipe):
        return list(dict.fromkeys(([recipe.base] if recipe.base else []) + [s.model for s in recipe.sources]))
    if isinstance(recipe, StackRecipe):
        embed, head = recipe.embed or recipe.slices[0].model, recipe.head or recipe.slices[-1].model
    else:
        embed, head = recipe.embed, recipe.head or recipe.embed
    return list(dict.fromkeys([embed, head]))


def tokenizer_model(recipe: Recipe) -> str:
    """The model whose tokenizer files serve the recipe's output unchanged (what in-memory scoring
    loads): the ``tokenizer:`` source model, else the base (else first source, or embed model).
    :class:`ConfigError` when the output's tokenizer is built (a ``union`` vocabulary, added
    ``tokens``, padding rows, a chat template), which only ``evomerge merge`` writes."""
    spec = tokenizer_spec(recipe)
    if spec is not None and (spec.source == "union" or spec.tokens or spec.pad_to_multiple_of or spec.chat_template):
        what = ("a union vocabulary" if spec.source == "union" else "added tokens" if spec.tokens
                else "padding rows" if spec.pad_to_multiple_of else "a chat template")
        raise ConfigError(Problem("tokenizer", f"this recipe builds its own output tokenizer ({what}), which in-memory "
                                  "scoring cannot load", "merge it with `evomerge merge` and score the folder with "
                                  "`evomerge eval`, or name a model as `tokenizer: {source: <model>}`"))
    return tokenizer_source_model(recipe) or model_refs(recipe)[0]


def model_refs(recipe: Recipe) -> list[str]:
    """Every model the recipe reads (weights or tokenizer), in first-mention order, without repeats."""
    refs: list[str] = []
    if isinstance(recipe, MergeRecipe):
        refs = ([recipe.base] if recipe.base else []) + [s.model for s in recipe.sources]
    elif isinstance(recipe, StackRecipe):
        refs = [x for x in (recipe.embed,) if x] + [s.model for s in recipe.slices] + \
            [x for x in (recipe.head,) if x]
    else:
        refs = [recipe.embed] + [s.model for s in recipe.path] + [x for x in (recipe.head,) if x]
    if tokenizer_source_model(recipe):
        refs.append(tokenizer_source_model(recipe))
    return list(dict.fromkeys(refs))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json", exclude_none=True)
    # drop empty containers and defaults that add noise, keep the header first
    out: dict[str, Any] = {"evomerge": FORMAT_VERSION, "kind": data.pop("kind")}
    data.pop("evomerge", None)
    for key, val in data.items():
        if val in ({}, []):
            continue
        if key == "sources":
            val = [{k: v for k, v in s.items() if v not in ({}, None)} for s in val]
        if key == "path":
            val = [{k: v for k, v in s.items()} for s in val]
        if key == "tokenizer" and isinstance(val, dict):
            val = {k: v for k, v in val.items() if v not in ({}, None)}
            if "tokens" in val:
                val["tokens"] = {t: {k: v for k, v in ts.items() if not (k == "force" and v is False)}
                                 for t, ts in val["tokens"].items()}
        out[key] = val
    return out


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)


def dump_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` as YAML atomically (temporary file, then rename)."""
    return atomic_write_text(Path(path), recipe_to_yaml(recipe))


def recipe_hash(recipe: Recipe) -> str:
    """Stable content hash (sha256 hex) of a recipe, for caches and trial bookkeeping."""
    blob = json.dumps(recipe_to_dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
