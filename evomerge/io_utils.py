"""Small file helpers shared by every writer: nothing is ever half-written under its final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8, or a :class:`ConfigError` naming the file, line and byte offset."""
    from evomerge.errors import ConfigError, Problem

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(Problem(f"{where}:{line}", f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                                  f"{err.start})", "save the file as UTF-8"), source=where) from None


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a :class:`ConfigError` (never a traceback) when it is missing,
    unreadable (a folder, no permission) or not UTF-8."""
    from evomerge.errors import ConfigError, Problem

    path = Path(path)
    if path.is_dir():
        raise ConfigError(Problem(str(path), f"{what} expected, found a folder", f"give the path of the {what}"),
                          source=str(path))
    if not path.is_file():
        raise ConfigError(Problem(str(path), f"{what} not found"), source=str(path))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(Problem(str(path), f"cannot read the {what}: {err.strerror or err}"),
                          source=str(path)) from None
    return decode_utf8(data, str(path))


def load_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """Parse one YAML document from ``path`` (UTF-8); every failure is a :class:`ConfigError` naming
    the file and line. A multi-document file is refused with a message that says so."""
    return parse_yaml_text(read_text_file(path, what), path, what)


def parse_yaml_text(text: str, path: str | Path, what: str = "YAML file") -> Any:
    """:func:`load_yaml_file` for text already read from ``path`` (named in the errors)."""
    import yaml

    from evomerge.errors import ConfigError, Problem

    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(Problem(where, f"invalid YAML: {' '.join(str(err).split())}"), source=str(path)) from None
    docs = [d for d in docs if d is not None] or [None]
    if len(docs) > 1:
        raise ConfigError(Problem(str(path), f"{len(docs)} YAML documents in one file ('---' separators); "
                                  f"a {what} is one document",
                                  "split the file (a mergekit-multi file is not supported: merge each "
                                  "document separately)"), source=str(path))
    return docs[0]


def yaml_key_lines(text: str) -> dict[tuple[Any, ...], int]:
    """The 1-based line of every key and list entry of a (valid, one-document) YAML text, by key path:
    ``{("ps",): 5, ("ps", "sources"): 7, ("ps", "sources", 0): 8, ...}``."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        lines: dict[tuple[Any, ...], int] = {}
        if root is not None:
            _walk_lines(loader, root, (), lines)
        return lines
    except yaml.YAMLError:
        return {}
    finally:
        loader.dispose()


def _walk_lines(loader: Any, node: Any, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError:
                continue
            if isinstance(key, (str, int, float, bool)):
                lines[path + (key,)] = key_node.start_mark.line + 1
                _walk_lines(loader, value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_lines(loader, item, path + (i,), lines)


def load_yaml_document(path: str | Path, what: str = "YAML file") -> tuple[Any, dict[tuple[Any, ...], int], str]:
    """``(data, key lines, text)`` of a one-document YAML file: :func:`load_yaml_file` plus where each
    key is (see :func:`yaml_key_lines`) and the text as read (for a content hash)."""
    text = read_text_file(path, what)
    data = parse_yaml_text(text, path, what)
    return data, yaml_key_lines(text), text
