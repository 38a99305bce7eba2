"""Task suites: a strict YAML file plus local JSONL data, split into ``search`` and ``held-out``.

This module is the suite format alone (no model, no scoring), so both the evaluation layer
(:mod:`evomerge.evaluate`, which scores models on suites) and the calibration data of data-aware
merges read suites through it.

A suite file::

    name: zoo-demo                      # optional, defaults to the file stem
    description: free text              # optional
    tasks:
      - name: arith
        kind: generate                  # generate | multiple_choice | loglik
        data:                           # paths relative to the YAML file
          search: data/arith.search.jsonl
          held-out: data/arith.held-out.jsonl
        max_new_tokens: 8               # generate only (default 32)
        until: ["\\n"]                  # generate only: stop strings (EOS always stops)
        extract: {rule: regex, pattern: '\\|(\\w+)'}   # generate only, see EXTRACT_RULES
        metric: acc_norm                # multiple_choice only: acc (default) or acc_norm
        weight: 1.0                     # weight in the combined score (default 1)

JSONL records, one per line (other fields such as ``id`` are allowed and ignored):

* ``generate``:        ``{"prompt": str, "answer": str | [str, ...]}`` (any listed answer counts)
* ``multiple_choice``: ``{"prompt": str, "choices": [str, ...], "label": int}``
* ``loglik``:          ``{"target": str, "prompt": str (optional, default "")}``

Loading validates everything and raises one :class:`ConfigError` (YAML problems, naming file and
key) or :class:`EvalError` (a data file that is missing, a malformed line with file and line
number, a search/held-out overlap). The two splits of a task must not share an item: two items
are the same when their prompt (and, for ``loglik``, target) are equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from evomerge.errors import ConfigError, EvalError, Problem
from evomerge.splits import HELD_OUT, SEARCH, SPLITS
from evomerge.strict import Lines, StrictModel, bad, choice, locate, validate_all

KINDS = ("generate", "multiple_choice", "loglik")
EXTRACT_RULES = ("raw", "first_line", "regex", "first_number", "last_number")
PRIMARY = {"generate": "exact_match", "loglik": "mean_logprob"}



@dataclass(frozen=True)
class Item:
    """One scored example. ``answers`` for generate, ``choices``/``label`` for MC, ``target`` for loglik."""

    prompt: str
    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    label: int = -1
    target: str = ""

    def key(self) -> tuple[str, str]:
        return (self.prompt, self.target)


@dataclass(frozen=True)
class Extract:
    """Answer-extraction rule for ``generate`` tasks (applied to the generation after ``until`` cuts).

    * ``raw``: the text, stripped.   * ``first_line``: the first non-empty line, stripped.
    * ``regex``: the ``group`` (default 1 if the pattern has a group, else 0) of the first match of
      ``pattern``; no match extracts ``""`` (wrong).
    * ``first_number`` / ``last_number``: the first/last number (``-?\\d+(\\.\\d+)?``, commas removed).
    """

    rule: str = "raw"
    pattern: str | None = None
    group: int | None = None

    def __call__(self, text: str) -> str:
        return extract_answer(text, self)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    splits: dict[str, tuple[Item, ...]]
    weight: float = 1.0
    max_new_tokens: int = 32
    until: tuple[str, ...] = ("\n",)
    extract: Extract = field(default_factory=Extract)
    metric: str = "acc"

    @property
    def primary(self) -> str:
        return PRIMARY.get(self.kind, self.metric)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path | None
    tasks: tuple[Task, ...]
    fingerprint: str  # sha256 over the YAML text and every data file's bytes
    description: str = ""


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str, rule: Extract) -> str:
    if rule.rule == "raw":
        return text.strip()
    if rule.rule == "first_line":
        for line in text.splitlines():
            if line.strip():
                return line.strip()
        return ""
    if rule.rule == "regex":
        m = re.search(rule.pattern or "", text)
        if not m:
            return ""
        group = rule.group if rule.group is not None else (1 if m.re.groups else 0)
        return (m.group(group) or "").strip()
    if rule.rule in ("first_number", "last_number"):
        nums = _NUMBER.findall(text.replace(",", ""))
        if not nums:
            return ""
        return nums[0] if rule.rule == "first_number" else nums[-1]
    raise EvalError(f"unknown extraction rule {rule.rule!r}; expected one of {', '.join(EXTRACT_RULES)}")


def normalize_answer(text: str, rule: Extract) -> str:
    """How a gold answer is compared: numbers compare numerically (``"07"`` == ``"7"``)."""
    text = text.strip()
    if rule.rule in ("first_number", "last_number"):
        try:
            value = float(text.replace(",", ""))
            return repr(int(value)) if value.is_integer() else repr(value)
        except ValueError:
            return text
    return text


# ----------------------------------------------------------------------------------------------


def load_suite(path: str | Path) -> Suite:
    """Read, validate and load a suite (all of its data). Raises ConfigError / EvalError."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"suite file {path} does not exist (expected a YAML file describing tasks)")
    from evomerge.io_utils import load_yaml_document

    # read once: parsed here, and kept for the suite's hash
    raw, lines, text = load_yaml_document(path, "suite file")
    return parse_suite(raw, base_dir=path.parent, source=str(path), text=text, path=path, lines=lines)


