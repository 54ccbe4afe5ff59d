"""Folders attnlab writes (run directories, dataset folders, sweep folders): one writer at a time, made whole,
replaced only when attnlab made them.

Locks: ``locked(path)`` holds an ``fcntl.flock`` on ``.NAME.lock`` beside the
folder for as long as a process writes there. The lock file lives beside the
folder, not in it, so that ``--force`` can replace the folder while holding
it. The OS drops the lock when its process dies, so a lock file left by a
killed process never blocks anyone.

Ownership: ``--force`` replaces only a folder that ``kind_of`` recognises by
its marker files (a run's ``config.yaml`` + ``meta.json``, a dataset's
``meta.json``, a sweep's ``sweep.yaml``), never the working directory.

Whole folders: a new folder is written beside its target under a
``.NAME.tmp-PID`` name and moved into place in one rename; what a killed
writer leaves behind is settled by the next writer, which holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from .errors import CheckpointError, DataError, InUse, UserError

_KIND_ERRORS = {"run": CheckpointError, "dataset": DataError, "sweep": UserError}
_KIND_NAMES = {"run": "run directory", "dataset": "dataset folder", "sweep": "sweep folder"}


# ------------------------------------------------------------------ locks


def lock_path(path: str | Path) -> Path:
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.lock")


def cannot_write(path: Path, e: OSError, fix: str, error: type[UserError] = CheckpointError) -> UserError:
    """The one-line error for an unwritable location (read-only, no permission, no space)."""
    return error(f"cannot write to {path} ({e.strerror or type(e).__name__}): {fix}")


@contextlib.contextmanager
def locked(
    path: str | Path, what: str = "run directory", *, wait: bool = False, error: type[UserError] = CheckpointError
):
    """Hold the exclusive lock on the folder ``path`` (which need not exist yet; its parent must) for the with-block.

    Without ``wait`` a held lock raises ``InUse`` naming the holder's PID; with
    it, this process waits its turn (e.g. a second run preparing the same dataset).
    An unwritable parent raises ``error``.
    """
    lock = lock_path(path)
    fd = _acquire(lock, Path(path), what, wait, error)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before unlocking: a waiter then re-checks and takes a fresh file
        os.close(fd)


def _acquire(lock: Path, path: Path, what: str, wait: bool, error: type[UserError]) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise cannot_write(lock.parent, e, f"choose a writable location for the {what}", error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            who = f"PID {holder}" if holder else "a process that is starting"
            if not wait:
                os.close(fd)
                raise InUse(
                    f"{what} {path} is in use by another attnlab process ({who}): "
                    f"wait for it to finish or stop it, then try again"
                ) from None
            print(
                f"attnlab: waiting for another attnlab process ({who}) to finish writing {what} {path}",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):  # else its holder removed it while we waited: take the new one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_writable(path: Path, fix: str) -> None:
    """Refuse an existing folder this process cannot write into (read-only mount, permissions)."""
    try:
        with open(path / f".write-check-{os.getpid()}", "wb") as f:
            os.unlink(f.name)
    except OSError as e:
        raise cannot_write(path, e, fix) from None


def make_parent(path: Path, what: str, error: type[UserError] = CheckpointError) -> None:
    """Create the folder that will hold ``path`` (and its lock file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(path.parent, e, f"choose a writable location for the {what}", error) from None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so cleanup code runs instead of the process just ending."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------ ownership and --force


def kind_of(path: Path) -> str | None:
    """ "run", "dataset" or "sweep" when ``path`` holds attnlab's marker files for it, else None."""
    meta = _json_object(path / "meta.json")
    if (path / "config.yaml").is_file() and meta is not None and "versions" in meta:
        return "run"
    if meta is not None and "format_version" in meta and "splits" in meta:
        return "dataset"
    if (path / "sweep.yaml").is_file():
        return "sweep"
    return None


def _json_object(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def refuse_working_directory(path: Path, what: str, fix: str, error: type[UserError] = UserError) -> None:
    """The working directory (or a folder holding it) is never a target: attnlab would write over the user's files."""
    p, cwd = path.resolve(), Path.cwd().resolve()
    if p == cwd or p in cwd.parents:
        raise error(
            f"{path} is the current directory{' or holds it' if p != cwd else ''}, "
            f"which is never used as a {what}: {fix}"
        )


def check_target(path: Path, kind: str, force: bool, fix: str, own_fix: str = "") -> None:
    """May ``path`` become a new ``kind`` folder? Empty or absent: yes; else only with ``force``, and only
    when it is already an attnlab ``kind`` folder. The caller holds the lock: leftovers of killed writers
    are settled first (a folder a killed replacement had moved aside is put back, and judged).

    ``fix`` says what to do instead; ``own_fix`` adds advice for an existing ``kind`` folder (e.g. --resume).
    """
    error, what = _KIND_ERRORS[kind], _KIND_NAMES[kind]
    refuse_working_directory(path, what, fix, error)
    remove_leftovers(path)
    if path.exists() and not path.is_dir():
        raise error(f"{path} exists and is not a folder: {fix}")
    if not path.is_dir() or not any(path.iterdir()):
        return
    found = kind_of(path)
    if found == kind:
        if not force:
            raise error(f"{what} {path} already exists: {fix}{own_fix} or pass --force to replace it")
        return
    is_what = f"is an attnlab {found}" if found else f"is not an attnlab {kind} (it lacks the marker files)"
    if not force:
        raise error(f"{path} already exists and {is_what}: {fix}")
    raise error(f"{path} {is_what}, and --force replaces only an attnlab {kind}: {fix}, or remove the folder yourself")


def remove_leftovers(path: Path) -> None:
    """Delete ``.NAME.tmp-*`` / ``.NAME.old-*`` beside ``path`` left by killed writers (the caller holds its lock)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return
    for p in parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{path.name}.old-*"):
        if not path.exists():  # killed between its two renames: the old folder is the only copy
            os.replace(p, path)
        else:
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out``; an old ``out`` is removed only after that."""
    old = None
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(new, out)  # also onto an empty folder
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ run directories


def create_run_dir(run_dir: Path, files: dict[str, str]) -> None:
    """Make ``run_dir`` holding ``files`` (name -> text) in one rename, so a run directory is never half made.

    The caller holds the lock and has checked the target with ``check_target`` (an old run is replaced).
    """
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        replace_dir(tmp, run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(run_dir.parent, e, "choose a writable out_dir") from None


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise CheckpointError(
            f"run directory {run_dir} does not exist: pass a folder created by `attnlab train` (see runs/)"
        )
