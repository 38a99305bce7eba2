"""The Ray actor: one resident worker that builds its evaluator once, unpacks object-store
sources into a node-local cache, and scores jobs."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from evomerge.workers.base import CandidateJob, JobResult, run_job
from evomerge.workers.ray_errors import OOM


class RayWorker:
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
            from evomerge.evaluate.resident import worker_evaluator

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

    def run(self, job: CandidateJob, sources: dict[str, Any] | None = None) -> tuple[JobResult, dict[str, float]]:
        if sources:
            job = dataclasses.replace(job, recipe=_relocate(job.recipe, self._unpack(sources)))
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
