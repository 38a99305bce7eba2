"""Candidates scored on Ray actors: one resident worker per GPU (or per CPU slot), fault tolerant.

Each actor builds its evaluator once from the search space's ``evaluation:`` mapping
(:func:`evomerge.workers.resident_eval.worker_evaluator`): the sources are read once onto its device
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
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, Problem, RunInterrupted
from evomerge.workers.base import Job, JobResult, run_job

SOURCE_MODES = ("shared", "object-store")
OOM = "out of memory"


# ------------------------------------------------------------------------------------------ cluster


def connect(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
            dashboard: bool = False, log_dir: str | Path | None = None) -> bool:
    """Connect to Ray: the running instance of this process, ``address`` (``ray://host:10001``,
    ``host:6379``, ``auto``), ``$RAY_ADDRESS``, or else a new local instance (no dashboard, worker
    output kept out of the terminal, logs linked into ``log_dir``). Returns True when this call
    started a local instance (its owner shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        # the package must be importable on every node (installed there); a client session
        # carries this process's evomerge only when the cluster can import it
        ray.init(address=address, logging_level="WARNING")
        return False
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in [pkg_root, os.environ.get("PYTHONPATH", "")] if p),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
             log_to_driver=False, logging_level="WARNING", runtime_env={"env_vars": env})
    if log_dir is not None:
        _link_logs(Path(log_dir))
    return True


def _link_logs(log_dir: Path) -> None:
    """``<log_dir>/ray-logs`` -> this session's log folder (Ray's socket paths are too long for
    its temp dir to live in a study folder)."""
    try:
        from ray._private.worker import _global_node

        logs = Path(_global_node.get_session_dir_path()) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        link = log_dir / "ray-logs"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
    except Exception:  # noqa: BLE001 - logs are a convenience, never a reason to fail a search
        pass


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "OutOfMemoryError", "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError")
    return tuple(getattr(rex, n) for n in names if isinstance(getattr(rex, n, None), type))


# ------------------------------------------------------------------------------------------ the actor


