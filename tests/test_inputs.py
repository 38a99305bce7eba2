"""Input files read through one checked path: recipes, search spaces, suites and their JSONL data.
Bad bytes, folders, several YAML documents and mergekit files with several problems each give one
ConfigError naming the file (and line), with every problem of the file listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.evaluate.suite import load_suite
from evomerge.loader import load_recipe, parse_config
from evomerge.search.space import load_space

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "evals" / "zoo"


@pytest.mark.parametrize("loader", [load_recipe, load_space, load_suite])
def test_non_utf8_file_names_file_and_line(tmp_path, loader):
    path = tmp_path / "f.yaml"
    path.write_bytes(b"name: x\nkind: merge\n# caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        loader(path)
    text = str(err.value)
    assert f"{path}:3" in text and "UTF-8" in text and "0xe9" in text


@pytest.mark.parametrize("loader", [load_recipe, load_space, load_suite])
def test_folder_and_missing_file(tmp_path, loader):
    with pytest.raises(ConfigError, match="found a folder"):
        loader(tmp_path)
    with pytest.raises(Exception, match="not found|does not exist"):
        loader(tmp_path / "nope.yaml")


def test_yaml_error_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("kind: merge\nmethod: linear\nsources: [a, b\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert f"{path}:" in str(err.value) and "invalid YAML" in str(err.value)


def test_several_documents_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: b}]\n")
    with pytest.raises(ConfigError, match="2 merges in one file"):
        load_recipe(path)  # a mergekit-multi file: named as such
    path.write_text("name: a\nkind: ps\n---\nname: b\n")
    with pytest.raises(ConfigError, match="2 YAML documents"):
        load_space(path)


def test_jsonl_bad_bytes_name_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "a", "target": "b"}\n{"prompt": "\xff", "target": "b"}\n')
    (tmp_path / "s.yaml").write_text("name: x\ntasks:\n  - name: t\n    kind: generate\n"
                                     "    data: {search: d.jsonl, held-out: d.jsonl}\n")
    with pytest.raises(ConfigError) as err:
        load_suite(tmp_path / "s.yaml")
    assert "d.jsonl:2" in str(err.value)


def test_mergekit_every_problem_at_once():
    data = {"merge_method": "frankenmerge", "colour": "red",
            "models": [{"modle": "a"}, {"model": "b", "parameters": 3}, {"model": "c", "extra": 1}]}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="mk.yaml")
    wheres = [p.where for p in err.value.problems]
    assert "mk.yaml: colour" in wheres
    assert "mk.yaml: merge_method" in wheres
    assert "mk.yaml: models[0]" in wheres
    assert "mk.yaml: models[1].parameters" in wheres
    assert "mk.yaml: models[2]" in wheres


def test_mergekit_slices_checked_before_reading():
    data = {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": "a"}]}, {"sources": []}, {"sources": [{"layer_range": [0, 2]}]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="mk.yaml")
    wheres = [p.where for p in err.value.problems]
    assert wheres == ["mk.yaml: slices[0].sources[0].layer_range", "mk.yaml: slices[1].sources",
                      "mk.yaml: slices[2].sources[0]"]


def test_mergekit_moe_is_named():
    data = {"base_model": "a", "gate_mode": "hidden", "experts": [{"source_model": "b"}]}
    with pytest.raises(ConfigError, match="mergekit-moe"):
        parse_config(data, source="moe.yaml")


def test_cli_exit_code_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"kind: merge\n\xff\n")
    assert main(["merge", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "UTF-8" in err
    assert not (tmp_path / "out").exists()


def test_jsonl_every_bad_line_at_once(tmp_path):
    lines = ['{"prompt": "a", "answer": "b"}', "{oops", '{"prompt": "c"}', "[1, 2]", '{"prompt": "d", "answer": "e"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "s.yaml").write_text("name: x\ntasks:\n  - name: t\n    kind: generate\n"
                                     "    data: {search: d.jsonl, held-out: d.jsonl}\n")
    with pytest.raises(Exception) as err:
        load_suite(tmp_path / "s.yaml")
    text = str(err.value)
    assert "3 bad line(s)" in text
    assert all(f"d.jsonl:{n}" in text for n in (2, 3, 4)) and "d.jsonl:1" not in text and "d.jsonl:5" not in text
