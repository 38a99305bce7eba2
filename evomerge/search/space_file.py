"""The search space file's format as strict models: every key, its type, its range and its default.

What needs more than the file (the method registry, the models' headers, the evaluator) is checked
by :mod:`evomerge.search.space_sections` and :mod:`evomerge.search.checks` on the validated model;
:func:`evomerge.search.space.parse_space` puts both together. The format is described in
:mod:`evomerge.search.space`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from evomerge.dtypes import DTYPE_HINT, canonical_dtype, dtype_message
from evomerge.errors import ConfigError, Problem
from evomerge.recipe_sections import CalibrationSpec
from evomerge.search.objectives import COSTS
from evomerge.strict import StrictModel, bad, choice, refusing

KINDS = ("ps", "dfs", "ps_dfs")
PYCMA = ("pycma", "cma")
OPTUNA_SAMPLERS = ("tpe", "cmaes", "nsgaii", "nsgaiii", "gp", "random")
OPTIMIZERS = PYCMA + OPTUNA_SAMPLERS

_MODEL_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_DURATION_HINT = "write it like 8h, 1h30m, 45m, 90s or a number of seconds"


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds of ``"8h"``, ``"1h30m"``, ``"90s"``, ``"10m"`` or a number of seconds."""
    if text is None or isinstance(text, (int, float)) and not isinstance(text, bool):
        return None if text is None else float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise ConfigError(Problem("timeout", f"cannot read the duration {text!r}", _DURATION_HINT))
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(a) * unit[b] for a, b in parts)


def _empty_is_default(value: Any) -> Any:
    """``optimizer:`` written with nothing under it means the defaults."""
    return {} if value is None else value


def _empty_is_none(value: Any) -> Any:
    """``modules:`` written with nothing under it means none."""
    return [] if value is None else value


Mapping = BeforeValidator(_empty_is_default)
NoneIsEmpty = BeforeValidator(_empty_is_none)
NonEmpty = Annotated[str, Field(min_length=1)]
Number = float  # strict: an integer is a number too, true / false and "0.5" are not


# ------------------------------------------------------------------------------ models (sources)


class NamedModel(StrictModel):
    """``{name: a, model: path}``; the name defaults to the folder's name."""

    name: str | None = None
    model: str = Field(description="a path or hub id")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not _MODEL_NAME.fullmatch(name):
            raise bad(f"model name {name!r} may only use letters, digits, _ and -", "set another `name:`")
        return name


_BadModelRef = refusing(lambda value: f"expected a model path or {{name, model}}, got {value!r}",
                        "list model paths, or {name, model} mappings")


ModelRef = Annotated[
    Union[Annotated[str, Tag("#path")], Annotated[NamedModel, Tag("#named")], Annotated[_BadModelRef, Tag("#bad")]],
    Discriminator(lambda v: "#path" if isinstance(v, str) else "#named" if isinstance(v, dict) else "#bad")]


def named_models(entries: list[str | NamedModel]) -> list[tuple[str, str]]:
    """``(name, reference)`` of every entry (a path's name: its folder's name, ``.`` as ``_``)."""
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            out.append((entry.rstrip("/").split("/")[-1].replace(".", "_") or entry, entry))
        else:
            out.append((entry.name or entry.model.rstrip("/").split("/")[-1] or f"m{i}", entry.model))
    return out


def _unique_names(entries: list[str | NamedModel]) -> list[str | NamedModel]:
    names = [name for name, _ in named_models(entries)]
    for name in names:
        if not _MODEL_NAME.fullmatch(name):
            raise bad(f"model name {name!r} (from its path) may only use letters, digits, _ and -",
                      "give it a `name:` ({name: a, model: path})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise bad(f"model name '{twice[0]}' is used twice", "give the models distinct `name:` values")
    return entries


Models = Annotated[list[ModelRef], Field(min_length=1, description="model paths or {name, model} mappings")]


# ------------------------------------------------------------------------------- the ps section


class Bounds(StrictModel):
    """``{low, high}``: search bounds of a method parameter (either one defaults to the registry's)."""

    low: Number | None = None
    high: Number | None = None

    @model_validator(mode="after")
    def _order(self) -> Bounds:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise bad(f"bounds reversed: low {self.low} > high {self.high}", "swap them")
        return self


ParamSetting = Annotated[
    Union[Annotated[Bounds, Tag("#bounds")], Annotated[Any, Tag("#value")]],
    Discriminator(lambda v: "#bounds" if isinstance(v, dict) else "#value")]


class PSSection(StrictModel):
    base: str | None = None
    sources: Models
    method: Union[NonEmpty, Annotated[list[NonEmpty], Field(min_length=1)]] = "ties"
    granularity: int | None = Field(default=None, ge=1)
    control_points: int | None = Field(default=None, ge=2)  # per-layer values interpolated between k points
    modules: Annotated[list[NonEmpty], NoneIsEmpty] = []
    params: Annotated[dict[str, ParamSetting], Mapping] = {}
    trials: int | None = Field(default=None, ge=1)
    calibration: CalibrationSpec | None = None  # data for the data-aware methods (regmean, fisher)

    _sources = field_validator("sources")(classmethod(lambda cls, v: _unique_names(v)))

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)


