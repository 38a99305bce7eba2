"""Searches on a real local Ray cluster (2 CPUs, 2 declared GPUs on a CPU machine): results equal
the in-process run's, a worker killed mid-candidate is restarted and the candidate retried (or the
trial failed with its reason), fractional GPUs are scheduled, and Ctrl-C leaves a resumable study."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.recipe import parse_recipe
from evomerge.search import resume_search, start_search
from evomerge.search.cli import search_command
from evomerge.evaluate.evaluators import WeightDistanceEvaluator
from evomerge.search.study import read_meta
from evomerge.workers.base import CandidateJob
from conftest import local_ray
from test_search_support import family, ps_space, target_model, write_space

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

DELAY = 0.5  # seconds per candidate of the slow evaluator: long enough to kill a worker mid-candidate


class SlowWeights(WeightDistanceEvaluator):
    def evaluate(self, recipe, **kw):
        time.sleep(DELAY)
        return super().evaluate(recipe, **kw)


def _slow(target: str, device: str) -> SlowWeights:
    return SlowWeights(target, device=device)


@pytest.fixture(scope="module")
def cluster():
    local_ray(num_cpus=2, num_gpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_world")
    fam = family(root / "fam")
    return fam, target_model(fam, root / "target")


def trials(study_dir: Path) -> list:
    meta = read_meta(study_dir)
    study = optuna.load_study(study_name=meta.study_name(meta.stages[-1]), storage=meta.storage)
    return study.get_trials()


def search_records(study_dir: Path) -> dict[int, tuple]:
    return {t.number: (t.state, t.params, t.values, t.user_attrs.get("cma"))
            for t in trials(study_dir) if t.user_attrs.get("kind") == "search"}


def free_gpus(expect: float, timeout: float = 30.0) -> float:
    """Declared GPUs not held by an actor (killed actors give theirs back asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        got = ray.available_resources().get("GPU", 0.0)
        if abs(got - expect) < 1e-6 or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _suite(root: Path) -> str:
    import json

    data = root / "data"
    data.mkdir()
    for split, off in (("search", 0), ("held-out", 50)):
        with open(data / f"ll.{split}.jsonl", "w") as fh:
            for i in range(6):
                fh.write(json.dumps({"prompt": f"a{i + off}:", "target": f"{i + off}"}) + "\n")
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny", "tasks": [
        {"name": "ll", "kind": "loglik", "data": {"search": "data/ll.search.jsonl",
                                                  "held-out": "data/ll.held-out.jsonl"}}]}))
    return str(suite)


def test_cli_workers_on_ray_equal_the_in_process_run(tmp_path, world, cluster):
    """`--workers 2` on Ray (resident suite evaluator, fake GPUs): same proposals, same scores."""
    fam, target = world
    space = ps_space(fam, target, objectives=[{"metric": "ll"}], optimizer={"popsize": 4, "seed": 5},
                     budget={"trials": 8}, baselines=False)
    space["evaluation"] = {"kind": "suite", "suite": _suite(tmp_path), "batch_size": 8}
    space["ps"]["method"] = "ties"
    path = write_space(tmp_path / "s.yaml", space)
    assert search_command(str(path), str(tmp_path / "ray"), workers=2, quiet=True,
                          ray={"max_retries": 1, "cpus_per_worker": 1.0}) == 0
    start_search(path, tmp_path / "local", progress=False)
    got, want = search_records(tmp_path / "ray"), search_records(tmp_path / "local")
    assert len(got) == 8 and got == want
    workers = {t.user_attrs["worker"].split(":")[1] for t in trials(tmp_path / "ray")}
    assert len(workers) == 2  # the population was spread over both workers
    assert free_gpus(2.0) == 2.0  # the CLI's executor gave its GPUs back


@pytest.fixture(scope="module")
def slow_executor(world, cluster):
    from evomerge.workers.ray_executor import RayExecutor

    fam, target = world
    ex = RayExecutor(evaluator_factory=functools.partial(_slow, target), workers=2, gpus_per_worker=0.5,
                     cpus_per_worker=0.5, max_retries=1)
    ex.wait_ready()
    yield ex
    ex.shutdown()


def test_fractional_fake_gpus_are_scheduled(slow_executor, world):
    from evomerge.errors import ConfigError
    from evomerge.workers.ray_executor import RayExecutor

    ws = slow_executor.workers()
    assert [w["state"] for w in ws] == ["idle", "idle"]
    assert all(w["gpu_ids"] and w["device"] == "cpu" for w in ws)  # a GPU reserved, torch runs on CPU
    assert free_gpus(1.0) == pytest.approx(1.0)  # 2 x 0.5 of the 2 declared
    with pytest.raises(ConfigError, match="need 2.5 GPUs"):
        RayExecutor(evaluator_factory=functools.partial(_slow, world[1]), workers=5, gpus_per_worker=0.5)


