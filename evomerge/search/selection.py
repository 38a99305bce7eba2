"""Selection that survives noise: candidates compared on the same items, and a winner chosen on a
validation sample the optimizer never saw.

**Per-item results.** The suite evaluator reports, next to each task's score, the score of every
item it scored and the item's id (its line in the split's data file; ``EvalOutcome.items``, payload
``{"weights": {task: w}, "tasks": {task: {"ids": [...], "values": [...]}}}``). A task's score is
the mean of its items' values (exact match / accuracy: 0 or 1; loglik: the item's mean per-token
log-probability), and ``combined`` is ``sum_t w_t mean_t / sum_t w_t``.

**The score as a linear form.** A study's *utility* (:func:`evomerge.search.objectives.utility`)
is linear in the task means: ``U = sum_t c_t mean_t + k`` where ``c_t`` collects the objectives'
weights and signs (a ``combined`` objective spreads over the tasks by the suite's weights) and
``k`` holds the cost objectives (parameter / layer counts: exact, no sampling noise).
:func:`task_coefs` derives ``c``.

**One score with its interval** (:func:`estimate`): ``U`` with the stratified standard error
``se = sqrt(sum_t c_t^2 s_t^2 / n_t)`` (``s_t``: the sample standard deviation of task ``t``'s item
values, ``n_t - 1`` in the denominator) and a 95% Student-t interval with Welch-Satterthwaite
degrees of freedom ``df = (sum_t v_t)^2 / sum_t v_t^2 / (n_t - 1)``, ``v_t = c_t^2 s_t^2 / n_t``.

**Two candidates on the same items** (:func:`paired`): with ``d_ti = a_ti - b_ti`` on the items
both were scored on (ids matched), the mean paired difference ``D = sum_t c_t mean_i(d_ti) +
(k_a - k_b)``, its standard error ``sqrt(sum_t c_t^2 s_t(d)^2 / n_t)``, the t statistic ``D / se``
with a two-sided p-value and 95% interval on the Welch-Satterthwaite ``df`` (one task: exactly the
paired t-test, ``df = n - 1``), and a two-sided sign test over items (``c_t d_ti > 0`` a win,
``< 0`` a loss, ties dropped; exact binomial p-value). Paired differences are far more precise
than the difference of two independent scores: two merges of the same models get most items
right or wrong together, and the pairing removes that shared part (on the demo zoo's held-out split:
``se`` ~0.010 of the winner's difference with the best hand-set merge, where each score has ~0.012
and the difference of two independent scores would have ~0.017). A difference is *significant*
when its 95% interval excludes 0.

**Choosing the winner** (:func:`choose`). The best of many noisy search scores sits above its true
value (selection bias: with 60 candidates of equal true score and a standard error of 0.035, the
maximum of the search scores is ~2.3 standard errors high). So before a stage names its winner,
the ``top_k`` search candidates by search utility and every baseline are re-scored on a
**validation** sample, items carved deterministically out of the search split (the evaluator's
``validation`` option: the optimizer never sees them, and the held-out split is never touched
during a search), and the winner is the candidate with the highest validation utility. The
validation score of the winner is then itself selected among ``top_k``, a far smaller bias than
among all trials; held-out scores (scored after the search) are the unbiased measure the report
gives against every baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from evomerge.search.objectives import Objective, is_scalarized

COMBINED = "combined"
DEFAULT_TOP_K = 5
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------------ item results


@dataclass(frozen=True)
class ItemResults:
    """Per-item values of one candidate on one split: ``tasks[task][item id] = value``; ``weights``:
    each task's weight in ``combined``."""

    tasks: dict[str, dict[int, float]]
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_payload(cls, payload: dict[str, Any] | None) -> ItemResults | None:
        """The results stored in an evaluation record (None when it holds no per-item results)."""
        if not payload or not isinstance(payload.get("tasks"), dict) or not payload["tasks"]:
            return None
        tasks = {}
        for name, rec in payload["tasks"].items():
            ids, values = rec["ids"], rec["values"]
            if len(ids) != len(values):
                raise ValueError(f"task {name}: {len(ids)} item ids but {len(values)} values")
            tasks[name] = {int(i): float(v) for i, v in zip(ids, values)}
        return cls(tasks, {k: float(v) for k, v in (payload.get("weights") or {}).items()})

    def to_payload(self) -> dict[str, Any]:
        return {"weights": dict(self.weights),
                "tasks": {t: {"ids": list(v), "values": list(v.values())} for t, v in self.tasks.items()}}

    def task_mean(self, task: str) -> float:
        vals = self.tasks[task].values()
        return sum(vals) / len(vals)