# ------------------------------------------------------------------------------ the dfs section


class ScaleBounds(StrictModel):
    low: Number = 0.5
    high: Number = 2.0

    @field_validator("low")
    @classmethod
    def _positive(cls, low: float) -> float:
        if low <= 0:
            raise bad(f"scales must be positive, got low {low}", "use e.g. low: 0.5")
        return low

    @model_validator(mode="after")
    def _order(self) -> ScaleBounds:
        if self.low > self.high:
            raise bad(f"bounds reversed: low {self.low} > high {self.high}", "swap them")
        return self


_BadScale = refusing(lambda value: f"expected {{low, high}} or false, got {value!r}", "false keeps every scale at 1")


Scale = Annotated[
    Union[Annotated[ScaleBounds, Tag("#bounds")], Annotated[bool, Tag("#off")], Annotated[_BadScale, Tag("#bad")]],
    Discriminator(lambda v: "#bounds" if isinstance(v, dict) else "#off" if v is False else "#bad")]


class DFSSection(StrictModel):
    models: Models
    repeats: int = Field(default=1, ge=1)
    embed: str | None = None
    head: str | None = None
    scale: Scale = ScaleBounds()
    first_layers: int = Field(default=0, ge=0)
    last_layers: int = Field(default=0, ge=0)
    max_depth: int | None = Field(default=None, ge=1)
    trials: int | None = Field(default=None, ge=1)

    _models = field_validator("models")(classmethod(lambda cls, v: _unique_names(v)))

    @property
    def scale_bounds(self) -> tuple[float, float] | None:
        return None if self.scale is False else (float(self.scale.low), float(self.scale.high))


# ------------------------------------------------------------------------- objectives, optimizer


def _objective_shorthand(value: Any) -> Any:
    """``combined`` -> ``{metric: combined}``, ``cost:layers`` -> ``{cost: layers}``."""
    if isinstance(value, str):
        return {"cost": value[5:]} if value.startswith("cost:") else {"metric": value}
    return value


class ObjectiveEntry(StrictModel):
    metric: NonEmpty | None = None
    cost: str | None = None
    direction: str | None = None
    weight: Number | None = None

    @field_validator("cost")
    @classmethod
    def _cost(cls, cost: str | None) -> str | None:
        if cost is not None and cost not in COSTS:
            raise bad(f"unknown cost '{cost}'", f"use one of {', '.join(COSTS)}")
        return cost

    @field_validator("direction")
    @classmethod
    def _direction(cls, direction: str | None) -> str | None:
        if direction is not None and direction not in ("maximize", "minimize"):
            raise bad(f"expected maximize or minimize, got {direction!r}")
        return direction

    @model_validator(mode="after")
    def _one_of(self) -> ObjectiveEntry:
        if (self.metric is None) == (self.cost is None):
            raise bad("give exactly one of `metric: <score name>` or `cost: params|layers`")
        return self


def _default_objectives(value: Any) -> Any:
    return [{"metric": "combined"}] if value is None else value


Objectives = Annotated[list[Annotated[ObjectiveEntry, BeforeValidator(_objective_shorthand)]],
                       Field(min_length=1), BeforeValidator(_default_objectives)]


