"""Writing files so that a crash never leaves a half-written one: the write-to-a-temporary-name,
then-rename rule, for single files and for whole folders. Every module that writes a result a
user keeps (checkpoints, exports, prediction files, metrics, the GGUF cache) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
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
