"""Liveness of the Ray executor's actors and cluster: ping answers, start / restart / silence
deadlines, losses told apart (candidate or infrastructure), the watchdog thread (local instance's
processes, a stalled dispatcher) and the GCS probe. A part of
:class:`~evomerge.workers.ray_executor.RayExecutor`."""

from __future__ import annotations

import time

from evomerge.workers.ray_errors import INFRA_TEXT, last_line, failure_reason
from evomerge.workers.ray_state import WorkerSlot


class Watchdog:
    """The liveness methods of :class:`~evomerge.workers.ray_executor.RayExecutor` (its state)."""

    def _on_ping(self, slot: WorkerSlot, value, err: BaseException | None, dead_nodes: set[str]) -> None:
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
                self._mark_lost(slot, f"worker {slot.index} is unavailable: {failure_reason(err)}", now)
            return
        if isinstance(err, self._lost) and not getattr(err, "actor_init_failed", False):
            why = (f"worker {slot.index} (pid {slot.info.get('pid')}) is dead"
                   f"{' with its node' if self._infra(err, slot, dead_nodes) else ''}: {failure_reason(err, 2000)}")
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
            slot.state, slot.why = "dead", f"worker {slot.index} failed to start: {last_line(err)}"
            self.events.append({"event": "worker failed to start", "worker": slot.index, "reason": slot.why,
                                "detail": failure_reason(err, 4000)})
        # a dead actor's running job is retried when its own result comes back (an error too)

    def _mark_lost(self, slot: WorkerSlot, why: str, now: float) -> None:
        slot.state, slot.since, slot.why = "lost", now, why
        slot.ping_at = min(slot.ping_at, now + 0.5) if slot.ping is None else slot.ping_at

    def _check_deadlines(self, now: float) -> None:
        """Starting, restarting and silent actors past their deadlines (callers hold the lock)."""
        for worker_slot in self._slots:
            if worker_slot.state == "starting" and now - worker_slot.since > self.start_timeout:
                self._gone(worker_slot, f"worker {worker_slot.index} did not start within {self.start_timeout:g} s "
                              "(no free resources for it, or its evaluator takes longer to build)")
            elif worker_slot.state == "lost" and now - worker_slot.since > self._restart_deadline(worker_slot):
                self._gone(worker_slot, f"worker {worker_slot.index} did not come back within "
                           f"{self._restart_deadline(worker_slot):.0f} s of being lost ({worker_slot.why})")
            elif worker_slot.state in ("idle", "busy") and now - worker_slot.answered > self.ping_timeout:
                why = (f"worker {worker_slot.index} (pid {worker_slot.info.get('pid')}) did not answer for "
                       f"{self.ping_timeout:g} s")
                self.events.append({"event": "worker unresponsive", "worker": worker_slot.index, "reason": why})
                for ref, (queued, slot) in list(self._inflight.items()):
                    if slot is worker_slot:
                        del self._inflight[ref]
                        self._retry(queued, worker_slot, why, "unclear")
                self._mark_lost(worker_slot, why, now)
                worker_slot.ping, worker_slot.job_ref = None, None
                self._kills.append(worker_slot.actor)
        self._check_broken()

    def _restart_deadline(self, worker_slot: WorkerSlot) -> float:
        return self.restart_timeout + 2 * (worker_slot.startup if worker_slot.startup is not None else 0.0)

    def _gone(self, worker_slot: WorkerSlot, why: str) -> None:
        worker_slot.state, worker_slot.why = "gone", why
        self.events.append({"event": "worker gone", "worker": worker_slot.index, "reason": why})

    def _check_broken(self) -> None:
        if self._slots and all(s.state in ("dead", "gone") for s in self._slots):
            whys = [s.why if len(s.why) <= 400 else s.why[:397] + "..." for s in self._slots[:3]]
            more = f"; and {len(self._slots) - 3} more" if len(self._slots) > 3 else ""
            self._break(f"no Ray worker is left ({'; '.join(whys)}{more})")

    def _infra(self, err: BaseException, slot: WorkerSlot, dead_nodes: set[str]) -> bool:
        """Whether a worker was lost to the infrastructure (its node, raylet or owner died) rather
        than, possibly, to its candidate (a crash or kill on a live node, Ray's OOM killer)."""
        import ray.exceptions as rex

        kinds = tuple(getattr(rex, n) for n in ("NodeDiedError", "LocalRayletDiedError", "OwnerDiedError")
                      if isinstance(getattr(rex, n, None), type))
        if isinstance(err, kinds) or getattr(err, "preempted", False):
            return True
        node = slot.info.get("node")
        return bool(node and node in dead_nodes) or bool(INFRA_TEXT.search(str(err)))

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
            reason = self._local_exit() or self._node_dead
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

    def _local_exit(self) -> str | None:
        """Why the local instance this executor started is gone (a process of it exited), or None."""
        for name, proc in self._local_procs:
            rc = proc.poll()
            if rc is None:
                continue
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            reason = f"the local Ray instance's {name} (pid {proc.pid}) {how}"
            if name == "raylet":
                reason += (": the node and its workers are gone (a raylet also stops when its "
                           "dashboard agent or runtime-env agent dies)")
            return reason
        return None

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
                self._gcs_error = failure_reason(err)
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
