"""Candidates scored on Ray actors: one resident worker per GPU (or per CPU slot), fault tolerant.

Each actor builds its evaluator once from the search space's ``evaluation:`` mapping
(:func:`evomerge.workers.resident_eval.worker_evaluator`): the sources are read once onto its device
and every candidate is materialized into a reused in-memory model, scored, and sent back as a
:class:`~evomerge.workers.base.JobResult`. :class:`RayExecutor` implements the driver's executor
protocol (``capacity``, ``submit`` -> ``Future``, ``shutdown``): a dispatcher thread hands each
queued job to the next idle actor, so a CMA-ES population is spread over all workers and an
asynchronous sampler gets a free slot as soon as any worker finishes.

Faults. A job whose actor dies (process killed, node lost, Ray's memory monitor) or that fails with
an out-of-memory error is retried, on whichever actor is idle next, up to ``max_retries`` times;
then its result carries the reason as ``error`` and the driver records the trial as failed. Ray
restarts a dead actor (``max_restarts``); an actor is given jobs again only after it answers a
ping, so work never queues behind a restarting or unschedulable actor. Every submitted job's future
is resolved exactly once, so no trial is lost or counted twice. ``shutdown`` kills the actors and
cancels what is queued; the driver has already marked running trials as interrupted, so the study
resumes.

Sources reach workers as paths all nodes can read (``sources="shared"``, the default), or through
Ray's object store (``sources="object-store"``): the driver sends each model folder's files once
and every node unpacks them into a local cache; the task suite is then sent too.
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, Problem
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


@dataclass
class _Pending:
    job: Job
    future: Future
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    started: float = 0.0


@dataclass
class _Slot:
    index: int
    actor: Any
    state: str = "starting"  # starting -> idle <-> busy; lost (pinged until it answers); dead
    ping: Any = None
    ping_at: float = 0.0  # when to ask a restarting actor again
    info: dict[str, Any] = field(default_factory=dict)
    busy: float = 0.0  # seconds spent evaluating (as the worker measured)
    jobs: int = 0
    deaths: int = 0


class RayExecutor:
    """Runs jobs on Ray actors (see the module doc). ``capacity`` is the number of actors.

    ``evaluation``: the space's ``evaluation:`` mapping (each actor builds its evaluator from it), or
    ``evaluator_factory(device) -> Evaluator`` (a picklable callable). ``workers``: actors to start
    (default: one per GPU of the cluster, else 1). ``gpus_per_worker``: GPUs each actor reserves
    (fractions allowed; default 1 when the cluster has GPUs, else 0 = CPU actors).
    ``residency``: ``device`` (sources on the worker's device) or ``host`` (streamed per tensor).
    ``sources``: ``shared`` paths or ``object-store``. ``max_retries``: attempts after a worker loss
    or out-of-memory error. ``max_restarts``: restarts Ray grants each actor (-1: unlimited).
    """

    def __init__(self, evaluation: dict | None = None, *, evaluator_factory: Callable[[str], Any] | None = None,
                 workers: int | None = None, address: str | None = None, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1.0, residency: str = "device", sources: str = "shared",
                 max_retries: int = 2, max_restarts: int = -1, fused: bool | None = None,
                 dashboard: bool = False, log_dir: str | Path | None = None, num_gpus: float | None = None):
        import ray

        if (evaluation is None) == (evaluator_factory is None):
            raise ValueError("give either evaluation (the space's evaluation mapping) or evaluator_factory")
        if sources not in SOURCE_MODES:
            raise ConfigError(Problem("--ray-sources", f"unknown mode '{sources}'", f"use one of {', '.join(SOURCE_MODES)}"))
        want_cpus = None
        if workers is not None and address is None and not os.environ.get("RAY_ADDRESS"):
            want_cpus = max(os.cpu_count() or 1, workers * cpus_per_worker)
        self._owns_ray = connect(address, num_cpus=want_cpus, num_gpus=num_gpus, dashboard=dashboard, log_dir=log_dir)
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
        actor_cls = ray.remote(_Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                max_restarts=max_restarts, max_task_retries=0)
        self._slots = [_Slot(i, actor_cls.remote(i, evaluation, evaluator_factory, residency, fused, suite))
                       for i in range(int(workers))]
        for s in self._slots:
            s.ping = s.actor.info.remote()
        self.capacity = len(self._slots)
        self._published: dict[str, Any] = {}
        self._queue: collections.deque[_Pending] = collections.deque()
        self._inflight: dict[Any, tuple[_Pending, _Slot]] = {}
        self._lock = threading.Condition()
        self._stop = False
        self._lost = _lost_errors()
        self.events: list[dict[str, Any]] = []  # worker losses and retries, for reports and tests
        self.timings: dict[int, dict[str, float]] = {}  # per worker: materialize / load seconds
        self.started = time.time()
        self._thread = threading.Thread(target=self._loop, name="evomerge-ray-dispatch", daemon=True)
        self._thread.start()

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
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            if self._stop:
                raise RuntimeError("the Ray executor was shut down")
            self._queue.append(_Pending(job, fut, started=time.perf_counter()))
            self._lock.notify_all()
        return fut

    def map(self, jobs: list[Job]) -> list[JobResult]:
        return [f.result() for f in [self.submit(j) for j in jobs]]

    def shutdown(self) -> None:
        """Stop dispatching, cancel queued and running jobs, kill the actors (and the local Ray
        instance this executor started)."""
        import ray

        with self._lock if hasattr(self, "_lock") else _null():
            self._stop = True
            pending = list(getattr(self, "_queue", [])) + [p for p, _ in getattr(self, "_inflight", {}).values()]
            for p in pending:
                if not p.future.done():
                    p.future.set_exception(CancelledError("the Ray executor was shut down"))
            if hasattr(self, "_queue"):
                self._queue.clear()
                self._inflight.clear()
            if hasattr(self, "_lock"):
                self._lock.notify_all()
        for s in getattr(self, "_slots", []):
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if getattr(self, "_thread", None) is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    # ------------------------------------------------------------------------------ introspection

    def workers(self) -> list[dict[str, Any]]:
        """Each actor's state, pid, device, GPU ids, jobs run and busy seconds."""
        return [{"index": s.index, "state": s.state, "jobs": s.jobs, "busy_s": s.busy, "deaths": s.deaths, **s.info}
                for s in self._slots]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every actor has started or restarted (benchmarks exclude start-up)."""
        deadline = time.monotonic() + timeout
        while any(s.state in ("starting", "lost") for s in self._slots) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        wall = time.time() - self.started
        busy = sum(s.busy for s in self._slots)
        return {"workers": self.capacity, "jobs": sum(s.jobs for s in self._slots), "busy_s": busy,
                "wall_s": wall, "busy_fraction": busy / max(wall * self.capacity, 1e-9),
                "retries": sum(e["event"] == "retry" for e in self.events),
                "failed_after_retries": sum(e["event"] == "gave up" for e in self.events)}

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

    def _dispatch(self, slot: _Slot, p: _Pending) -> None:
        sources = None
        if self.sources == "object-store" and p.job.recipe is not None:
            from evomerge.recipe import model_refs

            refs = set(model_refs(p.job.recipe)) | ({p.job.recipe.tokenizer} if p.job.recipe.tokenizer else set())
            sources = {r: self._publish(r) for r in refs if Path(r).is_dir()}
        slot.state = "busy"
        p.attempts += 1
        self._inflight[slot.actor.run.remote(p.job, sources)] = (p, slot)

    def _loop(self) -> None:
        import ray

        while True:
            with self._lock:
                if self._stop:
                    return
                for s in self._slots:
                    if s.state == "idle" and self._queue:
                        self._dispatch(s, self._queue.popleft())
                    elif s.state == "lost" and s.ping is None and time.monotonic() >= s.ping_at:
                        s.ping = s.actor.info.remote()
                pings = {s.ping: s for s in self._slots if s.ping is not None}
                waiting = list(self._inflight) + list(pings)
                if not waiting:
                    self._lock.wait(0.1)
                    continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.2)
            with self._lock:
                if self._stop:
                    return
                for ref in ready:
                    if ref in pings:
                        self._on_ping(pings[ref], ref)
                    elif ref in self._inflight:
                        self._on_result(ref, *self._inflight.pop(ref))

    def _on_ping(self, slot: _Slot, ref) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError

        slot.ping = None
        try:
            slot.info = ray.get(ref)
            slot.state = "idle"
        except ActorUnavailableError:  # restarting: ask again shortly
            slot.ping_at = time.monotonic() + 0.5
        except self._lost as err:
            slot.deaths += 1
            slot.state = "dead"
            self.events.append({"event": "worker dead", "worker": slot.index, "reason": _reason(err, 2000)})
        except Exception as err:  # noqa: BLE001 - the actor could not build its evaluator
            slot.state = "dead"
            self.events.append({"event": "worker failed to start", "worker": slot.index, "reason": _reason(err, 2000)})
        if all(s.state == "dead" for s in self._slots):
            self._fail_queue(f"no Ray worker is alive; last: {self.events[-1]['reason']}")

    def _on_result(self, ref, p: _Pending, slot: _Slot) -> None:
        import ray

        try:
            res, timings = ray.get(ref)
        except self._lost as err:
            slot.deaths += 1
            slot.state = "lost"  # pinged until Ray has restarted it
            self._retry_or_fail(p, slot, f"worker {slot.index} (pid {slot.info.get('pid')}) died: {_reason(err)}")
            return
        except Exception as err:  # noqa: BLE001 - e.g. a job that cannot be unpickled on the worker
            slot.state = "idle"
            self._finish(p, JobResult(p.job.key, None, f"Ray task failed: {_reason(err)}",
                                      time.perf_counter() - p.started, f"ray:{slot.index}"))
            return
        slot.state, slot.jobs, slot.busy = "idle", slot.jobs + 1, slot.busy + res.seconds
        self.timings[slot.index] = timings
        if res.error and OOM in res.error:
            self._retry_or_fail(p, slot, res.error, last=res)
            return
        self._finish(p, res)

    def _retry_or_fail(self, p: _Pending, slot: _Slot, reason: str, last: JobResult | None = None) -> None:
        p.reasons.append(reason)
        if p.attempts <= self.max_retries:
            self.events.append({"event": "retry", "key": p.job.key, "attempt": p.attempts + 1, "reason": reason})
            self._queue.appendleft(p)
            return
        self.events.append({"event": "gave up", "key": p.job.key, "attempts": p.attempts, "reason": reason})
        msg = reason if p.attempts == 1 else f"failed {p.attempts} times; last: {reason}"
        self._finish(p, JobResult(p.job.key, None, msg, time.perf_counter() - p.started,
                                  last.worker if last else f"ray:{slot.index}"))

    def _finish(self, p: _Pending, res: JobResult) -> None:
        if not p.future.done():
            p.future.set_result(res)

    def _fail_queue(self, reason: str) -> None:
        while self._queue:
            p = self._queue.popleft()
            self._finish(p, JobResult(p.job.key, None, reason, 0.0, "ray"))


def _reason(err: BaseException, size: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:size]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
