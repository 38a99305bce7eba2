"""Executors: where candidates are scored. The search driver only sees the :class:`Executor`
protocol; :class:`InProcessExecutor` runs jobs in this process, a Ray executor (later) runs them on
actors that each build their own evaluator from the same factory."""

from evomerge.workers.base import Executor, InProcessExecutor, Job, JobResult, run_job

__all__ = ["Executor", "InProcessExecutor", "Job", "JobResult", "run_job"]
