"""Candidates scored on Ray actors: one resident worker per GPU (or per CPU slot), fault tolerant.

Each actor builds its evaluator once from the search space's ``evaluation:`` mapping
(:func:`evomerge.evaluate.resident.worker_evaluator`): the sources are read once onto its device
and every candidate is materialized into a reused in-memory model, scored, and sent back as a
:class:`~evomerge.workers.base.JobResult`. :class:`RayExecutor` implements the driver's executor
protocol (``capacity``, ``submit`` -> ``Future``, ``shutdown``): a dispatcher thread hands each
queued job to the next idle actor, so a CMA-ES population is spread over all workers and an
asynchronous sampler gets a free slot as soon as any worker finishes.

Faults. A job whose actor dies (process killed, node lost, Ray's memory monitor), stops answering,
or fails with an out-of-memory error is retried, on whichever actor is idle next. Losses the candidate
may have caused (its worker crashed or was killed on a live node, out of memory, a worker that stopped
answering) count against it: after ``max_retries`` retries its result carries the reason as ``error``
and the driver records the trial as failed. Losses to the infrastructure (the worker's node, raylet or
owner died) do not: after ``max_retries`` of those the job is *interrupted* instead (its future raises
:class:`~evomerge.errors.RunInterrupted`), so a trial is never recorded as failed for the cluster's
fault. Ray restarts a dead actor (``max_restarts``); an actor is given jobs again only after it
answers a ping, so work never queues behind a restarting actor, and one that does not come back in
time (``restart_timeout``; no node or resources left for it) no longer counts.

Every wait is bounded. The dispatcher thread makes every Ray call without holding the executor's
lock; a watchdog thread (no Ray calls) and a GCS probe (calls with a timeout) see a dispatcher stuck
in a Ray call, a GCS that stops answering, this driver's node marked dead, or a ``gcs_server`` /
``raylet`` of the local instance this executor started exiting (a raylet also stops when its
dashboard agent dies). In those cases, and when no worker is left, every unresolved future gets a
:class:`~evomerge.errors.RunInterrupted` saying what died (the driver then records the running trials
as interrupted and the CLI exits with status 3; ``evomerge resume`` finishes the study), and
``submit`` raises it. Every submitted job's future is resolved exactly once (a result, a
``RunInterrupted``, or ``CancelledError`` at shutdown), so no trial is lost or counted twice.
``shutdown`` kills the actors and cancels what is queued, in a thread it waits for at most
``shutdown_timeout`` seconds (then it kills the processes of the local instance it started), so
exiting never hangs; the driver has already marked running trials as interrupted, so the study
resumes.

Sources reach workers as paths all nodes can read (``sources="shared"``, the default), or through
Ray's object store (``sources="object-store"``): the driver sends each model folder's files once
and every node unpacks them into a local cache; the task suite is then sent too.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, Problem, RunInterrupted
from evomerge.workers.base import CandidateJob, JobResult

from evomerge.workers.ray_actor import RayWorker
from evomerge.workers.ray_connection import descendants, kill_local, kill_strays, local_processes, connect
from evomerge.workers.ray_dispatch import Dispatcher
from evomerge.workers.ray_errors import lost_errors
from evomerge.workers.ray_state import PendingJob, WorkerSlot
from evomerge.workers.ray_watchdog import Watchdog

SOURCE_MODES = ("shared", "object-store")


# ------------------------------------------------------------------------------------------ the executor


class RayExecutor(Dispatcher, Watchdog):
    """Runs jobs on Ray actors (see the module doc). ``capacity`` is the number of actors.

    ``evaluation``: the space's ``evaluation:`` mapping (each actor builds its evaluator from it), or
    ``evaluator_factory(device) -> Evaluator`` (a picklable callable). ``workers``: actors to start
    (default: one per GPU of the cluster, else 1). ``gpus_per_worker``: GPUs each actor reserves
    (fractions allowed; default 1 when the cluster has GPUs, else 0 = CPU actors).
    ``residency``: ``device`` (sources on the worker's device) or ``host`` (streamed per tensor).
    ``sources``: ``shared`` paths or ``object-store``. ``max_retries``: attempts after a worker loss
    or out-of-memory error (counted apart for losses the candidate may have caused and losses to the
    infrastructure, see the module doc). ``max_restarts``: restarts Ray grants each actor (-1:
    unlimited).

    Liveness (seconds; every wait of the driver is bounded by them, see the module doc):

    * ``start_timeout`` (600): an actor's first start (scheduling, reading the sources, building the
      evaluator) may take this long before the actor no longer counts;
    * ``restart_timeout`` (60): a lost actor must answer a ping again within this time plus twice
      its own first start-up time (a worker that reloads big sources is not given up while it does),
      else it no longer counts (it is still re-admitted if it ever answers);
    * ``ping_interval`` (10) / ``ping_timeout`` (120): every live actor is pinged (its ``info`` runs
      in a second thread, so a busy actor answers too); one silent for ``ping_timeout`` is killed
      (Ray restarts it) and its job retried elsewhere;
    * ``stall_timeout`` (120): a Ray call of the dispatcher thread that has not returned after this
      long means the cluster is unreachable (raise it when ``sources="object-store"`` sends models
      of many GB);
    * ``gcs_timeout`` (30): the GCS is asked every few seconds whether it and this driver's node
      are alive; unanswered this long, the run is interrupted (before Ray itself ends a driver whose
      GCS is gone, after 60 s);
    * ``shutdown_timeout`` (20): :meth:`shutdown` waits this long for ``ray.kill`` /
      ``ray.shutdown``, then kills the processes of the local instance it started.

    When no worker is left (each dead, or past its deadline), the cluster is unreachable or a
    process of the local instance this executor started (``gcs_server``, ``raylet``) exits, every
    unresolved future gets a :class:`~evomerge.errors.RunInterrupted` saying what died, and
    :meth:`submit` and :meth:`check` raise it.
    """

    def __init__(self, evaluation: dict | None = None, *, evaluator_factory: Callable[[str], Any] | None = None,
                 workers: int | None = None, address: str | None = None, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1.0, residency: str = "device", sources: str = "shared",
                 max_retries: int = 2, max_restarts: int = -1, fused: bool | None = None,
                 dashboard: bool = False, log_dir: str | Path | None = None, num_gpus: float | None = None,
                 start_timeout: float = 600.0, restart_timeout: float = 60.0, ping_interval: float = 10.0,
                 ping_timeout: float = 120.0, stall_timeout: float = 120.0, gcs_timeout: float = 30.0,
                 shutdown_timeout: float = 20.0):
        import ray

        # state first: shutdown() works from any point of the constructor
        self._lock = threading.Condition()  # an RLock: resolving a future may call back into submit
        self._stop = False
        self._broken: str | None = None
        self._slots: list[WorkerSlot] = []
        self._queue: collections.deque[PendingJob] = collections.deque()
        self._inflight: dict[Any, tuple[PendingJob, WorkerSlot]] = {}
        self._unresolved: set[PendingJob] = set()
        self._kills: list[Any] = []  # actors to kill (and so restart) once the lock is released
        self._held: list[PendingJob] = []  # jobs awaiting the fate of the worker they last lost (_settle)
        self._dead_nodes: set[str] = set()  # node ids the GCS reports dead (kept fresh by the probe)
        self._threads: list[threading.Thread] = []
        self._local_procs: list[tuple[str, Any]] = []
        self._owns_ray = False
        self.events: list[dict[str, Any]] = []  # worker losses, retries, interruptions: for reports and tests
        self.timings: dict[int, dict[str, float]] = {}  # per worker: materialize / load seconds
        self.start_timeout, self.restart_timeout = float(start_timeout), float(restart_timeout)
        self.ping_interval, self.ping_timeout = float(ping_interval), float(ping_timeout)
        self.stall_timeout, self.gcs_timeout = float(stall_timeout), float(gcs_timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.capacity = 0

        if (evaluation is None) == (evaluator_factory is None):
            raise ValueError("give either evaluation (the space's evaluation mapping) or evaluator_factory")
        if sources not in SOURCE_MODES:
            raise ConfigError(Problem("--ray-sources", f"unknown mode '{sources}'",
                                      f"use one of {', '.join(SOURCE_MODES)}"))
        want_cpus = None
        if workers is not None and address is None and not os.environ.get("RAY_ADDRESS"):
            want_cpus = max(os.cpu_count() or 1, workers * cpus_per_worker)
        self._owns_ray = connect(address, num_cpus=want_cpus, num_gpus=num_gpus, dashboard=dashboard, log_dir=log_dir)
        if self._owns_ray:
            self._local_procs = local_processes()
        self.max_retries, self.sources = int(max_retries), sources
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if cluster_gpus >= 1 else 0.0
        if workers is None:
            workers = max(1, int(cluster_gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
        if gpus_per_worker > 0 and gpus_per_worker * workers > cluster_gpus + 1e-9:
            self.shutdown()
            raise ConfigError(Problem("--workers", f"{workers} workers x {gpus_per_worker} GPU need "
                                      f"{workers * gpus_per_worker:g} GPUs; the cluster has {cluster_gpus:g}",
                                      "lower --workers or --ray-gpus-per-worker (fractions share a GPU)"))
        self.gpus_per_worker, self.cpus_per_worker = gpus_per_worker, cpus_per_worker
        evaluation = self._prepare(evaluation)
        suite = None
        if sources == "object-store" and evaluation is not None and evaluation.get("kind", "suite") == "suite" \
                and "suite" in evaluation:
            from evomerge.evaluate.suite_eval import suite_evaluator

            suite = ray.put(suite_evaluator({k: v for k, v in evaluation.items() if k != "kind"}).suite)
        # max_concurrency=2: ``info`` answers in a second thread while ``run`` is busy (the
        # dispatcher never sends an actor a second job)
        actor_cls = ray.remote(RayWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                max_restarts=max_restarts, max_task_retries=0, max_concurrency=2)
        now = time.monotonic()
        self._slots = [WorkerSlot(i, actor_cls.remote(i, evaluation, evaluator_factory, residency, fused, suite),
                             since=now, answered=now) for i in range(int(workers))]
        for worker_slot in self._slots:
            worker_slot.ping, worker_slot.ping_sent = worker_slot.actor.info.remote(), now
        self.capacity = len(self._slots)
        self._published: dict[str, Any] = {}
        self._lost = lost_errors()
        self.started = time.time()
        self._beat = time.monotonic()  # the dispatcher's last sign of life
        self._gcs_ok = time.monotonic()  # the GCS's last answer
        self._gcs_error = ""
        self._node_dead: str | None = None
        for name, target in (("dispatch", self._loop), ("watchdog", self._watch), ("gcs-probe", self._probe)):
            t = threading.Thread(target=target, name=f"evomerge-ray-{name}", daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _prepare(evaluation: dict | None) -> dict | None:
        """Local paths in the evaluation mapping made absolute (actors do not share our directory)."""
        if evaluation is None:
            return None
        out = dict(evaluation)
        for key in ("suite", "target"):
            if isinstance(out.get(key), str) and Path(out[key]).expanduser().exists():
                out[key] = str(Path(out[key]).expanduser().resolve())
        return out

    @classmethod
    def for_space(cls, space, **kw) -> "RayExecutor":
        """An executor whose actors build the evaluator ``space.evaluation`` describes."""
        return cls(space.evaluation, **kw)

    # ------------------------------------------------------------------------------ protocol

    def submit(self, job: CandidateJob) -> Future:
        """Queue ``job``; its future gets the :class:`JobResult`, or :class:`RunInterrupted` when the
        cluster can no longer run it. Raises :class:`RunInterrupted` once that has happened."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            if self._broken is not None:
                raise self._interrupted(0)
            if self._stop:
                raise RuntimeError("the Ray executor was shut down")
            queued = PendingJob(job, fut, started=time.perf_counter())
            self._unresolved.add(queued)
            self._queue.append(queued)
            self._lock.notify_all()
        return fut

    def map(self, jobs: list[CandidateJob]) -> list[JobResult]:
        return [f.result() for f in [self.submit(j) for j in jobs]]

    def check(self) -> None:
        """Raise :class:`RunInterrupted` when the executor can no longer run jobs (for waits that
        poll). Cheap, never blocks on Ray."""
        with self._lock:
            if self._broken is None and not self._stop:
                dead = [t.name for t in self._threads[:2] if not t.is_alive()]  # dispatcher, watchdog
                if dead:
                    self._break(f"the executor's thread(s) {', '.join(dead)} ended unexpectedly")
            if self._broken is not None:
                raise self._interrupted(len(self._unresolved))

    @property
    def interrupted(self) -> str | None:
        """What stopped the executor (a worker-less or unreachable cluster), or None."""
        return self._broken

    def shutdown(self) -> None:
        """Stop dispatching, cancel queued and running jobs, kill the actors (and the local Ray
        instance this executor started). Never blocks for more than about ``shutdown_timeout``."""
        with self._lock:
            self._stop = True
            for queued in list(self._unresolved):
                self._resolve(queued, exc=CancelledError("the Ray executor was shut down"))
            self._queue.clear()
            self._inflight.clear()
            self._lock.notify_all()
        slots, owns = list(self._slots), self._owns_ray
        self._owns_ray = False
        if not (slots or owns):
            return
        # the raylet's children (agents, workers) of a local instance we started: killed after
        # ray.shutdown if a dead or hung raylet left them behind
        strays = descendants(self._local_procs) if owns else []

        def teardown() -> None:
            import ray

            if ray.is_initialized():
                for worker_slot in slots:
                    try:
                        ray.kill(worker_slot.actor, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            if owns and ray.is_initialized():
                ray.shutdown()

        t = threading.Thread(target=teardown, name="evomerge-ray-shutdown", daemon=True)
        t.start()
        t.join(self.shutdown_timeout)
        if t.is_alive():
            self.events.append({"event": "shutdown timed out", "seconds": self.shutdown_timeout})
            print(f"warning: Ray did not shut down within {self.shutdown_timeout:g} s"
                  + ("; the processes of its local instance were killed" if owns else ""), file=sys.stderr)
            if owns:
                import ray

                kill_local(self._local_procs)
                atexit.unregister(ray.shutdown)  # it would block the interpreter's exit the same way
        if strays:
            kill_strays(strays, grace=0.0 if t.is_alive() else 2.0)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2)

    # ------------------------------------------------------------------------------ introspection

    def workers(self) -> list[dict[str, Any]]:
        """Each actor's state, pid, device, GPU ids, jobs run and busy seconds."""
        return [{"index": s.index, "state": s.state, "jobs": s.jobs, "busy_s": s.busy, "deaths": s.deaths, **s.info}
                for s in self._slots]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every actor has started or restarted (benchmarks exclude start-up)."""
        deadline = time.monotonic() + timeout
        while any(s.state in ("starting", "lost") for s in self._slots) and time.monotonic() < deadline \
                and self._broken is None and not self._stop:
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        wall = time.time() - self.started
        busy = sum(s.busy for s in self._slots)
        return {"workers": self.capacity, "jobs": sum(s.jobs for s in self._slots), "busy_s": busy,
                "wall_s": wall, "busy_fraction": busy / max(wall * self.capacity, 1e-9),
                "retries": sum(e["event"] == "retry" for e in self.events),
                "failed_after_retries": sum(e["event"] == "gave up" for e in self.events),
                "interrupted": self._broken}

    # ------------------------------------------------------------------------------ futures

    def _resolve(self, queued: PendingJob, res: JobResult | None = None, exc: BaseException | None = None) -> None:
        """Resolve ``queued``'s future, once (callers hold the lock)."""
        self._unresolved.discard(queued)
        if queued.future.done():
            return
        if exc is not None:
            queued.future.set_exception(exc)
        else:
            queued.future.set_result(res)

    def _interrupted(self, jobs: int, what: str | None = None) -> RunInterrupted:
        what = what or self._broken or "the Ray cluster is gone"
        msg = what + (f"; {jobs} job(s) in flight were interrupted" if jobs else "") + \
            "; the study can be resumed with `evomerge resume`"
        err = RunInterrupted(msg)
        err.what, err.jobs = what, jobs  # the runner words its own message (trials, not jobs) from these
        return err

    def _break(self, reason: str) -> None:
        """The cluster can no longer run jobs: every unresolved future gets :class:`RunInterrupted`."""
        with self._lock:
            if self._broken is not None or self._stop:
                return
            self._broken = reason
            todo = [p for p in self._unresolved if not p.future.done()]
            self.events.append({"event": "interrupted", "reason": reason, "jobs": len(todo)})
            for queued in todo:
                self._resolve(queued, exc=self._interrupted(len(todo)))
            self._queue.clear()
            self._inflight.clear()
            self._lock.notify_all()
