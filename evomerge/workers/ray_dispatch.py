"""The Ray executor's dispatcher: the thread that hands queued jobs to idle actors, sends pings,
collects results, and retries or gives up on lost jobs. A part of
:class:`~evomerge.workers.ray_executor.RayExecutor`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evomerge.workers.base import CandidateJob, JobResult
from evomerge.workers.ray_errors import OOM, failure_reason
from evomerge.workers.ray_state import WorkerLoss, PendingJob, WorkerSlot


class Dispatcher:
    """The dispatching methods of :class:`~evomerge.workers.ray_executor.RayExecutor` (its state)."""

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

    def _sources(self, job: CandidateJob) -> dict[str, Any] | None:
        if self.sources != "object-store" or job.recipe is None:
            return None
        from evomerge.recipe import model_refs

        refs = set(model_refs(job.recipe))  # the tokenizer source model included
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
                    for worker_slot in self._slots:
                        if worker_slot.state == "idle" and self._queue:
                            queued = self._queue.popleft()
                            worker_slot.state, queued.attempts = "busy", queued.attempts + 1
                            assign.append((worker_slot, queued))
                    ping = [s for s in self._slots if s.ping is None and s.state != "dead" and now >= s.ping_at]
                    kills, self._kills = self._kills, []
                for actor in kills:
                    try:
                        ray.kill(actor, no_restart=False)  # Ray restarts it
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                for worker_slot, queued in assign:
                    try:
                        ref = worker_slot.actor.run.remote(queued.job, self._sources(queued.job))
                    except Exception as err:  # noqa: BLE001 - e.g. a source that cannot be sent
                        with self._lock:
                            worker_slot.state = "idle" if worker_slot.state == "busy" else worker_slot.state
                            error = f"cannot send the job to Ray: {failure_reason(err)}"
                            seconds = time.perf_counter() - queued.started
                            self._resolve(queued, JobResult(queued.job.key, None, error, seconds, f"ray:{worker_slot.index}"))
                        continue
                    with self._lock:
                        if not queued.future.done():
                            self._inflight[ref] = (queued, worker_slot)
                            worker_slot.job_ref = ref
                for worker_slot in ping:
                    sent = time.monotonic()
                    ref = worker_slot.actor.info.remote()
                    with self._lock:
                        worker_slot.ping, worker_slot.ping_sent = ref, sent
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
                            queued, worker_slot = self._inflight.pop(ref)
                            self._on_result(ref, queued, worker_slot, value, err, dead_nodes)
                        elif ref in pings and pings[ref].ping is ref:
                            self._on_ping(pings[ref], value, err, dead_nodes)
                    self._check_broken()
        except BaseException as err:  # noqa: BLE001 - a dispatcher that dies must not leave waiters hanging
            self._break(f"the Ray dispatcher failed: {failure_reason(err, 2000)}")

    def _on_result(self, ref, queued: PendingJob, slot: WorkerSlot, value, err: BaseException | None,
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
                queued.last = res
                self._retry(queued, slot, res.error, "candidate")
                return
            self._resolve(queued, res)
            return
        if isinstance(err, self._lost):
            slot.deaths += 1
            infra = self._infra(err, slot, dead_nodes)
            what = "was lost with its node" if infra else "died"
            reason = f"worker {slot.index} (pid {slot.info.get('pid')}) {what}: {failure_reason(err)}"
            if current and slot.state == "busy":
                self._mark_lost(slot, reason, now)
            self._retry(queued, slot, reason, "infra" if infra else "unclear")
            return
        # e.g. a job that cannot be unpickled on the worker: the candidate's failure
        if current and slot.state == "busy":
            slot.state = "idle"
        self._resolve(queued, JobResult(queued.job.key, None, f"Ray task failed: {failure_reason(err)}",
                                   time.perf_counter() - queued.started, f"ray:{slot.index}"))

    def _retry(self, queued: PendingJob, slot: WorkerSlot, reason: str, kind: str) -> None:
        """Record a lost attempt of ``queued`` and queue it again, or give up (see :meth:`_decide`)."""
        queued.losses.append(WorkerLoss(slot, slot.info.get("node"), time.monotonic(), kind, reason))
        self._decide(queued)

    def _decide(self, queued: PendingJob) -> None:
        """Queue ``queued`` again, or give up: a candidate that keeps crashing its worker fails (its
        trial is recorded as failed); a job that keeps losing its worker to the infrastructure is
        interrupted (resume runs it again). Before failing a job for an unclear loss, the fate of
        that worker is awaited (held, see :meth:`_settle`): back on its node, the loss was the
        candidate's; its node dead, or not back within the restart deadline, it was not."""
        for loss in queued.losses:  # what the GCS has learnt since
            if loss.kind == "unclear" and loss.node and loss.node in self._dead_nodes:
                loss.kind = "infra"
        last = queued.losses[-1]
        blamed = queued.count("candidate") + queued.count("unclear")
        if blamed > self.max_retries and last.kind == "unclear" and not self._back(last):
            if queued.held is None:
                queued.held = time.monotonic()
                self._held.append(queued)
            return
        if blamed > self.max_retries:
            self.events.append({"event": "gave up", "key": queued.job.key, "attempts": queued.attempts,
                                "reason": last.reason})
            msg = last.reason if queued.attempts == 1 else f"failed {queued.attempts} times; last: {last.reason}"
            self._resolve(queued, JobResult(queued.job.key, None, msg, time.perf_counter() - queued.started,
                                       queued.last.worker if queued.last is not None and last.kind == "candidate"
                                       else f"ray:{last.slot.index}"))
            return
        if queued.count("infra") > self.max_retries:
            what = (f"job {queued.job.key!r} lost its worker {queued.count('infra')} times to infrastructure failures; "
                    f"last: {last.reason}")
            self.events.append({"event": "interrupted job", "key": queued.job.key, "reason": what})
            self._resolve(queued, exc=self._interrupted(1, what))
            return
        self.events.append({"event": "retry", "key": queued.job.key, "attempt": queued.attempts + 1,
                            "reason": last.reason, "infrastructure": last.kind == "infra"})
        self._queue.appendleft(queued)

    def _back(self, loss: WorkerLoss) -> bool:
        """Whether the worker of an unclear loss answered again since, on the same node."""
        slot = loss.slot
        return slot.answered > loss.at and slot.state in ("idle", "busy") and slot.info.get("node") == loss.node

    def _settle(self, now: float) -> None:
        """Decide the held jobs whose last worker's fate is known (callers hold the lock)."""
        for queued in list(self._held):
            if queued.future.done():
                self._held.remove(queued)
                continue
            last = queued.losses[-1]
            if last.node and last.node in self._dead_nodes or last.slot.state == "dead" \
                    or now - queued.held > self._restart_deadline(last.slot):
                last.kind = "infra"  # its node died, or the worker never came back
            elif not self._back(last):
                continue
            self._held.remove(queued)
            queued.held = None
            self._decide(queued)