class _Worker:
    """A Ray actor: builds its evaluator once, then scores jobs (one at a time)."""

    def __init__(self, index: int, evaluation: dict | None, factory: Callable[[str], Any] | None,
                 residency: str, fused: bool | None, suite: Any = None):
        import ray
        import torch

        self.index = index
        gpus = ray.get_gpu_ids()
        self.device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        if factory is not None:
            self.evaluator = factory(self.device)
        else:
            from evomerge.workers.resident_eval import worker_evaluator

            self.evaluator = worker_evaluator(evaluation, device=self.device, residency=residency,
                                              fused=fused, suite=suite)
            if hasattr(self.evaluator, "resident"):
                import transformers.models.auto.modeling_auto  # noqa: F401 - imported now, not in the first job
        self._local: dict[str, str] = {}  # driver path -> node-local copy (object-store sources)
        self.started = time.time()

    def info(self) -> dict[str, Any]:
        import socket

        import ray

        ctx = ray.get_runtime_context()
        return {"index": self.index, "pid": os.getpid(), "host": socket.gethostname(), "node": ctx.get_node_id(),
                "device": self.device, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _unpack(self, sources: dict[str, Any]) -> dict[str, str]:
        import ray

        for ref, obj in sources.items():
            if ref in self._local:
                continue
            files = ray.get(obj)
            root = Path(tempfile.gettempdir()) / "evomerge-sources" / files["key"]
            if not (root / ".complete").exists():
                tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root.parent if root.parent.exists()
                                            else _mkdir(root.parent)))
                for name, data in files["files"].items():
                    (tmp / name).write_bytes(data)
                (tmp / ".complete").write_text("")
                try:
                    tmp.rename(root)
                except OSError:  # another worker on this node unpacked it first
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
            self._local[ref] = str(root)
        return self._local

    def run(self, job: Job, sources: dict[str, Any] | None = None) -> tuple[JobResult, dict[str, float]]:
        if sources:
            job = Job(job.key, _relocate(job.recipe, self._unpack(sources)), job.split, job.fidelity, job.limit)
        res = run_job(self.evaluator, job)
        resident = getattr(self.evaluator, "resident", None)
        if res.error and OOM in res.error and resident is not None:
            resident.drop_models()  # the retry starts from a clean device
        timings = dict(resident.timings) if resident is not None else {}
        if resident is not None:
            timings["load"] = resident.load_seconds
        return res, timings


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _relocate(recipe, paths: dict[str, str]):
    """``recipe`` with every model reference found in ``paths`` replaced by its local copy."""
    from evomerge.recipe import parse_recipe

    def sub(v):
        if isinstance(v, str):
            return paths.get(v, v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    return parse_recipe(sub(recipe.model_dump(mode="json", exclude_none=True)))


# ------------------------------------------------------------------------------------------ the executor


@dataclass(eq=False)
class _Loss:
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
class _Pending:
    job: Job
    future: Future
    attempts: int = 0  # times dispatched
    losses: list[_Loss] = field(default_factory=list)
    held: float | None = None  # since when it waits for the fate of its last worker (see _settle)
    last: JobResult | None = None  # the last out-of-memory result
    started: float = 0.0

    def count(self, kind: str) -> int:
        return sum(loss.kind == kind for loss in self.losses)


@dataclass(eq=False)
class _Slot:
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


_INFRA_TEXT = re.compile(r"owner has died|owner's node|node (it was running on )?(is|was) (dead|preempted|removed"
                         r"|terminated)|its node (has )?died|node has (died|crashed)|node .* has been marked dead",
                         re.IGNORECASE)


class RayExecutor:
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
        self._slots: list[_Slot] = []
        self._queue: collections.deque[_Pending] = collections.deque()
        self._inflight: dict[Any, tuple[_Pending, _Slot]] = {}
        self._unresolved: set[_Pending] = set()
        self._kills: list[Any] = []  # actors to kill (and so restart) once the lock is released
        self._held: list[_Pending] = []  # jobs awaiting the fate of the worker they last lost (_settle)
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
            raise ConfigError(Problem("--ray-sources", f"unknown mode '{sources}'", f"use one of {', '.join(SOURCE_MODES)}"))
        want_cpus = None
        if workers is not None and address is None and not os.environ.get("RAY_ADDRESS"):
            want_cpus = max(os.cpu_count() or 1, workers * cpus_per_worker)
        self._owns_ray = connect(address, num_cpus=want_cpus, num_gpus=num_gpus, dashboard=dashboard, log_dir=log_dir)
        if self._owns_ray:
            self._local_procs = _local_processes()
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
            from evomerge.search.suite_eval import _suite_factory

            suite = ray.put(_suite_factory({k: v for k, v in evaluation.items() if k != "kind"}).suite)
        # max_concurrency=2: ``info`` answers in a second thread while ``run`` is busy (the
        # dispatcher never sends an actor a second job)
        actor_cls = ray.remote(_Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                max_restarts=max_restarts, max_task_retries=0, max_concurrency=2)
        now = time.monotonic()
        self._slots = [_Slot(i, actor_cls.remote(i, evaluation, evaluator_factory, residency, fused, suite),
                             since=now, answered=now) for i in range(int(workers))]
        for s in self._slots:
            s.ping, s.ping_sent = s.actor.info.remote(), now
        self.capacity = len(self._slots)
        self._published: dict[str, Any] = {}
        self._lost = _lost_errors()
        self.started = time.time()
        self._beat = time.monotonic()  # the dispatcher's last sign of life
        self._gcs_ok = time.monotonic()  # the GCS's last answer
        self._gcs_error = ""
        self._node_dead: str | None = None
        for name, target in (("dispatch", self._loop), ("watchdog", self._watch), ("gcs-probe", self._probe)):
            t = threading.Thread(target=target, name=f"evomerge-ray-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        self._thread = self._threads[0]

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

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets the :class:`JobResult`, or :class:`RunInterrupted` when the
        cluster can no longer run it. Raises :class:`RunInterrupted` once that has happened."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            if self._broken is not None:
                raise self._interrupted(0)
            if self._stop:
                raise RuntimeError("the Ray executor was shut down")
            p = _Pending(job, fut, started=time.perf_counter())
            self._unresolved.add(p)
            self._queue.append(p)
            self._lock.notify_all()
        return fut

    def map(self, jobs: list[Job]) -> list[JobResult]:
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
            for p in list(self._unresolved):
                self._resolve(p, exc=CancelledError("the Ray executor was shut down"))
            self._queue.clear()
            self._inflight.clear()
            self._lock.notify_all()
        slots, owns = list(self._slots), self._owns_ray
        self._owns_ray = False
        if not (slots or owns):
            return
        # the raylet's children (agents, workers) of a local instance we started: killed after
        # ray.shutdown if a dead or hung raylet left them behind
        strays = _descendants(self._local_procs) if owns else []

        def teardown() -> None:
            import ray

            if ray.is_initialized():
                for s in slots:
                    try:
                        ray.kill(s.actor, no_restart=True)
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

                _kill_local(self._local_procs)
                atexit.unregister(ray.shutdown)  # it would block the interpreter's exit the same way
        if strays:
            _kill_strays(strays, grace=0.0 if t.is_alive() else 2.0)
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

    def _resolve(self, p: _Pending, res: JobResult | None = None, exc: BaseException | None = None) -> None:
        """Resolve ``p``'s future, once (callers hold the lock)."""
        self._unresolved.discard(p)
        if p.future.done():
            return
        if exc is not None:
            p.future.set_exception(exc)
        else:
            p.future.set_result(res)

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
            for p in todo:
                self._resolve(p, exc=self._interrupted(len(todo)))
            self._queue.clear()
            self._inflight.clear()
            self._lock.notify_all()

    # ------------------------------------------------------------------------------ dispatching

    def _publish(self, ref: str) -> Any:
        """The files of model folder ``ref`` in the object store (once)."""
        import hashlib

        import ray

        if ref not in self._published:
            root = Path(ref)
            files = {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}
            h = hashlib.sha256(str(root.resolve()).encode())
            for name, data in files.items():
                h.update(name.encode() + len(data).to_bytes(8, "little") + data[:4096] + data[-4096:])
            self._published[ref] = ray.put({"key": h.hexdigest()[:24], "files": files})
        return self._published[ref]

    def _sources(self, job: Job) -> dict[str, Any] | None:
        if self.sources != "object-store" or job.recipe is None:
            return None
        from evomerge.recipe import model_refs

        refs = set(model_refs(job.recipe)) | ({job.recipe.tokenizer} if job.recipe.tokenizer else set())
        return {r: self._publish(r) for r in refs if Path(r).is_dir()}

    def _loop(self) -> None:
        """The dispatcher thread. Ray calls are made without the lock held, so a call that blocks
        (a vanished raylet or GCS) never blocks ``submit`` or the watchdog."""
        import ray

        try:
            while True:
                now = self._beat = time.monotonic()
                with self._lock:
                    if self._stop or self._broken is not None:
                        return
                    self._settle(now)
                    self._check_deadlines(now)
                    if self._broken is not None:
                        return
                    assign = []
                    for s in self._slots:
                        if s.state == "idle" and self._queue:
                            p = self._queue.popleft()
                            s.state, p.attempts = "busy", p.attempts + 1
                            assign.append((s, p))
                    ping = [s for s in self._slots if s.ping is None and s.state != "dead" and now >= s.ping_at]
                    kills, self._kills = self._kills, []
                for actor in kills:
                    try:
                        ray.kill(actor, no_restart=False)  # Ray restarts it
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                for s, p in assign:
                    try:
                        ref = s.actor.run.remote(p.job, self._sources(p.job))
                    except Exception as err:  # noqa: BLE001 - e.g. a source that cannot be sent
                        with self._lock:
                            s.state = "idle" if s.state == "busy" else s.state
                            self._resolve(p, JobResult(p.job.key, None, f"cannot send the job to Ray: {_reason(err)}",
                                                       time.perf_counter() - p.started, f"ray:{s.index}"))
                        continue
                    with self._lock:
                        if not p.future.done():
                            self._inflight[ref] = (p, s)
                            s.job_ref = ref
                for s in ping:
                    sent = time.monotonic()
                    ref = s.actor.info.remote()
                    with self._lock:
                        s.ping, s.ping_sent = ref, sent
                with self._lock:
                    pings = {s.ping: s for s in self._slots if s.ping is not None}
                    waiting = list(self._inflight) + list(pings)
                    if not waiting:
                        self._lock.wait(0.1)
                        continue
                self._beat = time.monotonic()
                ready, _ = ray.wait(waiting, num_returns=1, timeout=0.2)
                got = []
                for ref in ready:
                    try:
                        got.append((ref, ray.get(ref), None))
                    except Exception as err:  # noqa: BLE001 - sorted out below
                        got.append((ref, None, err))
                dead_nodes = self._dead_node_ids() if any(e is not None for *_, e in got) else set()
                self._dead_nodes |= dead_nodes
                with self._lock:
                    if self._stop or self._broken is not None:
                        return
                    for ref, value, err in got:
                        if ref in self._inflight:
                            p, s = self._inflight.pop(ref)
                            self._on_result(ref, p, s, value, err, dead_nodes)
                        elif ref in pings and pings[ref].ping is ref:
                            self._on_ping(pings[ref], value, err, dead_nodes)
                    self._check_broken()
        except BaseException as err:  # noqa: BLE001 - a dispatcher that dies must not leave waiters hanging
            self._break(f"the Ray dispatcher failed: {_reason(err, 2000)}")

    def _on_ping(self, slot: _Slot, value, err: BaseException | None, dead_nodes: set[str]) -> None:
        from ray.exceptions import ActorUnavailableError

        now = time.monotonic()
        slot.ping = None
        if not isinstance(err, self._lost) or type(err).__name__ == "ActorUnavailableError":
            slot.died_ping = False
        if err is None:
            if slot.state in ("lost", "gone") and slot.ping_sent < slot.since:
                slot.ping_at = now  # answered by the process that was lost since: ask the new one
                return
            slot.info, slot.answered, slot.ping_at = value, now, now + self.ping_interval
            if slot.state == "starting":
                slot.startup = now - slot.since
                slot.state = "idle"
            elif slot.state in ("lost", "gone"):
                self.events.append({"event": "worker back", "worker": slot.index, "after_s": now - slot.since})
                slot.state = "idle"
            return
        if slot.state == "dead":
            return
        if isinstance(err, ActorUnavailableError):  # restarting, or unreachable for now: ask again shortly
            slot.ping_at = now + 0.5
            if slot.state == "idle":
                self._mark_lost(slot, f"worker {slot.index} is unavailable: {_reason(err)}", now)
            return
        if isinstance(err, self._lost) and not getattr(err, "actor_init_failed", False):
            why = (f"worker {slot.index} (pid {slot.info.get('pid')}) is dead"
                   f"{' with its node' if self._infra(err, slot, dead_nodes) else ''}: {_reason(err, 2000)}")
            if not slot.died_ping:
                # a ping in flight when the process died fails so even if Ray restarts the actor; a
                # ping sent after that fails again only if the actor is dead for good
                slot.died_ping, slot.ping_at = True, now + 0.5
                if slot.state in ("idle", "starting"):
                    self._mark_lost(slot, why, now)
                return
            slot.deaths += 1
            slot.state, slot.why = "dead", why
            self.events.append({"event": "worker dead", "worker": slot.index, "reason": slot.why})
        else:  # the actor could not build its evaluator
            slot.state, slot.why = "dead", f"worker {slot.index} failed to start: {_last_line(err)}"
            self.events.append({"event": "worker failed to start", "worker": slot.index, "reason": slot.why,
                                "detail": _reason(err, 4000)})
        # a dead actor's running job is retried when its own result comes back (an error too)

    def _on_result(self, ref, p: _Pending, slot: _Slot, value, err: BaseException | None,
                   dead_nodes: set[str]) -> None:
        now = time.monotonic()
        current = slot.job_ref is ref  # else a late answer of a slot that has moved on (restarted, new job)
        if current:
            slot.job_ref = None
        if err is None:
            res, timings = value
            if current and slot.state == "busy":
                slot.state = "idle"
            slot.answered, slot.jobs, slot.busy = now, slot.jobs + 1, slot.busy + res.seconds
            self.timings[slot.index] = timings
            if res.error and OOM in res.error:
                p.last = res
                self._retry(p, slot, res.error, "candidate")
                return
            self._resolve(p, res)
            return
        if isinstance(err, self._lost):
            slot.deaths += 1
            infra = self._infra(err, slot, dead_nodes)
            what = "was lost with its node" if infra else "died"
            reason = f"worker {slot.index} (pid {slot.info.get('pid')}) {what}: {_reason(err)}"
            if current and slot.state == "busy":
                self._mark_lost(slot, reason, now)
            self._retry(p, slot, reason, "infra" if infra else "unclear")
            return
        # e.g. a job that cannot be unpickled on the worker: the candidate's failure
        if current and slot.state == "busy":
            slot.state = "idle"
        self._resolve(p, JobResult(p.job.key, None, f"Ray task failed: {_reason(err)}",
                                   time.perf_counter() - p.started, f"ray:{slot.index}"))

    def _mark_lost(self, slot: _Slot, why: str, now: float) -> None:
        slot.state, slot.since, slot.why = "lost", now, why
        slot.ping_at = min(slot.ping_at, now + 0.5) if slot.ping is None else slot.ping_at

    def _retry(self, p: _Pending, slot: _Slot, reason: str, kind: str) -> None:
        """Record a lost attempt of ``p`` and queue it again, or give up (see :meth:`_decide`)."""
        p.losses.append(_Loss(slot, slot.info.get("node"), time.monotonic(), kind, reason))
        self._decide(p)

    def _decide(self, p: _Pending) -> None:
        """Queue ``p`` again, or give up: a candidate that keeps crashing its worker fails (its
        trial is recorded as failed); a job that keeps losing its worker to the infrastructure is
        interrupted (resume runs it again). Before failing a job for an unclear loss, the fate of
        that worker is awaited (held, see :meth:`_settle`): back on its node, the loss was the
        candidate's; its node dead, or not back within the restart deadline, it was not."""
        for loss in p.losses:  # what the GCS has learnt since
            if loss.kind == "unclear" and loss.node and loss.node in self._dead_nodes:
                loss.kind = "infra"
        last = p.losses[-1]
        blamed = p.count("candidate") + p.count("unclear")
        if blamed > self.max_retries and last.kind == "unclear" and not self._back(last):
            if p.held is None:
                p.held = time.monotonic()
                self._held.append(p)
            return
        if blamed > self.max_retries:
            self.events.append({"event": "gave up", "key": p.job.key, "attempts": p.attempts, "reason": last.reason})
            msg = last.reason if p.attempts == 1 else f"failed {p.attempts} times; last: {last.reason}"
            self._resolve(p, JobResult(p.job.key, None, msg, time.perf_counter() - p.started,
                                       p.last.worker if p.last is not None and last.kind == "candidate"
                                       else f"ray:{last.slot.index}"))
            return
        if p.count("infra") > self.max_retries:
            what = (f"job {p.job.key!r} lost its worker {p.count('infra')} times to infrastructure failures; "
                    f"last: {last.reason}")
            self.events.append({"event": "interrupted job", "key": p.job.key, "reason": what})
            self._resolve(p, exc=self._interrupted(1, what))
            return
        self.events.append({"event": "retry", "key": p.job.key, "attempt": p.attempts + 1, "reason": last.reason,
                            "infrastructure": last.kind == "infra"})
        self._queue.appendleft(p)

    def _back(self, loss: _Loss) -> bool:
        """Whether the worker of an unclear loss answered again since, on the same node."""
        s = loss.slot
        return s.answered > loss.at and s.state in ("idle", "busy") and s.info.get("node") == loss.node

    def _settle(self, now: float) -> None:
        """Decide the held jobs whose last worker's fate is known (callers hold the lock)."""
        for p in list(self._held):
            if p.future.done():
                self._held.remove(p)
                continue
            last = p.losses[-1]
            if last.node and last.node in self._dead_nodes or last.slot.state == "dead" \
                    or now - p.held > self._restart_deadline(last.slot):
                last.kind = "infra"  # its node died, or the worker never came back
            elif not self._back(last):
                continue
            self._held.remove(p)
            p.held = None
            self._decide(p)

    def _check_deadlines(self, now: float) -> None:
        """Starting, restarting and silent actors past their deadlines (callers hold the lock)."""
        for s in self._slots:
            if s.state == "starting" and now - s.since > self.start_timeout:
                self._gone(s, f"worker {s.index} did not start within {self.start_timeout:g} s "
                              "(no free resources for it, or its evaluator takes longer to build)")
            elif s.state == "lost" and now - s.since > self._restart_deadline(s):
                self._gone(s, f"worker {s.index} did not come back within {self._restart_deadline(s):.0f} s "
                              f"of being lost ({s.why})")
            elif s.state in ("idle", "busy") and now - s.answered > self.ping_timeout:
                why = f"worker {s.index} (pid {s.info.get('pid')}) did not answer for {self.ping_timeout:g} s"
                self.events.append({"event": "worker unresponsive", "worker": s.index, "reason": why})
                for ref, (p, slot) in list(self._inflight.items()):
                    if slot is s:
                        del self._inflight[ref]
                        self._retry(p, s, why, "unclear")
                self._mark_lost(s, why, now)
                s.ping, s.job_ref = None, None
                self._kills.append(s.actor)
        self._check_broken()

    def _restart_deadline(self, s: _Slot) -> float:
        return self.restart_timeout + 2 * (s.startup if s.startup is not None else 0.0)

    def _gone(self, s: _Slot, why: str) -> None:
        s.state, s.why = "gone", why
        self.events.append({"event": "worker gone", "worker": s.index, "reason": why})

    def _check_broken(self) -> None:
        if self._slots and all(s.state in ("dead", "gone") for s in self._slots):
            whys = [s.why if len(s.why) <= 400 else s.why[:397] + "..." for s in self._slots[:3]]
            more = f"; and {len(self._slots) - 3} more" if len(self._slots) > 3 else ""
            self._break(f"no Ray worker is left ({'; '.join(whys)}{more})")

    def _infra(self, err: BaseException, slot: _Slot, dead_nodes: set[str]) -> bool:
        """Whether a worker was lost to the infrastructure (its node, raylet or owner died) rather
        than, possibly, to its candidate (a crash or kill on a live node, Ray's OOM killer)."""
        import ray.exceptions as rex

        kinds = tuple(getattr(rex, n) for n in ("NodeDiedError", "LocalRayletDiedError", "OwnerDiedError")
                      if isinstance(getattr(rex, n, None), type))
        if isinstance(err, kinds) or getattr(err, "preempted", False):
            return True
        node = slot.info.get("node")
        return bool(node and node in dead_nodes) or bool(_INFRA_TEXT.search(str(err)))

    def _dead_node_ids(self) -> set[str]:
        """Nodes the GCS reports dead (asked now, bounded; else the probe's last answer)."""
        gcs = _gcs_client()
        if gcs is not None:
            try:
                return _gcs_dead_nodes(gcs, timeout=min(5.0, self.gcs_timeout))
            except Exception:  # noqa: BLE001 - unreachable: the probe's view
                pass
        return set(self._dead_nodes)

    # ------------------------------------------------------------------------------ watchdogs

    def _watch(self) -> None:
        """Breaks the executor when the local instance's processes exit, the dispatcher stalls in a
        Ray call, or the GCS stops answering. Never calls Ray."""
        tick = max(0.05, min(0.5, self.stall_timeout / 4, self.gcs_timeout / 4))
        while True:
            time.sleep(tick)
            if self._stop or self._broken is not None:
                return
            now = time.monotonic()
            reason = None
            for name, proc in self._local_procs:
                rc = proc.poll()
                if rc is not None:
                    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
                    reason = f"the local Ray instance's {name} (pid {proc.pid}) {how}"
                    if name == "raylet":
                        reason += (": the node and its workers are gone (a raylet also stops when its "
                                   "dashboard agent or runtime-env agent dies)")
                    break
            if reason is None and self._node_dead:
                reason = self._node_dead
            if reason is None and not self._threads[0].is_alive():
                reason = "the Ray dispatcher thread ended unexpectedly"
            if reason is None and now - self._beat > self.stall_timeout:
                reason = (f"a Ray call has not returned for {now - self._beat:.0f} s (stall_timeout "
                          f"{self.stall_timeout:g} s): the Ray cluster (raylet or GCS) is unreachable")
            if reason is None and now - self._gcs_ok > self.gcs_timeout:
                reason = (f"the Ray GCS has not answered for {now - self._gcs_ok:.0f} s (gcs_timeout "
                          f"{self.gcs_timeout:g} s): the cluster's head is gone or unreachable"
                          + (f"; last error: {self._gcs_error}" if self._gcs_error else ""))
            if reason is not None:
                self._break(reason)
                return

    def _probe(self) -> None:
        """Asks the GCS every few seconds which nodes are alive (with a timeout): a GCS that does
        not answer, or this driver's node marked dead, is seen by the watchdog."""
        import ray

        gcs = _gcs_client()
        try:
            me = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - Ray client mode: no GCS access from here
            me = None
        if gcs is None:
            self._gcs_ok = float("inf")  # not observable from this process (Ray client mode)
            return
        interval = max(0.05, min(5.0, self.gcs_timeout / 6))
        while not self._stop and self._broken is None:
            try:
                dead = _gcs_dead_nodes(gcs, timeout=max(0.1, min(5.0, self.gcs_timeout / 3)))
                self._gcs_ok, self._gcs_error, self._dead_nodes = time.monotonic(), "", dead
                if me and me in dead:
                    self._node_dead = (f"this driver's Ray node ({me[:12]}) was marked dead: its raylet is "
                                       "gone, and with it every worker the driver owns")
            except Exception as err:  # noqa: BLE001 - counted by the watchdog
                self._gcs_error = _reason(err)
            time.sleep(interval)


def _gcs_client():
    try:
        from ray._private.worker import global_worker

        return getattr(global_worker, "gcs_client", None)
    except Exception:  # noqa: BLE001 - private API moved, or Ray client mode
        return None


def _gcs_dead_nodes(gcs, timeout: float) -> set[str]:
    """Hex ids of the nodes the GCS lists as not alive."""
    infos = gcs.get_all_node_info(timeout=timeout)
    return {nid.hex() for nid, info in infos.items() if info.state != 0}  # 0: GcsNodeInfo.ALIVE


def _local_processes() -> list[tuple[str, Any]]:
    """``(name, Popen)`` of the local instance's ``gcs_server`` and ``raylet`` (this process started them)."""
    try:
        from ray._private.worker import _global_node

        return [(name, info.process) for name in ("gcs_server", "raylet")
                for info in _global_node.all_processes.get(name, []) if info.process is not None]
    except Exception:  # noqa: BLE001 - private API moved: the GCS probe still sees a dead instance
        return []


def _kill_local(procs: list[tuple[str, Any]]) -> None:
    """SIGKILL every process of the local instance this executor started (a blocked ``ray.shutdown``)."""
    try:
        from ray._private.worker import _global_node

        every = [info.process for infos in _global_node.all_processes.values() for info in infos]
    except Exception:  # noqa: BLE001
        every = [p for _, p in procs]
    for proc in every:
        try:
            if proc is not None and proc.poll() is None:
                proc.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _descendants(procs: list[tuple[str, Any]]) -> list[Any]:
    """The processes the local instance's raylet started (its agents and workers), as psutil handles."""
    try:
        import psutil

        out = []
        for name, proc in procs:
            if name == "raylet" and proc.poll() is None:
                out += psutil.Process(proc.pid).children(recursive=True)
        return out
    except Exception:  # noqa: BLE001 - psutil missing or the raylet just exited
        return []


def _kill_strays(procs: list[Any], grace: float = 2.0) -> None:
    """SIGKILL those of ``procs`` still running ``grace`` seconds after ``ray.shutdown``."""
    try:
        import psutil

        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001 - cleanup must not fail a shutdown
        pass


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(err: BaseException, size: int = 300) -> str:
    text = " ".join(_ANSI.sub("", str(err)).split())
    return f"{type(err).__name__}: {text}"[:size]


def _last_line(err: BaseException, size: int = 500) -> str:
    """The last line of an error's text: for an actor whose ``__init__`` raised, the exception
    (``RuntimeError: ...``) at the end of the traceback Ray wraps it in."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:size]
