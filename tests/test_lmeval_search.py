"""The lm-eval evaluator (kind ``lmeval``) on local custom multiple-choice tasks over the shipped demo
zoo: real lm-eval, real models, nothing downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from test_search_support import write_space
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.evaluate import lmeval_score
from evomerge.recipe import parse_recipe
from evomerge.search import start_search
from evomerge.evaluate.evaluators import make_evaluator

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "evals" / "zoo"
TASKS = ["zoo_rev_mc", "zoo_arith_mc"]
N_DOCS = 40


def _rows(name: str) -> list[dict]:
    with open(ROOT / "evals" / "data" / f"{name}.search.jsonl") as fh:
        return [json.loads(line) for line in fh][:N_DOCS]


def _mc(prompt: str, answer: str, distractors: list[str], i: int) -> dict:
    choices = [answer, *[d for d in dict.fromkeys(distractors) if d != answer]][:3]
    k = i % len(choices)  # the right answer moves around
    choices = choices[k:] + choices[:k]
    return {"q": prompt, "choices": choices, "label": choices.index(answer)}


def _task_yaml(folder: Path, name: str, docs: list[dict]) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {folder / (name + '.jsonl')}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two 40-document tasks from the zoo's skills: pick the reversed word (distractors: the word
    itself, the reversal with two letters swapped), and pick the sum (off by one either way)."""
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    rev = []
    for i, r in enumerate(_rows("zoo_reverse")):
        a = r["answer"]
        rev.append(_mc(r["prompt"], a, [r["prompt"][2:-1], a[1] + a[0] + a[2:], a[::-1] + "x"], i))
    arith = [_mc(r["prompt"], r["answer"], [str(int(r["answer"]) + 1), str(int(r["answer"]) - 1)], i)
             for i, r in enumerate(_rows("zoo_arith"))]
    _task_yaml(folder, "zoo_rev_mc", rev)
    _task_yaml(folder, "zoo_arith_mc", arith)
    return folder


def _config(task_dir: Path, **over) -> dict:
    return {"kind": "lmeval", "tasks": TASKS, "include_path": str(task_dir), "batch_size": 8, **over}


def test_the_splits_are_disjoint_deterministic_and_nested(task_dir):
    ev = make_evaluator(_config(task_dir))
    again = make_evaluator(_config(task_dir))
    assert ev.metric_names() == [*TASKS, "combined"]
    held = math.ceil(0.3 * N_DOCS)
    assert ev.split_size("held-out") == 2 * held and ev.split_size("search") == 2 * (N_DOCS - held)
    for task in TASKS:
        search, heldout = ev.splits["search"][task], ev.splits["held-out"][task]
        assert not set(search) & set(heldout) and sorted(search + heldout) == list(range(N_DOCS))
    assert again.splits == ev.splits  # identical across evaluator instances
    assert ev.splits["search"]["zoo_rev_mc"] != ev.splits["search"]["zoo_arith_mc"]  # per-task shuffles
    other = make_evaluator(_config(task_dir, seed=1))
    assert other.splits != ev.splits
    quarter, half, full = (ev.samples("search", f) for f in (0.25, 0.5, 1.0))
    for task in TASKS:
        assert set(quarter[task]) < set(half[task]) < set(full[task]) == set(ev.splits["search"][task])
        assert len(half[task]) == math.ceil(0.5 * (N_DOCS - held))
    assert all(len(v) == 3 for v in ev.samples("search", 0.5, limit=3).values())
    assert ev.samples("search", 0.5, limit=3) == again.samples("search", 0.5, limit=3)


def test_the_score_of_a_candidate_equals_lmeval_on_the_loaded_model(task_dir):
    ev = make_evaluator(_config(task_dir))
    recipe = parse_recipe({"method": "linear",
                           "sources": [{"model": str(ZOO / "expert_reverse"), "params": {"weight": 1.0}}]})
    got = ev.evaluate(recipe, split="held-out", fidelity=0.75)
    samples = ev.samples("held-out", 0.75)
    model = AutoModelForCausalLM.from_pretrained(ZOO / "expert_reverse").eval()
    tok = AutoTokenizer.from_pretrained(ZOO / "expert_reverse")
    want = lmeval_score(model, tok, TASKS, include_path=task_dir, samples=samples, batch_size=4)
    for task in TASKS:
        assert got.scores[task] == pytest.approx(want.tasks[task].score)
        assert got.n[task] == want.tasks[task].n == len(samples[task])
        assert math.isfinite(got.stderr[task])
    assert got.scores["combined"] == pytest.approx(want.combined)
    assert got.n["combined"] == sum(len(v) for v in samples.values())
    assert math.isfinite(got.stderr["combined"])


