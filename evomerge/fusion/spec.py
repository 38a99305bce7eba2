"""Fusion recipes: what to run at inference time instead of merging (strict YAML, like merge recipes).

A fusion recipe (``kind: fusion``) names its sources and the way their outputs are combined::

    kind: fusion
    method: logit                  # logit | panel | moa
    models: [evals/zoo/expert_arith, evals/zoo/expert_reverse, evals/zoo/expert_cipher]
    weights: [0.5, 0.3, 0.2]       # logit only: one per model (normalised; default equal)
    judge: evals/zoo/base          # panel only: rank the answers by this model (default: the panel)
    normalize: false               # panel only: rank by per-token mean log-likelihood instead of the sum
    moa: {...}                     # moa only: the Mixture-of-Agents configuration (below)
    dtype: float32                 # optional: load local models in this dtype (default: as stored)
    tokenizer: path                # optional: the tokenizer (default: the first local model's)

For method moa, ``models:`` without ``moa.agents`` are local agents named by their folder.

A Mixture-of-Agents configuration (``moa:``, or a file given to ``evomerge eval --moa-config``)::

    agents:                        # name -> a local model folder, or a model on an OpenAI-compatible server
      a: models/chat-a                                # local, short for {model: models/chat-a}: run by the backend
      b: {model: llama-3-8b-instruct, endpoint: http://127.0.0.1:8000/v1, api: chat,
          api_key_env: MY_KEY, relative_size: 16}     # remote: /v1/chat/completions (api: completions
                                                      # uses /v1/completions)
    layers: [[a, b], [a, b]]       # proposer layers (default: one layer of every agent)
    aggregator: a                  # default: the first agent
    max_tokens: 128                # proposers' token limit (default: the task's)
    temperature: 0.0               # remote proposers' sampling temperature (local agents decode greedily)
    instruction: "..."             # the aggregation instruction (default: evomerge's, see prompts.py)
    system_role: true              # instruction and references as a system message (false: in the user turn)
    timeout: 120                   # seconds per remote request
    concurrency: 8                 # remote requests in flight

Both are strict models (:mod:`evomerge.strict`): values are not coerced, and every problem is reported
at once, at its key, with a fix. Model references resolve as in merge recipes (relative paths against
the current directory); :mod:`evomerge.fusion.study` reads the fusion entries of a search space's
``baselines:`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from evomerge.dtypes import DTYPE_HINT, canonical_dtype, dtype_message
from evomerge.errors import ConfigError, Problem
from evomerge.strict import StrictModel, bad, choice, validate_all

METHODS = ("logit", "panel", "moa")
APIS = ("chat", "completions")

NonEmpty = Annotated[str, Field(min_length=1)]
Number = Annotated[float, Field(allow_inf_nan=False)]  # an int is a number too; true, "0.5" and .inf are not
Models = Annotated[list[NonEmpty], Field(min_length=1)]
_MODELS = TypeAdapter(Models, config=ConfigDict(strict=True))


def local_agents(refs: list[str]) -> dict[str, dict[str, str]]:
    """``refs`` as local agents named by their folder (a second ``a`` is ``a_``)."""
    agents: dict[str, dict[str, str]] = {}
    for ref in refs:
        name = Path(ref).name or ref
        while name in agents:
            name += "_"
        agents[name] = {"model": ref}
    return agents


class AgentSpec(StrictModel):
    """One Mixture-of-Agents member: a local model folder (``endpoint`` None) or a model served by an
    OpenAI-compatible API at ``endpoint`` (its base URL, ending in ``/v1``)."""

    model: NonEmpty = Field(description="a local model folder, or the model name on the endpoint")
    endpoint: str | None = None
    api: Literal["chat", "completions"] = "chat"
    api_key_env: NonEmpty | None = None
    relative_size: Number = Field(1.0, gt=0)  # parameters relative to the first source (for the cost figures)

    _api = field_validator("api", mode="before")(classmethod(lambda cls, api: choice(api, APIS, "api")))

    @field_validator("endpoint")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise bad(f"expected an http(s) base URL, got {url!r}", "e.g. endpoint: http://127.0.0.1:8000/v1")
        return url

    @property
    def local(self) -> bool:
        return self.endpoint is None


def _agent_shorthand(value: Any) -> Any:
    """``name: folder`` is short for ``name: {model: folder}``."""
    if isinstance(value, str):
        return {"model": value}
    if not isinstance(value, (dict, AgentSpec)):
        raise bad(f"expected a model folder or a mapping {{model, endpoint, api}}, got {value!r}")
    return value


def _again(err: ValidationError) -> list[dict[str, Any]]:
    """The errors of ``err`` (raised by a wrapped validation) as line errors to raise again with others."""
    return [{"type": PydanticCustomError(e["type"], "{message}", {**e.get("ctx", {}), "message": e["msg"]}),
             "loc": e["loc"], "input": e["input"]} for e in err.errors()]


class MoAConfig(StrictModel):
    agents: dict[str, Annotated[AgentSpec, BeforeValidator(_agent_shorthand)]] = Field(
        description="name -> a model folder or {model, endpoint, api}")
    layers: list[Annotated[list[str], Field(min_length=1)]] = Field([], min_length=1)  # default: every agent
    aggregator: str = ""  # default: the first agent
    max_tokens: int | None = Field(None, ge=1)
    temperature: Number = Field(0.0, ge=0)
    instruction: str | None = None
    system_role: bool = True
    timeout: Number = Field(120.0, gt=0)
    concurrency: int = Field(8, ge=1)

    @field_validator("agents")
    @classmethod
    def _some(cls, agents: dict[str, AgentSpec]) -> dict[str, AgentSpec]:
        if not agents:
            raise bad("expected at least one agent, got {}", "e.g. agents: {a: {model: path/to/model}}")
        return agents

    @field_validator("instruction")
    @classmethod
    def _text(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise bad(f"expected a non-empty text, got {text!r}")
        return text

    @model_validator(mode="wrap")
    @classmethod
    def _agent_names(cls, data: Any, handler) -> MoAConfig:
        """``layers`` and ``aggregator`` default to the agents' names and must name agents: checked on
        the names even when an agent's own keys have problems, so that both are reported."""
        agents = data.get("agents") if isinstance(data, dict) else None
        names = [name for name in agents if isinstance(name, str)] if isinstance(agents, dict) else []
        if not names:
            return handler(data)  # no agents to name: reported at `agents`
        data = {"layers": [names], "aggregator": names[0], **data}
        try:
            config, errors = handler(data), []
        except ValidationError as err:
            config, errors = None, _again(err)
        failed = {e["loc"][0] for e in errors if e["loc"]}
        used = [] if "layers" in failed else [(("layers", i), layer) for i, layer in enumerate(data["layers"])]
        if "aggregator" not in failed:
            used.append((("aggregator",), [data["aggregator"]]))
        for loc, given in used:
            stray = [name for name in given if name not in agents]
            if stray:
                errors.append({"type": bad(f"{stray[0]!r} is not an agent", f"agents: {', '.join(names)}"),
                               "loc": loc, "input": stray[0]})
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config

    def calls_per_query(self) -> int:
        """Model calls one query makes: every proposer of every layer, then the aggregator."""
        return sum(len(layer) for layer in self.layers) + 1


