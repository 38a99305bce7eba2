"""OS errors in words: what failed, on which path, why, and how to fix it (by errno)."""

from __future__ import annotations

import errno
import os


_HINTS: dict[int, str] = {
    errno.ENOSPC: "free disk space (or raise the quota), or choose an output folder on another disk",
    errno.EFBIG: ("a file grew past the file size limit (`ulimit -f`) or the filesystem's largest file; raise "
                  "the limit, choose another filesystem, or pass a smaller --shard-size"),
    errno.EROFS: "the filesystem is read-only; choose a folder on a writable filesystem",
    errno.EACCES: "no permission there; choose a folder you can write to, or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose a path whose parents are all folders",
    errno.EEXIST: "something already exists at that path; remove it or choose another path",
    errno.EISDIR: "a folder is where a file was expected; choose another path",
    errno.ENOENT: "a folder on the path does not exist (or was removed meanwhile); check the path",
    errno.ENAMETOOLONG: "the path or one of its names is too long; choose a shorter path",
    errno.ELOOP: "the path runs in a loop of symbolic links; fix the links or choose another path",
    errno.EMFILE: "too many open files; raise the limit (`ulimit -n`) or close other programs",
    errno.EIO: "the disk or filesystem reported an input/output error; check it (dmesg) or use another",
    errno.EPIPE: "the program reading the output (a pipe) stopped early",
    errno.ENOMEM: "free memory or use a machine with more",
    errno.EXDEV: "the temporary folder and the output are on different filesystems; choose another output",
}
_HINTS[errno.EPERM] = _HINTS[errno.EACCES]
_HINTS[errno.ENFILE] = _HINTS[errno.EMFILE]
if hasattr(errno, "EDQUOT"):
    _HINTS[errno.EDQUOT] = _HINTS[errno.ENOSPC]


def os_error_hint(err: OSError) -> str:
    """How to fix an :class:`OSError`, by its errno."""
    return _HINTS.get(err.errno, "check the path and the filesystem it is on")


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
