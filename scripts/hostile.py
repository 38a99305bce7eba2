"""Run a table of bad inputs and faults against the `evomerge` CLI and count how each one ends.

Every case runs the real CLI in a subprocess (``python -m evomerge.cli ...``) in a fresh folder,
over the shipped demo zoo (``evals/zoo``) or copies of it damaged on purpose, and checks:

* **clean error**: the exit code the case expects (2 for bad input, 3 for a search stopped by a
  fault, 0 where the input is fine), ``error: ...`` on stderr and no Python traceback;
* **traceback**: ``Traceback (most recent call last)`` anywhere in the output;
* **wrong exit code**: any other code (e.g. 0 for bad input that was accepted);
* **partial output**: something left under a final name that looks complete (an output folder of a
  failed merge, a study folder of a failed search start, a changed ``study.json``);
* **data lost**: trials of a study lost, repeated or left running after a fault and a resume;
* **hang**: the command did not end within the case's time limit (it is then killed).

Faults are real: ``kill -9`` / SIGINT of the CLI, a second process on the same study, full and
read-only filesystems (tmpfs mounts, skipped with a note where ``mount`` is not permitted), and on a
Ray search (``--ray``) kill -9 of a worker and of the node's dashboard agent.

    python scripts/hostile.py               # every case but the Ray ones (~5 minutes on 2 cores)
    python scripts/hostile.py --ray         # Ray cases too
    python scripts/hostile.py -k merge      # cases whose name contains "merge"
    python scripts/hostile.py --list

Prints one row per case and the totals; exits 1 when any case is not clean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "evals" / "zoo"
SUITE = REPO / "evals" / "zoo_demo.yaml"
TRACEBACK = "Traceback (most recent call last)"


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Ctx:
    dir: Path
    notes: list[str] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def p(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


@dataclass
class Outcome:
    rc: int | None  # None: hung (killed at the time limit)
    out: str
    seconds: float


@dataclass
class Case:
    name: str
    group: str
    argv: Callable[[Ctx], list[str]]
    expect: int | tuple[int, ...] = 2  # the exit code(s) a clean ending may have
    setup: Callable[[Ctx], None] | None = None
    # during the run: gets the context and the running process; returns nothing
    fault: Callable[[Ctx, subprocess.Popen], None] | None = None
    # after the run: returns ("partial" | "lost" | "message", text) findings
    check: Callable[[Ctx, Outcome], list[tuple[str, str]]] | None = None
    timeout: float = 120.0
    needs_mount: bool = False
    ray: bool = False


CASES: list[Case] = []


def case(name: str, group: str, argv, **kw) -> None:
    CASES.append(Case(name, group, argv if callable(argv) else (lambda c, a=argv: list(a)), **kw))


MARKER = "EVOMERGE_HOSTILE_CASE"  # set in every case's environment: finds its Ray daemons afterwards


def env(ctx: Ctx | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if ctx is not None:
        e[MARKER] = str(ctx.dir)
    e["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), e.get("PYTHONPATH", "")] if p)
    return e


def cli(ctx: Ctx, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI to completion (set-up steps: a case's own command goes through ``run_case``)."""
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd or ctx.dir, env=env(ctx),
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def model_copy(ctx: Ctx, name: str = "m", src: str = "expert_arith") -> Path:
    dst = ctx.p(name)
    shutil.copytree(ZOO / src, dst)
    return dst


