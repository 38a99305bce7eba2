"""The study folder and its Optuna storage.

A study folder holds ``study.json`` (which storage and study names, the budget), ``space.yaml``
(the resolved search space the study runs), and by default the storage itself, ``study.db``
(SQLite). Everything the search decides lives in the storage, so ``resume`` is "open it again":

* trials: params, and user attributes ``kind`` (search | baseline), ``label``, ``recipe`` (YAML),
  ``recipe_hash``, ``scores`` / ``n`` / ``stderr`` (per metric), ``items`` (per-item results of the
  full-fidelity score, where the evaluator reports them: :mod:`evomerge.search.selection`),
  ``objectives``, ``rungs`` (scores at each fidelity), ``seconds``, ``worker``, ``error``, ``cma``
  ({gen, idx} for pycma trials);
* study system attributes: ``evomerge:cma_state`` (pycma state after the last told generation),
  ``evomerge:heldout:<trial>`` (held-out re-scores), ``evomerge:validation:<trial>`` (validation
  re-scores of the selection pool), ``evomerge:selection`` (the stage's winner chosen on validation:
  :mod:`evomerge.search.validation`), ``evomerge:stage_done``.

Optuna-dashboard reads the same storage: ``optuna-dashboard sqlite:///results/NAME/study.db``.

``study.lock`` is the lock of the folder: ``search``, ``resume`` and ``rescore`` hold an exclusive
``flock`` on it while they run (released by the kernel when the process ends, even by ``kill -9``),
so a second one on the same study is refused with the holder's pid and host; ``status``, ``report``
and ``export`` only read and never take it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import StudyError
from evomerge.io_utils import atomic_write_text

META_FILE = "study.json"
SPACE_FILE = "space.yaml"
DB_FILE = "study.db"
LOCK_FILE = "study.lock"
ATTR = "evomerge:"
INTERRUPTED = "interrupted: the search stopped while this trial was running (retried on resume)"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class StudyMeta:
    name: str
    storage: str
    stages: list[str]
    trials: int | None = None
    timeout: float | None = None
    stage_trials: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    limit: int | None = None
    created: float = 0.0
    version: int = 1

    def study_name(self, stage: str) -> str:
        return self.name if len(self.stages) == 1 else f"{self.name}/{stage}"

    def budget(self, stage: str) -> int | None:
        return self.stage_trials.get(stage, self.trials)


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir).resolve() / DB_FILE)}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (None: another database, or in memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def normalize_storage_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute (against the current directory), so the
    URL recorded in study.json opens the same file from any directory."""
    url = url.strip()
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    rest = url[len("sqlite:///"):]
    query = rest[len(rest.split("?", 1)[0]):]
    return f"sqlite:///{os.path.abspath(path.expanduser())}{query}"


# the module a database driver imports -> the pip command that installs it
_DRIVER_PACKAGES = {"psycopg": "pip install 'psycopg[binary]' (or psycopg2-binary with postgresql+psycopg2://...)",
                    "psycopg2": "pip install psycopg2-binary", "pg8000": "pip install pg8000",
                    "asyncpg": "pip install asyncpg",
                    "MySQLdb": "pip install mysqlclient (or pip install pymysql and use mysql+pymysql://...)",
                    "pymysql": "pip install pymysql", "mysql": "pip install mysql-connector-python",
                    "oracledb": "pip install oracledb", "cx_Oracle": "pip install oracledb",
                    "pyodbc": "pip install pyodbc", "pymssql": "pip install pymssql"}


