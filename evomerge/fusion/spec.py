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

A Mixture-of-Agents configuration (``moa:``, or a file given to ``evomerge eval --moa-config``)::

    agents:                        # name -> a local model folder, or a model on an OpenAI-compatible server
      a: {model: models/chat-a}                       # local: run by the evaluation backend
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

Model references resolve as in merge recipes (relative paths against the current directory);
:mod:`evomerge.fusion.study` reads the fusion entries of a search space's ``baselines:`` section.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from evomerge.dtypes import DTYPE_HINT, DTYPES
from evomerge.errors import ConfigError, Problem

METHODS = ("logit", "panel", "moa")
APIS = ("chat", "completions")
_TOP = {"evomerge", "kind", "method", "models", "weights", "judge", "normalize", "moa", "dtype", "tokenizer"}
_MOA = {"agents", "layers", "aggregator", "max_tokens", "temperature", "instruction", "system_role", "timeout",
        "concurrency"}
_AGENT = {"model", "endpoint", "api", "api_key_env", "relative_size"}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSpec(_Frozen):
    """One Mixture-of-Agents member: a local model folder (``endpoint`` None) or a model served by an
    OpenAI-compatible API at ``endpoint`` (its base URL, ending in ``/v1``)."""

    model: str
    endpoint: str | None = None
    api: Literal["chat", "completions"] = "chat"
    api_key_env: str | None = None
    relative_size: float = 1.0

    @property
    def local(self) -> bool:
        return self.endpoint is None


class MoAConfig(_Frozen):
    agents: dict[str, AgentSpec]
    layers: list[list[str]]
    aggregator: str
    max_tokens: int | None = None
    temperature: float = 0.0
    instruction: str | None = None
    system_role: bool = True
    timeout: float = 120.0
    concurrency: int = 8

    def calls_per_query(self) -> int:
        """Model calls one query makes: every proposer of every layer, then the aggregator."""
        return sum(len(layer) for layer in self.layers) + 1


class FusionRecipe(_Frozen):
    evomerge: Literal[1] = 1
    kind: Literal["fusion"] = "fusion"
    method: Literal["logit", "panel", "moa"]
    models: list[str] = []
    weights: list[float] | None = None
    judge: str | None = None
    normalize: bool = False
    moa: MoAConfig | None = None
    dtype: str | None = None
    tokenizer: str | None = None

    def local_refs(self) -> list[str]:
        """Every local model this recipe runs, in first-mention order (the judge last)."""
        refs = list(self.models)
        if self.moa is not None:
            refs += [a.model for a in self.moa.agents.values() if a.local]
        if self.judge:
            refs.append(self.judge)
        return list(dict.fromkeys(refs))

    def label(self) -> str:
        """A short name, e.g. ``logit ensemble (expert_arith, expert_cipher)``."""
        what = {"logit": "logit ensemble", "panel": "panel + judge", "moa": "mixture-of-agents"}[self.method]
        names = list(self.moa.agents) if self.moa is not None else [Path(m).name or m for m in self.models]
        extra = ""
        if self.weights is not None:
            extra = " w=" + "/".join(f"{w:g}" for w in self.weights)
        if self.judge:
            extra += f" judge {Path(self.judge).name or self.judge}"
        return f"{what} ({', '.join(names)}){extra}"


# --------------------------------------------------------------------------------------- parsing


def unknown_keys(raw: dict, allowed: set[str], where: str) -> list[Problem]:
    """A problem per key of ``raw`` outside ``allowed``, located at ``where`` + key."""
    return [Problem(f"{where}{k}", f"unknown key '{k}'", f"allowed: {', '.join(sorted(allowed))}")
            for k in raw if k not in allowed]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_list(value: Any, where: str, problems: list[Problem]) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m for m in value):
        problems.append(Problem(where, f"expected a non-empty list of model folders, got {value!r}",
                                "e.g. models: [evals/zoo/expert_arith, evals/zoo/expert_reverse]"))
        return []
    return list(value)


