"""The output folder of a writer: path checks before any work (:func:`check_output_path`), and the
temporary sibling folders writers write into, with owner records that let a later writer remove the
ones a killed writer left (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.checkpoint.oserrors import describe_os_error
from evomerge.errors import CheckpointError


def _abspath(path: str | os.PathLike) -> Path:
    """Absolute, with ``.`` and ``..`` folded (``Path.absolute`` keeps them, and a name of ``..``
    would make no sense for a temporary sibling)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


TMP_TAG = ".tmp-"
_NAME_MAX = 255
_TMP_NAME_EXTRA = 40  # ".tmp-<pid>-<8 random>" / ".old-<8 hex>" added to the output's name


def _looks_like_model_folder(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return not names or "config.json" in names or any(n.endswith(".safetensors") for n in names)


def check_output_path(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The absolute output path of a model folder, after checks that need no writing.

    Refuses (:class:`CheckpointError`, worded for the CLI): an existing ``out`` without
    ``overwrite``; with ``overwrite``, an ``out`` that is a file or a folder that holds no model
    (``--overwrite`` replaces model folders only); a parent that is a file; a parent on a read-only
    filesystem or without write permission; a name too long for the temporary sibling. Nothing is
    created, so it can run before any work.
    """
    path = _abspath(out)
    if path.parent == path:
        raise CheckpointError(f"cannot write a model as the filesystem root {path} (fix: give a folder path, "
                              f"e.g. {path / 'merged'})")
    if len(os.fsencode(path.name)) > _NAME_MAX - _TMP_NAME_EXTRA:
        raise CheckpointError(f"output folder name {path.name[:40]!r}... in {path.parent} is too long "
                              f"({len(os.fsencode(path.name))} bytes; with the suffix of its temporary sibling "
                              f"it must fit in {_NAME_MAX}, so at most {_NAME_MAX - _TMP_NAME_EXTRA}) "
                              f"(fix: choose a shorter name)")
    try:
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"output path {path} is a broken symbolic link (to {os.readlink(path)}) "
                                  f"(fix: remove the link or choose another output path)")
        if path.exists():
            if not overwrite:
                raise CheckpointError(f"output folder {path} already exists (fix: choose another output path, "
                                      f"remove it, or pass --overwrite to replace it; the old folder is kept "
                                      f"until the new one is complete)")
            if not path.is_dir():
                raise CheckpointError(f"output path {path} is a file, not a model folder; --overwrite replaces "
                                      f"model folders only (fix: remove the file or choose another output path)")
            if not _looks_like_model_folder(path):
                raise CheckpointError(f"output folder {path} exists and holds no model (no config.json, no "
                                      f"*.safetensors); --overwrite replaces model folders only, so nothing was "
                                      f"touched (fix: choose another output path, or empty the folder)")
        anc = path.parent
        while not (anc.exists() or anc.is_symlink()) and anc.parent != anc:
            anc = anc.parent
        if not anc.is_dir():
            kind = "a broken symbolic link" if anc.is_symlink() else "a file"
            raise CheckpointError(f"cannot create output folder {path}: {anc} is {kind}, not a folder "
                                  f"(fix: choose an output path under a folder, or move {anc} away)")
        if not os.access(anc, os.W_OK | os.X_OK):
            try:
                readonly = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
            except OSError:
                readonly = False
            if readonly:
                raise CheckpointError(f"cannot create output folder {path}: {anc} is on a read-only filesystem "
                                      f"(fix: choose an output folder on a writable filesystem)")
            raise CheckpointError(f"cannot create output folder {path}: no permission to write in {anc} "
                                  f"(fix: choose a folder you can write to, or fix its permissions)")
    except OSError as e:
        raise CheckpointError(describe_os_error(e, f"cannot check output folder {path}:")) from e
    return path


# ----------------------------------------------------------------------------- temporary folders

OWNER_FILE = ".evomerge-writer.json"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def owner_record() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "start": stat[1] if stat else None}


def _owner_alive(rec: Mapping[str, Any]) -> bool | None:
    """Whether the process that wrote owner record ``rec`` still runs; None when this host cannot tell
    (another host sharing the filesystem, a malformed record)."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or rec.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if rec.get("boot_id") and boot and rec["boot_id"] != boot:
        return False  # written before the last reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is not None:
        if stat[0] in ("Z", "X"):
            return False  # exited, not yet reaped: it writes nothing more
        if rec.get("start") and stat[1] != rec["start"]:
            return False  # the pid was reused by another process
    return True


_TMP_PID_RE = re.compile(r"^(\d+)-[^-]+$")


def remove_stale_temps(out: str | os.PathLike, *, quiet: bool = False) -> list[Path]:
    """Remove the temporary folders that writers of ``out`` left behind when they were killed.

    A temporary folder ``<out>.tmp-<pid>-<random>`` holds an owner record (pid, host, boot id, start
    time of the process). It is stale when that process is gone (or the machine rebooted since), and
    only then removed; a live writer's folder, one made on another host, and one without a record
    whose pid still runs are left alone. Returns the folders removed."""
    out = _abspath(out)
    prefix = out.name + TMP_TAG
    removed: list[Path] = []
    try:
        entries = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for p in entries:
        try:
            if p.is_symlink() or not p.is_dir():
                continue
            rec_path = p / OWNER_FILE
            if rec_path.is_file():
                rec = json.loads(rec_path.read_text(encoding="utf-8"))
                alive = _owner_alive(rec) if isinstance(rec, dict) else None
            else:
                # killed between creating the folder and writing its record (microseconds): the pid
                # is in the name; a folder of an older evomerge has none and is left alone
                m = _TMP_PID_RE.match(p.name[len(prefix):])
                if m is None:
                    if not quiet:
                        print(f"note: left {p} alone: it has no owner record (an older evomerge made it); "
                              f"remove it by hand if no merge into {out} is running", file=sys.stderr)
                    continue
                alive = _owner_alive({"pid": int(m.group(1)), "host": socket.gethostname()})
        except (OSError, ValueError):
            continue
        if alive is False:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                if not quiet:
                    print(f"note: removed {p}, left by a writer that is no longer running", file=sys.stderr)
    return removed