_FOR_METHOD = {"weights": "logit", "judge": "panel", "normalize": "panel", "moa": "moa"}  # key -> its method


class FusionRecipe(StrictModel):
    """A fusion recipe (see the module docstring); ``models`` is [] for method moa (its agents run)."""

    evomerge: Literal[1] = 1
    kind: Literal["fusion"] = "fusion"
    method: Literal["logit", "panel", "moa"] = Field(description="logit, panel or moa")
    models: Models | None = Field(None, validate_default=True)  # not given: [] (see _models)
    weights: list[Annotated[Number, Field(ge=0)]] | None = None
    judge: NonEmpty | None = None
    normalize: bool = False
    moa: MoAConfig | None = Field(None, validate_default=True)
    dtype: str | None = None
    tokenizer: NonEmpty | None = None

    @model_validator(mode="before")
    @classmethod
    def _models_as_agents(cls, data: Any) -> Any:
        """Method moa: valid ``models:`` are the local agents when ``moa:`` names none (they are not kept)."""
        if not isinstance(data, dict) or data.get("method") != "moa" or data.get("models") is None:
            return data
        try:
            refs = _MODELS.validate_python(data["models"])
        except ValidationError:
            return data  # reported at `models`
        moa = {} if data.get("moa") is None else data["moa"]
        if isinstance(moa, dict) and moa.get("agents") is None:
            moa = {**moa, "agents": local_agents(refs)}
        return {**data, "models": None, "moa": moa}

    _method = field_validator("method", mode="before")(
        classmethod(lambda cls, method: choice(method, METHODS, "fusion method")))

    @field_validator(*_FOR_METHOD, mode="before")
    @classmethod
    def _for_method(cls, value: Any, info: ValidationInfo) -> Any:
        """A key of another method is refused, whatever its value (``normalize: false`` is no value)."""
        method, wanted = info.data.get("method"), _FOR_METHOD[info.field_name]
        if value not in (None, False) and method not in (None, wanted):
            raise bad(f"only method {wanted} takes `{info.field_name}`", "remove it")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str] | None, info: ValidationInfo) -> list[str]:
        method = info.data.get("method")
        if models is None and method in ("logit", "panel"):
            raise bad(f"method {method} needs `models:` (the model folders it combines)",
                      "e.g. models: [evals/zoo/expert_arith, evals/zoo/expert_reverse]")
        return models or []

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        models = info.data.get("models")
        if weights is not None and models and len(weights) != len(models):
            raise bad(f"{len(weights)} weight(s) for {len(models)} model(s)", "give one weight per model")
        if weights is not None and not sum(weights) > 0:
            raise bad("the weights are all 0", "give a model a weight above 0")
        return weights

    @field_validator("moa", mode="before")
    @classmethod
    def _moa_needed(cls, moa: Any, info: ValidationInfo) -> Any:
        """Method moa needs agents (valid ``models:`` are in ``moa`` by now; invalid ones are reported)."""
        if moa is None and info.data.get("method") == "moa" and "models" in info.data:
            raise bad("method moa needs a `moa:` mapping (agents, layers, aggregator) or `models:` to use as "
                      "local agents")
        return moa

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str | None) -> str | None:
        if dtype is not None and canonical_dtype(dtype) is None:
            raise bad(dtype_message(dtype), DTYPE_HINT)
        return canonical_dtype(dtype)

    def local_refs(self) -> list[str]:
        """Every local model this recipe runs, in first-mention order (the judge last)."""
        refs = list(self.models)
        if self.moa is not None:
            refs += [a.model for a in self.moa.agents.values() if a.local]
        if self.judge:
            refs.append(self.judge)
        return list(dict.fromkeys(refs))

    def label(self, names: dict[str, str] | None = None) -> str:
        """A short name, e.g. ``logit ensemble (expert_arith, expert_cipher)``; ``names``: what to call
        a model reference (a search space's source names), else its folder's name."""
        what = {"logit": "logit ensemble", "panel": "panel + judge", "moa": "mixture-of-agents"}[self.method]

        def name(ref: str) -> str:
            return (names or {}).get(ref) or Path(ref).name or ref

        members = list(self.moa.agents) if self.moa is not None else [name(m) for m in self.models]
        extra = ""
        if self.weights is not None:
            extra = " w=" + "/".join(f"{w:g}" for w in self.weights)
        if self.judge:
            extra += f" judge {name(self.judge)}"
        return f"{what} ({', '.join(members)}){extra}"