def task_coefs(objectives: list[Objective], weights: dict[str, float]) -> dict[str, float] | None:
    """``c_t`` of the utility's linear form over task means (module docstring); None when an
    objective's metric does not decompose over the tasks of ``weights`` (e.g. an lm-eval metric)."""
    used = objectives if is_scalarized(objectives) else objectives[:1]
    coefs: dict[str, float] = {}
    wsum = sum(weights.values())
    for o in used:
        if o.kind != "metric":
            continue
        a = (o.weight if is_scalarized(objectives) else 1.0) * o.sign
        if o.key == COMBINED and wsum > 0:
            for t, w in weights.items():
                coefs[t] = coefs.get(t, 0.0) + a * w / wsum
        elif o.key in weights:
            coefs[o.key] = coefs.get(o.key, 0.0) + a
        else:
            return None
    return coefs


def cost_constant(objectives: list[Objective], values: dict[str, float]) -> float:
    """``k``: the cost objectives' part of the utility (exact: costs are not sampled)."""
    if not is_scalarized(objectives):
        o = objectives[0]
        return o.sign * values[o.name] if o.kind == "cost" else 0.0
    return sum(o.weight * o.sign * values[o.name] for o in objectives if o.kind == "cost")


# ---------------------------------------------------------------------------------------------- statistics


def _t_quantile(df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) if df > 0 and math.isfinite(df) else \
        float(stats.norm.ppf(0.5 + CONFIDENCE / 2))


def _t_pvalue(t: float, df: float) -> float:
    from scipy import stats

    if math.isnan(t):
        return 1.0
    if df > 0 and math.isfinite(df):
        return float(2 * stats.t.sf(abs(t), df))
    return float(2 * stats.norm.sf(abs(t)))


def _moments(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample variance with n - 1 in the denominator (inf for one value: a single item says
    nothing about the spread, so it never makes a difference significant), n)."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((x - mean) ** 2 for x in values) / (n - 1) if n > 1 else math.inf
    return mean, var, n


def _stratified(parts: list[tuple[float, float, float, int]]) -> tuple[float, float, float]:
    """(sum c mean, se, Welch-Satterthwaite df) of strata ``(c, mean, var, n)``."""
    total = math.fsum(c * m for c, m, _, _ in parts)
    v = [(c * c * var / n, n) for c, _, var, n in parts if c]  # a stratum weighted 0 adds nothing
    var_sum = math.fsum(x for x, _ in v)
    denom = math.fsum(x * x / (n - 1) for x, n in v if n > 1)
    df = var_sum * var_sum / denom if denom > 0 else math.inf
    return total, math.sqrt(var_sum), df


@dataclass(frozen=True)
class Estimate:
    """A score with its standard error, sample size and 95% interval."""

    mean: float
    se: float
    n: int
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "se": self.se, "n": self.n, "low": self.low, "high": self.high}


def estimate(res: ItemResults, coefs: dict[str, float], const: float = 0.0) -> Estimate:
    """The utility ``sum_t c_t mean_t + k`` of one candidate with its stratified interval."""
    parts = []
    for t, c in coefs.items():
        if c == 0:
            continue
        if t not in res.tasks or not res.tasks[t]:
            raise KeyError(f"no per-item results for task '{t}'")
        mean, var, n = _moments(list(res.tasks[t].values()))
        parts.append((c, mean, var, n))
    total, se, df = _stratified(parts)
    half = _t_quantile(df) * se
    mean = total + const
    return Estimate(mean, se, sum(p[3] for p in parts), mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """The paired difference ``a - b`` on shared items (module docstring)."""

    mean: float
    se: float
    n: int  # items both were scored on
    df: float
    low: float
    high: float
    t: float
    p: float  # two-sided, Student t
    wins: int  # items where a is better (sign test)
    losses: int
    p_sign: float  # two-sided exact binomial sign test

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("mean", "se", "n", "df", "low", "high", "t", "p", "wins", "losses",
                                               "p_sign")} | {"significant": self.significant}


