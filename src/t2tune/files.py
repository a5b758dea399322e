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
- **No link is followed out of a folder**: files inside a folder t2tune did not just create
  are opened with ``O_NOFOLLOW`` (:func:`open_inside`), replaced by rename (which replaces a
  link, never its target), and names that become path components are checked to be plain
  (:func:`plain_name`).

Reading JSON that a user or another program wrote goes through :func:`parse_json`, so that a
nesting bomb or a 5,000-digit number is a ``ValueError`` like any other malformed text.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError

MARKER = ".t2tune"
LOCK = ".t2tune.lock"
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def plain_name(name: str, what: str) -> str:
    """``name`` when it can be one path component (letters, digits, ``_ . + -``, not starting
    with a dot, at most 100 characters), else a UserError naming ``what``.

    >>> plain_name("rte", "tasks")
    'rte'
    >>> plain_name("../x", "tasks")
    Traceback (most recent call last):
    ...
    t2tune.errors.UserError: tasks: '../x' must be a plain name (letters, digits, _ . + -), as it names files
    """
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        shown = repr(name)[:60]
        raise UserError(f"{what}: {shown} must be a plain name (letters, digits, _ . + -), as it names files")
    return name


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure is a ``ValueError`` with a short reason: malformed
    text, nesting too deep for the parser (RecursionError) or an integer past Python's digit
    limit.

    >>> parse_json('{"a": 1}')
    {'a': 1}
    >>> parse_json("[" * 100000)
    Traceback (most recent call last):
    ...
    ValueError: nested too deeply
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:
        raise ValueError(str(exc).splitlines()[0][:200] if str(exc) else "malformed JSON") from None


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_inside(path: Path, mode: str = "r") -> IO[str]:
    """Open a text file in a folder t2tune did not just create, never through a symbolic link
    (``O_NOFOLLOW``): a link planted there is a UserError, and its target is untouched.
    ``mode``: ``r``, ``a`` (append, created if missing) or ``a+`` (read and append)."""
    flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a+": os.O_RDWR | os.O_APPEND | os.O_CREAT}[
        mode
    ]
    try:
        fd = os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise _link_error(path) from None
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


def _link_error(path: Path) -> UserError:
    return UserError(f"{path} is a symbolic link; t2tune never follows links inside its folders (remove the link)")


def refuse_links(root: Path, entries: list[str], depth: dict[str, int]) -> None:
    """Raise if any of ``entries`` below ``root`` is a symbolic link, or (for the names in
    ``depth``) anything up to that many levels below it: writing there would land outside
    ``root``. A run folder is checked so before anything is written into it."""
    for name in entries:
        path = root / name
        if path.is_symlink():
            raise _link_error(path)
        levels = depth.get(name, 0)
        stack = [(path, levels)] if levels and path.is_dir() else []
        while stack:
            folder, left = stack.pop()
            with os.scandir(folder) as found:
                for entry in found:
                    if entry.is_symlink():
                        raise _link_error(Path(entry.path))
                    if left > 1 and entry.is_dir(follow_symlinks=False):
                        stack.append((Path(entry.path), left - 1))


def cache_dir() -> Path:
    """t2tune's cache (dequantized GGUF models, the MFU peak): ``$T2TUNE_CACHE``, else
    ``~/.cache/t2tune``; a path that exists and is no folder is a UserError naming the setting."""
    given = os.environ.get("T2TUNE_CACHE")  # empty: unset
    path = Path(given).expanduser() if given else Path.home() / ".cache" / "t2tune"
    if path.exists() and not path.is_dir():
        raise UserError(f"T2TUNE_CACHE: {path} is not a folder; point it at a folder (or unset it)")
    return path


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` to disk (before it is renamed into place)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(path: Path, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write a text file (``encoding=None``: a binary one) under a temporary name beside
    ``path``, renamed over it on success.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_file(target) as handle:
    ...     _ = handle.write("done")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('done', ['out.txt'])
    """
    mode = "w" if encoding else "wb"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        # a fresh name, created exclusively: a link planted at it is never followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by :func:`atomic_file` (a link at ``path`` is replaced, its
    target untouched)."""
    with atomic_file(path, encoding=None) as handle:
        handle.write(data)


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
        with open_inside(folder / MARKER) as handle:
            marker = parse_json(handle.read(1 << 20))
    except (OSError, ValueError, UserError):  # missing, unreadable, a link, not JSON: not ours
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("kind"), str):
        return None
    files = marker.get("files")
    if files is not None and not (isinstance(files, list) and all(_inside_name(f) for f in files)):
        return None  # a list naming anything outside the folder was not written by t2tune
    return marker


def _inside_name(name: Any) -> bool:
    """A relative path that stays inside its folder (no ``..``, not absolute)."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def write_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    from . import __version__

    marker: dict[str, Any] = {"kind": kind, "t2tune": __version__}
    if files is not None:
        marker["files"] = files
    path = folder / MARKER
    if path.is_symlink():
        raise _link_error(path)
    atomic_bytes(path, json.dumps(marker).encode("utf-8"))


def files_below(folder: Path) -> list[str]:
    """Every file below ``folder``, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())


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
        raise UserError(f"{what}: {folder} is {found}, not a t2tune {kind}; nothing was changed, choose another path")
    written = set(marker.get("files") or []) | {MARKER}
    foreign = [name for name in present if name not in written]
    if foreign:
        raise UserError(
            f"{what}: {folder} holds files t2tune did not write ({', '.join(foreign[:3])}); "
            "move them out or choose another path"
        )


def check_new_file(path: Path, what: str, ours: Callable[[Path], bool]) -> None:
    """Raise unless ``path`` may be written: it does not exist, is an empty file, or is a file
    that ``ours`` recognises as one t2tune wrote (checked before anything slow)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise UserError(f"{what}: {path} exists and is not a plain file; nothing was changed, choose another path")
    if path.stat().st_size and not ours(path):
        raise UserError(
            f"{what}: {path} exists and is not a file t2tune wrote; nothing was changed, choose another path"
        )


def check_writable_parent(path: Path, what: str) -> None:
    """Raise unless the folders above ``path`` exist as folders or can be made: none of them is
    a file (checked before anything slow, so the write at the end cannot fail on it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(
                    f"{what}: {parent} is a file, so {path} cannot be written below it; choose another path"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{what}: {parent} is not writable; choose another path")
            return


def json_field(path: Path, key: str, first_line: bool = False) -> Any:
    """The value of ``key`` in the JSON object that ``path`` holds (with ``first_line``: that its
    first line holds), or None when there is none; at most 16 MiB is read.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = path.write_text('{"prediction": "yes"}\\n{"prediction": "no"}\\n')
    >>> json_field(path, "prediction", first_line=True), json_field(path, "prediction")
    ('yes', None)
    """
    value = json_object(path, first_line)
    return None if value is None else value.get(key)


def json_object(path: Path, first_line: bool = False) -> dict[str, Any] | None:
    """The JSON object that ``path`` holds (with ``first_line``: that its first line holds), or
    None when it holds none; at most 16 MiB is read."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.readline(16 << 20) if first_line else handle.read(16 << 20)
        value = parse_json(text)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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
    folder = folder.absolute()
    here = Path.cwd()
    if folder.resolve() == here.resolve() or folder.resolve() in here.resolve().parents:
        raise UserError(
            f"out_dir: {folder} is the current folder or one above it, which cannot be moved aside; "
            "choose an out_dir below it"
        )
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
        handle = open_inside(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(
                f"{what}: {self.path.parent} is in use by another t2tune process (PID {holder}); "
                "wait for it to finish, or use another out_dir"
            ) from None
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