def parse_moa(raw: Any, where: str = "moa", *, default_models: list[str] | None = None
              ) -> tuple[MoAConfig | None, list[Problem]]:
    """A Mixture-of-Agents mapping; ``default_models`` become local agents (named by their folder)
    when the mapping has no ``agents``. Returns (config or None, every problem)."""
    p = f"{where}." if where else ""
    if not isinstance(raw, dict):
        return None, [Problem(where or "moa", f"expected a mapping (agents, layers, aggregator, ...), got {raw!r}")]
    problems = unknown_keys(raw, _MOA, p)
    agents: dict[str, AgentSpec] = {}
    rawagents = raw.get("agents")
    if rawagents is None and default_models:
        for ref in default_models:
            name = Path(ref).name or ref
            while name in agents:
                name += "_"
            agents[name] = AgentSpec(model=ref)
    elif not isinstance(rawagents, dict) or not rawagents:
        problems.append(Problem(f"{p}agents", f"expected a mapping of agent name to {{model, endpoint, api}}, got "
                                f"{rawagents!r}", "e.g. agents: {a: {model: path/to/model}}"))
    else:
        for name, spec in rawagents.items():
            at = f"{p}agents.{name}"
            if isinstance(spec, str):
                spec = {"model": spec}
            if not isinstance(spec, dict):
                problems.append(Problem(at, f"expected a model folder or a mapping {{model, endpoint, api}}, got {spec!r}"))
                continue
            bad = unknown_keys(spec, _AGENT, f"{at}.")
            if not isinstance(spec.get("model"), str) or not spec.get("model"):
                bad.append(Problem(f"{at}.model", "required key 'model' (a local model folder, or the model name "
                                   "on the endpoint) is missing or empty"))
            ep = spec.get("endpoint")
            if ep is not None and (not isinstance(ep, str) or not ep.startswith(("http://", "https://"))):
                bad.append(Problem(f"{at}.endpoint", f"expected an http(s) base URL, got {ep!r}",
                                   "e.g. endpoint: http://127.0.0.1:8000/v1"))
            if spec.get("api", "chat") not in APIS:
                bad.append(Problem(f"{at}.api", f"unknown api {spec.get('api')!r}", f"use one of {', '.join(APIS)}"))
            env = spec.get("api_key_env")
            if env is not None and (not isinstance(env, str) or not env):
                bad.append(Problem(f"{at}.api_key_env", f"expected an environment variable name, got {env!r}"))
            size = spec.get("relative_size", 1.0)
            if not _number(size) or size <= 0:
                bad.append(Problem(f"{at}.relative_size", f"expected a positive number, got {size!r}",
                                   "the agent's parameters relative to the first source (for the cost figures)"))
            if bad:
                problems += bad
                continue
            agents[str(name)] = AgentSpec(**spec)
    names = list(rawagents) if isinstance(rawagents, dict) else list(agents)  # invalid agents still count as named
    layers = raw.get("layers", [names] if names else None)
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(layer, list) and layer and all(isinstance(a, str) for a in layer) for layer in layers)):
        problems.append(Problem(f"{p}layers", f"expected a list of proposer layers, each a non-empty list of agent "
                                f"names, got {layers!r}", "e.g. layers: [[a, b], [a, b]]"))
        layers = []
    for i, layer in enumerate(layers):
        for a in layer:
            if names and a not in names:
                problems.append(Problem(f"{p}layers[{i}]", f"'{a}' is not an agent", f"agents: {', '.join(names)}"))
    aggregator = raw.get("aggregator", names[0] if names else None)
    if not isinstance(aggregator, str) or (names and aggregator not in names):
        problems.append(Problem(f"{p}aggregator", f"expected one of the agents ({', '.join(names)}), got {aggregator!r}"))
    max_tokens = raw.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        problems.append(Problem(f"{p}max_tokens", f"expected a whole number >= 1, got {max_tokens!r}"))
    for key, low, strict in (("temperature", 0.0, False), ("timeout", 0.0, True)):
        v = raw.get(key)
        if v is not None and (not _number(v) or v < low or (strict and v <= low)):
            problems.append(Problem(f"{p}{key}", f"expected a number {'>' if strict else '>='} {low:g}, got {v!r}"))
    conc = raw.get("concurrency")
    if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
        problems.append(Problem(f"{p}concurrency", f"expected a whole number >= 1, got {conc!r}"))
    if raw.get("instruction") is not None and (not isinstance(raw["instruction"], str) or not raw["instruction"].strip()):
        problems.append(Problem(f"{p}instruction", f"expected a non-empty text, got {raw['instruction']!r}"))
    if not isinstance(raw.get("system_role", True), bool):
        problems.append(Problem(f"{p}system_role", f"expected true or false, got {raw['system_role']!r}"))
    if problems:
        return None, problems
    rest = {k: raw[k] for k in ("max_tokens", "temperature", "instruction", "system_role", "timeout", "concurrency")
            if raw.get(k) is not None}
    return MoAConfig(agents=agents, layers=layers, aggregator=aggregator, **rest), []


