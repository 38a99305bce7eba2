"""What the Ray executor keeps track of: each submitted job (its future, attempts and lost
attempts) and each actor's slot (its state, deadlines, outstanding calls and counters)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from evomerge.workers.base import CandidateJob, JobResult


@dataclass(eq=False)
class WorkerLoss:
    """One lost attempt of a job: ``kind`` is ``candidate`` (an out-of-memory result: the candidate's
    doing), ``infra`` (the worker's node, raylet or owner died), or ``unclear`` (the worker process
    died or stopped answering: the candidate's doing if the worker comes back on its node, else
    the infrastructure's)."""

    slot: Any
    node: str | None
    at: float
    kind: str
    reason: str


@dataclass(eq=False)  # hashed by identity: the executor keeps a set of the unresolved ones
class PendingJob:
    job: CandidateJob
    future: Future
    attempts: int = 0  # times dispatched
    losses: list[WorkerLoss] = field(default_factory=list)
    held: float | None = None  # since when it waits for the fate of its last worker (see _settle)
    last: JobResult | None = None  # the last out-of-memory result
    started: float = 0.0

    def count(self, kind: str) -> int:
        return sum(loss.kind == kind for loss in self.losses)


@dataclass(eq=False)
class WorkerSlot:
    index: int
    actor: Any
    # starting -> idle <-> busy; lost (restarting: pinged until it answers); gone (did not come back
    # in time: no longer counted, re-admitted if it ever answers); dead (for good)
    state: str = "starting"
    since: float = 0.0  # when it entered starting / lost (monotonic), for the deadlines
    startup: float | None = None  # seconds its first start took (scheduling + building the evaluator)
    answered: float = 0.0  # its last sign of life (a ping answered, a result returned)
    ping: Any = None  # the outstanding ``info`` call
    ping_sent: float = 0.0
    job_ref: Any = None  # the ``run`` call it is busy with
    ping_at: float = 0.0  # when to ping next
    why: str = ""  # why it is lost / gone / dead
    died_ping: bool = False  # its last ping failed with the actor dead
    info: dict[str, Any] = field(default_factory=dict)
    busy: float = 0.0  # seconds spent evaluating (as the worker measured)
    jobs: int = 0
    deaths: int = 0
