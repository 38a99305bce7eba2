"""Connecting to Ray (or starting a local instance, its logs linked into the study folder), and
the processes of a local instance this driver started: watched while a search runs, killed when a
shutdown blocks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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


def local_processes() -> list[tuple[str, Any]]:
    """``(name, Popen)`` of the local instance's ``gcs_server`` and ``raylet`` (this process started them)."""
    try:
        from ray._private.worker import _global_node

        return [(name, info.process) for name in ("gcs_server", "raylet")
                for info in _global_node.all_processes.get(name, []) if info.process is not None]
    except Exception:  # noqa: BLE001 - private API moved: the GCS probe still sees a dead instance
        return []


def kill_local(procs: list[tuple[str, Any]]) -> None:
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


def descendants(procs: list[tuple[str, Any]]) -> list[Any]:
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


def kill_strays(procs: list[Any], grace: float = 2.0) -> None:
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
