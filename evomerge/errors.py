"""One exception hierarchy for every user-facing failure.

Every message says what was received, where (file, key, model, tensor), what was expected and how
to fix it. The CLI prints ``str(error)`` and exits with status 2 for any :class:`EvomergeError`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found while validating an input.

    ``where`` locates it (``"recipe.yaml: sources[1].params.density"``), ``message`` says what is
    wrong, ``hint`` says how to fix it.
    """

    where: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}"
        if self.hint:
            text += f" (fix: {self.hint})"
        return text


class EvomergeError(Exception):
    """Base class of every error evomerge raises on bad input or a failed run."""


class ConfigError(EvomergeError):
    """A recipe, search space, suite or option is invalid. Holds every problem found, not just one."""

    def __init__(self, problems: list[Problem] | Problem | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(source or "config", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in {source}" if source else f"{len(self.problems)} problem(s)"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class CheckpointError(EvomergeError):
    """A model directory is missing, unreadable, pickled, truncated or otherwise unusable."""


class IncompatibleModelsError(CheckpointError):
    """Models that must be merged together differ in architecture, tensor set, shape or vocabulary."""


class MergeError(EvomergeError):
    """A merge could not be computed (numerical failure, unsupported architecture for an operation)."""


class EvalError(EvomergeError):
    """A task suite or its data is invalid, or a model cannot be scored (e.g. no tokenizer)."""


class StudyError(EvomergeError):
    """A study folder or storage is missing, unreachable or inconsistent."""


class RunInterrupted(EvomergeError):
    """A search stopped because of a fault outside the candidates (every Ray worker lost, a dead node,
    an unreachable cluster). Trials that were running are recorded as interrupted; ``evomerge
    resume`` finishes the study. The CLI exits with status 3 (not 2: the input was fine)."""

    exit_code = 3
