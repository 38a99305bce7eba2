"""OS errors in words: what failed, on which path, why, and how to fix it (by errno)."""

from __future__ import annotations

import errno
import os


def os_error_hint(err: OSError) -> str:
    """How to fix an :class:`OSError`, by its errno."""
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "free disk space (or raise the quota), or choose an output folder on another disk"
    if code == errno.EFBIG:
        return ("a file grew past the file size limit (`ulimit -f`) or the filesystem's largest file; raise "
                "the limit, choose another filesystem, or pass a smaller --shard-size")
    if code == errno.EROFS:
        return "the filesystem is read-only; choose a folder on a writable filesystem"
    if code in (errno.EACCES, errno.EPERM):
        return "no permission there; choose a folder you can write to, or fix its permissions"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder; choose a path whose parents are all folders"
    if code == errno.EEXIST:
        return "something already exists at that path; remove it or choose another path"
    if code == errno.EISDIR:
        return "a folder is where a file was expected; choose another path"
    if code == errno.ENOENT:
        return "a folder on the path does not exist (or was removed meanwhile); check the path"
    if code == errno.ENAMETOOLONG:
        return "the path or one of its names is too long; choose a shorter path"
    if code == errno.ELOOP:
        return "the path runs in a loop of symbolic links; fix the links or choose another path"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files; raise the limit (`ulimit -n`) or close other programs"
    if code == errno.EIO:
        return "the disk or filesystem reported an input/output error; check it (dmesg) or use another"
    if code == errno.EPIPE:
        return "the program reading the output (a pipe) stopped early"
    if code == errno.ENOMEM:
        return "free memory or use a machine with more"
    if code == errno.EXDEV:
        return "the temporary folder and the output are on different filesystems; choose another output"
    return "check the path and the filesystem it is on"


def describe_os_error(err: OSError, what: str, path: str | os.PathLike | None = None) -> str:
    """``"<what> <path>: <strerror> (fix: <hint>)"``; ``path`` defaults to the error's file name(s),
    ``path=""`` leaves it out."""
    if path is None and err.filename is not None:
        path = os.fsdecode(err.filename)
        if err.filename2 is not None:
            path = f"{path} -> {os.fsdecode(err.filename2)}"
    reason = err.strerror or str(err) or type(err).__name__
    where = f"{what} {os.fspath(path)}" if path not in (None, "") else what
    return f"{where}: {reason} (fix: {os_error_hint(err)})"
