"""Writing files safely. Three rules live here and nowhere else:

- **Write, then rename**: a file or folder is written under a temporary name and renamed into
  place, so a crash never leaves a half-written one (checkpoints, exports, prediction files,
  metrics, the GGUF cache).
- **Touch only what t2tune wrote**: folders t2tune creates carry a marker file (``.t2tune``,
  JSON: what kind of folder, and for exports the files written), and a folder is replaced or
  moved only when its marker says t2tune owns everything in it. A single file named by the user
  (a predictions file, a plot, a benchmark's JSON) is written over only when empty or
  recognisably one t2tune wrote (:func:`check_new_file`).
- **One process per run folder**: an exclusive ``flock`` on ``.t2tune.lock``, which the kernel
  releases when the holder exits however it exits (``kill -9`` too), so a lock file left
  behind by a dead process is never mistaken for a live run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError

MARKER = ".t2tune"
LOCK = ".t2tune.lock"


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` to disk (before it is renamed into place)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(path: Path, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Write a text file under a temporary name beside ``path``, renamed over it on success.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_file(target) as handle:
    ...     _ = handle.write("done")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('done', ['out.txt'])
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding=encoding) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """A fresh temporary folder beside ``final``; when the block ends without error it becomes
    ``final`` by renames only, so a folder named ``final`` is always complete. An old ``final``
    is moved aside before the swap and removed after it. With ``replace=False`` an existing
    ``final`` wins (another process got there first) and the new folder is dropped. On error
    the temporary folder is removed and ``final`` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # the umask's permissions (tempfile.mkdtemp would make it owner-only)
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- ownership ---------------------------------------------------------------------------

def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder t2tune created, or None (no marker, or not one t2tune wrote)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    from . import __version__

    marker: dict[str, Any] = {"kind": kind, "t2tune": __version__}
    if files is not None:
        marker["files"] = files
    (folder / MARKER).write_text(json.dumps(marker), encoding="utf-8")


def files_below(folder: Path) -> list[str]:
    """Every file below ``folder``, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def check_replaceable(folder: Path, kind: str, what: str, known_as: str | None = None) -> None:
    """Raise unless ``folder`` may be replaced by a new one of ``kind``: it does not exist, is
    empty, or is a ``kind`` folder all of whose files t2tune wrote. ``what`` names the setting;
    ``known_as`` says what the caller recognised the folder to be (e.g. a checkpoint)."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise UserError(f"{what}: {folder} exists and is not a folder; choose another path")
    present = files_below(folder)
    if not present:
        return
    marker = read_marker(folder)
    if marker is None or marker["kind"] != kind:
        if known_as is not None:
            found = known_as
        elif marker is not None:
            found = f"a t2tune {marker['kind']} folder"
        else:
            found = "a folder t2tune did not create"
        raise UserError(f"{what}: {folder} is {found}, not a t2tune {kind}; nothing was changed, "
                        "choose another path")
    written = set(marker.get("files") or []) | {MARKER}
    foreign = [name for name in present if name not in written]
    if foreign:
        raise UserError(f"{what}: {folder} holds files t2tune did not write ({', '.join(foreign[:3])}); "
                        "move them out or choose another path")


def check_new_file(path: Path, what: str, ours: Callable[[Path], bool]) -> None:
    """Raise unless ``path`` may be written: it does not exist, is an empty file, or is a file
    that ``ours`` recognises as one t2tune wrote (checked before anything slow)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise UserError(f"{what}: {path} exists and is not a plain file; nothing was changed, choose another path")
    if path.stat().st_size and not ours(path):
        raise UserError(f"{what}: {path} exists and is not a file t2tune wrote; nothing was changed, "
                        "choose another path")


def json_field(path: Path, key: str, first_line: bool = False) -> Any:
    """The value of ``key`` in the JSON object that ``path`` holds (with ``first_line``: that its
    first line holds), or None when there is none; at most 16 MiB is read.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = path.write_text('{"prediction": "yes"}\\n{"prediction": "no"}\\n')
    >>> json_field(path, "prediction", first_line=True), json_field(path, "prediction")
    ('yes', None)
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.readline(16 << 20) if first_line else handle.read(16 << 20)
        value = json.loads(text)
    except (OSError, ValueError):
        return None
    return value.get(key) if isinstance(value, dict) else None


def has_png_text(path: Path, keyword: str, value: str) -> bool:
    """Whether the PNG at ``path`` carries the text chunk ``keyword``: ``value`` among its first 64 KiB."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64 << 10)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and f"{keyword}\0{value}".encode("latin-1") in head


def move_aside(folder: Path) -> Path:
    """Rename ``folder`` to ``folder.old-TIMESTAMP`` (nothing is deleted) and return the new path."""
    aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    os.replace(folder, aside)
    return aside


# --- one process per folder ----------------------------------------------------------------

class FolderLock:
    """An exclusive lock on a folder, held until :meth:`release` or the process's exit."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self._handle: IO[str] | None = None

    def acquire(self, what: str) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"{what}: {self.path.parent} is in use by another t2tune process (PID {holder}); "
                            "wait for it to finish, or use another out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None