def open_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; :class:`StudyError` when it cannot be opened, saying why (no such
    folder or file, a database driver to install, not a URL, an unreachable server).

    ``create=False``: a SQLite file must exist already (a study's database is never silently
    replaced by a new, empty one)."""
    if not isinstance(url, str) or "://" not in url:
        raise StudyError(f"storage {url!r} is not a database URL; use sqlite:///path/to/study.db or "
                         "postgresql://user:password@host/database")
    scheme = url.split("://", 1)[0]
    dialect = scheme.partition("+")[0]
    path = sqlite_path(url)
    if path is not None:
        if path.is_dir():
            raise StudyError(f"cannot open storage {url}: {path} is a folder; give the database file, "
                             f"e.g. sqlite:///{path / DB_FILE}")
        if not path.parent.is_dir():
            raise StudyError(f"cannot open storage {url}: folder {path.parent} does not exist")
        if not create and not path.is_file():
            raise StudyError(f"cannot open storage {url}: the database file {path} does not exist (deleted "
                             "or moved?); restore it, or give the URL of where it is now with `evomerge resume "
                             "STUDY_DIR --storage URL`")
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        if url.startswith("sqlite"):
            _sqlite_wal(storage)
        return storage
    except ImportError as err:  # optuna re-raises the driver's ModuleNotFoundError as an ImportError
        cause = err.__cause__ or err
        module = (getattr(cause, "name", None) or "").split(".")[0]
        how = _DRIVER_PACKAGES.get(module, f"pip install the Python driver of {scheme} ({module or 'see the message'})")
        raise StudyError(f"cannot open storage {_redact(url)}: the {dialect} database driver is not installed "
                         f"({cause}); install it: {how}") from None
    except Exception as err:  # noqa: BLE001 - sqlalchemy raises many kinds
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        if type(err).__name__ == "NoSuchModuleError" or "Can't load plugin" in text:
            raise StudyError(f"cannot open storage {_redact(url)}: unknown database kind '{scheme}' ({first}); "
                             "use sqlite:///path, postgresql://... or mysql+pymysql://..., and install "
                             "the driver if it is a SQLAlchemy plugin") from None
        if "Could not parse" in text or type(err).__name__ == "ArgumentError":
            raise StudyError(f"storage {_redact(url)} is not a database URL ({first}); use "
                             "sqlite:///path/to/study.db or postgresql://user:password@host/database") from None
        if path is not None:
            raise StudyError(f"cannot open the SQLite database {path}: {first}; check that the file is "
                             "a SQLite database and that the folder is writable") from None
        raise StudyError(f"cannot reach storage {_redact(url)}: {first}; check the URL, that the "
                         "database server is running, and the credentials") from None


def _sqlite_wal(storage) -> None:
    """WAL journal + synchronous=NORMAL: a commit costs ~1 ms instead of an fsync, readers (status,
    optuna-dashboard) do not block the search, and a killed process still loses no committed trial."""
    from sqlalchemy import event, text

    def pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections made during set-up reconnect with the pragmas
    with storage.engine.connect() as conn:
        conn.execute(text("PRAGMA journal_mode=WAL"))


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def _redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def meta_text(meta: StudyMeta) -> str:
    return json.dumps(asdict(meta), indent=2) + "\n"


def write_meta(study_dir: Path, meta: StudyMeta) -> None:
    try:
        atomic_write_text(Path(study_dir) / META_FILE, meta_text(meta))
    except OSError as err:
        raise StudyError(f"cannot write {Path(study_dir) / META_FILE}: {err.strerror or err}") from None


def _meta_problems(data: dict[str, Any]) -> list[str]:
    def whole(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    out = []
    known = set(StudyMeta.__dataclass_fields__)
    out += [f"unknown key '{k}'" for k in data if k not in known]
    out += [f"missing key '{k}'" for k in ("name", "storage", "stages") if k not in data]
    if not isinstance(data.get("name", ""), str) or not isinstance(data.get("storage", ""), str):
        out.append("'name' and 'storage' must be strings")
    stages = data.get("stages", ["ps"])
    if not isinstance(stages, list) or not stages or not all(s in ("ps", "dfs") for s in stages):
        out.append(f"'stages' must be a list of ps / dfs, got {stages!r}")
    if data.get("trials") is not None and not whole(data["trials"], 1):
        out.append(f"'trials' must be a whole number >= 1 or null, got {data['trials']!r}")
    stage_trials = data.get("stage_trials", {})
    if not isinstance(stage_trials, dict) or not all(isinstance(k, str) and whole(v, 1) for k, v in stage_trials.items()):
        out.append(f"'stage_trials' must map stages to whole numbers >= 1, got {stage_trials!r}")
    if not whole(data.get("workers", 1), 1):
        out.append(f"'workers' must be a whole number >= 1, got {data.get('workers')!r}")
    if data.get("limit") is not None and not whole(data["limit"], 1):
        out.append(f"'limit' must be a whole number >= 1 or null, got {data['limit']!r}")
    t = data.get("timeout")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
        out.append(f"'timeout' must be a positive number of seconds or null, got {t!r}")
    created = data.get("created", 0.0)
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        out.append(f"'created' must be a number (seconds since 1970), got {created!r}")
    return out


def read_meta(study_dir: str | Path) -> StudyMeta:
    study_dir = Path(study_dir)
    path = study_dir / META_FILE
    if not path.is_file():
        if not study_dir.exists():
            what = "does not exist"
        elif not study_dir.is_dir():
            what = "is a file, not a study folder"
        else:
            what = f"holds no study (no {META_FILE})"
        raise StudyError(f"{study_dir} {what}; start one with `evomerge search SPACE.yaml --study-dir "
                         f"{study_dir}`")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise StudyError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:  # not JSON, not UTF-8
        raise StudyError(f"{path} is damaged ({err}); it must be the {META_FILE} evomerge wrote "
                         "(restore it from a backup)") from None
    problems = _meta_problems(data) if isinstance(data, dict) else ["not a JSON object"]
    if problems:
        raise StudyError(f"{path} is damaged: {'; '.join(problems)}; it must be the {META_FILE} evomerge "
                         "wrote (restore it, or fix the value by hand)")
    meta = StudyMeta(**data)
    # the folder's own study.db where study.json names one in another folder: the study folder was
    # moved or copied (its own database, never the original's)
    db = sqlite_path(meta.storage)
    here = study_dir.resolve() / DB_FILE
    if db is not None and db.name == DB_FILE and db.parent != study_dir.resolve() and here.is_file():
        meta.storage = default_storage(study_dir)
    return meta


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def check_study_exists(storage: optuna.storages.BaseStorage, meta: StudyMeta, study_dir: str | Path) -> None:
    """A :class:`StudyError` unless the storage holds the study ``study.json`` records (its first
    stage; later stages are created when they start). Catches a deleted or replaced database before
    a resume would silently start again from zero."""
    names = study_names(storage)
    first = meta.study_name(meta.stages[0])
    if first in names:
        return
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.created)) if meta.created else "earlier"
    has = f"it has: {', '.join(sorted(names))}" if names else "it has no study at all"
    raise StudyError(f"the storage {_redact(meta.storage)} holds no study named {first!r} ({has}), but "
                     f"{Path(study_dir) / META_FILE} records one created {created}: the database was deleted, "
                     f"replaced or moved. Restore it, or give the URL of where it is now with `evomerge resume "
                     f"{study_dir} --storage URL`; to start over, remove {study_dir} and run `evomerge search` again")


# ------------------------------------------------------------------------------------------- the lock


class StudyLock:
    """An exclusive ``flock`` on ``<study>/study.lock`` (pid, host, command and start time written in
    it for the message of whoever is refused). The kernel releases it when the process ends, however
    it ends, so it is never stale on a local disk."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, study_dir: str | Path, command: str) -> StudyLock:
        import fcntl

        path = Path(study_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StudyError(f"cannot lock the study folder {study_dir}: cannot create {path} "
                             f"({err.strerror or err}); the folder must be writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
                holder = holder if isinstance(holder, dict) else {}
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            since = holder.get("since")
            when = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                    if isinstance(since, (int, float)) else "")
            who = (f"`evomerge {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host "
                   f"{holder.get('host', '?')}{when})")
            raise StudyError(f"the study in {study_dir} is in use by {who}; wait for it to end or stop it "
                             f"first (status, report and export work meanwhile)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without the note
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # the file stays: removing it could let two processes lock two files
            self.fd = -1

    def __enter__(self) -> StudyLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def load_study(storage: optuna.storages.BaseStorage, name: str,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise StudyError(f"the storage holds no study named {name!r} (it has: {', '.join(names) or 'none'})") \
            from None
    legacy = {k: v for k, v in _legacy_attrs(storage, name).items() if k.startswith(ATTR)}
    if legacy:
        _LEGACY[study] = legacy
    return study


def create_or_load(storage: optuna.storages.BaseStorage, name: str, directions: list[str],
                   sampler: optuna.samplers.BaseSampler | None = None,
                   metric_names: list[str] | None = None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                load_if_exists=True)
    have = [d.name.lower() for d in study.directions]
    if have != list(directions):
        raise StudyError(f"study {name!r} in this storage optimizes {have}, the search space asks for "
                         f"{list(directions)}; use a new study folder or name")
    if metric_names and not study.metric_names:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names)
    _migrate_attrs(study, storage)
    return study


# ------------------------------------------------------------------------------- study attributes
#
# evomerge's study-level records are study user attributes named ``evomerge:<key>`` (Optuna's public
# study API). Studies written before kept them as system attributes, which only the storage reads:
# a run moves them over when it opens the study (:func:`create_or_load`); a reader
# (:func:`load_study`, which never writes) keeps them beside the study object.

_LEGACY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # study -> its older system attributes


def study_attrs(study: optuna.Study) -> dict[str, Any]:
    """evomerge's study attributes, by key without the ``evomerge:`` prefix."""
    attrs = dict(_LEGACY.get(study, {}))
    attrs.update(study.user_attrs)
    return {k[len(ATTR):]: v for k, v in attrs.items() if k.startswith(ATTR)}


def _legacy_attrs(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    return dict(storage.get_study_system_attrs(storage.get_study_id_from_name(name)))


def get_attr(study: optuna.Study, key: str, default: Any = None) -> Any:
    return study.user_attrs.get(ATTR + key, default)


def set_attr(study: optuna.Study, key: str, value: Any) -> None:
    study.set_user_attr(ATTR + key, value)


def records(study: optuna.Study, kind: str) -> dict[int, dict[str, Any]]:
    """The re-scores of a study's trials stored under ``kind`` (``heldout``, ``validation``), by
    trial number."""
    prefix = kind + ":"
    return {int(k[len(prefix):]): v for k, v in study_attrs(study).items() if k.startswith(prefix)}


def heldout_records(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """The held-out re-scores of a study's trials, by trial number."""
    return records(study, "heldout")


def _migrate_attrs(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Copy the records an older evomerge kept as system attributes into user attributes."""
    have = study.user_attrs
    for key, value in _legacy_attrs(storage, study.study_name).items():
        if key.startswith(ATTR) and key not in have:
            study.set_user_attr(key, value)


# ------------------------------------------------------------------------------------------- trials


class TrialRecords:
    """The trials of one study written through its storage's public API (Optuna keeps a study's
    storage private): trials created with given params, a trial's user attributes set by number, and
    trials a killed run left running marked as interrupted."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage):
        self.study, self.storage = study, storage
        self.study_id = storage.get_study_id_from_name(study.study_name)

    def new_trial(self, *, params: dict[str, Any], distributions: dict[str, Any], user_attrs: dict[str, Any]) -> int:
        """Create a RUNNING trial with ``params`` in one storage call; returns its number."""
        import datetime

        template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                               datetime_start=datetime.datetime.now(), datetime_complete=None, params=params,
                               distributions={k: distributions[k] for k in params}, user_attrs=user_attrs,
                               system_attrs={}, intermediate_values={}, trial_id=-1)
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        return self.storage.get_trial_number_from_id(trial_id)

    def set_user_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def is_finished(self, number: int) -> bool:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self.storage.get_trial(trial_id).state.is_finished()

    def recover_interrupted(self) -> list[FrozenTrial]:
        """Mark trials left RUNNING (or WAITING) by a killed run as failed ('interrupted'); returns them."""
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            # a WAITING trial is a retry the killed run had queued: interrupted too, so it is queued again
            self.set_user_attrs(t.number, {"error": INTERRUPTED, "interrupted": True})
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            out.append(t)
        return out


def is_interrupted(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("interrupted"))


def finished(study: optuna.Study, *, kind: str | None = "search") -> list[FrozenTrial]:
    """Finished trials (complete, pruned, or failed by the candidate itself, not by an interruption)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if kind is not None and t.user_attrs.get("kind", "search") != kind:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                t.state == TrialState.FAIL and not is_interrupted(t)):
            out.append(t)
    return out


def now() -> float:
    return time.time()
