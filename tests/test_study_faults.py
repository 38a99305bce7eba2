"""Hostile use of the search commands: every bad input is one clear error (exit 2, no traceback), a
failed command never damages a study, and the corrected command then works.

Real components throughout: tiny checkpoints, the weight-distance evaluator, SQLite storages, the
CLI entry point in this process, and real child processes killed with SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.cli import main
from evomerge.search.study import StudyLock, heldout_records, read_meta
from evomerge.tiny import build_tiny_model
from test_search_support import family, ps_space, target_model, write_space

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_world")
    fam = family(root / "fam")
    target = target_model(fam, root / "target")
    # same architecture and layer count as the family, wider MLP: a source of another shape
    wide = str(build_tiny_model(root / "wide", num_layers=4, intermediate_size=256, seed=5))
    return fam, target, wide


def space_file(path: Path, fam, target, **over) -> Path:
    base = {"budget": {"trials": 4}, "optimizer": {"popsize": 4}, "baselines": False}
    base.update(over)
    return write_space(path, ps_space(fam, target, **base))


def run(capsys, *argv) -> tuple[int, str]:
    """``evomerge ARGV`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def load(study_dir: Path) -> optuna.Study:
    meta = read_meta(study_dir)
    return optuna.load_study(study_name=meta.study_name(meta.stages[-1]), storage=meta.storage)


def search_trials(study):
    return [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"]


@pytest.fixture()
def study(tmp_path, world, capsys):
    """A finished 4-trial study (tiny models, weight-distance evaluator)."""
    fam, target, _ = world
    out = tmp_path / "study"
    assert run(capsys, "search", space_file(tmp_path / "s.yaml", fam, target), "--study-dir", out, "-q")[0] == 0
    return out


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "tests") + os.pathsep
                + os.environ.get("PYTHONPATH", ""))


# ------------------------------------------------------------------ 1. a rejected start leaves nothing


def _bad_spaces(fam, target):
    return {
        "objective": {"objectives": [{"metric": "accuracy"}]},
        "evaluator kind": {"evaluation": {"kind": "nope", "target": target}},
        "suite file": {"evaluation": {"kind": "suite", "suite": "no/such/suite.yaml"}},
        "suite option": {"evaluation": {"kind": "suite", "suite": str(REPO / "evals" / "zoo_demo.yaml"),
                                        "batch_size": "many"}},
        "pycma option": {"optimizer": {"popsize": 4, "options": {"no_such_option": 1}}},
        "pycma option value": {"optimizer": {"popsize": 4, "options": {"CMA_active": "not a bool"}}},
        "sampler option": {"optimizer": {"name": "tpe", "options": {"n_startup": 3}}},
        "pycma with one dimension": {"ps": {**ps_space(fam, target)["ps"],
                                            "sources": [{"name": "e1", "model": fam["expert1"]}]}},
        "missing source": {"ps": {**ps_space(fam, target)["ps"],
                                  "sources": [{"name": "e1", "model": fam["expert1"]},
                                              {"name": "e2", "model": str(Path(target).parent / "gone")}]}},
    }


@pytest.mark.parametrize("case", ["objective", "evaluator kind", "suite file", "suite option", "pycma option",
                                  "pycma option value", "sampler option", "pycma with one dimension",
                                  "missing source"])
def test_a_rejected_start_creates_nothing_and_the_corrected_retry_works(tmp_path, world, capsys, case):
    fam, target, _ = world
    over = _bad_spaces(fam, target)[case]
    out = tmp_path / "results" / "study"
    code, err = run(capsys, "search", space_file(tmp_path / "bad.yaml", fam, target, **over), "--study-dir", out, "-q")
    assert code == 2 and err.startswith("error: ") and "bad.yaml" in err, err
    assert not out.exists() and not (tmp_path / "results").exists()
    code, err = run(capsys, "search", space_file(tmp_path / "good.yaml", fam, target), "--study-dir", out, "-q")
    assert code == 0, err
    assert len(search_trials(load(out))) == 4


def test_a_failed_start_removes_only_what_it_created(tmp_path, world):
    from evomerge.search.driver import start_search

    fam, target, _ = world
    space = space_file(tmp_path / "s.yaml", fam, target)

    def broken_executor(space, meta, study_dir):  # fails once the study folder is made, before any trial
        (study_dir / "worker.log").write_text("starting workers\n")
        raise RuntimeError("no workers today")

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(RuntimeError, match="no workers"):
        start_search(space, mine, progress=False, executor_factory=broken_executor)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # the user's folder and file stay
    assert (mine / "notes.txt").read_text() == "my notes"
    nested = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError, match="no workers"):
        start_search(space, nested, progress=False, executor_factory=broken_executor)
    assert not (tmp_path / "a").exists()  # every folder it made is gone
    result = start_search(space, mine, progress=False)
    assert result.complete and (mine / "study.json").is_file() and (mine / "notes.txt").is_file()


def test_a_folder_that_already_holds_a_study_is_refused_and_left_alone(study, tmp_path, world, capsys):
    fam, target, _ = world
    before = {p.name: p.read_bytes() for p in study.iterdir() if p.is_file()}
    code, err = run(capsys, "search", space_file(tmp_path / "s2.yaml", fam, target), "--study-dir", study, "-q")
    assert code == 2 and "already holds a study" in err
    assert {p.name: p.read_bytes() for p in study.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------ 2. sources of another shape


def test_a_source_of_another_shape_is_refused_before_the_study_exists(tmp_path, world, capsys):
    fam, target, wide = world
    space = ps_space(fam, target, budget={"trials": 4})
    space["ps"]["sources"][1] = {"name": "wide", "model": wide}
    out = tmp_path / "study"
    code, err = run(capsys, "search", write_space(tmp_path / "s.yaml", space), "--study-dir", out, "-q")
    assert code == 2 and not out.exists()
    assert "wide" in err and wide in err and "mlp.up_proj.weight" in err and "[256, 64]" in err, err
    # the same for a data-flow space: its layers must fit the embed model's
    dfs = {"kind": "dfs", "dfs": {"models": [{"name": "a", "model": fam["expert1"]}, {"name": "w", "model": wide}]},
           "objectives": [{"metric": "combined"}], "optimizer": {"name": "random"},
           "evaluation": {"kind": "weights", "target": target}, "budget": {"trials": 2}}
    code, err = run(capsys, "search", write_space(tmp_path / "d.yaml", dfs), "--study-dir", out, "-q")
    assert code == 2 and not out.exists()
    assert "dfs.models" in err and "w (" in err and "mlp.up_proj.weight" in err, err


def test_a_search_whose_every_trial_failed_does_not_pretend_success(tmp_path, world, capsys):
    """Every candidate fails (a source holds NaN: not visible in its headers): the study and the
    errors are kept, and the command exits 2 with the first errors instead of 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    fam, target, _ = world
    bad = tmp_path / "broken"
    shutil.copytree(fam["expert2"], bad)
    for f in bad.glob("*.safetensors"):
        tensors = load_file(f)
        for name in tensors:
            tensors[name].fill_(float("nan"))
        save_file(tensors, f, metadata={"format": "pt"})
    space = ps_space(fam, target, budget={"trials": 4}, optimizer={"popsize": 4}, baselines=False)
    space["ps"]["sources"][1]["model"] = str(bad)
    out = tmp_path / "study"
    code, err = run(capsys, "search", write_space(tmp_path / "s.yaml", space), "--study-dir", out, "-q")
    assert code == 2, err
    assert "every trial of stage ps failed (4 of 4)" in err and "  - " in err and "evomerge resume" in err, err
    assert (out / "study.json").is_file() and (out / "trials.csv").is_file()
    assert run(capsys, "status", out)[0] == 0


# ------------------------------------------------------------------ 3. numbers on the command line


@pytest.mark.parametrize("flags,named", [
    (["--trials", "0"], ["--trials"]), (["--trials", "-3"], ["--trials"]), (["--limit", "0"], ["--limit"]),
    (["--workers", "0"], ["--workers"]), (["--timeout", "0"], ["--timeout"]), (["--timeout", "soon"], ["--timeout"]),
    (["--trials", "0", "--workers", "0", "--limit", "0"], ["--trials", "--workers", "--limit"]),
    (["--ray-max-retries", "-1"], ["--ray-max-retries"]),
    (["--ray-restart-timeout", "0", "--ray-ping-timeout", "-5", "--ray-start-timeout", "nan"],
     ["--ray-restart-timeout", "--ray-ping-timeout", "--ray-start-timeout"]),
])
def test_search_refuses_bad_numbers_naming_the_flag(tmp_path, world, capsys, flags, named):
    fam, target, _ = world
    out = tmp_path / "study"
    code, err = run(capsys, "search", space_file(tmp_path / "s.yaml", fam, target), "--study-dir", out, "-q", *flags)
    assert code == 2 and not out.exists()
    for flag in named:
        assert f"{flag}:" in err, err


@pytest.mark.parametrize("flags", [["--trials", "0"], ["--trials", "-3"], ["--workers", "0"], ["--timeout", "0"],
                                   ["--timeout", "never"]])
def test_resume_refuses_bad_numbers_and_leaves_the_study_as_it_was(study, capsys, flags):
    meta = (study / "study.json").read_bytes()
    n = len(load(study).get_trials())
    code, err = run(capsys, "resume", study, "-q", *flags)
    assert code == 2 and flags[0] + ":" in err, err
    assert (study / "study.json").read_bytes() == meta and len(load(study).get_trials()) == n


def test_a_bad_budget_timeout_in_the_space_is_refused(tmp_path, world, capsys):
    fam, target, _ = world
    code, err = run(capsys, "search", space_file(tmp_path / "s.yaml", fam, target, budget={"trials": 4, "timeout": 0}),
                    "--study-dir", tmp_path / "study", "-q")
    assert code == 2 and "budget.timeout" in err


# ------------------------------------------------------------------ 4. resume overrides


def _no_module(name: str) -> bool:
    return importlib.util.find_spec(name) is None


@pytest.mark.parametrize("url,says", [
    ("sqlite:////no/such/folder/x.db", "does not exist"),
    ("sqlite:///{tmp}/missing.db", "does not exist"),  # never replaced by a new, empty database
    ("notaurl", "not a database URL"),
    ("foo://somewhere/x", "unknown database kind"),
    pytest.param("postgresql://u:secret@127.0.0.1:9/x", "install it", marks=pytest.mark.skipif(
        not _no_module("psycopg"), reason="a PostgreSQL driver is installed")),
])
def test_a_failed_storage_override_is_not_persisted(study, tmp_path, capsys, url, says):
    url = url.format(tmp=tmp_path)
    meta = (study / "study.json").read_bytes()
    code, err = run(capsys, "resume", study, "-q", "--storage", url)
    assert code == 2 and says in err, err
    assert "secret" not in err
    assert (study / "study.json").read_bytes() == meta
    assert not (tmp_path / "missing.db").exists()
    assert run(capsys, "status", study)[0] == 0
    assert run(capsys, "resume", study, "-q", "--trials", "6")[0] == 0  # and resume still works
    assert read_meta(study).trials == 6  # a successful override is kept
    assert len([t for t in search_trials(load(study)) if t.state.name == "COMPLETE"]) == 6


def test_a_resume_without_changes_does_not_rewrite_study_json(study, capsys):
    before = (study / "study.json").stat().st_mtime_ns, (study / "study.json").read_bytes()
    assert run(capsys, "resume", study, "-q")[0] == 0
    assert ((study / "study.json").stat().st_mtime_ns, (study / "study.json").read_bytes()) == before


# ------------------------------------------------------------------ 5. a deleted or replaced database


def test_a_deleted_database_is_detected_not_silently_restarted(study, tmp_path, capsys):
    (study / "study.db").unlink()
    for argv in (["resume", study, "-q"], ["rescore", study], ["status", study], ["report", study],
                 ["export", study, "-o", tmp_path / "r.yaml"]):
        code, err = run(capsys, *argv)
        assert code == 2 and "study.db does not exist" in err, (argv, err)
    assert not (study / "study.db").exists() and not (tmp_path / "r.yaml").exists()


def test_a_replaced_database_is_detected(study, capsys):
    (study / "study.db").unlink()
    optuna.create_study(study_name="someone-else", storage=f"sqlite:///{study / 'study.db'}")
    meta = (study / "study.json").read_bytes()
    code, err = run(capsys, "resume", study, "-q")
    assert code == 2 and "holds no study named 't'" in err and "someone-else" in err, err
    assert (study / "study.json").read_bytes() == meta
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{study / 'study.db'}")] == ["someone-else"]


def test_a_study_json_that_was_tampered_with_is_one_clear_error(study, capsys):
    meta = json.loads((study / "study.json").read_text())
    for bad in ({**meta, "trials": "lots"}, {**meta, "stages": []}, {**meta, "unknown": 1}, [1, 2]):
        (study / "study.json").write_text(json.dumps(bad))
        for argv in (["resume", study, "-q"], ["status", study]):
            code, err = run(capsys, *argv)
            assert code == 2 and "study.json is damaged" in err, err
    (study / "study.json").write_bytes(b"\xff\xfe{")
    assert run(capsys, "status", study)[0] == 2


# ------------------------------------------------------------------ 6. any working directory


def _project(tmp_path: Path, fam, target) -> Path:
    """A project folder whose space names its models and target by relative paths."""
    import shutil

    proj = tmp_path / "proj"
    for name in ("base", "expert1", "expert2"):
        shutil.copytree(fam[name], proj / "models" / name)
    shutil.copytree(target, proj / "models" / "target")
    space = ps_space({k: f"models/{k}" for k in ("base", "expert1", "expert2")}, "models/target",
                     budget={"trials": 4}, optimizer={"popsize": 4}, baselines=False)
    write_space(proj / "space.yaml", space)
    return proj


def test_a_study_works_from_any_directory(tmp_path, world, capsys, monkeypatch):
    fam, target, _ = world
    proj = _project(tmp_path, fam, target)
    monkeypatch.chdir(proj)
    code, err = run(capsys, "search", "space.yaml", "--study-dir", "results/t", "-q", "--storage", "sqlite:///own.db")
    assert code == 0, err
    saved = yaml.safe_load((proj / "results" / "t" / "space.yaml").read_text())
    assert saved["evaluation"]["target"] == str(proj / "models" / "target")
    assert all(Path(s["model"]).is_absolute() for s in saved["ps"]["sources"])
    assert read_meta(proj / "results" / "t").storage == f"sqlite:///{proj / 'own.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    study = proj / "results" / "t"
    for argv in (["status", study], ["report", study], ["export", study, "-o", "best.yaml"],
                 ["resume", study, "--trials", "6", "-q"], ["rescore", study, "--force"]):
        code, err = run(capsys, *argv)
        assert code == 0, (argv, err)
    assert (elsewhere / "best.yaml").is_file() and not (elsewhere / "results").exists()


def test_an_older_study_with_relative_paths_still_works(tmp_path, world, capsys, monkeypatch):
    """Studies written before paths were stored absolute: their relative paths are found from the
    study folder's parents when the current directory does not have them."""
    fam, target, _ = world
    proj = _project(tmp_path, fam, target)
    monkeypatch.chdir(proj)
    assert run(capsys, "search", "space.yaml", "--study-dir", "results/t", "-q")[0] == 0
    study = proj / "results" / "t"
    old = yaml.safe_load((proj / "space.yaml").read_text())  # relative paths, as older versions saved them
    (study / "space.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    for argv in (["status", study], ["resume", study, "--trials", "6", "-q"], ["rescore", study]):
        code, err = run(capsys, *argv)
        assert code == 0, (argv, err)
    assert yaml.safe_load((study / "space.yaml").read_text()) == old  # not rewritten


# ------------------------------------------------------------------ 7. one process per study


# a search whose candidates take 0.4 s each, so the parent can act while it runs
_SLOW_SEARCH = """
import sys, time
import evomerge.workers.base as base
_run = base.run_job
def _slow(evaluator, job):
    time.sleep(float(sys.argv[3]) if job.split == sys.argv[4] else 0.0)
    return _run(evaluator, job)
base.run_job = _slow
from evomerge.search.driver import start_search
start_search(sys.argv[1], sys.argv[2], progress=False)
"""


def _spawn(space: Path, out: Path, delay: float, split: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW_SEARCH, str(space), str(out), str(delay), split],
                            env=_child_env(), cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the child ended before {what}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - the study is still being created
            pass
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_study_in_use_is_refused_and_free_again_after_kill_9(tmp_path, world, capsys):
    fam, target, _ = world
    space = space_file(tmp_path / "s.yaml", fam, target, budget={"trials": 40})
    out = tmp_path / "study"
    proc = _spawn(space, out, 0.4, "search")
    try:
        _wait_for(proc, lambda: len(search_trials(load(out))) >= 2, "two trials")
        meta = (out / "study.json").read_bytes()
        for argv in (["resume", out, "-q"], ["resume", out, "-q", "--trials", "80"], ["rescore", out]):
            code, err = run(capsys, *argv)
            assert code == 2 and f"pid {proc.pid}" in err and "in use" in err, err
        assert (out / "study.json").read_bytes() == meta
        assert run(capsys, "status", out)[0] == 0  # reading is allowed
        assert run(capsys, "export", out, "-o", tmp_path / "r.yaml")[0] in (0, 2)  # no completed trial yet: 2
        assert not any(t.user_attrs.get("interrupted") for t in load(out).get_trials())
        assert proc.poll() is None  # the search goes on undisturbed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    code, err = run(capsys, "resume", out, "-q", "--trials", "10")
    assert code == 0, err
    assert sum(t.state.name == "COMPLETE" for t in search_trials(load(out))) == 10


def test_the_lock_names_its_holder_and_is_exclusive(tmp_path):
    from evomerge.errors import StudyError

    with StudyLock.acquire(tmp_path, "resume"):
        note = json.loads((tmp_path / "study.lock").read_text())
        assert note["pid"] == os.getpid() and note["command"] == "resume"
        with pytest.raises(StudyError, match=f"in use by `evomerge resume` \\(pid {os.getpid()} on host"):
            StudyLock.acquire(tmp_path, "rescore")
    StudyLock.acquire(tmp_path, "rescore").release()  # free again


# ------------------------------------------------------------------ 8. kill -9 during the held-out re-score


@pytest.mark.slow
def test_kill_9_during_the_held_out_rescore_keeps_what_was_scored(tmp_path, world, capsys):
    fam, target, _ = world
    # baselines on: 4 of them plus the front are re-scored, 1.5 s each
    space = space_file(tmp_path / "s.yaml", fam, target, baselines=True)
    out = tmp_path / "study"
    proc = _spawn(space, out, 1.5, "held-out")
    try:
        _wait_for(proc, lambda: len(heldout_records(load(out))) >= 2, "two held-out scores", timeout=180)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    kept = heldout_records(load(out))
    assert len(kept) >= 2 and all("scores" in r for r in kept.values())
    code, err = run(capsys, "rescore", out)
    assert code == 0, err
    total = heldout_records(load(out))
    assert set(kept) < set(total) and {n: total[n] for n in kept} == kept  # only the rest was scored
    assert f"re-scored {len(total) - len(kept)} trial(s)" in err


# ------------------------------------------------------------------ 9. output paths


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/proc/evomerge-test")  # nothing can be created under /proc, not even by root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def test_export_checks_the_output_path_first(study, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    ro = _read_only_dir(tmp_path)
    for out, says in ((tmp_path, "folder"), (f"{tmp_path}/newdir/", "folder"),
                      (tmp_path / "afile" / "r.yaml", "is a file"), (ro / "r.yaml", "cannot write")):
        code, err = run(capsys, "export", study, "-o", out)
        assert code == 2 and says in err, (out, err)
    assert not (tmp_path / "newdir").exists() and (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    code, err = run(capsys, "export", study, "-o", tmp_path / "new" / "deep" / "r.yaml", "--format", "mergekit")
    assert code == 0 and yaml.safe_load((tmp_path / "new" / "deep" / "r.yaml").read_text())


def test_search_refuses_a_study_dir_that_cannot_be_a_folder(tmp_path, world, capsys):
    fam, target, _ = world
    space = space_file(tmp_path / "s.yaml", fam, target)
    (tmp_path / "afile").write_text("x")
    for out, says in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub" / "study", "is a file"),
                      (_read_only_dir(tmp_path) / "study", "cannot create the study folder")):
        code, err = run(capsys, "search", space, "--study-dir", out, "-q")
        assert code == 2 and says in err, (out, err)
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------ 10. messages


def test_every_problem_of_a_space_at_once(tmp_path, world, capsys):
    fam, target, _ = world
    space = ps_space(fam, target, objectives=[{"metric": "accuracy"}], seed=-1, colour="red")
    space["ps"]["sources"].append({"name": "e3", "model": str(tmp_path / "gone")})
    code, err = run(capsys, "search", write_space(tmp_path / "s.yaml", space), "--study-dir", tmp_path / "o", "-q")
    assert code == 2
    for part in ("unknown objective metric 'accuracy'", "seed", "unknown key 'colour'", "cannot open model",
                 "the evaluator reports: attn, combined, mlp, other"):
        assert part in err, (part, err)
    assert err.count("\n  - ") >= 4


def test_an_unknown_evaluator_kind_lists_every_kind(tmp_path, world, capsys):
    fam, target, _ = world
    space = space_file(tmp_path / "s.yaml", fam, target, evaluation={"kind": "judge"})
    code, err = run(capsys, "search", space, "--study-dir", tmp_path / "o", "-q")
    assert code == 2 and "unknown evaluator kind 'judge'" in err and "suite, weights" in err, err


@pytest.mark.parametrize("url,module", [("postgresql://u:pw@127.0.0.1:9/db", "psycopg"),
                                        ("mysql://u:pw@127.0.0.1:9/db", "MySQLdb")])
def test_a_missing_database_driver_says_install_it(tmp_path, world, capsys, url, module):
    if not _no_module(module):
        pytest.skip(f"{module} is installed here")
    fam, target, _ = world
    out = tmp_path / "study"
    code, err = run(capsys, "search", space_file(tmp_path / "s.yaml", fam, target), "--study-dir", out, "-q",
                    "--storage", url)
    assert code == 2 and "driver is not installed" in err and "pip install" in err and "pw" not in err, err
    assert "server is running" not in err and not out.exists()


def test_ray_timeout_flags_reach_the_executor_arguments():
    """The liveness flags map onto RayExecutor's own argument names (unset flags keep its defaults)."""
    import argparse
    import inspect

    from evomerge.search.cli import RAY_TIMEOUT_FLAGS, add_ray_options, ray_args
    from evomerge.workers.ray_executor import RayExecutor

    params = inspect.signature(RayExecutor.__init__).parameters
    parser = argparse.ArgumentParser()
    add_ray_options(parser)
    assert all(key in params for key, _ in RAY_TIMEOUT_FLAGS)
    assert not set(ray_args(parser.parse_args([]))) & {k for k, _ in RAY_TIMEOUT_FLAGS}
    got = ray_args(parser.parse_args(["--ray-restart-timeout", "7", "--ray-ping-timeout", "9",
                                       "--ray-start-timeout", "11"]))
    assert (got["restart_timeout"], got["ping_timeout"], got["start_timeout"]) == (7.0, 9.0, 11.0)
    assert set(ray_args(parser.parse_args([]))) <= set(params)


# ------------------------------------------------------------------ Ctrl-C at the awkward moments


@pytest.mark.parametrize("moment", ["created, not yet tracked", "told, not yet untracked"])
def test_ctrl_c_at_any_moment_leaves_no_running_trial(tmp_path, world, monkeypatch, moment):
    """The interrupt can land between a trial's creation in storage and the runner tracking it, or
    between Optuna's tell and the runner forgetting it: either way no trial stays RUNNING (which a
    later resume would mistake for a killed run's) and resume completes the budget."""
    from evomerge.search.driver import resume_search, start_search
    from evomerge.search.study import TrialRecords

    fam, target, _ = world
    path = space_file(tmp_path / "s.yaml", fam, target, budget={"trials": 8})
    calls = {"n": 0}
    if moment.startswith("created"):
        real = TrialRecords.new_trial

        def interrupted(self, **kw):
            number = real(self, **kw)
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return number

        monkeypatch.setattr(TrialRecords, "new_trial", interrupted)
    else:
        real = optuna.Study.tell

        def interrupted(self, *a, **kw):
            out = real(self, *a, **kw)
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(optuna.Study, "tell", interrupted)
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        start_search(path, out, progress=False)
    assert calls["n"] >= 6  # the interrupt came (abandon tells the rest)
    states = [t.state for t in search_trials(load(out))]
    assert optuna.trial.TrialState.RUNNING not in states, states
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 4
    monkeypatch.undo()
    assert resume_search(out, progress=False).complete
    done = [t for t in search_trials(load(out)) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 8


@pytest.mark.slow
def test_a_ctrl_c_that_the_evaluator_swallows_still_stops_the_search(tmp_path, world):
    """SIGINT lands in code that catches every exception (here an evaluator with a bare ``except``
    around its work; in the field a library's): the search still stops with KeyboardInterrupt at
    the runner's next wait, and no trial stays RUNNING."""
    import threading

    from evomerge.evaluate.evaluators import WeightDistanceEvaluator
    from evomerge.search.driver import start_search

    fam, target, _ = world

    class Swallowing(WeightDistanceEvaluator):
        def evaluate(self, recipe, **kw):
            while True:
                try:
                    time.sleep(0.3)
                    return super().evaluate(recipe, **kw)
                except BaseException:  # noqa: BLE001 - swallowed, and tried again: what the test is about
                    continue

    path = space_file(tmp_path / "s.yaml", fam, target, budget={"trials": 40})
    out, main_id, sent = tmp_path / "study", threading.main_thread().ident, []

    def interrupt():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in search_trials(load(out)))
            except Exception:  # noqa: BLE001 - the study is not created yet
                continue
            if n >= 3:
                signal.pthread_kill(main_id, signal.SIGINT)
                sent.append(n)
                return

    t = threading.Thread(target=interrupt)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            start_search(path, out, progress=False, evaluator_factory=lambda: Swallowing(target))
    finally:
        t.join()
    states = [t.state for t in search_trials(load(out))]
    assert sent and optuna.trial.TrialState.RUNNING not in states
    assert 3 <= states.count(optuna.trial.TrialState.COMPLETE) < 40