class OptimizerSection(StrictModel):
    name: str = "pycma"
    popsize: int | None = Field(default=None, ge=2)
    sigma0: Number = 0.25
    seed: int | None = Field(default=None, ge=0)
    options: Annotated[dict[str, Any], Mapping] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        choice(name.lower(), OPTIMIZERS, "optimizer")
        return name.lower()

    @field_validator("sigma0")
    @classmethod
    def _sigma0(cls, sigma0: float) -> float:
        if not 0 < sigma0 <= 1:
            raise bad(f"sigma0 {sigma0} is outside (0, 1]",
                      "sigma0 is in unit-cube coordinates (every dimension scaled to [0, 1])")
        return float(sigma0)


class SelectionSection(StrictModel):
    """``selection:``: how a stage names its winner (:mod:`evomerge.search.validation`): the ``top_k``
    search trials and the baselines re-scored on the evaluator's validation sample."""

    top_k: int = Field(default=5, ge=1)


class FidelitySection(StrictModel):
    enabled: Any = "auto"
    rungs: Any = [0.25, 1.0]
    promote: Any = 0.5
    # the first rung scores `anchors` informative items and predicts the full score from them
    # (evomerge.search.estimator) once `reference` models are fully scored; None: a random subsample
    estimator: Literal["anchors", "irt"] | None = None
    anchors: int = Field(default=24, ge=1)
    reference: int = Field(default=16, ge=2)

    @field_validator("enabled")
    @classmethod
    def _enabled(cls, enabled: Any) -> Any:
        if enabled not in (True, False, "auto") or enabled in (0, 1) and not isinstance(enabled, bool):
            raise bad(f"expected true, false or auto, got {enabled!r}")
        return enabled

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, rungs: Any) -> list[float]:
        numbers = isinstance(rungs, list) and rungs and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) for r in rungs)
        if not numbers or any(not 0 < r <= 1 for r in rungs) or sorted(set(rungs)) != list(rungs) or rungs[-1] != 1:
            raise bad(f"expected increasing fractions in (0, 1] ending with 1, got {rungs!r}", "e.g. [0.25, 1.0]")
        return [float(r) for r in rungs]

    @field_validator("promote")
    @classmethod
    def _promote(cls, promote: Any) -> float:
        if isinstance(promote, bool) or not isinstance(promote, (int, float)) or not 0 < promote <= 1:
            raise bad(f"expected a fraction in (0, 1], got {promote!r}", "the share of candidates promoted per rung")
        return float(promote)


class BudgetSection(StrictModel):
    trials: int | None = Field(default=None, ge=1)
    timeout: Any = None

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, timeout: Any) -> float | None:
        if timeout is None:
            return None
        try:
            seconds = parse_duration(timeout)
        except ConfigError as err:
            raise bad(err.problems[0].message, err.problems[0].hint) from None
        if not seconds > 0:
            raise bad(f"expected a positive duration, got {timeout!r}", "e.g. 8h, 45m; leave it out for no time limit")
        return seconds


# ------------------------------------------------------------------------------------- the file


class SpaceFile(StrictModel):
    name: Any = "study"
    description: str | None = None
    kind: str = "ps"
    seed: int = Field(default=0, ge=0)
    dtype: Any = None
    ps: PSSection | None = None
    dfs: DFSSection | None = None
    objectives: Objectives = [ObjectiveEntry(metric="combined")]
    optimizer: Annotated[OptimizerSection, Mapping] = OptimizerSection()
    evaluation: Any = None  # the evaluator checks its own mapping (see evomerge.search.checks)
    multi_fidelity: Annotated[FidelitySection, Mapping] = FidelitySection()
    selection: Annotated[SelectionSection, Mapping] = SelectionSection()
    budget: Annotated[BudgetSection, Mapping] = BudgetSection()
    baselines: Any = True  # true / false, or {merges, fusion} (evomerge.fusion.study.parse_baselines)

    @field_validator("name")
    @classmethod
    def _name(cls, name: Any) -> str:
        text = str(name)
        if isinstance(name, bool) or not isinstance(name, (str, int, float)) or not text.strip() or "/" in text or "\\" in text or text in (".", ".."):
            raise bad(f"expected a study name without '/' (it names the Optuna study and the default folder "
                      f"results/<name>), got {name!r}", "e.g. name: my-search")
        return text

    @field_validator("kind")
    @classmethod
    def _kind(cls, kind: str) -> str:
        return choice(kind, KINDS, "kind")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: Any) -> str | None:
        if dtype is None:
            return None
        if canonical_dtype(dtype) is None:
            raise bad(dtype_message(dtype), DTYPE_HINT)
        return canonical_dtype(dtype)
