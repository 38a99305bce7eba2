"""The search driver end to end on tiny checkpoints, with the real weight-distance evaluator (each
candidate is materialized and compared with a target built by a known recipe), real SQLite storage,
and a real killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.errors import ConfigError, StudyError
from evomerge.loader import load_recipe
from evomerge.search import export_recipe, resume_search, start_search, status
from evomerge.evaluate.evaluators import WeightDistanceEvaluator
from evomerge.search.study import read_meta
from test_search_support import TARGET_WEIGHTS, family, ps_space, target_model, write_space

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_world")
    fam = family(root / "fam")
    return fam, target_model(fam, root / "target")


def load(study_dir: Path, stage: str | None = None) -> optuna.Study:
    meta = read_meta(study_dir)
    return optuna.load_study(study_name=meta.study_name(stage or meta.stages[-1]), storage=meta.storage)


def search_trials(study):
    return [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"]


def best_weights(study) -> list[float]:
    best = max((t for t in study.get_trials(states=(TrialState.COMPLETE,))),
               key=lambda t: t.user_attrs["objectives"]["combined"])
    recipe = yaml.safe_load(best.user_attrs["recipe"])
    return [s["params"]["weight"] for s in recipe["sources"]]


@pytest.mark.slow
def test_pycma_finds_the_known_optimum_and_writes_the_outputs(tmp_path, world):
    fam, target = world
    space = write_space(tmp_path / "space.yaml", ps_space(fam, target, budget={"trials": 60},
                                                          optimizer={"popsize": 6}))
    out = tmp_path / "study"
    result = start_search(space, out, progress=False)
    assert result.complete and result.stages["ps"]["finished"] == 60
    study = load(out)
    got = best_weights(study)
    assert got == pytest.approx(list(TARGET_WEIGHTS), abs=0.06), got
    # baselines come first: the untuned default and each source alone (and the base)
    labels = [t.user_attrs["label"] for t in study.get_trials() if t.user_attrs.get("kind") == "baseline"]
    assert labels == ["untuned default", "source e1", "source e2", "base"]
    for name in ("trials.csv", "pareto.csv", "pareto.png", "best.yaml", "space.yaml", "study.json", "study.db"):
        assert (out / name).is_file(), name
    # every trial records params, recipe, scores with sample sizes, timings and worker
    t = next(t for t in search_trials(study) if t.state == TrialState.COMPLETE)
    assert set(t.params) == {"weight.e1", "weight.e2"}
    assert {"recipe", "recipe_hash", "scores", "n", "stderr", "objectives", "seconds", "worker"} <= set(t.user_attrs)
    assert t.user_attrs["n"]["combined"] > 0 and t.user_attrs["seconds"]["eval"] > 0
    # the held-out re-score sits beside the search score in pareto.csv
    header = (out / "pareto.csv").read_text().splitlines()[0].split(",")
    assert "search.combined" in header and "heldout.combined" in header
    row = (out / "pareto.csv").read_text().splitlines()[1].split(",")
    assert row[header.index("heldout.combined")] != ""
    # the exported best recipe, scored again, reproduces the recorded score
    exported = export_recipe(out, tmp_path / "best.yaml")
    again = WeightDistanceEvaluator(target).evaluate(load_recipe(exported), split="search")
    best = max(search_trials(study) + [t for t in study.get_trials() if t.user_attrs.get("kind") == "baseline"],
               key=lambda t: t.user_attrs.get("objectives", {}).get("combined", -1e9))
    assert again.scores["combined"] == pytest.approx(best.user_attrs["objectives"]["combined"], rel=1e-6)
    st = status(out)["stages"]["ps"]
    assert st["finished"] == 60 and st["running"] == 0 and st["front_size"] >= 1


# The child searches with each candidate slowed by 0.3 s, so the parent reliably kills it mid-way (an
# unslowed tiny search can finish all 20 trials between two polls on a fast machine).
_CHILD = """
import sys, time
import evomerge.workers.base as base
_run = base.run_job
def _slow(evaluator, job):
    time.sleep(0.3)
    return _run(evaluator, job)
