"""Faults of a real local Ray instance under a running search (`evomerge search --workers 2` in a
subprocess, the way a user runs it): a worker process killed mid-candidate is survived; a dead
dashboard agent or raylet (the node is gone), or the whole local instance gone, ends the driver
within a bounded time with exit status 3 (RunInterrupted), the trials it was running recorded as
interrupted (not failed), and `evomerge resume` finishes the study. A test process kills only the
processes of the Ray instance its own subprocess started (found as that process's descendants).

To land each fault mid-candidate deterministically, the workers are first frozen (SIGSTOP) once a
few trials are done: the trials they hold then stay RUNNING until the fault.

The last tests drive a RayExecutor from this process, on real actors: workers that cannot start, a
worker that never comes back (the restart deadline), a worker that stops answering (pings of busy
actors), and nodes lost one after the other (a two-node cluster on this machine). Each must end in
bounded time; none may hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.ray  # the subprocess tests (20-60 s each) are also marked slow

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "evals" / "zoo"
DATA = REPO / "evals" / "data"
BUDGET = 20
EXIT_WITHIN = 240  # seconds a driver gets to end after the fault (generous: a bound, not a speed test)


# ------------------------------------------------------------------------------------------ setup


def _space(root: Path) -> Path:
    """TIES over two zoo experts, scored by a tiny generation suite (6 search / 4 held-out items)."""
    data = root / "data"
    data.mkdir(parents=True)
    for split, n in (("search", 6), ("held-out", 4)):
        lines = (DATA / f"zoo_arith.{split}.jsonl").read_text().splitlines()[:n]
        (data / f"arith.{split}.jsonl").write_text("\n".join(lines) + "\n")
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny-arith", "tasks": [
        {"name": "arith", "kind": "generate", "max_new_tokens": 6, "until": ["\n"], "extract": {"rule": "raw"},
         "data": {"search": "data/arith.search.jsonl", "held-out": "data/arith.held-out.jsonl"}}]}))
    space = {
        "name": "faults", "kind": "ps", "seed": 0,
        "ps": {"base": str(ZOO / "base"),
               "sources": [{"name": "arith", "model": str(ZOO / "expert_arith")},
                           {"name": "reverse", "model": str(ZOO / "expert_reverse")}],
               "method": "ties", "params": {"weight": {"low": 0.0, "high": 1.5},
                                            "density": {"low": 0.2, "high": 1.0}, "lambda": 1.0}},
        "objectives": [{"metric": "combined"}],
        "optimizer": {"name": "pycma", "popsize": 4, "sigma0": 0.25, "seed": 1},
        "evaluation": {"kind": "suite", "suite": str(suite)},
        "multi_fidelity": {"enabled": False},
        "baselines": False,
        "budget": {"trials": BUDGET},
    }
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


class Driver:
    """`evomerge search SPACE --workers 2` in a subprocess, and the processes of its Ray instance."""

    def __init__(self, root: Path):
        self.study = root / "study"
        self.log = open(root / "driver.log", "w+")  # a file, not a pipe: a full pipe would block the driver
        env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p))
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "evomerge.cli", "search", str(_space(root)), "--study-dir", str(self.study),
               "--workers", "2", "-q"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.seen: dict[int, psutil.Process] = {}  # every process of its Ray instance, for the clean-up

    def ray_processes(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for p in kids:
            self.seen.setdefault(p.pid, p)
        return kids

    def find(self, kind: str) -> list[psutil.Process]:
        out = []
        for p in self.ray_processes():
            try:
                argv = p.cmdline()
            except psutil.Error:
                continue
            first = argv[0] if argv else ""
            if {"worker": first.startswith("ray::RayWorker"),
                "dashboard-agent": first.startswith("ray::DashboardAgent")
                or (len(argv) > 1 and argv[1].endswith("dashboard/agent.py")),
                "raylet": first.endswith("raylet/raylet"),
                "gcs": first.endswith("gcs_server")}[kind]:
                out.append(p)
        return out

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return _trials(self.study)

    def wait_for(self, what, timeout: float = 240.0, step: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the driver ended (status {self.proc.returncode}) before the fault:\n{self.output()[-3000:]}")
            try:
                got = what()
            except Exception:  # noqa: BLE001 - the study is not created yet
                got = None
            if got:
                return got
            time.sleep(step)
        pytest.fail(f"timed out waiting for the search:\n{self.output()[-3000:]}")

    def freeze_workers(self) -> list[psutil.Process]:
        """Once a few trials are done, stop (SIGSTOP) both workers: their trials stay RUNNING."""
        self.wait_for(lambda: len(self.find("worker")) == 2 and sum(
            t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self.trials()) >= 2)
        workers = self.find("worker")
        for w in workers:
            w.send_signal(signal.SIGSTOP)
        return workers

    def running(self) -> set[int]:
        return {t.number for t in self.trials() if t.state == TrialState.RUNNING}

    def held(self, quiet: float = 1.5) -> set[int]:
        """The trials the frozen workers hold: running, and the same over ``quiet`` seconds (a result
        sent just before the freeze can take a while to be recorded on a loaded machine)."""
        last = self.wait_for(self.running)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.running()
            if now == last and now:
                return now
            last = now or self.wait_for(self.running)
        pytest.fail(f"the running trials did not settle: {last}")

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver still runs {EXIT_WITHIN} s after the fault (it hangs):\n{self.output()[-3000:]}")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.ray_processes()
        for p in self.seen.values():  # only what this driver's Ray instance started
            try:
                p.kill()
            except psutil.Error:
                pass
        self.log.close()


@pytest.fixture
def driver(tmp_path):
    d = Driver(tmp_path)
    yield d
    d.cleanup()


def _trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    meta = json.loads((study_dir / "study.json").read_text())
    return optuna.load_study(study_name=meta["name"], storage=meta["storage"]).get_trials()


def _assert_complete_and_unique(study_dir: Path) -> None:
    """Full budget, nothing running, no candidate failed, no CMA-ES member scored twice."""
    ts = [t for t in _trials(study_dir) if t.user_attrs.get("kind") == "search"]
    assert TrialState.RUNNING not in {t.state for t in ts}
    done = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in ts if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    assert not failed, [(t.number, t.user_attrs.get("error")) for t in failed]
    assert len(done) == BUDGET, Counter(t.state.name for t in ts)
    members = [(t.user_attrs["cma"]["gen"], t.user_attrs["cma"]["idx"]) for t in done]
    assert len(members) == len(set(members)), sorted(members)
    numbers = [t.number for t in _trials(study_dir)]
    assert len(numbers) == len(set(numbers))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_a_killed_worker_process_is_survived(driver):
    """kill -9 of a busy worker: its candidate is retried, the search finishes, nothing lost or doubled."""
    workers = driver.freeze_workers()
    running = driver.held()
    victim, other = workers
    victim.kill()
    other.send_signal(signal.SIGCONT)
    status = driver.wait_exit()
    assert status == 0, driver.output()[-3000:]
    _assert_complete_and_unique(driver.study)
    ts = {t.number: t for t in driver.trials()}
    assert running and all(ts[n].state in (TrialState.COMPLETE, TrialState.PRUNED) for n in running)
    assert all(t.user_attrs["worker"].split(":")[1] != str(victim.pid) for t in ts.values()
               if t.number in running)  # what the killed worker held was scored again elsewhere


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["dashboard-agent", "raylet"])
def test_a_dead_node_interrupts_the_search_and_resume_finishes_it(driver, victim):
    """The dashboard agent or the raylet killed (the raylet fate-shares with its agent: the node is
    gone): exit 3 naming what died, the running trials recorded as interrupted, resume completes."""
    driver.freeze_workers()
    running = driver.held()
    targets = driver.find(victim)
    assert targets, [p.cmdline()[:2] for p in driver.ray_processes()]
    for p in targets:
        p.kill()
    status = driver.wait_exit()
    out = driver.output()
    assert status == 3, out[-3000:]
    _assert_interrupted(driver, running, out, "raylet")
    _resume_and_check(driver.study)


@pytest.mark.slow
def test_the_whole_local_instance_dying_interrupts_the_search_and_resume_finishes_it(driver):
    """Every process of the driver's Ray instance (gcs_server, raylet, agents, workers) killed at once."""
    driver.freeze_workers()
    running = driver.held()
    procs = driver.ray_processes()
    assert driver.find("gcs") and driver.find("raylet")
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    status = driver.wait_exit()
    out = driver.output()
    assert status == 3, out[-3000:]
    _assert_interrupted(driver, running, out, "gcs_server")
    _resume_and_check(driver.study)