def test_scores_are_cached_on_disk_and_keyed_by_the_task_files(tmp_path, task_dir):
    """A repeated candidate is answered from the cache (also by another evaluator sharing cache_dir,
    without materializing it); other documents or edited task files are scored anew."""
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(task_dir, tasks)
    config = _config(tasks, cache_dir=str(tmp_path / "cache"))
    recipe = parse_recipe({"method": "linear",
                           "sources": [{"model": str(ZOO / "expert_reverse"), "params": {"weight": 1.0}}]})
    first = make_evaluator(config).evaluate(recipe, split="held-out", fidelity=0.5)
    other = make_evaluator(config)
    other.model = None  # a cache hit must not materialize the candidate
    again = other.evaluate(recipe, split="held-out", fidelity=0.5)
    assert (again.scores, again.n, again.stderr) == (first.scores, first.n, first.stderr)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    with pytest.raises(TypeError):  # other documents: scored, so the candidate is materialized
        other.evaluate(recipe, split="held-out", fidelity=1.0)
    yaml_file = tasks / f"{TASKS[0]}.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("target_delimiter: ''", "target_delimiter: ' '"))
    edited = make_evaluator(config)
    assert edited.fingerprint != other.fingerprint
    edited.model = None
    with pytest.raises(TypeError):  # the task changed: not answered from the old scores
        edited.evaluate(recipe, split="held-out", fidelity=0.5)


@pytest.mark.slow
def test_a_search_with_the_lmeval_evaluator(tmp_path, task_dir):
    space = {"name": "lm", "kind": "ps",
             "ps": {"base": str(ZOO / "base"),
                    "sources": [{"name": "rev", "model": str(ZOO / "expert_reverse")},
                                {"name": "arith", "model": str(ZOO / "expert_arith")}],
                    "method": "task_arithmetic", "params": {"lambda": 1.0}},
             "objectives": [{"metric": "combined"}],
             "optimizer": {"name": "pycma", "popsize": 2, "sigma0": 0.3, "seed": 1},
             "evaluation": _config(task_dir, held_out=0.25),
             "multi_fidelity": {"enabled": False}, "baselines": False, "budget": {"trials": 4}}
    out = tmp_path / "study"
    res = start_search(write_space(tmp_path / "space.yaml", space), out, progress=False)
    assert res.complete and not res.failed_stages()
    assert sum(s["finished"] for s in res.stages.values()) == 4
    header = (out / "pareto.csv").read_text().splitlines()[0].split(",")
    assert "search.combined" in header and "heldout.combined" in header
    row = (out / "pareto.csv").read_text().splitlines()[1].split(",")
    assert row[header.index("heldout.combined")] != ""


@pytest.mark.slow
def test_a_bad_lmeval_config_reports_every_problem(tmp_path, task_dir, capsys):
    space = {"name": "bad", "kind": "ps",
             "ps": {"base": str(ZOO / "base"), "sources": [{"name": "rev", "model": str(ZOO / "expert_reverse")}],
                    "method": "task_arithmetic"},
             "objectives": [{"metric": "combined"}], "optimizer": {"name": "random"},
             "evaluation": _config(task_dir, tasks=["zoo_rev_mcc"], held_out=1.5), "budget": {"trials": 1}}
    path = write_space(tmp_path / "bad.yaml", space)
    capsys.readouterr()
    code = main(["search", str(path), "--study-dir", str(tmp_path / "study")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "unknown lm-eval task 'zoo_rev_mcc'" in err and "zoo_rev_mc" in err.split("zoo_rev_mcc", 2)[-1], err
    assert "held_out" in err and "1.5" in err, err
    assert not (tmp_path / "study").exists()


def test_a_group_is_scored_per_leaf_task_and_reported_under_its_name(tmp_path, task_dir):
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(task_dir, tasks)
    (tasks / "zoo_group.yaml").write_text(
        "group: zoo_group\ntask:\n  - zoo_rev_mc\n  - zoo_arith_mc\naggregate_metric_list:\n"
        "  - metric: acc\n    weight_by_size: true\n")
    grouped = make_evaluator(_config(tasks, tasks=["zoo_group"]))
    plain = make_evaluator(_config(tasks))
    assert grouped.metric_names() == [*TASKS, "zoo_group", "combined"]
    assert grouped.splits == plain.splits  # the leaves are split as when listed alone
    recipe = parse_recipe({"method": "linear",
                           "sources": [{"model": str(ZOO / "expert_reverse"), "params": {"weight": 1.0}}]})
    got = grouped.evaluate(recipe, split="held-out")
    want = plain.evaluate(recipe, split="held-out")
    for t in TASKS:
        assert got.scores[t] == want.scores[t] and got.n[t] == want.n[t]
    n = [want.n[t] for t in TASKS]
    assert got.scores["zoo_group"] == pytest.approx(sum(k * want.scores[t] for k, t in zip(n, TASKS)) / sum(n))
    assert got.n["zoo_group"] == sum(n) and got.scores["combined"] == got.scores["zoo_group"]
    assert got.stderr["zoo_group"] == pytest.approx(
        math.sqrt(sum((k * want.stderr[t]) ** 2 for k, t in zip(n, TASKS))) / sum(n))
