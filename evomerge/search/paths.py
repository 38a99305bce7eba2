"""Where the paths of a search space point: model references and the ``evaluation:`` mapping's
file paths made absolute, and where an older study's relative paths are looked for.

A study folder's ``space.yaml`` holds every path absolute (:mod:`evomerge.search.space` resolves
them while it parses), so a study works from any directory; older studies recorded paths relative
to where the search ran (:func:`study_bases`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PS_WINNER = "@ps"  # a dfs.models reference to the PS stage's winner (kind ps_dfs), not a path


def resolve_ref(ref: str, base_dirs: list[Path] | None = None) -> str:
    """A local path made absolute (a relative one: against the first of ``base_dirs``, default the
    current directory, where it exists), else the reference unchanged (a hub id)."""
    if ref == PS_WINNER:
        return ref
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path.resolve()) if path.exists() else ref
    for base in base_dirs or [Path.cwd()]:
        candidate = Path(base) / path
        if candidate.exists():
            return str(candidate.resolve())
    return ref


def resolve_path(value: str, base_dirs: list[Path] | None = None) -> str:
    """A file path made absolute: against the first of ``base_dirs`` (default the current directory)
    where it exists, else against the first one (a file or folder still to be created)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    bases = [Path(b) for b in (base_dirs or [Path.cwd()])]
    for base in bases:
        if (base / path).exists():
            return str((base / path).resolve())
    return os.path.normpath(os.path.abspath(bases[0] / path))


def resolve_evaluation(evaluation: dict[str, Any], base_dirs: list[Path] | None = None) -> dict[str, Any]:
    """The ``evaluation:`` mapping with the evaluator kind's file paths made absolute."""
    from evomerge.evaluate.evaluators import evaluator_kind, evaluator_path_keys

    out = dict(evaluation)
    for key in evaluator_path_keys(evaluator_kind(out)):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = resolve_path(out[key], base_dirs)
    return out


def study_bases(study_dir: Path) -> list[Path]:
    """Where relative paths of an older study's space.yaml are looked for: the current directory
    (where they were written from, as before), then the study folder's parents (results/<name> sits
    in the folder the search ran from). New studies record absolute paths."""
    return [Path.cwd(), *Path(study_dir).resolve().parents]
