"""How the Ray executor tells losses apart: the error types that mean a lost worker, the text of
an infrastructure failure, and errors shortened to one line for events and messages."""

from __future__ import annotations

import re

OOM = "out of memory"


def lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "OutOfMemoryError", "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError")
    return tuple(getattr(rex, n) for n in names if isinstance(getattr(rex, n, None), type))


INFRA_TEXT = re.compile(r"owner has died|owner's node|node (it was running on )?(is|was) (dead|preempted|removed"
                         r"|terminated)|its node (has )?died|node has (died|crashed)|node .* has been marked dead",
                         re.IGNORECASE)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_reason(err: BaseException, size: int = 300) -> str:
    text = " ".join(_ANSI.sub("", str(err)).split())
    return f"{type(err).__name__}: {text}"[:size]


def last_line(err: BaseException, size: int = 500) -> str:
    """The last line of an error's text: for an actor whose ``__init__`` raised, the exception
    (``RuntimeError: ...``) at the end of the traceback Ray wraps it in."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:size]
