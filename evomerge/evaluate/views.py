"""What the suite evaluator scores for a split name: the ``validation`` sample carved out of the
search split, item ids, per-item payloads, and scoring that stops at a bound.

**Validation carving.** With ``validation: f`` (a fraction in (0, 0.5]) every task's *search*
split is cut in two, deterministically and independently of the file's line order: items are
ranked by ``sha256(prompt NUL target)`` and the first ``round(f * n)`` (at least one) form the
``validation`` sample; the rest stay ``search``, the items the optimizer sees. The held-out split
is untouched. ``validation: auto`` (the default) carves 0.25 when the search split holds at least
400 items in all, else nothing. A view of the suite per split name (:func:`split_view`) has the
chosen items as its ``search`` split and a fingerprint of its own, so scores of the two parts are
cached apart.

**Item ids.** An item's id is its 0-based position among the items of its task's data file for
that split (the search file for ``search`` and ``validation``), so results of different candidates
and of different fidelities pair item by item (:mod:`evomerge.search.selection`).

**Stopping at a bound** (:func:`score_bounded`). Given a *bar* (a linear form over the metrics,
``sum_m a_m metric_m + offset``, and a value), the items of every task are scored in ``chunks``
nested slices, none smaller than a batch (a slice never splits what would have been one forward
batch); after each slice the largest value the form can still reach is computed by assuming the
best possible value for every item not scored yet (1 for exact match / accuracy, 0
for a mean log-probability) with ``a_m > 0`` and the worst with ``a_m < 0``. When even that cannot
reach the bar, scoring stops: the candidate's result at this fidelity cannot reach the bar, whatever
the remaining items hold. A bound, not an estimate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

from evomerge.evaluate.engine import TaskResult, binomial_stderr, score_tasks, subsample
from evomerge.evaluate.suite import Item, Suite, Task

VALIDATION = "validation"
AUTO_FRACTION = 0.25
AUTO_MIN_ITEMS = 400  # search items (all tasks) from which ``validation: auto`` carves
MAX_FRACTION = 0.5
DEFAULT_CHUNKS = 4
MIN_CHUNK = 8  # items per task and slice, at least

# the range of one item's primary value, by task kind
_ITEM_RANGE = {"generate": (0.0, 1.0), "multiple_choice": (0.0, 1.0), "loglik": (-math.inf, 0.0)}


def resolve_fraction(value: Any, search_items: int) -> float:
    """The validation fraction an option value asks for (``auto``: see the module docstring)."""
    if value == "auto":
        return AUTO_FRACTION if search_items >= AUTO_MIN_ITEMS else 0.0
    return float(value or 0.0)


def fraction_problem(value: Any) -> str | None:
    """What is wrong with a ``validation`` option value (None: nothing)."""
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_FRACTION:
        return (f"expected a fraction of the search split between 0 and {MAX_FRACTION} (0: no validation "
                f"sample) or auto, got {value!r}")
    return None


def carve(items: tuple[Item, ...], fraction: float) -> frozenset[int]:
    """Ids of the validation sample of one task's search items (module docstring). Items that share
    a prompt and target (``Item.key``) go to the same side, so no question is both searched and
    validated on."""
    if fraction <= 0 or len(items) < 2:
        return frozenset()
    k = min(len(items) - 1, max(1, round(fraction * len(items))))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.key(), []).append(i)
    if len(groups) < 2:
        return frozenset()
    ranked = sorted(groups, key=lambda key: hashlib.sha256("\0".join(key).encode()).hexdigest())
    chosen: list[int] = []
    for key in ranked[:-1]:  # the last group always stays in the search sample
        if len(chosen) >= k:
            break
        chosen += groups[key]
    return frozenset(chosen)


@dataclasses.dataclass(frozen=True)
class SplitView:
    """The suite as a split name sees it: ``suite`` (the chosen items as split ``split``) and every
    task's item ids, aligned with ``suite``'s items."""

    suite: Suite
    split: str  # the split of ``suite`` to score ("search" or "held-out")
    ids: dict[str, tuple[int, ...]]


def split_view(suite: Suite, split: str, fraction: float) -> SplitView:
    """The view of ``suite`` for ``split`` (``search``, ``validation`` or ``held-out``)."""
    if split not in ("search", VALIDATION) or (split == "search" and fraction <= 0):
        if split == VALIDATION:
            raise ValueError("this evaluator has no validation sample (its validation fraction is 0)")
        return SplitView(suite, split, {t.name: tuple(range(len(t.splits[split]))) for t in suite.tasks})
    tasks, ids = [], {}
    for t in suite.tasks:
        items = t.splits["search"]
        val = carve(items, fraction)
        keep = tuple(i for i in range(len(items)) if (i in val) == (split == VALIDATION))
        ids[t.name] = keep
        tasks.append(dataclasses.replace(t, splits={**t.splits, "search": tuple(items[i] for i in keep)}))
    fp = hashlib.sha256(f"{suite.fingerprint}|{split}|{fraction!r}".encode()).hexdigest()[:16]
    return SplitView(dataclasses.replace(suite, tasks=tuple(tasks), fingerprint=fp), "search", ids)


def scored_ids(view: SplitView, cap: int | None, seed: int) -> dict[str, list[int]]:
    """The ids of the items a scorer of ``view`` with item cap ``cap`` and ``seed`` scores (the
    engine's nested seeded subsample applied to the ids)."""
    return {t: subsample(ids, cap, seed) for t, ids in view.ids.items()}


def items_payload(suite: Suite, results: dict[str, TaskResult], ids: dict[str, list[int]]) -> dict[str, Any]:
    """The per-item payload of an outcome (``EvalOutcome.items``); empty when a result carries no
    per-item values (a score cached before they were recorded)."""
    if any(len(r.items) != len(ids[name]) for name, r in results.items()):
        return {}
    return {"weights": {t.name: t.weight for t in suite.tasks},
            "tasks": {name: {"ids": list(ids[name]), "values": list(r.items)} for name, r in results.items()}}


# ------------------------------------------------------------------------------------------ bounded scoring


@dataclasses.dataclass(frozen=True)
class Bar:
    """Stop scoring once ``sum_m coef[m] * metric_m + offset`` cannot reach ``value`` any more."""

    coef: dict[str, float]
    value: float
    offset: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"coef": dict(self.coef), "value": self.value, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bar:
        return cls({k: float(v) for k, v in d["coef"].items()}, float(d["value"]), float(d.get("offset", 0.0)))


def task_coefs(bar: Bar, suite: Suite) -> dict[str, float]:
    """The bar's form over task means (``combined`` spread by the suite's weights)."""
    wsum = sum(t.weight for t in suite.tasks)
    out = {t.name: 0.0 for t in suite.tasks}
    for m, a in bar.coef.items():
        if m == "combined":
            for t in suite.tasks:
                out[t.name] += a * t.weight / wsum if wsum > 0 else 0.0
        elif m in out:
            out[m] += a
        else:
            raise KeyError(f"the bar names metric '{m}', which this suite does not report")
    return out


def reachable(coefs: dict[str, float], kinds: dict[str, str], done: dict[str, list[float]],
              totals: dict[str, int], offset: float = 0.0) -> float:
    """The largest value ``sum_t c_t mean_t + offset`` can still take when task ``t`` has the values
    ``done[t]`` for its first items and ``totals[t]`` items in all."""
    best = offset
    for t, c in coefs.items():
        if c == 0:
            continue
        lo, hi = _ITEM_RANGE[kinds[t]]
        rest = totals[t] - len(done[t])
        extreme = hi if c > 0 else lo
        if rest and math.isinf(extreme):
            return math.inf
        best += c * (math.fsum(done[t]) + (rest * extreme if rest else 0.0)) / totals[t]
    return best


def score_bounded(lm, work: list[tuple[Task, list[Item]]], bar: Bar, suite: Suite,
                  chunks: int = DEFAULT_CHUNKS, min_chunk: int = MIN_CHUNK
                  ) -> tuple[dict[str, TaskResult], dict[str, float] | None]:
    """Score ``work`` in ``chunks`` slices per task (each at least ``min_chunk`` items: the
    evaluator passes its batch size, so a slice never splits what would have been one batch),
    stopping when the bar is out of reach.

    Returns ``(results, stopped)``: the results of the items scored (all of them when not stopped),
    and None, or when scoring stopped early ``{"high", "low", "bar", "scored"}``: the largest and the
    smallest value the bar's form could still take over every item, the bar, and the items scored."""
    coefs = task_coefs(bar, suite)
    kinds = {task.name: task.kind for task, _ in work}
    totals = {task.name: len(items) for task, items in work}
    size = {name: max(min_chunk, math.ceil(n / max(1, chunks))) for name, n in totals.items()}
    done: dict[str, list[float]] = {task.name: [] for task, _ in work}
    parts: dict[str, list[TaskResult]] = {task.name: [] for task, _ in work}
    pos = 0
    while True:
        piece = [(task, items[pos * size[task.name]:(pos + 1) * size[task.name]]) for task, items in work]
        piece = [(task, items) for task, items in piece if items]
        if not piece:
            break
        for name, r in score_tasks(lm, piece).items():
            done[name] += r.items
            parts[name].append(r)
        pos += 1
        high = reachable(coefs, kinds, done, totals, bar.offset)
        # a margin for rounding: the bound and the bar are sums in different orders, and an exact
        # tie with the bar is promoted
        if high < bar.value - 1e-9 and any(len(done[n]) < totals[n] for n in totals):
            low = -reachable({t: -c for t, c in coefs.items()}, kinds, done, totals, -bar.offset)
            results = {task.name: merge_parts(task, parts[task.name]) for task, _ in work}
            return results, {"high": high, "low": low, "bar": bar.value, "scored": sum(map(len, done.values()))}
    return {task.name: merge_parts(task, parts[task.name]) for task, _ in work}, None


def merge_parts(task: Task, parts: list[TaskResult]) -> TaskResult:
    """One task's result from the results of consecutive slices of its items."""
    values = [v for r in parts for v in r.items]
    n = len(values)
    if n == 0:
        return TaskResult(task.name, task.kind, task.primary, math.nan, math.nan, 0, {}, task.weight, [])
    mean = math.fsum(values) / n
    if task.kind == "loglik":
        var = math.fsum((x - mean) ** 2 for x in values) / (n - 1) if n > 1 else math.nan
        se = math.sqrt(var / n)
    else:
        se = binomial_stderr(mean, n)
    metrics: dict[str, float] = {}
    for r in parts:  # other metrics: the item-weighted mean over the slices (perplexity does not split so)
        for k, v in r.metrics.items():
            if k != "perplexity" or len(parts) == 1:
                metrics[k] = metrics.get(k, 0.0) + v * r.n / n
    metrics[parts[0].primary] = mean
    return TaskResult(task.name, task.kind, parts[0].primary, mean, se, n, metrics, task.weight, values)