def _kill_when_busy(ex, done: threading.Event, killed: list) -> None:
    while not done.is_set():
        busy = [w for w in ex.workers() if w["state"] == "busy"]
        if busy:
            time.sleep(DELAY / 3)  # well inside the candidate
            os.kill(busy[0]["pid"], signal.SIGKILL)
            killed.append(busy[0]["pid"])
            return
        time.sleep(0.01)


def test_a_worker_killed_mid_candidate_is_restarted_and_the_candidate_retried(tmp_path, world, slow_executor):
    fam, target = world
    path = write_space(tmp_path / "s.yaml", ps_space(fam, target, optimizer={"popsize": 4, "seed": 2},
                                                     budget={"trials": 8}, baselines=False))
    ex = slow_executor
    done, killed = threading.Event(), []
    before = len(ex.events)
    killer = threading.Thread(target=_kill_when_busy, args=(ex, done, killed))
    killer.start()
    try:
        res = start_search(path, tmp_path / "ray", executor=ex, progress=False)
    finally:
        done.set()
        killer.join()
    assert killed and res.complete
    retries = [e for e in ex.events[before:] if e["event"] == "retry"]
    assert len(retries) == 1 and "died" in retries[0]["reason"]
    got = search_records(tmp_path / "ray")
    assert len(got) == 8 and all(state == TrialState.COMPLETE for state, *_ in got.values())
    start_search(path, tmp_path / "local", progress=False)  # same proposals and scores without Ray
    assert got == search_records(tmp_path / "local")

    # retries exhausted: the candidate comes back failed, with the reason; the worker is restarted
    ex.max_retries = 0
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_when_busy, args=(ex, done, killed))
    killer.start()
    recipe = parse_recipe(yaml.safe_load(trials(tmp_path / "ray")[0].user_attrs["recipe"]))
    fut = ex.submit(CandidateJob("k", recipe))
    r = fut.result(timeout=120)
    done.set()
    killer.join()
    assert not r.ok and "died" in r.error and killed
    after = ex.map([CandidateJob(i, recipe) for i in range(2)])  # the study would go on
    assert all(x.ok for x in after), [x.error for x in after]
    ex.wait_ready()
    assert {w["pid"] for w in ex.workers()}.isdisjoint(killed)  # restarted: a new process
    ex.max_retries = 1


def test_ctrl_c_stops_the_workers_and_leaves_a_resumable_study(tmp_path, world, slow_executor):
    fam, target = world
    budget = 40  # 18 s of slow candidates on 2 workers: the interrupt lands mid-search even on a loaded machine
    path = write_space(tmp_path / "s.yaml", ps_space(fam, target, optimizer={"popsize": 4, "seed": 3},
                                                     budget={"trials": budget}, baselines=False))
    ex, out = slow_executor, tmp_path / "study"
    main, lock, stop, sent = threading.main_thread().ident, threading.Lock(), [False], [None]

    def interrupt():
        while True:
            time.sleep(0.05)
            try:
                n = sum(t.state == TrialState.COMPLETE for t in trials(out))
            except Exception:  # noqa: BLE001 - the study is not created yet
                n = 0
            with lock:
                if stop[0]:
                    return
                if n >= 3:
                    signal.pthread_kill(main, signal.SIGINT)  # what Ctrl-C does
                    sent[0] = n
                    return

    t = threading.Thread(target=interrupt)
    t.start()
    raised = False
    try:
        try:
            start_search(path, out, executor=ex, progress=False)
        except KeyboardInterrupt:
            raised = True
        finally:
            with lock:
                stop[0] = True
            ex.shutdown()  # what the CLI does on the way out
    except KeyboardInterrupt:  # it landed on the way out
        raised = True
    finally:
        t.join()
    assert raised, f"the search ended without the interrupt (sent after {sent[0]} complete trials)"
    assert free_gpus(2.0) == pytest.approx(2.0)  # the workers are gone
    states = [t.state for t in trials(out)]
    assert TrialState.RUNNING not in states and 3 <= states.count(TrialState.COMPLETE) < budget
    res = resume_search(out, progress=False)  # in-process this time
    assert res.complete
    done = [t for t in trials(out) if t.state == TrialState.COMPLETE]
    assert len(done) == budget