def _assert_interrupted(driver: Driver, running: set[int], out: str, what: str) -> None:
    assert running
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert error, out[-3000:]
    msg = error[-1]
    assert what in msg and "interrupted" in msg and "evomerge resume" in msg, msg
    ts = {t.number: t for t in driver.trials()}
    assert not driver.running()
    # what the driver was running is interrupted (resume retries it), never failed; a result the
    # driver had already received when the node died (a loaded machine can take seconds to record
    # it) is recorded as complete, a real score. A frozen worker's trial is always interrupted.
    for n in running:
        assert ts[n].state == TrialState.COMPLETE or (
            ts[n].state == TrialState.FAIL and ts[n].user_attrs.get("interrupted") is True), (n, ts[n].user_attrs)
    assert any(ts[n].state == TrialState.FAIL for n in running), {n: ts[n].state for n in running}
    interrupted = [n for n, t in ts.items() if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
    assert f"{len(interrupted)} running trial(s)" in msg, msg  # the message counts what was recorded
    failed = [n for n, t in ts.items() if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    assert not failed


def _resume_and_check(study_dir: Path) -> None:
    from evomerge.search import resume_search

    # in-process, one thread (two threads importing transformers lazily at once can race)
    res = resume_search(study_dir, progress=False, report=False, workers=1)
    assert res.complete
    _assert_complete_and_unique(study_dir)


# ------------------------------------------------------------------------------------------ in-process
# RayExecutor driven from this process on its own small cluster: the liveness deadlines (a worker
# that never starts, never comes back, or stops answering) end in bounded time, on real actors.

DELAY = 1.0  # seconds per candidate of the slow evaluators: long enough to act mid-candidate


def _slow_weights(target: str, device: str):
    from evomerge.evaluate.evaluators import WeightDistanceEvaluator

    class Slow(WeightDistanceEvaluator):
        def evaluate(self, recipe, **kw):
            time.sleep(DELAY)
            return super().evaluate(recipe, **kw)

    return Slow(target, device=device)


def _cannot_start(device: str):
    raise RuntimeError("this evaluator cannot be built here")


def _hangs_on_restart(target: str, marker: str, device: str):
    """Starts once; a restarted actor never finishes building its evaluator (an actor Ray cannot
    bring back: no node or resources left for it)."""
    if os.path.exists(marker):
        time.sleep(3600)
    Path(marker).write_text("started")
    return _slow_weights(target, device)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from conftest import local_ray

    local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_search_support import family, target_model

    root = tmp_path_factory.mktemp("faults_world")
    fam = family(root / "fam")
    return fam, target_model(fam, root / "target")


def _recipe(fam):
    from evomerge.recipe import parse_recipe

    return parse_recipe({"method": "task_arithmetic", "base": fam["base"],
                         "sources": [{"model": fam["expert1"], "params": {"weight": 0.5}},
                                     {"model": fam["expert2"], "params": {"weight": 0.5}}]})


def _busy_pid(ex, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [w for w in ex.workers() if w["state"] == "busy" and w.get("pid")]
        if busy:
            time.sleep(DELAY / 3)  # inside the candidate
            return busy[0]["pid"]
        time.sleep(0.01)
    pytest.fail(f"no worker became busy: {ex.workers()}")


def test_workers_that_cannot_start_interrupt_the_run_instead_of_hanging(cluster, world):
    from evomerge.errors import RunInterrupted
    from evomerge.workers.base import CandidateJob
    from evomerge.workers.ray_executor import RayExecutor

    ex = RayExecutor(evaluator_factory=_cannot_start, workers=2, cpus_per_worker=0.5)
    try:
        fut = ex.submit(CandidateJob("k", _recipe(world[0])))
        with pytest.raises(RunInterrupted) as err:
            fut.result(timeout=120)
        assert "failed to start" in str(err.value) and "cannot be built here" in str(err.value)
        assert "evomerge resume" in str(err.value)
        with pytest.raises(RunInterrupted):
            ex.submit(CandidateJob("k2", _recipe(world[0])))
    finally:
        ex.shutdown()


def test_a_worker_that_never_comes_back_interrupts_the_search_which_resumes(cluster, world, tmp_path):
    """The only worker killed mid-candidate and never restarted: past the restart deadline the
    search raises RunInterrupted (not a hang, no trial failed), and resume finishes the study."""
    import functools
    import threading

    from test_search_support import ps_space, write_space

    from evomerge.errors import RunInterrupted
    from evomerge.search import resume_search, start_search
    from evomerge.workers.ray_executor import RayExecutor

    fam, target = world
    path = write_space(tmp_path / "s.yaml", ps_space(fam, target, optimizer={"popsize": 4, "seed": 2},
                                                     budget={"trials": 8}, baselines=False))
    ex = RayExecutor(evaluator_factory=functools.partial(_hangs_on_restart, target, str(tmp_path / "marker")),
                     workers=1, cpus_per_worker=0.5, restart_timeout=3.0)
    killed = []

    def kill() -> None:
        pid = _busy_pid(ex)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    outcome: list = []

    def search() -> None:  # in a thread: a hang fails the test instead of blocking it
        try:
            start_search(path, tmp_path / "study", executor=ex, progress=False, report=False)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - checked below
            outcome.append(e)

    killer = threading.Thread(target=kill, daemon=True)
    runner = threading.Thread(target=search, daemon=True)
    killer.start()
    runner.start()
    try:
        runner.join(timeout=EXIT_WITHIN)
        assert outcome, f"the search still runs {EXIT_WITHIN} s after its only worker was lost (it hangs)"
    finally:
        killer.join(timeout=130)
        ex.shutdown()
    assert killed
    assert isinstance(outcome[0], RunInterrupted), repr(outcome[0])
    msg = str(outcome[0])
    assert "did not come back" in msg and "recorded as interrupted" in msg and "evomerge resume" in msg, msg
    assert [e for e in ex.events if e["event"] == "retry"]  # the lost candidate was queued again first
    ts = _trials(tmp_path / "study")
    interrupted = [t for t in ts if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
    assert interrupted and f"{len(interrupted)} running trial(s)" in msg
    assert not [t for t in ts if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    assert resume_search(tmp_path / "study", progress=False, report=False).complete
    done = [t for t in _trials(tmp_path / "study") if t.state == TrialState.COMPLETE]
    assert len(done) == 8


def test_a_frozen_worker_is_restarted_and_its_candidate_retried(cluster, world):
    """A worker that stops answering pings (SIGSTOP: no crash Ray could see) is killed after
    ``ping_timeout``, Ray restarts it, and the candidate it held is scored by the new process."""
    import functools

    from evomerge.workers.base import CandidateJob
    from evomerge.workers.ray_executor import RayExecutor

    fam, target = world
    ex = RayExecutor(evaluator_factory=functools.partial(_slow_weights, target), workers=1, cpus_per_worker=0.5,
                     ping_interval=0.5, ping_timeout=5.0)
    frozen = None
    try:
        ex.wait_ready()
        fut = ex.submit(CandidateJob("k", _recipe(fam)))
        frozen = _busy_pid(ex)
        os.kill(frozen, signal.SIGSTOP)
        res = fut.result(timeout=120)
        assert res.ok, res.error
        assert [e for e in ex.events if e["event"] == "worker unresponsive"]
        assert res.worker.split(":")[1] != str(frozen)  # scored by the restarted worker
    finally:
        ex.shutdown()
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def nodes():
    """A head without CPUs and two 1-CPU nodes on this machine: one worker per node, so a node can
    be lost like a remote one (the module's cluster is shut down first: one Ray per process)."""
    import ray
    from conftest import local_ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1), c.add_node(num_cpus=1)]
    local_ray(address=c.address)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_a_lost_node_s_job_is_retried_on_a_live_worker_and_losing_every_node_interrupts(nodes, world):
    import functools

    from evomerge.errors import RunInterrupted
    from evomerge.workers.base import CandidateJob
    from evomerge.workers.ray_executor import RayExecutor

    c, (n1, n2) = nodes
    fam, target = world
    ex = RayExecutor(evaluator_factory=functools.partial(_slow_weights, target), workers=2, cpus_per_worker=1,
                     restart_timeout=3.0)
    try:
        ex.wait_ready()
        assert len({w["node"] for w in ex.workers()}) == 2
        futs = [ex.submit(CandidateJob(i, _recipe(fam))) for i in range(4)]
        pid = _busy_pid(ex)
        lost = next(n for n in (n1, n2) if n.node_id == next(w["node"] for w in ex.workers() if w["pid"] == pid))
        c.remove_node(lost, allow_graceful=False)
        results = [f.result(timeout=EXIT_WITHIN) for f in futs]
        assert all(r.ok for r in results), [r.error for r in results]  # on the worker of the live node
        live = next(n for n in (n1, n2) if n is not lost)
        c.remove_node(live, allow_graceful=False)
        # a worker outlives its raylet for a few seconds; then jobs must stop, with RunInterrupted
        deadline = time.monotonic() + EXIT_WITHIN
        with pytest.raises(RunInterrupted) as err:
            while time.monotonic() < deadline:
                ex.submit(CandidateJob("late", _recipe(fam))).result(timeout=EXIT_WITHIN)
                time.sleep(0.2)
        assert "no Ray worker is left" in str(err.value) and "evomerge resume" in str(err.value)
    finally:
        ex.shutdown()
