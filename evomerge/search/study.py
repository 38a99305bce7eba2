"""The study folder and its Optuna storage.

A study folder holds ``study.json`` (which storage and study names, the budget), ``space.yaml``
(the resolved search space the study runs), and by default the storage itself, ``study.db``
(SQLite). Everything the search decides lives in the storage, so ``resume`` is "open it again":

* trials: params, and user attributes ``kind`` (search | baseline), ``label``, ``recipe`` (YAML),
  ``recipe_hash``, ``scores`` / ``n`` / ``stderr`` (per metric), ``objectives``, ``rungs`` (scores
  at each fidelity), ``seconds``, ``worker``, ``error``, ``cma`` ({gen, idx} for pycma trials);
* study system attributes: ``evomerge:cma_state`` (pycma state after the last told generation),
  ``evomerge:heldout:<trial>`` (held-out re-scores), ``evomerge:stage_done``.

Optuna-dashboard reads the same storage: ``optuna-dashboard sqlite:///results/NAME/study.db``.
"""

from __future__ import annotations

import json
import time
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


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; :class:`StudyError` when it cannot be reached."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise StudyError(f"cannot open storage {url}: folder {path.parent} does not exist")
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        if url.startswith("sqlite"):
            _sqlite_wal(storage)
        return storage
    except ModuleNotFoundError as err:
        raise StudyError(f"cannot open storage {_redact(url)}: the database driver is not installed "
                         f"({err}); for PostgreSQL: pip install psycopg2-binary") from None
    except Exception as err:  # noqa: BLE001 - sqlalchemy raises many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
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


def write_meta(study_dir: Path, meta: StudyMeta) -> None:
    atomic_write_text(Path(study_dir) / META_FILE, json.dumps(asdict(meta), indent=2) + "\n")


def read_meta(study_dir: str | Path) -> StudyMeta:
    path = Path(study_dir) / META_FILE
    if not path.is_file():
        what = "does not exist" if not Path(study_dir).exists() else f"holds no study (no {META_FILE})"
        raise StudyError(f"{study_dir} {what}; start one with `evomerge search SPACE.yaml --study-dir "
                         f"{study_dir}`")
    try:
        data = json.loads(path.read_text())
        return StudyMeta(**data)
    except (ValueError, TypeError) as err:
        raise StudyError(f"{path} is damaged ({err}); it must be the {META_FILE} evomerge wrote") from None


def load_study(storage: optuna.storages.BaseStorage, name: str,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyError(f"the storage holds no study named {name!r} (it has: {', '.join(names) or 'none'})") \
            from None


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
    return study


# -------------------------------------------------------------------------------------- system attrs


def _sid(study: optuna.Study) -> int:
    return study._storage.get_study_id_from_name(study.study_name)


def get_attr(study: optuna.Study, key: str, default: Any = None) -> Any:
    return study._storage.get_study_system_attrs(_sid(study)).get(ATTR + key, default)


def set_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(_sid(study), ATTR + key, value)


def heldout_records(study: optuna.Study) -> dict[int, dict[str, Any]]:
    prefix = ATTR + "heldout:"
    attrs = study._storage.get_study_system_attrs(_sid(study))
    return {int(k[len(prefix):]): v for k, v in attrs.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------- trials


def new_trial(study: optuna.Study, *, params: dict[str, Any], distributions: dict[str, Any],
              user_attrs: dict[str, Any]) -> int:
    """Create a RUNNING trial with ``params`` in one storage call; returns its number."""
    tmpl = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                       datetime_start=None, datetime_complete=None, params=params,
                       distributions={k: distributions[k] for k in params}, user_attrs=user_attrs,
                       system_attrs={}, intermediate_values={}, trial_id=-1)
    import datetime

    tmpl.datetime_start = datetime.datetime.now()
    trial_id = study._storage.create_new_trial(_sid(study), template_trial=tmpl)
    return study._storage.get_trial_number_from_id(trial_id)


def set_user_attrs(study: optuna.Study, number: int, attrs: dict[str, Any]) -> None:
    tid = study._storage.get_trial_id_from_study_id_trial_number(_sid(study), number)
    for k, v in attrs.items():
        study._storage.set_trial_user_attr(tid, k, v)


def recover_interrupted(study: optuna.Study) -> list[FrozenTrial]:
    """Mark trials left RUNNING (or WAITING) by a killed run as failed ('interrupted'); returns them."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        # a WAITING trial is a retry the killed run had queued: interrupted too, so it is queued again
        study._storage.set_trial_user_attr(t._trial_id, "error", INTERRUPTED)
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
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
