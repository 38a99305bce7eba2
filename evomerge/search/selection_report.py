"""The selection report of a stage: search, validation and held-out scores side by side with their
95% intervals, and the winner's held-out margin over every baseline with its paired interval.

``selection.md`` (a table to read) and ``selection.json`` (the same numbers) are written beside
``trials.csv``. Rows: the winner (chosen on the validation sample), the search-best trial when it
is another one, the rest of the selection pool, and every baseline. Scores are the study's utility
(the objective, or the weighted objectives); intervals are stratified Student-t intervals over
items (:mod:`evomerge.search.selection`). A margin is *significant* when the 95% interval of the
paired difference on the same held-out items excludes 0; where per-item results are missing (an
evaluator that reports none) the difference of independent scores is given instead, marked
``unpaired``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from evomerge.search import selection as S
from evomerge.search.objectives import Objective, is_scalarized, utility
from evomerge.search.study import get_attr
from evomerge.search.validation import SELECTION, split_records

SPLITS = ("search", "validation", "held-out")


def _items(t: FrozenTrial, split: str, recs: dict[str, dict[int, dict]]) -> tuple[S.ItemResults | None, dict | None]:
    """(per-item results, record) of trial ``t`` on ``split`` (the trial itself for ``search``)."""
    if split == "search":
        rec = {"objectives": t.user_attrs.get("objectives"), "items": t.user_attrs.get("items"),
               "scores": t.user_attrs.get("scores"), "stderr": t.user_attrs.get("stderr")}
    else:
        rec = recs[split].get(t.number)
        if not rec or rec.get("error") or "objectives" not in rec:
            return None, None
    return S.ItemResults.from_payload(rec.get("items")), rec


def _fallback(objectives: list[Objective], rec: dict) -> S.Estimate:
    """A score without per-item results: the utility, with the first metric's standard error when
    the utility is that metric alone."""
    u = utility(objectives, rec["objectives"])
    metrics = [o for o in objectives if o.kind == "metric"]
    se = math.nan
    if len(metrics) == 1 and (rec.get("stderr") or {}).get(metrics[0].key) is not None:
        o = metrics[0]
        se = abs(o.weight if is_scalarized(objectives) else 1.0) * rec["stderr"][o.key]
    z = 1.959963984540054
    return S.Estimate(u, se, 0, u - z * se, u + z * se)


def stage_summary(study, objectives: list[Objective]) -> dict[str, Any] | None:
    """The numbers of ``selection.md`` for one stage (None: no winner chosen yet)."""
    choice = get_attr(study, SELECTION)
    if not choice:
        return None
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "objectives" in t.user_attrs}
    if choice["winner"] not in trials:
        return None
    recs = {s: split_records(study, s) for s in ("validation", "held-out")}
    order = [choice["winner"]]
    baselines = [n for n, t in trials.items() if t.user_attrs.get("kind") == "baseline"]
    for n in [choice["incumbent"], *choice.get("pool", []), *baselines]:
        if n not in order and n in trials:
            order.append(n)
    coefs = None
    rows = []
    results: dict[tuple[int, str], S.ItemResults] = {}
    for n in order:
        t = trials[n]
        const = S.cost_constant(objectives, t.user_attrs["objectives"])
        row: dict[str, Any] = {"trial": n, "label": t.user_attrs.get("label") or "",
                               "kind": t.user_attrs.get("kind", "search"),
                               "role": "winner" if n == choice["winner"] else
                               "search-best" if n == choice["incumbent"] else ""}
        for split in SPLITS:
            items, rec = _items(t, split, recs)
            if rec is None:
                row[split] = None
                continue
            if items is not None and coefs is None:
                coefs = S.task_coefs(objectives, items.weights)
            if items is not None and coefs is not None:
                results[(n, split)] = items
                row[split] = S.estimate(items, coefs, const).to_dict()
            else:
                row[split] = _fallback(objectives, rec).to_dict()
        rows.append(row)
    margins = []
    w = choice["winner"]
    for row in rows[1:]:
        n = row["trial"]
        if row["kind"] != "baseline" and n != choice["incumbent"]:
            continue
        margin: dict[str, Any] = {"versus": n, "label": row["label"] or f"trial {n}"}
        a, b = results.get((w, "held-out")), results.get((n, "held-out"))
        const = S.cost_constant(objectives, trials[w].user_attrs["objectives"]) - \
            S.cost_constant(objectives, trials[n].user_attrs["objectives"])
        if a is not None and b is not None and coefs is not None:
            margin.update(S.paired(a, b, coefs, const).to_dict(), paired=True)
        elif rows[0]["held-out"] is not None and row["held-out"] is not None:
            est = S.unpaired(S.Estimate(**rows[0]["held-out"]), S.Estimate(**row["held-out"]))
            margin.update(est.to_dict(), paired=False, significant=est.low > 0 or est.high < 0)
        else:
            margin["missing"] = "no held-out score yet (`evomerge rescore` scores it)"
        margins.append(margin)
    return {"winner": w, "incumbent": choice["incumbent"], "reason": choice.get("reason", ""),
            "versus_incumbent_validation": choice.get("versus_incumbent"), "rows": rows, "margins": margins}


def _cell(est: dict | None) -> str:
    if est is None:
        return "-"
    if est["se"] != est["se"]:  # nan: no interval
        return f"{est['mean']:.4f}"
    return f"{est['mean']:.4f} [{est['low']:.4f}, {est['high']:.4f}]"


def markdown(summary: dict[str, Any], title: str) -> str:
    """``selection.md`` of one stage."""
    lines = [f"# {title}: the winner and the baselines", "",
             f"Winner: trial {summary['winner']} ({summary['reason']}).", "",
             ("Scores are the study's utility with 95% intervals over items; validation items are carved out of "
              "the search split (the optimizer never saw them), held-out items were scored only after the search."),
             "", "| trial | role | label | search | validation | held-out |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['trial']} | {r['role']} | {r['label']} | {_cell(r['search'])} | "
                     f"{_cell(r['validation'])} | {_cell(r['held-out'])} |")
    vs = summary.get("versus_incumbent_validation")
    if vs:
        lines += ["", (f"On validation the winner leads the search-best trial {summary['incumbent']} by "
                       f"{vs['mean']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}] (paired, {vs['n']} items).")]
    lines += ["", "Winner minus each baseline (and the search-best trial) on the held-out split:", "",
              "| versus | difference | 95% interval | se | n | paired | significant |", "|---|---|---|---|---|---|---|"]
    for m in summary["margins"]:
        if "missing" in m:
            lines.append(f"| {m['label']} | - | - | - | - | - | {m['missing']} |")
            continue
        sig = "yes" if m["significant"] else "no"
        lines.append(f"| {m['label']} | {m['mean']:+.4f} | [{m['low']:+.4f}, {m['high']:+.4f}] | {m['se']:.4f} | "
                     f"{m['n']} | {'yes' if m['paired'] else 'unpaired'} | {sig} |")
    return "\n".join(lines) + "\n"


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=float) + "\n"
