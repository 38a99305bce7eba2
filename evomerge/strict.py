"""Strict config files: the pydantic base model of search spaces and task suites, and the translation
of a validation into :class:`~evomerge.errors.Problem` s (every problem of a file at once, each with
file, key, line where the YAML loader gives it, and a fix).

A model is validated with :func:`validate_all`. When the file has problems, the keys that failed are
removed and the rest is validated again (up to a few rounds), so the checks that run on a valid model
(method registry, model headers, cross-section rules) still report their problems for the parts that
are well formed. A value that fails inside a list removes the whole list (checking the rest of a
shortened list would report counts the file does not have).

Validators raise :func:`bad` to give their own message and fix. Union fields use a callable
:class:`pydantic.Discriminator` whose tags start with ``#`` (they are dropped from the reported key;
a tag like ``#kind 'generate'`` is named in an unknown-key message: "unknown key 'metric' for kind
'generate'").
"""

from __future__ import annotations

import copy
import re
import typing
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from evomerge.errors import Problem

Lines = dict[tuple[Any, ...], int]  # key path -> 1-based line of the key in the YAML file

_ROUNDS = 4  # pruning rounds before the semantic checks give up on a file


class StrictModel(BaseModel):
    """Unknown keys are refused, values are not coerced (``"3"`` is not a number, ``true`` not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


def bad(message: str, hint: str | None = None) -> PydanticCustomError:
    """The error a validator raises for ``message`` (and its fix): ``raise bad(...)``."""
    return PydanticCustomError("evomerge", "{message}", {"message": message, "hint": hint})


def choice(value: Any, choices: tuple[str, ...], what: str) -> Any:
    """``value`` when it is one of ``choices``; else "unknown <what> 'x'" with the choices as the fix."""
    if value not in choices:
        raise bad(f"unknown {what} {value!r}", f"use one of {', '.join(choices)}")
    return value


def refusing(describe: Callable[[Any], str], hint: str | None = None) -> type[StrictModel]:
    """A union member that refuses every value with ``describe(value)`` (a callable discriminator sends
    the shapes no other member takes to it, so the message says what was expected)."""

    class Refused(StrictModel):
        @model_validator(mode="before")
        @classmethod
        def _refuse(cls, value: Any) -> Any:
            raise bad(describe(value), hint)

    return Refused


_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|none|constrained-\w+|[a-z-]+\[.*\])$")


def _is_member(part: Any) -> bool:
    """A union member's name pydantic puts in a location (``str``, ``list[constrained-str]``)."""
    return isinstance(part, str) and bool(_MEMBER.match(part))


def key_text(loc: tuple[Any, ...]) -> str:
    """``("ps", "sources", 1, "model")`` -> ``"ps.sources[1].model"`` (tags and union members dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith("#") or _is_member(part)):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<top>"


def where(source: str, key: str, lines: Lines | None = None) -> str:
    """``"space.yaml:12: ps.method"`` (the line when ``lines`` knows the key or one above it)."""
    line = line_of(key, lines)
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


_TOKEN = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def line_of(key: str, lines: Lines | None) -> int | None:
    """The line of ``key`` (``"ps.params.weight.low"``), or of its nearest enclosing key."""
    if not lines:
        return None
    loc = tuple(int(i) if i else name for i, name in _TOKEN.findall(key))
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def locate(problems: list[Problem], source: str, lines: Lines | None) -> list[Problem]:
    """``problems`` located at ``"<source>: <key>"`` given the line of their key."""
    if not lines:
        return problems
    prefix = f"{source}: "
    out = [(line_of(p.where[len(prefix):], lines), i, p) if p.where.startswith(prefix) else (None, i, p)
           for i, p in enumerate(problems)]
    out.sort(key=lambda item: (item[0] is None, item[0] or 0, item[1]))  # in the file's order
    return [Problem(f"{source}:{line}: {p.where[len(prefix):]}", p.message, p.hint) if line else p
            for line, _, p in out]


# ------------------------------------------------------------------------------ error messages


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the last key of ``loc`` (for the keys allowed there)."""
    tp: Any = model
    for part in loc[:-1]:
        tp = _unwrap(tp, part)
        if tp is None:
            return None
    tp = _unwrap(tp, None)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any, part: Any) -> Any:
    """The type found one step down ``part`` of ``tp`` (None: not known)."""
    for _ in range(8):
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            args = typing.get_args(tp)
            tag = next((getattr(m, "tag", None) for m in args[1:] if getattr(m, "tag", None)), None)
            if isinstance(part, str) and part.startswith("#"):
                if tag == part:
                    return args[0]
            tp = args[0]
            continue
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if isinstance(part, str) and part.startswith("#"):
                for member in members:
                    if typing.get_origin(member) is typing.Annotated and any(
                            getattr(m, "tag", None) == part for m in typing.get_args(member)[1:]):
                        return typing.get_args(member)[0]
                return None
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if len(models) == 1 and (part is None or isinstance(part, str)):
                tp = models[0]
                continue
            containers = [m for m in members if typing.get_origin(m) in (list, dict)]
            if len(containers) == 1:
                tp = containers[0]
                continue
            return None
        break
    if part is None:
        return tp
    if isinstance(part, str) and part.startswith("#"):
        return tp
    origin = typing.get_origin(tp)
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict:
        return typing.get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
        for name, info in tp.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    return None


