"""Executors: where candidates are scored. The search driver only sees the :class:`Executor`
protocol; :class:`InProcessExecutor` runs jobs in this process, :class:`ray_executor.RayExecutor` runs
them on Ray actors that each build their own resident evaluator."""

from evomerge.workers.base import Executor, InProcessExecutor, CandidateJob, JobResult, run_job

__all__ = ["Executor", "InProcessExecutor", "CandidateJob", "JobResult", "run_job"]