def paired(a: ItemResults, b: ItemResults, coefs: dict[str, float], const_diff: float = 0.0) -> Paired:
    """``a - b`` on the items both were scored on (per task, matched by id)."""
    from scipy import stats

    parts = []
    wins = losses = 0
    for t, c in coefs.items():
        if c == 0:
            continue
        if t not in a.tasks or t not in b.tasks:
            raise KeyError(f"no per-item results for task '{t}' in both candidates")
        shared = sorted(set(a.tasks[t]) & set(b.tasks[t]))
        if not shared:
            raise ValueError(f"task '{t}': the two candidates share no scored item")
        d = [a.tasks[t][i] - b.tasks[t][i] for i in shared]
        wins += sum(c * x > 0 for x in d)
        losses += sum(c * x < 0 for x in d)
        mean, var, n = _moments(d)
        parts.append((c, mean, var, n))
    total, se, df = _stratified(parts)
    total += const_diff
    n = sum(p[3] for p in parts)
    if se > 0:
        tstat = total / se
        p = _t_pvalue(tstat, df)
        half = _t_quantile(df) * se
    else:  # every item difference equal (e.g. identical candidates): no sampling noise left
        tstat = math.copysign(math.inf, total) if total else 0.0
        p = 1.0 if total == 0 else 0.0
        half = 0.0
    p_sign = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    return Paired(total, se, n, df, total - half, total + half, tstat, p, wins, losses, p_sign)


def unpaired(a: Estimate, b: Estimate) -> Estimate:
    """``a - b`` of two scores on independent items (normal interval); the fallback when per-item
    results are missing (e.g. scores cached before they were recorded)."""
    se = math.hypot(a.se, b.se)
    d = a.mean - b.mean
    z = _t_quantile(math.inf)
    return Estimate(d, se, min(a.n, b.n), d - z * se, d + z * se)


# ------------------------------------------------------------------------------------------------- choice


@dataclass
class Entry:
    """One candidate of the validation pool: its trial, search utility, validation results."""

    number: int
    label: str
    search: float  # search-split utility
    validation: ItemResults | None
    const: float = 0.0  # cost part of the utility


@dataclass
class Choice:
    winner: int  # trial number
    incumbent: int  # the best by search utility ("current best")
    scores: dict[int, Estimate]  # validation utility of every pooled trial
    versus_incumbent: Paired | None  # winner - incumbent on validation items (None: the same trial)

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "incumbent": self.incumbent,
                "validation": {str(k): v.to_dict() for k, v in self.scores.items()},
                "versus_incumbent": None if self.versus_incumbent is None else self.versus_incumbent.to_dict()}


def choose(pool: Iterable[Entry], coefs: dict[str, float]) -> Choice:
    """The entry with the highest validation utility (ties: the higher search utility, then the lower
    trial number); entries without validation results cannot win unless none has them."""
    pool = list(pool)
    if not pool:
        raise ValueError("no candidate to choose from")
    incumbent = max(pool, key=lambda e: (e.search, -e.number))
    scored = {e.number: estimate(e.validation, coefs, e.const) for e in pool if e.validation is not None}
    if not scored:
        return Choice(incumbent.number, incumbent.number, {}, None)
    best = max((e for e in pool if e.number in scored),
               key=lambda e: (scored[e.number].mean, e.search, -e.number))
    vs = None
    if best.number != incumbent.number and incumbent.validation is not None:
        vs = paired(best.validation, incumbent.validation, coefs, best.const - incumbent.const)
    return Choice(best.number, incumbent.number, scored, vs)


def top_k(trials: list[tuple[int, float]], k: int) -> list[int]:
    """Trial numbers of the ``k`` highest utilities (ties: the lower number first)."""
    return [n for n, _ in sorted(trials, key=lambda nu: (-nu[1], nu[0]))[:k]]