def _allowed(model: type[BaseModel]) -> list[str]:
    return sorted(info.alias or name for name, info in model.model_fields.items())


def _tag_phrase(loc: tuple[Any, ...]) -> str:
    """`` for kind 'generate'`` when the key sits right in a tagged union member."""
    tag = loc[-2] if len(loc) > 1 else None
    return f" for {tag[1:]}" if isinstance(tag, str) and tag.startswith("#") and " " in tag else ""


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


_TYPES = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
          "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping", "model_attributes_type": "a mapping", "literal_error": None}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def problem_of(error: dict[str, Any], source: str, model: type[BaseModel]) -> Problem:
    """One pydantic error as a :class:`Problem` in our wording."""
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    value = error.get("input")
    key = key_text(loc)
    hint = None
    if kind == "evomerge":
        message, hint = ctx["message"], ctx.get("hint")
    elif kind == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'{_tag_phrase(loc)}"
        holder = _model_at(model, loc)
        if holder is not None:
            hint = f"allowed keys here: {', '.join(_allowed(holder))}"
    elif kind == "missing":
        holder = _model_at(model, loc)
        info = next((i for n, i in holder.model_fields.items() if loc[-1] in (n, i.alias)), None) if holder else None
        what = f" ({info.description})" if info is not None and info.description else ""
        message = f"required key '{loc[-1]}'{what} is missing"
    elif kind == "literal_error":
        message = f"unknown value {value!r}"
        hint = f"use one of {ctx.get('expected', '')}".replace(" or ", ", ")
    elif kind in _TYPES:
        message = f"expected {_TYPES[kind]}, got {value!r}"
    elif kind in _BOUNDS:
        sign, name = _BOUNDS[kind]
        message = f"expected a number {sign} {_number(ctx.get(name))}, got {value!r}"
    elif kind == "string_too_short":
        message = f"expected a non-empty string, got {value!r}"
    elif kind == "too_short":
        message = f"expected a non-empty list, got {value!r}" if ctx.get("min_length") == 1 else \
            f"expected at least {ctx.get('min_length')} entries, got {value!r}"
    elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
        message = f"unexpected value {value!r}"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return Problem(where(source, key), message, hint)


def problems_of(err: ValidationError, source: str, model: type[BaseModel]) -> list[Problem]:
    """Every error as a :class:`Problem`; the members of a union that all refused a value are one
    problem ("expected a string or a list, got 3")."""
    out: list[Problem] = []
    expected: dict[str, list[str]] = {}
    for error in err.errors():
        problem = problem_of(error, source, model)
        if error["type"] in _TYPES and error["type"] != "literal_error" and _is_member(error["loc"][-1]):
            want = expected.setdefault(problem.where, [])
            if not want:
                out.append(problem)
            if _TYPES[error["type"]] not in want:
                want.append(_TYPES[error["type"]])
            continue
        if all((p.where, p.message) != (problem.where, problem.message) for p in out):
            out.append(problem)
    for i, problem in enumerate(out):
        want = expected.get(problem.where)
        if want and len(want) > 1 and problem.message.startswith("expected "):
            got = problem.message[problem.message.rindex(", got "):]
            out[i] = Problem(problem.where, f"expected {' or '.join(want)}{got}", problem.hint)
    return out


# ------------------------------------------------------------------------------------ validation


def validate_all(model: type[BaseModel], data: Any, *, source: str) -> tuple[Any, list[Problem]]:
    """``(instance, problems)``: the file's structural problems (all of them) and a model instance
    built from the parts without problems, for the checks that follow (None: nothing usable)."""
    try:
        return model.model_validate(data), []
    except ValidationError as err:
        problems = problems_of(err, source, model)
        errors = err.errors()
    pruned = copy.deepcopy(data)
    for _ in range(_ROUNDS):
        if not _prune(pruned, [tuple(e["loc"]) for e in errors]):
            break
        try:
            return model.model_validate(pruned), problems
        except ValidationError as err:
            errors = err.errors()
    return None, problems


def _prune(data: Any, locs: list[tuple[Any, ...]]) -> bool:
    """Remove from ``data`` the keys that failed (a failing list entry removes the list; a missing
    key removes the mapping it is missing from). True when something was removed."""
    changed = False
    for loc in locs:
        path = [p for p in loc if not (isinstance(p, str) and p.startswith("#"))]
        cut = next((i for i, p in enumerate(path) if isinstance(p, int)), None)
        if cut is not None:
            path = path[:cut]  # the key holding the list
        parents: list[tuple[dict, Any]] = []
        node = data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            parents.append((node, part))
            node = node[part]
        if parents:  # the failing key, or the mapping a missing key is missing from
            holder, key = parents[-1]
            del holder[key]
            changed = True
    return changed
