"""Which output folders emguard wrote, so that a command replaces or removes only those.

Every command that writes a folder (a training run, an evaluation, a SafeLoRA adapter)
leaves a marker file of its own kind in it (``.emguard-run.json``, ...). A folder is
*ours* for a command when it holds that command's marker; it is *free* when it does not
exist or holds none of the files the command writes; anything else is *foreign* and is
never written into, replaced or removed: the command refuses and says how to proceed.
Removing a run (``--force``) deletes only the files of that kind, never the folder with
what else a user keeps in it.

Commands claim their folder with one call, ``claim`` (lock, check, remove what ``force``
replaces, mark, and for a whole-folder kind replace it atomically), after checking it
early, before any expensive work, with ``check_claim`` (the same checks, writing nothing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emguard.io import atomic_dir, cache_dir, write_json_atomic

State = Literal["free", "ours", "foreign"]


class FolderConflictError(RuntimeError):
    """An output folder that emguard cannot prove it wrote, or that holds other work."""


class FolderBusyError(FolderConflictError):
    """Another emguard process holds the folder's lock right now (it is not an error in the
    folder: it is work in progress elsewhere)."""


@dataclass(frozen=True)
class FolderKind:
    """One kind of output folder: its marker file and the names it writes (globs allowed).

    ``whole=True``: the command owns the whole folder (replaces it atomically), so any
    file in it counts as one of its files.
    """

    name: str
    artifacts: tuple[str, ...]
    whole: bool = False

    @property
    def marker(self) -> str:
        return f".emguard-{self.name}.json"


# The training recipe's own files; each defense declares what it adds (Defense.artifacts,
# collected by emguard.defenses.registry.run_folder).
RUN = FolderKind("run", ("config.yaml", "provenance.json", "data_report.json", "checkpoints",
                         "adapter", "train_log.jsonl", "summary.json", "data_split.json",
                         "heldout.jsonl", "task_*.test.jsonl", "trajectory", "tensorboard"))
EVAL = FolderKind("eval", ("eval_spec.json", "generations.jsonl", "generations.partial.jsonl",
                           "judgments.jsonl", "reference_answers.jsonl", "judge_free.json",
                           "metrics.json", "task_*.json"))
SAFELORA = FolderKind("safelora", (), whole=True)
DIRECTION = FolderKind("direction", (), whole=True)  # emguard direction fit


def _refuse_a_file(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise FolderConflictError(f"output folder '{folder}' is a file, not a folder; choose "
                                  "another output path")


def check_writable_target(folder: Path) -> None:
    """Raise FolderConflictError if ``folder`` is a file or cannot be created/written."""
    folder = Path(folder)
    _refuse_a_file(folder)
    parent = folder if folder.exists() else _nearest_existing(folder)
    probe = parent / f".emguard-write-test-{time.time_ns()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FolderConflictError(f"cannot write into '{parent}' (for output '{folder}'): "
                                  f"{e.strerror or e}; choose a writable output path") from None


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise FolderConflictError(f"'{parent}' is a file, so the output folder '{path}' "
                                          "cannot be created under it")
            return parent
    return Path(".")


def present_artifacts(folder: Path, kind: FolderKind) -> list[str]:
    """Names in ``folder`` that this kind writes (everything but its marker if ``whole``)."""
    if not folder.is_dir():
        return []
    if kind.whole:
        return sorted(p.name for p in folder.iterdir() if p.name != kind.marker)
    found = {p.name for pattern in kind.artifacts for p in folder.glob(pattern)}
    return sorted(found)


def read_marker(folder: Path, kind: FolderKind) -> dict | None:
    path = Path(folder) / kind.marker
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == kind.name else None


def folder_state(folder: Path, kind: FolderKind) -> State:
    """free (absent, or none of this kind's files), ours (our marker) or foreign."""
    folder = Path(folder)
    _refuse_a_file(folder)
    if read_marker(folder, kind) is not None:
        return "ours"
    return "foreign" if present_artifacts(folder, kind) else "free"


def write_marker(folder: Path, kind: FolderKind, **info) -> None:
    """Mark ``folder`` as written by this kind of command (``info``: what it holds)."""
    write_json_atomic(Path(folder) / kind.marker,
                      {"kind": kind.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})


def remove_ours(folder: Path, kind: FolderKind) -> list[str]:
    """Delete this kind's files (and marker) from a folder we own; return what was removed.

    Anything else in the folder stays. Refuses if the folder is not ours.
    """
    folder = Path(folder)
    if folder_state(folder, kind) != "ours":
        raise FolderConflictError(f"'{folder}' holds no {kind.marker}: emguard did not write it, "
                                  "so it removes nothing there")
    removed = present_artifacts(folder, kind)
    for name in removed:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (folder / kind.marker).unlink(missing_ok=True)
    return removed


def refuse_foreign(folder: Path, kind: FolderKind, what: str) -> None:
    """Raise the standard message for a folder that holds files this command did not write."""
    names = present_artifacts(Path(folder), kind)
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    raise FolderConflictError(
        f"'{folder}' already holds {shown} but no {kind.marker}, so emguard cannot tell that it "
        f"wrote them and will not overwrite or remove them. Choose a new or empty folder for "
        f"{what}, or move those files away yourself.")


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``, kept in the user cache (``$EMGUARD_CACHE/locks``), so
    taking a lock never creates or litters the user's folders."""
    folder = Path(folder).expanduser().absolute()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return cache_dir() / "locks" / f"{folder.name or 'root'}-{digest}.lock"


_held = threading.local()  # the lock files this thread holds (folder_lock)


@contextmanager
def folder_lock(folder: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for the block (an OS file lock, released when
    the process ends, even by kill -9). Another process (or thread) holding it: wait up to
    ``wait`` seconds, then FolderBusyError. A thread that holds it already enters at once:
    a recipe holds its folder from its first check and claims it later (``claim``)."""
    from filelock import FileLock, Timeout

    path = lock_path(folder)
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(
            f"another emguard process is writing '{folder}' (it holds {path}); wait for it to "
            "finish or choose another output folder") from None
    held.add(path)
    try:
        yield
    finally:
        held.discard(path)
        lock.release()


# ----------------------------------------------------------------------------- claiming


@dataclass(frozen=True)
class Claim:
    """An output folder claimed for the block of ``claim``.

    path: where to write: ``folder`` itself, or for a whole kind the temporary folder that
    replaces it when the block ends without an exception. state: the folder before the
    claim ("foreign" only when it held this very work, ``same``). removed: the names of
    the other work of ours that ``force`` removed.
    """

    folder: Path
    path: Path
    state: State
    removed: tuple[str, ...] = ()


def check_claim(folder: Path, kind: FolderKind, what: str, *, same: bool = False,
                conflict: Callable[[], Exception] | None = None, force: bool = False,
                writable: bool = True) -> State:
    """Raise unless ``folder`` can be claimed for ``kind``; return its state. Writes nothing,
    so a command runs it before its expensive work (``claim`` runs it again, locked).

    what: what the folder is for, named in the refusal ("this run (output_dir)").
    same: the caller found a record of this very work in the folder (same config), so a
        folder of it without our marker (written before markers existed) is not refused.
    conflict: the folder holds other work of ours (the caller's record of what it holds
        differs): called for the error to raise, unless ``force`` (``claim`` removes that
        work). File kinds only.
    writable: first check that the folder can be created and written (FolderConflictError
        naming it). False for a caller that may only read the folder (a finished run in a
        read-only folder is skipped, not refused); it checks later.
    """
    folder = Path(folder)
    if writable:
        check_writable_target(folder)
    state = folder_state(folder, kind)
    if state == "foreign" and not same:
        refuse_foreign(folder, kind, what)
    if state == "ours" and conflict is not None and not force:
        raise conflict()
    return state


@contextmanager
def claim(folder: Path, kind: FolderKind, *, what: str, marker: dict | None = None,
          force: bool = False, same: bool = False,
          conflict: Callable[[], Exception] | None = None, wait: float = 0.0) -> Iterator[Claim]:
    """Claim ``folder`` for ``kind`` for the block: the one sequence every command that
    writes an output folder goes through.

    1. lock the folder (``folder_lock``; ``wait`` seconds for another process; re-entered
       at once by a thread that holds it);
    2. ``check_claim`` (writable; a foreign folder refused naming ``what``; ``conflict``
       raised unless ``force``; see there for ``same``);
    3. with ``force`` and a ``conflict``: remove that work's files (``remove_ours``: only
       this kind's, never the folder);
    4. a file kind (run, eval): create the folder and write the marker (with ``marker``
       as its info) unless one is there, and yield; its files are written into the folder
       itself, each atomically, so an interrupted command resumes.
       A whole kind (SafeLoRA adapter, direction): yield a temporary folder holding the
       marker; it replaces ``folder`` atomically when the block ends without an exception,
       and is discarded otherwise (the old content stays).
    """
    folder = Path(folder)
    with folder_lock(folder, wait):
        state = check_claim(folder, kind, what, same=same, conflict=conflict, force=force)
        removed: tuple[str, ...] = ()
        if state == "ours" and conflict is not None:
            removed = tuple(remove_ours(folder, kind))
        if kind.whole:
            with atomic_dir(folder) as tmp:
                write_marker(tmp, kind, **(marker or {}))
                yield Claim(folder, tmp, state, removed)
            return
        folder.mkdir(parents=True, exist_ok=True)
        if read_marker(folder, kind) is None:
            write_marker(folder, kind, **(marker or {}))
        yield Claim(folder, folder, state, removed)
