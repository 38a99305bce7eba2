"""The executor protocol and the in-process executor.

A :class:`CandidateJob` is one evaluation (a recipe on a split at a fidelity); an executor turns it into a
:class:`concurrent.futures.Future` of a :class:`JobResult`. ``capacity`` says how many jobs can run
at once, so the driver submits a whole CMA-ES population as a batch (``map``) and asks an
asynchronous sampler for a new trial whenever a slot frees. A job never raises: a failing candidate
(exception, non-finite score) comes back as a result with ``error`` set, so one bad merge cannot stop
a search. Implementations: :class:`InProcessExecutor` here; :class:`evomerge.workers.ray_executor.RayExecutor`
implements the same three members (``capacity``, ``submit``, ``shutdown``) on Ray actors.
"""

from __future__ import annotations

import math
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from evomerge.recipe import Recipe
from evomerge.evaluate.evaluators import EvalOutcome, Evaluator, worker_name


@dataclass(frozen=True)
class CandidateJob:
    key: Any  # the driver's handle (trial number, rung)
    recipe: Recipe
    split: str = "search"
    fidelity: float = 1.0
    limit: int | None = None
    # stop scoring once this bar is out of reach (a rung below the last: evomerge.search.bounds);
    # given to evaluators whose ``evaluate`` takes ``bar`` (the suite evaluator), ignored by others
    bar: dict[str, Any] | None = None
    # score exactly these item ids per task (the first rung's anchors: evomerge.search.estimator);
    # given to evaluators whose ``evaluate`` takes ``items``
    items: dict[str, list[int]] | None = None


@dataclass
class JobResult:
    key: Any
    outcome: EvalOutcome | None
    error: str | None
    seconds: float
    worker: str

    @property
    def ok(self) -> bool:
        return self.error is None


class Executor(Protocol):
    capacity: int

    def submit(self, job: CandidateJob) -> Future[JobResult]: ...

    def shutdown(self) -> None: ...


def run_job(evaluator: Evaluator, job: CandidateJob) -> JobResult:
    """Evaluate ``job``; exceptions and non-finite scores become ``error`` (with the exception's message)."""
    start = time.perf_counter()
    try:
        extra = {k: v for k, v in (("bar", job.bar), ("items", job.items)) if v is not None and takes(evaluator, k)}
        outcome = evaluator.evaluate(job.recipe, split=job.split, fidelity=job.fidelity, limit=job.limit, **extra)
        bad = sorted(k for k, v in outcome.scores.items() if not math.isfinite(float(v)))
        error = f"non-finite score(s): {', '.join(bad)}" if bad else None
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError as err:
        outcome, error = None, f"out of memory: {err}"
    except Exception as err:  # noqa: BLE001 - any failure of one candidate is recorded, not raised
        outcome = None
        where = traceback.extract_tb(err.__traceback__)[-1]
        error = f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno})"
        if "out of memory" in str(err).lower():
            error = "out of memory: " + error
    seconds = time.perf_counter() - start
    worker = outcome.worker if outcome is not None and outcome.worker else worker_name()
    return JobResult(job.key, outcome if error is None else None, error, seconds, worker)


def takes(evaluator: Evaluator, option: str) -> bool:
    """Whether ``evaluator.evaluate`` accepts the keyword ``option`` (``bar``, ``items``)."""
    import inspect

    try:
        return option in inspect.signature(evaluator.evaluate).parameters
    except (TypeError, ValueError):
        return False


class InProcessExecutor:
    """Runs jobs in this process. ``workers=1`` (default) runs each job inside ``submit`` (no threads,
    Ctrl-C stops it at once); ``workers > 1`` uses a thread pool with one evaluator per thread
    (useful when evaluation releases the GIL, e.g. torch on several devices)."""

    def __init__(self, evaluator_factory: Callable[[], Evaluator], workers: int = 1):
        self.capacity = max(1, int(workers))
        self._factory = evaluator_factory
        self._local: dict[str, Evaluator] = {}
        self._pool = None
        if self.capacity > 1:
            # transformers resolves its lazy attributes on first use, and two threads doing that at
            # once can see a half-initialized module (ImportError: cannot import name 'AutoConfig');
            # resolve the ones the evaluators use here, before any thread starts
            import transformers

            transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer  # noqa: B018
            self._pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="evomerge")

    def _evaluator(self) -> Evaluator:
        import threading

        key = threading.current_thread().name
        if key not in self._local:
            self._local[key] = self._factory()
        return self._local[key]

    def submit(self, job: CandidateJob) -> Future[JobResult]:
        if self._pool is not None:
            return self._pool.submit(lambda: run_job(self._evaluator(), job))
        fut: Future[JobResult] = Future()
        fut.set_result(run_job(self._evaluator(), job))
        return fut

    def map(self, jobs: list[CandidateJob]) -> list[JobResult]:
        """Run a batch (e.g. a CMA-ES population); results in the jobs' order."""
        return [f.result() for f in [self.submit(j) for j in jobs]]

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for evaluator in self._local.values():  # stop what they started (vLLM engines)
            close = getattr(evaluator, "close", None)
            if close is not None:
                close()
        self._local.clear()