# --------------------------------------------------------------------------------------- parsing


def validated(model: type[StrictModel], data: Any, where: str) -> tuple[Any, list[Problem]]:
    """:func:`~evomerge.strict.validate_all` of ``data``, every problem located at ``where`` + its key."""
    if not isinstance(data, dict):
        return None, [Problem(where or "<top>", f"expected a mapping, got {data!r}")]
    obj, problems = validate_all(model, data, source="")  # located at ": <key>"
    return obj, [Problem(f"{where}.{p.where[2:]}" if where else p.where[2:], p.message, p.hint) for p in problems]


def parse_moa(raw: Any, where: str = "moa", *, default_models: list[str] | None = None
              ) -> tuple[MoAConfig | None, list[Problem]]:
    """A Mixture-of-Agents mapping; ``default_models`` become local agents (named by their folder)
    when the mapping has no ``agents``. Returns (config or None, every problem)."""
    if isinstance(raw, dict) and raw.get("agents") is None and default_models:
        raw = {**raw, "agents": local_agents(default_models)}
    cfg, problems = validated(MoAConfig, raw, where)
    return None if problems else cfg, problems


def load_moa_config(path: str | Path, *, default_models: list[str] | None = None) -> MoAConfig:
    """A Mixture-of-Agents YAML file; ConfigError naming the file and every problem."""
    from evomerge.io_utils import load_yaml_file

    cfg, problems = parse_moa(load_yaml_file(path, "Mixture-of-Agents config"), "", default_models=default_models)
    if problems:
        raise ConfigError(problems, source=str(path))
    return cfg


def fusion_problems(data: Any, where: str = "") -> tuple[FusionRecipe | None, list[Problem]]:
    """(the recipe, []) or (None, every problem) for a fusion mapping; ``where`` prefixes locations."""
    recipe, problems = validated(FusionRecipe, data, where)
    return None if problems else recipe, problems


def parse_fusion(data: Any, *, source: str = "<recipe>") -> FusionRecipe:
    """A fusion recipe mapping; ConfigError with every problem, located in ``source``."""
    recipe, problems = fusion_problems(data)
    if problems:
        raise ConfigError([Problem(f"{source}: {p.where}", p.message, p.hint) for p in problems], source=source)
    return recipe
