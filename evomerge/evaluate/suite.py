"""Task suites: a strict YAML file plus local JSONL data, split into ``search`` and ``held-out``.

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
from typing import Any

from evomerge.errors import ConfigError, EvalError, Problem

SPLITS = ("search", "held-out")
KINDS = ("generate", "multiple_choice", "loglik")
EXTRACT_RULES = ("raw", "first_line", "regex", "first_number", "last_number")
PRIMARY = {"generate": "exact_match", "loglik": "mean_logprob"}

_SUITE_KEYS = {"name", "description", "tasks"}
_TASK_KEYS = {
    "generate": {"name", "kind", "data", "weight", "max_new_tokens", "until", "extract"},
    "multiple_choice": {"name", "kind", "data", "weight", "metric"},
    "loglik": {"name", "kind", "data", "weight"},
}
_EXTRACT_KEYS = {"rule", "pattern", "group"}


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
    from evomerge.io_utils import parse_yaml_text, read_text_file

    text = read_text_file(path, "suite file")  # read once: parsed here, and kept for the suite's hash
    raw = parse_yaml_text(text, path, "suite file")
    return parse_suite(raw, base_dir=path.parent, source=str(path), text=text, path=path)


def parse_suite(raw: Any, *, base_dir: Path, source: str = "<suite>", text: str | None = None,
                path: Path | None = None) -> Suite:
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        raise ConfigError(Problem(source, f"expected a mapping with a 'tasks' list, got {type(raw).__name__}"),
                          source=source)
    for k in raw:
        if k not in _SUITE_KEYS:
            problems.append(Problem(f"{source}: {k}", "unknown key", f"allowed keys: {', '.join(sorted(_SUITE_KEYS))}"))
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        problems.append(Problem(f"{source}: tasks", "missing or empty; expected a non-empty list of tasks"))
        tasks_raw = []
    specs = []
    names: set[str] = set()
    for i, t in enumerate(tasks_raw):
        where = f"{source}: tasks[{i}]"
        spec = _check_task(t, where, problems)
        if spec is None:
            continue
        if spec["name"] in names:
            problems.append(Problem(f"{where}.name", f"duplicate task name {spec['name']!r}"))
        names.add(spec["name"])
        specs.append(spec)
    if problems:
        raise ConfigError(problems, source=source)

    digest = hashlib.sha256((text if text is not None else json.dumps(raw, sort_keys=True)).encode())
    tasks = []
    for spec in specs:
        splits = {}
        for split in SPLITS:
            data_path = (base_dir / spec["data"][split]).resolve()
            if not data_path.is_file():
                raise EvalError(
                    f"{source}: task {spec['name']!r}: {split} data file {data_path} does not exist "
                    f"(paths in 'data' are relative to the suite file)"
                )
            content = data_path.read_bytes()
            digest.update(split.encode() + b"\0" + content + b"\0")
            splits[split] = _read_items(data_path, content, spec["kind"])
        _check_disjoint(spec["name"], splits, source)
        tasks.append(Task(name=spec["name"], kind=spec["kind"], splits=splits, weight=spec["weight"],
                          max_new_tokens=spec["max_new_tokens"], until=spec["until"],
                          extract=spec["extract"], metric=spec["metric"]))
    name = raw.get("name") or (path.stem if path else "suite")
    return Suite(name=str(name), path=path, tasks=tuple(tasks), fingerprint=digest.hexdigest()[:16],
                 description=str(raw.get("description") or ""))


def _check_task(t: Any, where: str, problems: list[Problem]) -> dict | None:
    if not isinstance(t, dict):
        problems.append(Problem(where, f"expected a mapping, got {type(t).__name__}"))
        return None
    n0 = len(problems)
    kind = t.get("kind")
    if kind not in KINDS:
        problems.append(Problem(f"{where}.kind", f"unknown task kind {kind!r}", f"use one of {', '.join(KINDS)}"))
        allowed = set().union(*_TASK_KEYS.values())
    else:
        allowed = _TASK_KEYS[kind]
    for k in t:
        if k not in allowed:
            problems.append(Problem(f"{where}.{k}", "unknown key" + (f" for kind {kind!r}" if kind in KINDS else ""),
                                    f"allowed keys: {', '.join(sorted(allowed))}"))
    name = t.get("name")
    if not isinstance(name, str) or not name:
        problems.append(Problem(f"{where}.name", "missing; every task needs a non-empty string name"))
    data = t.get("data")
    if not isinstance(data, dict):
        problems.append(Problem(f"{where}.data", "missing; expected a mapping {search: path, held-out: path}"))
    else:
        for k in data:
            if k not in SPLITS:
                problems.append(Problem(f"{where}.data.{k}", "unknown split", "splits are 'search' and 'held-out'"))
        for s in SPLITS:
            if not isinstance(data.get(s), str):
                problems.append(Problem(f"{where}.data.{s}", "missing; expected a JSONL path"))
    weight = t.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        problems.append(Problem(f"{where}.weight", f"expected a number >= 0, got {weight!r}"))
    mnt = t.get("max_new_tokens", 32)
    if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
        problems.append(Problem(f"{where}.max_new_tokens", f"expected an integer >= 1, got {mnt!r}"))
    until = t.get("until", ["\n"])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        problems.append(Problem(f"{where}.until", f"expected a list of non-empty strings, got {until!r}"))
        until = []
    metric = t.get("metric", "acc")
    if metric not in ("acc", "acc_norm"):
        problems.append(Problem(f"{where}.metric", f"unknown metric {metric!r}", "use acc or acc_norm"))
    extract = _check_extract(t.get("extract", {"rule": "raw"}), f"{where}.extract", problems)
    if len(problems) > n0:
        return None
    return dict(name=name, kind=kind, data=data, weight=float(weight), max_new_tokens=mnt,
                until=tuple(until), extract=extract, metric=metric)


def _check_extract(e: Any, where: str, problems: list[Problem]) -> Extract:
    if isinstance(e, str):
        e = {"rule": e}
    if not isinstance(e, dict):
        problems.append(Problem(where, f"expected a rule name or a mapping, got {e!r}"))
        return Extract()
    for k in e:
        if k not in _EXTRACT_KEYS:
            problems.append(Problem(f"{where}.{k}", "unknown key", f"allowed keys: {', '.join(sorted(_EXTRACT_KEYS))}"))
    rule = e.get("rule", "raw")
    if rule not in EXTRACT_RULES:
        problems.append(Problem(f"{where}.rule", f"unknown extraction rule {rule!r}", f"use one of {', '.join(EXTRACT_RULES)}"))
        return Extract()
    pattern = e.get("pattern")
    if rule == "regex":
        if not isinstance(pattern, str):
            problems.append(Problem(f"{where}.pattern", "rule 'regex' needs a 'pattern' string"))
        else:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(Problem(f"{where}.pattern", f"invalid regular expression: {err}"))
    elif pattern is not None:
        problems.append(Problem(f"{where}.pattern", f"only rule 'regex' takes a pattern (rule is {rule!r})"))
    group = e.get("group")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
        problems.append(Problem(f"{where}.group", f"expected an integer >= 0, got {group!r}"))
    return Extract(rule=rule, pattern=pattern, group=group)


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
    search = {it.key() for it in splits["search"]}
    overlap = [it for it in splits["held-out"] if it.key() in search]
    if overlap:
        ex = overlap[0].prompt or overlap[0].target
        raise EvalError(
            f"{source}: task {task!r}: {len(overlap)} held-out item(s) also appear in the search split "
            f"(first: {ex[:80]!r}); the splits must be disjoint so held-out scores stay trustworthy"
        )