def mount_tmpfs(ctx: Ctx, where: Path, size: str, ro: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        return False
    ctx.mounts.append(where)
    if ro:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    return True


def recipe_linear(*models: str | Path, **extra) -> str:
    import yaml

    data = {"kind": "merge", "method": "linear",
            "sources": [{"model": str(m), "params": {"weight": 1.0}} for m in models], **extra}
    return yaml.safe_dump(data, sort_keys=False)


def good_recipe(ctx: Ctx) -> Path:
    return write(ctx.p("r.yaml"), recipe_linear(ZOO / "expert_arith", ZOO / "expert_reverse"))


def space_yaml(ctx: Ctx, name: str = "s.yaml", trials: int = 4, **over) -> Path:
    import yaml

    space = {
        "name": "h", "kind": "ps", "seed": 0,
        "ps": {"base": str(ZOO / "base"),
               "sources": [{"name": "arith", "model": str(ZOO / "expert_arith")},
                           {"name": "reverse", "model": str(ZOO / "expert_reverse")}],
               "method": "task_arithmetic", "params": {"weight": {"low": 0.0, "high": 1.5}, "lambda": 1.0}},
        "objectives": [{"metric": "combined"}],
        "optimizer": {"name": "pycma", "popsize": 2, "sigma0": 0.25},
        "evaluation": {"kind": "suite", "suite": str(SUITE)},
        "multi_fidelity": {"enabled": False},
        "baselines": False,
        "budget": {"trials": trials},
    }
    for k, v in over.items():
        if v is None:
            space.pop(k, None)
        elif isinstance(v, dict) and isinstance(space.get(k), dict):
            space[k] = {**space[k], **v}
        else:
            space[k] = v
    return write(ctx.p(name), yaml.safe_dump(space, sort_keys=False))


def _study_base(cache: dict = {}) -> Path:  # noqa: B006 - built once per run
    """A finished 4-trial study, built once and copied into each case that needs one."""
    if "dir" not in cache:
        root = Path(tempfile.mkdtemp(prefix="hostile-base-"))
        ctx = Ctx(root)
        space_yaml(ctx)
        r = cli(ctx, "search", "s.yaml", "--study-dir", "study", "--limit", "2", "-q")
        if r.returncode != 0:
            raise SystemExit(f"could not build the base study:\n{r.stderr[-3000:]}")
        cache["dir"] = root
    return cache["dir"]


def study_copy(ctx: Ctx) -> Path:
    base = _study_base()
    shutil.copy(base / "s.yaml", ctx.p("s.yaml"))
    shutil.copytree(base / "study", ctx.p("study"), symlinks=True)
    # the default storage URL is absolute: point the copy's study.json at its own database
    meta = json.loads(ctx.p("study", "study.json").read_text())
    if meta["storage"].startswith("sqlite:///"):
        meta["storage"] = f"sqlite:///{ctx.p('study', 'study.db')}"
        ctx.p("study", "study.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ctx.p("study")


# ------------------------------------------------------------------------------------------ checks


def no_path(*parts: str) -> Callable[[Ctx, Outcome], list[tuple[str, str]]]:
    def check(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
        path = ctx.p(*parts)
        return [("partial", f"{path.name} left behind")] if path.exists() else []

    return check


def no_tmp_leftovers(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
    left = [p.name for p in ctx.dir.rglob("*") if ".tmp-" in p.name]
    return [("partial", f"temporary outputs left: {left}")] if left else []


def says(*words: str) -> Callable[[Ctx, Outcome], list[tuple[str, str]]]:
    def check(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
        low = o.out.lower()
        return [("message", f"message does not mention {w!r}") for w in words if w.lower() not in low]

    return check


def both(*checks) -> Callable[[Ctx, Outcome], list[tuple[str, str]]]:
    def check(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
        return [f for c in checks for f in c(ctx, o)]

    return check


def meta_unchanged(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
    before = ctx.notes[0] if ctx.notes else None
    now = ctx.p("study", "study.json").read_text() if ctx.p("study", "study.json").exists() else None
    found = [] if before == now else [("partial", "study.json changed by a failed command")]
    r = cli(ctx, "status", "study")
    if r.returncode != 0:
        found.append(("lost", f"`status` fails afterwards: {r.stderr.strip()[-200:]}"))
    return found


def remember_meta(ctx: Ctx) -> None:
    study_copy(ctx)
    ctx.notes.append(ctx.p("study", "study.json").read_text())


def trials_of(db: Path) -> list[tuple[int, str]]:
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    finally:
        con.close()


def resumes_to_budget(budget: int) -> Callable[[Ctx, Outcome], list[tuple[str, str]]]:
    """After the fault: `evomerge resume` must finish the study to its budget, no trial lost or left
    running, no trial number twice, the interrupted ones marked so."""

    def check(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
        if not ctx.p("study", "study.json").exists():
            return [("lost", "no study folder after the fault")]
        r = cli(ctx, "resume", "study", "--workers", "1", "-q", timeout=600)
        if r.returncode != 0 or TRACEBACK in r.stderr:
            return [("lost", f"resume failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")]
        rows = trials_of(ctx.p("study", "study.db"))
        numbers = [n for n, _ in rows]
        found = []
        if len(numbers) != len(set(numbers)):
            found.append(("lost", "a trial number appears twice"))
        if any(s == "RUNNING" for _, s in rows):
            found.append(("lost", "trials left RUNNING after resume"))
        st = json.loads(cli(ctx, "status", "study", "--json").stdout or "{}")
        done = _finished(st)
        if done is not None and done < budget:
            found.append(("lost", f"only {done} of {budget} trials finished after resume"))
        return found

    return check


def _finished(st: dict) -> int | None:
    stages = st.get("stages") if isinstance(st, dict) else None
    if isinstance(stages, dict) and stages:
        last = list(stages.values())[-1]
        for key in ("finished", "done", "complete"):
            if isinstance(last.get(key), int):
                return last[key]
    return None


# ------------------------------------------------------------------------------------------ faults


def kill_after(delay: float, sig: int = signal.SIGKILL, when: Callable[[Ctx], bool] | None = None):
    def fault(ctx: Ctx, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 120
        while when is not None and not when(ctx) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    return fault


def trials_started(n: int) -> Callable[[Ctx], bool]:
    def when(ctx: Ctx) -> bool:
        db = ctx.p("study", "study.db")
        if not db.exists():
            return False
        try:
            return len(trials_of(db)) >= n
        except sqlite3.Error:
            return False

    return when


def second_resume(ctx: Ctx, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not trials_started(1)(ctx) and time.monotonic() < deadline:
        time.sleep(0.2)
    r = cli(ctx, "resume", "study", "-q")
    ctx.notes.append(f"second: exit {r.returncode}; {r.stderr.strip()[-300:]}")


def second_was_refused(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
    note = next((n for n in ctx.notes if n.startswith("second:")), "second: never ran")
    found = []
    if not note.startswith("second: exit 2"):
        found.append(("lost", f"the second process on the study was not refused ({note[:200]})"))
    if TRACEBACK in note:
        found.append(("message", "the second process printed a traceback"))
    rows = trials_of(ctx.p("study", "study.db"))
    if any(s == "RUNNING" for _, s in rows):
        found.append(("lost", "trials left RUNNING"))
    return found


def ray_kill(*patterns: str, after_trials: int = 2):
    """kill -9 the first process of this Ray session whose program (or script) contains one of
    ``patterns``."""

    def fault(ctx: Ctx, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 180
        while not trials_started(after_trials)(ctx) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
        time.sleep(1.0)
        for pid in _descendants(proc.pid) + _ray_session_pids(ctx):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            cmd = " ".join(argv)
            # the program (or the script a Python runs), never an argument: a raylet's command line
            # carries its agents' command lines as arguments
            if any(p in a for a in argv[:2] for p in patterns):
                os.kill(pid, signal.SIGKILL)
                ctx.notes.append(f"killed {pid}: {cmd[:80]}")
                return
        ctx.notes.append(f"no process matching {patterns} found")

    return fault


def killed(ctx: Ctx, o: Outcome) -> list[tuple[str, str]]:
    """The fault really happened (its process was found and killed)."""
    return [] if any(n.startswith("killed ") for n in ctx.notes) else [("message", "; ".join(ctx.notes) or "no kill")]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def _ray_session_pids(ctx: Ctx) -> list[int]:
    """Processes whose environment carries this case's marker (Ray daemons need not be our children)."""
    pids = []
    marker = f"{MARKER}={ctx.dir}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker + b"\0" in (d / "environ").read_bytes() + b"\0":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


# ------------------------------------------------------------------------------------------ the table


def _damaged(kind: str):
    """A copy of a zoo model damaged in one way (set-up step)."""

    def setup(ctx: Ctx) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        m = model_copy(ctx)
        st = m / "model.safetensors"
        if kind == "truncated":
            data = st.read_bytes()
            st.write_bytes(data[: len(data) // 2])
        elif kind == "header":
            data = bytearray(st.read_bytes())
            data[8:40] = b"\x00\xff" * 16
            st.write_bytes(bytes(data))
        elif kind == "shapes":
            t = load_file(str(st))
            name = next(k for k in t if k.endswith("mlp.up_proj.weight"))
            t[name] = t[name][:-1].contiguous()
            save_file(t, str(st), metadata={"format": "pt"})
        elif kind == "pickle":
            torch.save(load_file(str(st)), m / "pytorch_model.bin")
            st.unlink()
        elif kind == "missing":
            t = load_file(str(st))
            for k in [k for k in t if ".layers.1." in k]:
                del t[k]
            save_file(t, str(st), metadata={"format": "pt"})
        elif kind == "layers":
            cfg = json.loads((m / "config.json").read_text())
            cfg["num_hidden_layers"] += 2
            (m / "config.json").write_text(json.dumps(cfg))
        elif kind == "notokenizer":
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (m / f).unlink(missing_ok=True)
        elif kind == "config":
            (m / "config.json").write_text("{not json")
        elif kind == "empty":
            shutil.rmtree(m)
            m.mkdir()
        else:
            raise ValueError(kind)

    return setup


def _other_shape(ctx: Ctx) -> None:
    from evomerge.tiny import build_tiny_model

    build_tiny_model(ctx.p("other"), num_layers=4, hidden_size=64)


def build_cases() -> None:  # noqa: PLR0915 - one table
    z = lambda name: str(ZOO / name)  # noqa: E731

    # ---- recipe files
    case("recipe: missing file", "inputs", ["merge", "nope.yaml", "out"], check=no_path("out"))
    case("recipe: a folder", "inputs", ["merge", ".", "out"], check=no_path("out"))
    case("recipe: not UTF-8", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), b"kind: merge\nmethod: linear\n# \xff\xfe\n"),
         check=both(no_path("out"), says("UTF-8")))
    case("recipe: invalid YAML", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), "kind: [merge\n"), check=no_path("out"))
    case("recipe: empty file", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), ""), check=no_path("out"))
    case("recipe: a YAML list", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), "- 1\n- 2\n"), check=no_path("out"))
    case("recipe: unknown method", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), recipe_linear(z("expert_arith")).replace("linear", "tiez")),
         check=no_path("out"))
    case("recipe: unknown key and a bad weight, both reported", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), recipe_linear(z("expert_arith"), z("expert_reverse"), colour="red")
                               .replace("weight: 1.0", "weight: heavy", 1)),
         check=both(no_path("out"), says("colour", "weight")))
    case("recipe: density above 1", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), f"kind: merge\nmethod: ties\nbase: {z('base')}\nsources:\n"
                               f"  - model: {z('expert_arith')}\n    params: {{weight: 1, density: 1.5}}\n"),
         check=no_path("out"))
    case("recipe: source path missing", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), recipe_linear(z("expert_arith"), "missing/model")),
         check=both(no_path("out"), says("missing/model")))
    case("recipe: two YAML documents", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), recipe_linear(z("expert_arith")) + "---\n" + recipe_linear(z("base"))),
         check=no_path("out"))
    case("mergekit: unknown key and unknown method, both reported", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), f"merge_method: frankenmerge\nfoo: 1\nmodels:\n  - model: {z('base')}\n"),
         check=both(no_path("out"), says("foo", "frankenmerge")))
    case("mergekit: a mergekit-moe config", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), f"base_model: {z('base')}\ngate_mode: hidden\nexperts:\n"
                               f"  - source_model: {z('expert_arith')}\n    positive_prompts: [math]\n"),
         check=both(no_path("out"), says("mergekit-moe")))
    case("mergekit: models entry without model", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), "merge_method: linear\nmodels:\n  - modle: x\n  - model: y\n"
                               "    parameters: 3\n"),
         check=both(no_path("out"), says("models[0]", "models[1]")))
    case("mergekit: slice without layer_range", "inputs", ["merge", "r.yaml", "out"],
         setup=lambda c: write(c.p("r.yaml"), f"merge_method: passthrough\nslices:\n  - sources:\n"
                               f"      - model: {z('base')}\n"),
         check=no_path("out"))

    # ---- suites
    case("suite: missing file", "inputs", ["eval", z("expert_arith"), "--suite", "nope.yaml"])
    case("suite: not UTF-8", "inputs", ["eval", z("expert_arith"), "--suite", "s.yaml"],
         setup=lambda c: write(c.p("s.yaml"), b"name: x\ntasks: []\n# caf\xe9\n"), check=says("UTF-8"))
    case("suite: malformed JSONL line", "inputs", ["eval", z("expert_arith"), "--suite", "s.yaml"],
         setup=lambda c: (write(c.p("d.jsonl"), '{"prompt": "1+1=", "answer": "2"}\n{oops\n'),
                          write(c.p("s.yaml"), "name: x\ntasks:\n  - name: t\n    kind: generate\n"
                                "    data: {search: d.jsonl, held-out: d.jsonl}\n")),
         check=says("d.jsonl:2"))
    case("suite: JSONL not UTF-8", "inputs", ["eval", z("expert_arith"), "--suite", "s.yaml"],
         setup=lambda c: (write(c.p("d.jsonl"), b'{"prompt": "\xff", "answer": "2"}\n'),
                          write(c.p("s.yaml"), "name: x\ntasks:\n  - name: t\n    kind: generate\n"
                                "    data: {search: d.jsonl, held-out: d.jsonl}\n")),
         check=says("d.jsonl"))
    case("suite: unknown task kind", "inputs", ["eval", z("expert_arith"), "--suite", "s.yaml"],
         setup=lambda c: (write(c.p("d.jsonl"), '{"prompt": "1+1=", "answer": "2"}\n'),
                          write(c.p("s.yaml"), "name: x\ntasks:\n  - name: t\n    kind: chat\n"
                                "    data: {search: d.jsonl, held-out: d.jsonl}\n")))

    # ---- search spaces (a failed start leaves no study folder)
    case("space: missing file", "inputs", ["search", "nope.yaml", "--study-dir", "study"], check=no_path("study"))
    case("space: not UTF-8", "inputs", ["search", "s.yaml", "--study-dir", "study"],
         setup=lambda c: write(c.p("s.yaml"), b"name: x\n# \xff\n"), check=no_path("study"))
    case("space: unknown metric and unknown key, both reported", "inputs",
         ["search", "s.yaml", "--study-dir", "study", "--limit", "2"],
         setup=lambda c: space_yaml(c, objectives=[{"metric": "acuracy"}], colour="red"),
         check=both(no_path("study"), says("acuracy", "colour")))
    case("space: unknown evaluator kind lists the kinds", "inputs",
         ["search", "s.yaml", "--study-dir", "study", "--limit", "2"],
         setup=lambda c: space_yaml(c, evaluation={"kind": "vibes"}),
         check=both(no_path("study"), says("vibes", "suite")))
    case("space: bad sampler option", "inputs", ["search", "s.yaml", "--study-dir", "study", "--limit", "2"],
         setup=lambda c: space_yaml(c, optimizer={"name": "tpe", "popsize": 2, "n_startup_trials": "many"}),
         check=no_path("study"))
    case("space: suite file missing", "inputs", ["search", "s.yaml", "--study-dir", "study", "--limit", "2"],
         setup=lambda c: space_yaml(c, evaluation={"kind": "suite", "suite": "nope.yaml"}),
         check=no_path("study"))
    case("space: source of another shape", "inputs", ["search", "s.yaml", "--study-dir", "study", "--limit", "2"],
         setup=lambda c: (_other_shape(c), space_yaml(c, ps={"sources": [
             {"name": "arith", "model": z("expert_arith")}, {"name": "other", "model": str(c.p("other"))}]})),
         check=both(no_path("study"), says("other")))
    case("space: source path missing", "inputs", ["search", "s.yaml", "--study-dir", "study", "--limit", "2"],
         setup=lambda c: space_yaml(c, ps={"sources": [{"name": "arith", "model": "missing/model"},
                                                       {"name": "b", "model": z("expert_reverse")}]}),
         check=no_path("study"))

    # ---- output paths
    case("merge: OUT under a regular file", "paths", ["merge", "r.yaml", "afile/out"],
         setup=lambda c: (good_recipe(c), write(c.p("afile"), "x")), check=no_tmp_leftovers)
    case("merge: OUT on a read-only filesystem", "paths", ["merge", "r.yaml", "ro/out"], needs_mount=True,
         setup=lambda c: (good_recipe(c), mount_tmpfs(c, c.p("ro"), "4m", ro=True)))
    case("merge: disk full while writing shards", "paths", ["merge", "r.yaml", "small/out"], needs_mount=True,
         setup=lambda c: (good_recipe(c), mount_tmpfs(c, c.p("small"), "512k")),
         check=both(no_path("small", "out"), no_tmp_leftovers, says("space")))
    case("merge: disk full while copying tokenizer files", "paths", ["merge", "r.yaml", "small/out"],
         needs_mount=True, setup=lambda c: (good_recipe(c), mount_tmpfs(c, c.p("small"), "1320k")),
         check=both(no_path("small", "out"), no_tmp_leftovers))
    case("merge: --device tpu", "paths", ["merge", "r.yaml", "out", "--device", "tpu"],
         setup=good_recipe, check=no_path("out"))
    case("merge: --device cuda without a GPU", "paths", ["merge", "r.yaml", "out", "--device", "cuda:3"],
         setup=good_recipe, check=no_path("out"))
    case("merge: --shard-size junk", "paths", ["merge", "r.yaml", "out", "--shard-size", "lots"],
         setup=good_recipe, check=no_path("out"))
    case("merge: --shard-size 0", "paths", ["merge", "r.yaml", "out", "--shard-size", "0"],
         setup=good_recipe, check=no_path("out"))
    case("merge: OUT exists, no --overwrite", "paths", ["merge", "r.yaml", "out"],
         setup=lambda c: (good_recipe(c), write(c.p("out", "keep.txt"), "mine")),
         check=lambda c, o: [] if c.p("out", "keep.txt").exists() else [("lost", "existing OUT touched")])
    case("export: -o onto a folder", "paths", ["export", "study", "-o", "adir"],
         setup=lambda c: (study_copy(c), c.p("adir").mkdir()))
    case("export: -o on a read-only filesystem", "paths", ["export", "study", "-o", "ro/best.yaml"], needs_mount=True,
         setup=lambda c: (study_copy(c), mount_tmpfs(c, c.p("ro"), "1m", ro=True)))
    case("export: -o under a regular file", "paths", ["export", "study", "-o", "afile/best.yaml"],
         setup=lambda c: (study_copy(c), write(c.p("afile"), "x")))
    case("search: --study-dir under a regular file", "paths",
         ["search", "s.yaml", "--study-dir", "afile/study", "--limit", "2"],
         setup=lambda c: (space_yaml(c), write(c.p("afile"), "x")))
    case("search: --study-dir on a read-only filesystem", "paths",
         ["search", "s.yaml", "--study-dir", "ro/study", "--limit", "2"], needs_mount=True,
         setup=lambda c: (space_yaml(c), mount_tmpfs(c, c.p("ro"), "1m", ro=True)))
    case("eval: model folder missing", "paths", ["eval", "nope", "--suite", str(SUITE)])

    # ---- damaged checkpoints: eval and merge go through the same checks
    for kind, what in [("truncated", "truncated shard"), ("header", "corrupt header"), ("shapes", "wrong shapes"),
                       ("pickle", "pytorch_model.bin only"), ("missing", "missing tensors"),
                       ("layers", "config layer count disagrees"), ("config", "config.json not JSON"),
                       ("empty", "empty folder")]:
        case(f"eval: {what}", "checkpoints", ["eval", "m", "--suite", str(SUITE), "--limit", "2"],
             setup=_damaged(kind))
        case(f"merge: source with {what}", "checkpoints", ["merge", "r.yaml", "out"],
             setup=lambda c, k=kind: (_damaged(k)(c), write(c.p("r.yaml"), recipe_linear(c.p("m"), z("expert_reverse")))),
             check=both(no_path("out"), no_tmp_leftovers))
    case("eval: no tokenizer", "checkpoints", ["eval", "m", "--suite", str(SUITE), "--limit", "2"],
         setup=_damaged("notokenizer"), check=says("tokenizer"))
    case("merge: tokenizer source without a tokenizer", "checkpoints", ["merge", "r.yaml", "out"],
         setup=lambda c: (_damaged("notokenizer")(c),
                          write(c.p("r.yaml"), recipe_linear(c.p("m"), z("expert_reverse"), tokenizer=str(c.p("m"))))),
         check=both(no_path("out"), says("tokenizer")))

    # ---- numbers on the command line
    for argv, flag in [(["search", "s.yaml", "--study-dir", "study", "--trials", "0"], "--trials"),
                       (["search", "s.yaml", "--study-dir", "study", "--trials", "-3"], "--trials"),
                       (["search", "s.yaml", "--study-dir", "study", "--limit", "0"], "--limit"),
                       (["search", "s.yaml", "--study-dir", "study", "--workers", "0"], "--workers"),
                       (["search", "s.yaml", "--study-dir", "study", "--timeout", "soon"], "--timeout")]:
        case(f"search: {' '.join(argv[3:])}", "numbers", argv, setup=space_yaml,
             check=both(no_path("study"), says(flag)))
    case("eval: --batch-size 0", "numbers", ["eval", z("expert_arith"), "--suite", str(SUITE), "--batch-size", "0"],
         check=says("--batch-size"))
    case("eval: --limit 0", "numbers", ["eval", z("expert_arith"), "--suite", str(SUITE), "--limit", "0"],
         check=says("--limit"))
    case("resume: --trials -1 leaves study.json as it was", "numbers", ["resume", "study", "--trials", "-1"],
         setup=remember_meta, check=meta_unchanged)
    case("resume: --workers 0 leaves study.json as it was", "numbers", ["resume", "study", "--workers", "0"],
         setup=remember_meta, check=meta_unchanged)

    # ---- studies
    case("search: into an existing study is refused", "study", ["search", "s.yaml", "--study-dir", "study"],
         setup=remember_meta, check=meta_unchanged)
    case("resume: a folder that is not a study", "study", ["resume", "adir"], setup=lambda c: c.p("adir").mkdir())
    case("resume: --storage with a bad URL leaves study.json as it was", "study",
         ["resume", "study", "--storage", "sqlite:////nonexistent/dir/x.db"], setup=remember_meta, check=meta_unchanged)
    case("resume: --storage postgresql without a driver says install", "study",
         ["resume", "study", "--storage", "postgresql://u:p@127.0.0.1:1/db"], setup=remember_meta,
         check=both(meta_unchanged, lambda c, o: [] if "install" in o.out or "connect" in o.out.lower()
                    or "reach" in o.out.lower() else [("message", "no hint")]))
    case("resume: database deleted", "study", ["resume", "study"],
         setup=lambda c: (study_copy(c), c.p("study", "study.db").unlink()),
         check=lambda c, o: [("partial", "a new empty study was started")] if c.p("study", "study.db").exists()
         and trials_of(c.p("study", "study.db")) == [] else [])
    case("resume: from another working directory (relative paths)", "study", ["resume", "../study", "--trials", "4",
                                                                              "-q"], expect=0,
         setup=_relative_study, timeout=300)
    case("rescore: from another working directory (relative paths)", "study", ["rescore", "../study"], expect=0,
         setup=_relative_study, timeout=300)
    case("status: missing folder", "study", ["status", "nope"])
    case("export: unknown trial", "study", ["export", "study", "-o", "x.yaml", "--trial", "999"],
         setup=study_copy, check=no_path("x.yaml"))
    case("report: a folder that is not a study", "study", ["report", "adir"], setup=lambda c: c.p("adir").mkdir())

    # ---- faults
    case("fault: kill -9 of a search, then resume", "faults", ["search", "s.yaml", "--study-dir", "study",
                                                               "--limit", "2", "-q"], expect=-9,
         setup=lambda c: space_yaml(c, trials=8), fault=kill_after(0.5, when=trials_started(3)),
         check=resumes_to_budget(8), timeout=300)
    case("fault: Ctrl-C of a search, then resume", "faults", ["search", "s.yaml", "--study-dir", "study",
                                                              "--limit", "2", "-q"], expect=130,
         setup=lambda c: space_yaml(c, trials=8), fault=kill_after(0.5, signal.SIGINT, when=trials_started(3)),
         check=resumes_to_budget(8), timeout=300)
    case("fault: a second process on a running study", "faults", ["search", "s.yaml", "--study-dir", "study",
                                                                   "--limit", "2", "-q"], expect=0,
         setup=lambda c: space_yaml(c, trials=8), fault=second_resume, check=second_was_refused, timeout=300)
    case("fault: kill -9 of a merge, then merge again", "faults", ["merge", "r.yaml", "out"], expect=0,
         setup=lambda c: (good_recipe(c), _killed_merge(c)), check=no_tmp_leftovers, timeout=180)

    # ---- Ray (with --ray)
    case("ray: kill -9 of a worker mid-search", "ray", ["search", "s.yaml", "--study-dir", "study", "--limit", "2",
                                                        "--workers", "2", "-q"], expect=0, ray=True,
         setup=lambda c: space_yaml(c, trials=8), fault=ray_kill("ray::RayWorker"),
         check=both(resumes_to_budget(8), killed), timeout=400)
    case("ray: kill -9 of the dashboard agent mid-search", "ray",
         ["search", "s.yaml", "--study-dir", "study", "--limit", "2", "--workers", "2", "-q"], expect=(0, 3), ray=True,
         setup=lambda c: space_yaml(c, trials=24), fault=ray_kill("ray::DashboardAgent", "dashboard/agent.py"),
         check=both(resumes_to_budget(24), killed), timeout=400)
    case("ray: kill -9 of the raylet mid-search", "ray",
         ["search", "s.yaml", "--study-dir", "study", "--limit", "2", "--workers", "2", "-q"], expect=3, ray=True,
         setup=lambda c: space_yaml(c, trials=8), fault=ray_kill("/raylet"),
         check=both(resumes_to_budget(8), killed), timeout=400)


