"""Making a new study folder, and undoing a start that fails before its first trial.

Before anything is created, :func:`check_new_study_dir` refuses a folder that cannot become a new
study and :func:`check_names_free` a storage that already holds the study names with trials;
:func:`make_dirs` creates the folder and its missing parents; :class:`StartUndo` records what the
start created (folders, files, studies in the storage) and removes exactly that, never a folder or
file that was there before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna

from evomerge.errors import StudyError
from evomerge.search.study import META_FILE, study_names


def check_new_study_dir(study_dir: Path) -> None:
    """A :class:`StudyError` unless ``study_dir`` can become a new study folder."""
    if study_dir.exists() and not study_dir.is_dir():
        raise StudyError(f"--study-dir {study_dir} is a file, not a folder; give a folder (it is created "
                         "when missing)")
    if (study_dir / META_FILE).exists():
        raise StudyError(f"{study_dir} already holds a study; continue it with `evomerge resume {study_dir}` "
                         "or choose another --study-dir")
    anc = study_dir
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise StudyError(f"cannot create the study folder {study_dir}: {anc} is a file, not a folder; "
                         "choose another --study-dir")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise StudyError(f"cannot create the study folder {study_dir}: no permission to write in {anc}; "
                         "choose another --study-dir")


def make_dirs(study_dir: Path) -> list[Path]:
    """Create ``study_dir`` and its missing parents; the folders this call created, outermost first."""
    missing = []
    ancestor = study_dir
    while not ancestor.exists() and ancestor.parent != ancestor:
        missing.append(ancestor)
        ancestor = ancestor.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise StudyError(f"cannot create the study folder {study_dir}: {folder} is a file") from None
        except OSError as err:
            for made in reversed(created):
                try:
                    made.rmdir()
                except OSError:
                    pass
            raise StudyError(f"cannot create the study folder {study_dir}: {err.strerror or err} ({folder})") from None
    return created


def check_names_free(storage, url: str, names: list[str], study_dir: Path) -> list[str]:
    """The stage study names already in ``storage``; a :class:`StudyError` when one of them has
    trials (a study of another folder, or of this one whose study.json was lost)."""
    have = set(study_names(storage))
    found = [n for n in names if n in have]
    for n in found:
        count = len(optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False))
        if count:
            raise StudyError(f"the storage {url} already holds a study named {n!r} with {count} trial(s) (a "
                             f"study of another folder, or {study_dir} lost its {META_FILE}); set another "
                             "`name:` in the space, use another --storage, or resume the folder that owns it")
    return found


class StartUndo:
    """What a starting search created, to remove it when the start fails before its first trial."""

    def __init__(self, study_dir: Path, created_dirs: list[Path], before: set[str]):
        self.dir, self.created_dirs, self.before = study_dir, created_dirs, before
        self.storage = None
        self.stage_names: list[str] = []  # every stage study of the search
        self.names: list[str] = []  # those this start created in the storage
        self.armed = False

    def has_trials(self) -> bool:
        if self.storage is None:
            return False
        try:
            have = set(study_names(self.storage))
            return any(optuna.load_study(study_name=n, storage=self.storage).get_trials(deepcopy=False)
                       for n in self.stage_names if n in have)
        except Exception:  # noqa: BLE001 - cannot tell: keep everything
            return True

    def undo(self) -> None:
        if self.storage is not None:
            for n in self.names:
                try:
                    optuna.delete_study(study_name=n, storage=self.storage)
                except Exception:  # noqa: BLE001 - best effort; the files go below
                    pass
            try:
                self.storage.engine.dispose()
            except Exception:  # noqa: BLE001
                pass
        if self.dir in self.created_dirs:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for name in set(os.listdir(self.dir)) - self.before:
                entry = self.dir / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        for folder in reversed(self.created_dirs):
            if folder != self.dir:
                try:
                    folder.rmdir()  # only when empty: another process may have put something there
                except OSError:
                    pass
