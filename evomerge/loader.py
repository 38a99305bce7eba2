"""Reading a merge config in either format: an evomerge recipe or a mergekit config.

This module sits above :mod:`evomerge.recipe` (the evomerge format) and
:mod:`evomerge.mergekit_compat` (mergekit's, converted into a recipe), so neither imports the
other's reader. It detects the format (``merge_method``: mergekit), refuses what evomerge does not
build with a message naming it (mergekit-moe configs, mergekit-multi files of several merges) and
hands the mapping to the right parser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, Problem
from evomerge.mergekit_compat import from_mergekit, is_mergekit_moe
from evomerge.recipe import Recipe, parse_recipe


def parse_config(data: Any, *, source: str = "<recipe>") -> Recipe:
    """An evomerge recipe or a mergekit config mapping, validated into a :class:`Recipe`."""
    if is_mergekit_moe(data):
        raise ConfigError(Problem(source, "this is a mergekit-moe config (it has `experts` / `gate_mode`): "
                                  "it builds a Mixture-of-Experts model, which evomerge does not",
                                  "build it with `mergekit-moe`; evomerge merges dense models "
                                  "(mergekit-yaml configs and evomerge recipes)"), source=source)
    if isinstance(data, dict) and "merge_method" in data:
        return from_mergekit(data, source=source)
    return parse_recipe(data, source=source)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file: an evomerge recipe or a mergekit config (one YAML document, UTF-8)."""
    from evomerge.io_utils import parse_yaml_text, read_text_file

    path = Path(path)
    text = read_text_file(path, "recipe file")
    multi = _mergekit_multi(text)
    if multi is not None:
        raise ConfigError(Problem(str(path), f"this is a mergekit-multi file: {len(multi)} merges in one file "
                                  f"({', '.join(multi)}), each a YAML document, later ones able to read earlier "
                                  f"outputs by name; evomerge merges one recipe per file",
                                  "split it into one file per document and run `evomerge merge` on each in order, "
                                  "replacing a reference to an earlier merge's name with the folder it was "
                                  "written to"), source=str(path))
    return parse_config(parse_yaml_text(text, path, "recipe file"), source=str(path))


def _mergekit_multi(text: str) -> list[str] | None:
    """The documents' names (``name:`` or their position) when ``text`` holds several YAML documents
    of which at least one is a mergekit config; None otherwise (a single document, or YAML that
    :func:`~evomerge.io_utils.parse_yaml_text` reports)."""
    import yaml

    if "---" not in text:
        return None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return None
    if len(docs) < 2 or not any(isinstance(d, dict) and "merge_method" in d for d in docs):
        return None
    return [str(d.get("name")) if isinstance(d, dict) and d.get("name") else f"document {i + 1}"
            for i, d in enumerate(docs)]
