import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def local_ray(address: str = "local", **kw) -> None:
    """Connect this process to Ray (a fresh local instance by default) with the environment the
    workers need (the repo and tests/ importable, offline, no auth); any earlier connection is shut
    down first (one Ray per process). Extra keywords go to ray.init."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "RAY_AUTH_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if address == "local":
        kw.setdefault("include_dashboard", False)
    ray.init(address=address, log_to_driver=False, logging_level="WARNING", runtime_env={"env_vars": env}, **kw)