def _relative_study(ctx: Ctx) -> None:
    """A 2-trial study whose space names the zoo and suite by relative paths; the case then runs
    from a sibling folder (set-up step)."""
    (ctx.p("evals")).symlink_to(REPO / "evals", target_is_directory=True)
    space_yaml(ctx, trials=2, evaluation={"kind": "suite", "suite": "evals/zoo_demo.yaml"},
               ps={"base": "evals/zoo/base", "sources": [{"name": "arith", "model": "evals/zoo/expert_arith"},
                                                         {"name": "reverse", "model": "evals/zoo/expert_reverse"}]})
    r = cli(ctx, "search", "s.yaml", "--study-dir", "study", "--limit", "2", "-q")
    if r.returncode != 0:
        raise RuntimeError(f"set-up search failed: {r.stderr[-500:]}")
    ctx.p("elsewhere").mkdir()


def _killed_merge(ctx: Ctx) -> None:
    """Start a merge into ``out`` and kill -9 it once its temporary folder exists (set-up step)."""
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "merge", "r.yaml", "out", "-q"], cwd=ctx.dir,
                            env=env(ctx), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(".tmp-" in p.name for p in ctx.dir.iterdir()):
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    if ctx.p("out").exists():
        shutil.rmtree(ctx.p("out"))  # the merge finished before the kill: nothing to clean up then
    ctx.notes.append("temp folder left: " + str([p.name for p in ctx.dir.iterdir() if ".tmp-" in p.name]))