def parse_suite(raw: Any, *, base_dir: Path, source: str = "<suite>", text: str | None = None,
                path: Path | None = None, lines: Lines | None = None) -> Suite:
    """Validate a suite mapping (every problem at once, one :class:`ConfigError`) and load its data
    (an :class:`EvalError` naming the data file and line)."""
    if not isinstance(raw, dict):
        raise ConfigError(Problem(source, f"expected a mapping with a 'tasks' list, got {type(raw).__name__}"),
                          source=source)
    model, problems = validate_all(SuiteFile, raw, source=source)
    if model is not None:
        names = [t.name for t in model.tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append(Problem(f"{source}: tasks[{i}].name", f"duplicate task name {name!r}",
                                        "give every task its own name"))
    if problems:
        raise ConfigError(locate(problems, source, lines), source=source)

    digest = hashlib.sha256((text if text is not None else json.dumps(raw, sort_keys=True)).encode())
    tasks = []
    for spec in model.tasks:
        splits = {}
        for split in SPLITS:
            data_path = (base_dir / spec.data.path(split)).resolve()
            if not data_path.is_file():
                raise EvalError(
                    f"{source}: task {spec.name!r}: {split} data file {data_path} does not exist "
                    f"(paths in 'data' are relative to the suite file)"
                )
            content = data_path.read_bytes()
            digest.update(split.encode() + b"\0" + content + b"\0")
            splits[split] = _read_items(data_path, content, spec.kind)
        _check_disjoint(spec.name, splits, source)
        tasks.append(Task(name=spec.name, kind=spec.kind, splits=splits, weight=spec.weight,
                          max_new_tokens=getattr(spec, "max_new_tokens", 32),
                          until=tuple(getattr(spec, "until", ("\n",))),
                          extract=getattr(spec, "extract", ExtractSpec()).rule_object(),
                          metric=getattr(spec, "metric", "acc")))
    name = model.name if model.name is not None else (path.stem if path else "suite")
    return Suite(name=str(name), path=path, tasks=tuple(tasks), fingerprint=digest.hexdigest()[:16],
                 description=model.description or "")


# ------------------------------------------------------------------------------ the file's model


class DataFiles(StrictModel):
    """``data: {search: path, held-out: path}`` (paths relative to the suite file)."""

    search: str
    held_out: str = Field(alias="held-out")

    def path(self, split: str) -> str:
        return self.search if split == SEARCH else self.held_out


class ExtractSpec(StrictModel):
    rule: str = "raw"
    pattern: str | None = None
    group: int | None = Field(default=None, ge=0)

    @field_validator("rule")
    @classmethod
    def _rule(cls, rule: str) -> str:
        return choice(rule, EXTRACT_RULES, "extraction rule")

    @model_validator(mode="after")
    def _pattern(self) -> "ExtractSpec":
        if self.rule == "regex":
            if self.pattern is None:
                raise bad("rule 'regex' needs a 'pattern' string", "e.g. pattern: '####\\s*(\\d+)'")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise bad(f"invalid regular expression {self.pattern!r}: {err}") from None
        elif self.pattern is not None:
            raise bad(f"only rule 'regex' takes a pattern (rule is {self.rule!r})", "remove `pattern:`")
        return self

    def rule_object(self) -> Extract:
        return Extract(rule=self.rule, pattern=self.pattern, group=self.group)


def _rule_name(value: Any) -> Any:
    return {"rule": value} if isinstance(value, str) else value


def _one_string(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


NonEmpty = Annotated[str, Field(min_length=1)]


class _TaskCommon(StrictModel):
    name: NonEmpty
    data: DataFiles
    weight: float = Field(default=1.0, ge=0)


class GenerateTask(_TaskCommon):
    kind: Literal["generate"]
    max_new_tokens: int = Field(default=32, ge=1)
    until: Annotated[list[NonEmpty], BeforeValidator(_one_string)] = ["\n"]
    extract: Annotated[ExtractSpec, BeforeValidator(_rule_name)] = ExtractSpec()


class MultipleChoiceTask(_TaskCommon):
    kind: Literal["multiple_choice"]
    metric: str = "acc"

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if metric not in ("acc", "acc_norm"):
            raise bad(f"unknown metric {metric!r}", "use acc or acc_norm")
        return metric


class LoglikTask(_TaskCommon):
    kind: Literal["loglik"]


class _UnknownTask(StrictModel):
    """A task entry that is not a mapping or has no known ``kind`` (always refused, saying which)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise bad(f"expected a task mapping, got {value!r}", "e.g. {name: arith, kind: generate, data: {...}}")
        if "kind" not in value:
            raise bad("required key 'kind' is missing", f"use one of {', '.join(KINDS)}")
        raise bad(f"unknown task kind {value['kind']!r}", f"use one of {', '.join(KINDS)}")


def _task_kind(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else None
    return f"#kind {kind!r}" if kind in KINDS else "#unknown"


TaskEntry = Annotated[
    Union[Annotated[GenerateTask, Tag("#kind 'generate'")],
          Annotated[MultipleChoiceTask, Tag("#kind 'multiple_choice'")],
          Annotated[LoglikTask, Tag("#kind 'loglik'")],
          Annotated[_UnknownTask, Tag("#unknown")]],
    Discriminator(_task_kind)]


class SuiteFile(StrictModel):
    name: str | None = None
    description: str | None = None
    tasks: list[TaskEntry] = Field(min_length=1)


MAX_LINE_PROBLEMS = 20  # bad lines listed per data file (the count of the rest is given)


def _read_items(path: Path, content: bytes, kind: str) -> tuple[Item, ...]:
    """Every item of a JSONL data file; every bad line is reported at once (the first
    ``MAX_LINE_PROBLEMS`` by line number, then how many more), as one :class:`EvalError`."""
    from evomerge.io_utils import decode_utf8

    items, bad = [], []
    for lineno, line in enumerate(decode_utf8(content, str(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})")
            continue
        try:
            items.append(_make_item(rec, kind, f"{path}:{lineno}"))
        except EvalError as err:
            bad.append(str(err))
    if bad:
        more = len(bad) - MAX_LINE_PROBLEMS
        listed = "\n".join(f"  - {b}" for b in bad[:MAX_LINE_PROBLEMS])
        raise EvalError(f"{len(bad)} bad line(s) in {path}:\n{listed}" + (f"\n  ... and {more} more" if more > 0 else ""))
    if not items:
        raise EvalError(f"{path}: no items (expected one JSON object per line)")
    return tuple(items)


def _make_item(rec: Any, kind: str, where: str) -> Item:
    if not isinstance(rec, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def need_str(key: str, default: str | None = None) -> str:
        v = rec.get(key, default)
        if not isinstance(v, str):
            raise EvalError(f"{where}: field {key!r} must be a string for a {kind} task, got {v!r}")
        return v

    if kind == "generate":
        ans = rec.get("answer")
        answers = [ans] if isinstance(ans, str) else ans
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise EvalError(f"{where}: field 'answer' must be a string or a non-empty list of strings, got {ans!r}")
        return Item(prompt=need_str("prompt"), answers=tuple(answers))
    if kind == "multiple_choice":
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
        label = rec.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise EvalError(f"{where}: field 'label' must be an integer index into choices (0..{len(choices) - 1}), got {label!r}")
        return Item(prompt=need_str("prompt"), choices=tuple(choices), label=label)
    target = need_str("target")
    if not target:
        raise EvalError(f"{where}: field 'target' is empty; a loglik item needs text to score")
    return Item(prompt=need_str("prompt", ""), target=target)


def _check_disjoint(task: str, splits: dict[str, tuple[Item, ...]], source: str) -> None:
    search = {it.key() for it in splits[SEARCH]}
    overlap = [it for it in splits[HELD_OUT] if it.key() in search]
    if overlap:
        ex = overlap[0].prompt or overlap[0].target
        raise EvalError(
            f"{source}: task {task!r}: {len(overlap)} held-out item(s) also appear in the search split "
            f"(first: {ex[:80]!r}); the splits must be disjoint so held-out scores stay trustworthy"
        )
