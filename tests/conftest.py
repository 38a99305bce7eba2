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


def pytest_collection_modifyitems(config, items):
    """A test that starts a real Ray cluster or a vLLM engine takes tens of seconds: it is `slow` too,
    so the quick loop (`-m "not slow"`) leaves it out without listing every marker."""
    import pytest

    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.slow)
