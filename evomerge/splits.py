"""The splits candidates are scored on.

A suite's data files hold two: ``search`` (what the optimizer sees) and ``held-out`` (scored only for
the final front and the baselines, so a reported gain is measured on items the search never saw);
a task's two splits must not share an item. ``validation`` is a sample carved out of the search
split (:mod:`evomerge.evaluate.views`) on which a search chooses its winner.
"""

from __future__ import annotations

SEARCH = "search"
HELD_OUT = "held-out"
VALIDATION = "validation"
SPLITS = (SEARCH, HELD_OUT)  # the splits of a suite's data files
SCORED_SPLITS = (SEARCH, VALIDATION, HELD_OUT)  # every split a study records scores on


def split_error(split: object) -> str | None:
    """What is wrong with ``split`` as the name of a data file's split (None: it is one)."""
    if split in SPLITS:
        return None
    return f"unknown split {split!r}; use one of {', '.join(SPLITS)}"