# ------------------------------------------------------------------------------------------ runner


@dataclass
class Row:
    case: Case
    verdict: str  # clean | traceback | wrong exit | partial | lost | hang | message | skipped
    rc: int | None
    seconds: float
    detail: str


def run_case(c: Case, root: Path, can_mount: bool) -> Row:
    if c.needs_mount and not can_mount:
        return Row(c, "skipped", None, 0.0, "mount not permitted here")
    ctx = Ctx(Path(tempfile.mkdtemp(prefix="case-", dir=root)))
    try:
        if c.setup:
            c.setup(ctx)
        argv = c.argv(ctx)
        cwd = ctx.p("elsewhere") if ctx.p("elsewhere").is_dir() else ctx.dir
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *argv], cwd=cwd, env=env(ctx),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        import threading

        fault = threading.Thread(target=c.fault, args=(ctx, proc), daemon=True) if c.fault else None
        if fault:
            fault.start()
        try:
            out, _ = proc.communicate(timeout=c.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc = None
        if fault:
            fault.join(timeout=300)
        o = Outcome(rc, out or "", time.monotonic() - start)
        findings = c.check(ctx, o) if c.check else []
        last = o.out.strip().splitlines()[-1][:160] if o.out.strip() else ""
        if rc is None:
            return Row(c, "hang", None, o.seconds, f"killed after {c.timeout:.0f} s; {last}")
        if TRACEBACK in o.out:
            return Row(c, "traceback", rc, o.seconds, _traceback_tail(o.out))
        if rc not in (c.expect if isinstance(c.expect, tuple) else (c.expect,)):
            return Row(c, "wrong exit", rc, o.seconds, f"expected {c.expect}; {last}")
        if rc == 2 and "error:" not in o.out:
            return Row(c, "message", rc, o.seconds, f"no 'error:' line; {last}")
        for kind in ("lost", "partial", "message"):
            hits = [t for k, t in findings if k == kind]
            if hits:
                return Row(c, kind, rc, o.seconds, "; ".join(hits))
        return Row(c, "clean", rc, o.seconds, last)
    except Exception as err:  # noqa: BLE001 - a broken case is reported, the run goes on
        return Row(c, "harness", None, 0.0, f"{type(err).__name__}: {err}")
    finally:
        for m in reversed(ctx.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        _kill_leftovers(ctx)


def _traceback_tail(out: str) -> str:
    lines = [ln for ln in out[out.index(TRACEBACK):].splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "traceback"


def _kill_leftovers(ctx: Ctx) -> None:
    for pid in _ray_session_pids(ctx):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _can_mount(root: Path) -> bool:
    probe = root / ".mount-probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="pattern", default=None, help="only cases whose name contains this")
    ap.add_argument("--ray", action="store_true", help="include the Ray node-loss cases (slow)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the case folders")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    build_cases()
    cases = [c for c in CASES if (args.ray or not c.ray) and (not args.pattern or args.pattern in c.name)]
    if args.list:
        for c in cases:
            print(f"{c.group:12s} {c.name}")
        print(f"{len(cases)} cases")
        return 0
    root = Path(tempfile.mkdtemp(prefix="evomerge-hostile-"))
    can_mount = _can_mount(root)
    print(f"# {len(cases)} cases; {platform.node() and 'machine: ' + platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; tmpfs mounts {'available' if can_mount else 'NOT available'}",
          flush=True)
    rows = []
    started = time.monotonic()
    for i, c in enumerate(cases, 1):
        row = run_case(c, root, can_mount)
        rows.append(row)
        print(f"{i:3d} {row.verdict:10s} rc={str(row.rc):5s} {row.seconds:6.1f}s  [{c.group}] {c.name}: "
              f"{row.detail[:150]}", flush=True)
    counts = {v: sum(r.verdict == v for r in rows) for v in
              ("clean", "traceback", "wrong exit", "partial", "lost", "hang", "message", "skipped", "harness")}
    table = ["| cases | clean | tracebacks | wrong exit codes | partial outputs left | data lost | hangs | "
             "unclear messages | skipped | harness errors |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {len(rows)} | {counts['clean']} | {counts['traceback']} | {counts['wrong exit']} | {counts['partial']} "
             f"| {counts['lost']} | {counts['hang']} | {counts['message']} | {counts['skipped']} | {counts['harness']} |"]
    groups = sorted({r.case.group for r in rows})
    table += ["", "| group | cases | clean |", "|---|---|---|"]
    table += [f"| {g} | {sum(r.case.group == g for r in rows)} | "
              f"{sum(r.case.group == g and r.verdict == 'clean' for r in rows)} |" for g in groups]
    print()
    print("\n".join(table))
    print(f"\n{time.monotonic() - started:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(table) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        base = _study_base.__defaults__[0].get("dir")
        if base:
            shutil.rmtree(base, ignore_errors=True)
    bad = len(rows) - counts["clean"] - counts["skipped"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