def load_moa_config(path: str | Path, *, default_models: list[str] | None = None) -> MoAConfig:
    """A Mixture-of-Agents YAML file; ConfigError naming the file and every problem."""
    from evomerge.io_utils import load_yaml_file

    cfg, problems = parse_moa(load_yaml_file(path, "Mixture-of-Agents config"), "", default_models=default_models)
    if problems:
        raise ConfigError(problems, source=str(path))
    return cfg


def fusion_problems(data: Any, where: str = "") -> tuple[FusionRecipe | None, list[Problem]]:
    """(the recipe, []) or (None, every problem) for a fusion mapping; ``where`` prefixes locations."""
    p = f"{where}." if where else ""
    if not isinstance(data, dict):
        return None, [Problem(where or "recipe", f"a fusion recipe must be a mapping, got {type(data).__name__}")]
    problems = unknown_keys(data, _TOP, p)
    if data.get("kind", "fusion") != "fusion":
        problems.append(Problem(f"{p}kind", f"expected kind: fusion, got {data.get('kind')!r}"))
    if data.get("evomerge", 1) != 1:
        problems.append(Problem(f"{p}evomerge", f"unknown format version {data.get('evomerge')!r}", "use 1"))
    method = data.get("method")
    if method not in METHODS:
        problems.append(Problem(f"{p}method", f"unknown fusion method {method!r}" if method is not None
                                else "required key 'method' is missing", f"use one of {', '.join(METHODS)}"))
    models = data.get("models")
    if method in ("logit", "panel") or models is not None:
        models = _model_list(models, f"{p}models", problems)
    else:
        models = []
    weights = data.get("weights")
    if weights is not None:
        if method != "logit":
            problems.append(Problem(f"{p}weights", "weights apply to the logit ensemble only", "remove them"))
        elif (not isinstance(weights, list) or not all(_number(w) and w >= 0 for w in weights)
              or not sum(weights) > 0):
            problems.append(Problem(f"{p}weights", f"expected a list of numbers >= 0, not all 0, got {weights!r}"))
        elif models and len(weights) != len(models):
            problems.append(Problem(f"{p}weights", f"{len(weights)} weight(s) for {len(models)} model(s)",
                                    "give one weight per model"))
    judge = data.get("judge")
    if judge is not None and (method != "panel" or not isinstance(judge, str) or not judge):
        problems.append(Problem(f"{p}judge", "judge applies to the panel only" if method != "panel"
                                else f"expected a model folder, got {judge!r}"))
    normalize = data.get("normalize", False)
    if not isinstance(normalize, bool) or (normalize and method != "panel"):
        problems.append(Problem(f"{p}normalize", "normalize (true/false) applies to the panel only"
                                if isinstance(normalize, bool) else f"expected true or false, got {normalize!r}"))
    moa = None
    if method == "moa":
        raw = data.get("moa")
        if raw is None and not models:
            problems.append(Problem(f"{p}moa", "method moa needs a `moa:` mapping (agents, layers, aggregator) or "
                                    "`models:` to use as local agents"))
        else:
            moa, more = parse_moa(raw if raw is not None else {}, f"{p}moa", default_models=models)
            problems += more
    elif data.get("moa") is not None:
        problems.append(Problem(f"{p}moa", "a `moa:` mapping applies to method moa only", "remove it"))
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        problems.append(Problem(f"{p}dtype", f"unknown dtype {dtype!r}", DTYPE_HINT))
    tok = data.get("tokenizer")
    if tok is not None and (not isinstance(tok, str) or not tok):
        problems.append(Problem(f"{p}tokenizer", f"expected a model folder with a tokenizer, got {tok!r}"))
    if problems:
        return None, problems
    return FusionRecipe(method=method, models=models if method != "moa" else [], weights=weights, judge=judge,
                        normalize=normalize, moa=moa, dtype=DTYPES.get(dtype) if dtype else None,
                        tokenizer=tok), []


def parse_fusion(data: Any, *, source: str = "<recipe>") -> FusionRecipe:
    """A fusion recipe mapping; ConfigError with every problem, located in ``source``."""
    recipe, problems = fusion_problems(data)
    if problems:
        raise ConfigError([Problem(f"{source}: {p.where}", p.message, p.hint) for p in problems], source=source)
    return recipe