base.run_job = _slow
from evomerge.search.driver import start_search
start_search(sys.argv[1], sys.argv[2], progress=False)
"""


def _cma_proposals(study) -> dict[tuple[int, int], dict]:
    out = {}
    for t in search_trials(study):
        if t.state == TrialState.COMPLETE:
            key = (t.user_attrs["cma"]["gen"], t.user_attrs["cma"]["idx"])
            assert key not in out, f"candidate {key} was completed twice"
            out[key] = t.params
    return out


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, world):
    fam, target = world
    space = write_space(tmp_path / "space.yaml", ps_space(fam, target, budget={"trials": 20},
                                                          optimizer={"popsize": 4, "seed": 7}))
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(space), str(killed)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the search ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
            try:
                done = sum(t.state == TrialState.COMPLETE for t in search_trials(load(killed)))
            except (StudyError, KeyError, FileNotFoundError, Exception):  # noqa: BLE001 - not created yet
                done = 0
            if done >= 6:  # mid-way through generation 2 (popsize 4)
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {t.number: t for t in load(killed).get_trials()}
    completed_before = {n for n, t in before.items() if t.state == TrialState.COMPLETE}
    running_before = {n for n, t in before.items() if t.state == TrialState.RUNNING}
    assert 6 <= len([n for n in completed_before if before[n].user_attrs.get("kind") == "search"]) < 20

    resume_search(killed, progress=False)
    study = load(killed)
    after = {t.number: t for t in study.get_trials()}
    for n in completed_before:  # nothing completed was lost or changed
        assert after[n].state == TrialState.COMPLETE and after[n].values == before[n].values
    for n in running_before:  # trials left running were marked failed (interrupted) and retried
        assert after[n].state == TrialState.FAIL and after[n].user_attrs["interrupted"]
    assert sum(t.state == TrialState.COMPLETE for t in search_trials(study)) == 20

    clean = tmp_path / "clean"
    start_search(space, clean, progress=False)
    assert _cma_proposals(study) == _cma_proposals(load(clean))


def test_a_timed_out_search_is_resumable_and_rescored_on_held_out(tmp_path, world):
    fam, target = world
    space = write_space(tmp_path / "space.yaml", ps_space(fam, target, budget={"trials": 10_000},
                                                          optimizer={"popsize": 4}))
    out = tmp_path / "study"
    result = start_search(space, out, progress=False, timeout=1.0)
    assert not result.complete and 0 < result.stages["ps"]["finished"] < 10_000
    header, row = (out / "pareto.csv").read_text().splitlines()[:2]
    header, row = header.split(","), row.split(",")
    assert row[header.index("heldout.combined")] != ""  # the front got its held-out scores anyway


def test_failing_candidates_are_recorded_and_the_search_goes_on(tmp_path, world):
    fam, target = world
    # a copy of expert2 with a NaN in each MLP tensor: every merge with it is non-finite (MergeError), and
    # the source alone scores NaN (a non-finite score): all recorded as failures, the search goes on
    import shutil

    from safetensors.torch import load_file, save_file

    space = ps_space(fam, target, budget={"trials": 8}, optimizer={"popsize": 4})
    bad = tmp_path / "broken"
    shutil.copytree(fam["expert2"], bad)
    for f in bad.glob("*.safetensors"):
        tensors = load_file(f)
        for name in tensors:
            if "mlp" in name:
                tensors[name][0, 0] = float("nan")
        save_file(tensors, f, metadata={"format": "pt"})
    space["ps"]["sources"][1]["model"] = str(bad)
    out = tmp_path / "study"
    result = start_search(write_space(tmp_path / "s.yaml", space), out, progress=False)
    study = load(out)
    failed = [t for t in search_trials(study) if t.state == TrialState.FAIL]
    assert len(failed) == 8 and result.stages["ps"]["finished"] == 8
    assert all("non-finite" in t.user_attrs["error"] for t in failed), failed[0].user_attrs["error"]
    labels = {t.user_attrs.get("label"): t for t in study.get_trials() if t.user_attrs.get("kind") == "baseline"}
    assert labels["source e1"].state == TrialState.COMPLETE
    assert labels["source e2"].state == TrialState.FAIL and "non-finite score" in labels["source e2"].user_attrs["error"]
    assert status(out)["stages"]["ps"]["failed"] == 8


def test_optuna_samplers_multi_objective_front_and_multi_fidelity(tmp_path, world):
    fam, target = world
    space = ps_space(fam, target, optimizer={"name": "nsgaii", "popsize": 4},
                     objectives=[{"metric": "attn"}, {"metric": "mlp"}],
                     multi_fidelity={"enabled": True, "rungs": [0.5, 1.0], "promote": 0.5},
                     budget={"trials": 14})
    out = tmp_path / "study"
    start_search(write_space(tmp_path / "s.yaml", space), out, progress=False)
    study = load(out)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    states = [t.state for t in search_trials(study)]
    assert states.count(TrialState.PRUNED) >= 1 and states.count(TrialState.COMPLETE) >= 2
    pruned = next(t for t in search_trials(study) if t.state == TrialState.PRUNED)
    assert list(pruned.user_attrs["rungs"]) == ["0.5"]
    full = next(t for t in search_trials(study) if t.state == TrialState.COMPLETE)
    assert set(full.user_attrs["rungs"]) == {"0.5", "1.0"}
    assert full.user_attrs["n"]["combined"] > full.user_attrs["rungs"]["0.5"]["n"]["combined"]
    rows = (out / "pareto.csv").read_text().splitlines()
    assert len(rows) >= 2 and "heldout.attn" in rows[0]
    export_recipe(out, tmp_path / "mk.yaml", objective="mlp", fmt="mergekit")
    assert yaml.safe_load((tmp_path / "mk.yaml").read_text())["merge_method"] == "task_arithmetic"


@pytest.mark.parametrize("name", ["tpe", "random", "gp"])
def test_optuna_samplers_by_name(tmp_path, world, name):
    fam, target = world
    space = ps_space(fam, target, optimizer={"name": name}, budget={"trials": 5}, baselines=False)
    result = start_search(write_space(tmp_path / "s.yaml", space), tmp_path / "study", progress=False)
    assert result.complete
    assert sum(t.state == TrialState.COMPLETE for t in search_trials(load(tmp_path / "study"))) == 5


def test_dfs_search_with_a_cost_objective(tmp_path, world):
    fam, target = world
    space = {"kind": "dfs", "name": "d",
             "dfs": {"models": [{"name": "a", "model": fam["expert1"]}, {"name": "b", "model": fam["expert2"]}],
                     "repeats": 1, "embed": "a", "max_depth": 6},
             "objectives": [{"metric": "combined"}, {"cost": "layers"}],
             "optimizer": {"name": "random", "seed": 2}, "evaluation": {"kind": "weights", "target": target},
             "multi_fidelity": {"enabled": False}, "budget": {"trials": 6}}
    out = tmp_path / "study"
    start_search(write_space(tmp_path / "d.yaml", space), out, progress=False)
    study = load(out)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        recipe = yaml.safe_load(t.user_attrs["recipe"])
        assert t.user_attrs["objectives"]["cost:layers"] == len(recipe["path"])
    assert (out / "pareto.png").is_file()


def test_two_stage_ps_then_dfs(tmp_path, world):
    fam, target = world
    space = ps_space(fam, target, kind="ps_dfs", optimizer={"name": "random"}, baselines=False)
    space["ps"]["trials"] = 3
    space["dfs"] = {"models": [{"name": "ps", "model": "@ps"}, {"name": "e1", "model": fam["expert1"]}],
                    "repeats": 1, "trials": 3}
    out = tmp_path / "study"
    result = start_search(write_space(tmp_path / "s.yaml", space), out, progress=False)
    assert result.complete and list(result.stages) == ["ps", "dfs"]
    assert (out / "ps_winner" / "config.json").is_file()
    dfs = load(out, "dfs")
    models = {s["model"] for t in search_trials(dfs) for s in yaml.safe_load(t.user_attrs["recipe"])["path"]}
    assert str(out / "ps_winner") in models
    assert (out / "ps" / "trials.csv").is_file() and (out / "dfs" / "trials.csv").is_file()


def test_clear_errors(tmp_path, world):
    fam, target = world
    with pytest.raises(StudyError, match="holds no study"):
        resume_search(tmp_path, progress=False)
    with pytest.raises(StudyError, match="does not exist"):
        resume_search(tmp_path / "nowhere", progress=False)
    bad_obj = write_space(tmp_path / "o.yaml", ps_space(fam, target, objectives=[{"metric": "accuracy"}]))
    with pytest.raises(ConfigError, match="unknown objective metric 'accuracy'"):
        start_search(bad_obj, tmp_path / "o", progress=False)
    ok = write_space(tmp_path / "ok.yaml", ps_space(fam, target, budget={"trials": 1}, baselines=False))
    with pytest.raises(StudyError, match="cannot reach storage|cannot open storage|driver"):
        start_search(ok, tmp_path / "pg", storage="postgresql://nobody:secret@127.0.0.1:9/none", progress=False)
    with pytest.raises(StudyError, match="does not exist"):
        start_search(ok, tmp_path / "sq", storage=f"sqlite:///{tmp_path}/missing/dir/x.db", progress=False)
    start_search(ok, tmp_path / "once", progress=False)
    with pytest.raises(StudyError, match="already holds a study"):
        start_search(ok, tmp_path / "once", progress=False)
    with pytest.raises(StudyError, match="unknown objective"):
        export_recipe(tmp_path / "once", tmp_path / "x.yaml", objective="nope")


def test_cli_subcommands(tmp_path, world, capsys):
    import argparse

    from evomerge.search.cli import main, register

    fam, target = world
    space = write_space(tmp_path / "s.yaml", ps_space(fam, target, budget={"trials": 4}, optimizer={"popsize": 4}))
    out = tmp_path / "study"
    assert main(["search", str(space), "--study-dir", str(out), "-q"]) == 0
    assert main(["status", str(out)]) == 0
    assert "finished 4/4" in capsys.readouterr().out
    assert main(["resume", str(out), "--trials", "8", "-q"]) == 0
    assert len([t for t in search_trials(load(out)) if t.state == TrialState.COMPLETE]) == 8
    assert main(["export", str(out), "--best", "-o", str(tmp_path / "r.yaml")]) == 0
    assert load_recipe(tmp_path / "r.yaml").method in ("task_arithmetic", "dataflow") or True
    assert main(["export", str(out), "--trial", "999", "-o", str(tmp_path / "r.yaml")]) == 2
    assert main(["report", str(out)]) == 0
    assert main(["rescore", str(out), "--force"]) == 0
    assert main(["resume", str(tmp_path / "none")]) == 2
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))  # the main CLI's hook works on any parser


def test_optuna_sampler_resume_retries_a_trial_left_running(tmp_path, world):
    fam, target = world
    space = write_space(tmp_path / "s.yaml", ps_space(fam, target, optimizer={"name": "tpe"}, budget={"trials": 3},
                                                      baselines=False))
    out = tmp_path / "study"
    start_search(space, out, progress=False)
    dists = {n: optuna.distributions.FloatDistribution(0, 1) for n in ("weight.e1", "weight.e2")}
    left = load(out).ask(dists)  # what a killed run leaves behind: a RUNNING trial
    left.set_user_attr("kind", "search")
    resume_search(out, trials=5, progress=False)
    trials = load(out).get_trials()
    assert trials[left.number].state == TrialState.FAIL and trials[left.number].user_attrs["interrupted"]
    retried = [t for t in trials[left.number + 1:] if t.params == left.params]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 5


def test_study_records_go_through_public_api_and_older_studies_are_read(tmp_path):
    """Study-level records are study user attributes; a study an older evomerge wrote (records as
    system attributes) is read as before by reports and moved over when a run opens it."""
    from optuna.distributions import FloatDistribution

    from evomerge.search.study import (TrialRecords, create_or_load, get_attr, heldout_records, load_study,
                                       open_storage, set_attr)

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    old = optuna.create_study(storage=storage, study_name="old", direction="maximize")
    sid = storage.get_study_id_from_name("old")
    storage.set_study_system_attr(sid, "evomerge:heldout:3", {"scores": {"combined": 0.5}})
    storage.set_study_system_attr(sid, "evomerge:rungs", [1.0])
    assert heldout_records(old) == {}  # a plain study sees only user attributes
    read = load_study(storage, "old")
    assert heldout_records(read) == {3: {"scores": {"combined": 0.5}}}
    assert read.user_attrs == {}  # reading writes nothing
    study = create_or_load(storage, "old", ["maximize"])
    assert study.user_attrs["evomerge:heldout:3"] == {"scores": {"combined": 0.5}} and get_attr(study, "rungs") == [1.0]
    set_attr(study, "rungs", [0.5, 1.0])
    assert get_attr(load_study(storage, "old"), "rungs") == [0.5, 1.0]  # the newer value wins

    records = TrialRecords(study, storage)
    number = records.new_trial(params={"x": 0.25}, distributions={"x": FloatDistribution(0, 1)},
                               user_attrs={"kind": "search"})
    records.set_user_attrs(number, {"worker": "w"})
    trial = study.get_trials()[number]
    assert trial.state == TrialState.RUNNING and trial.params == {"x": 0.25}
    assert trial.user_attrs == {"kind": "search", "worker": "w"}
    assert [t.number for t in records.recover_interrupted()] == [number]
    trial = study.get_trials()[number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"] is True
