"""What the benchmarks share: the repository's paths and the rule for their --out files."""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def claim_out(parser: argparse.ArgumentParser, out: str, benchmark: str) -> Path:
    """``--out``: a new file, or this benchmark's own earlier JSON (``"benchmark": benchmark``);
    anything else stops the benchmark with the parser's one-line error, before any work."""
    sys.path.insert(0, str(ROOT / "src"))
    from t2tune.errors import UserError
    from t2tune.files import check_new_file, json_field

    try:
        check_new_file(Path(out), "--out", lambda path: json_field(path, "benchmark") == benchmark)
    except UserError as exc:
        parser.error(str(exc))
    return Path(out)


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for one benchmark process's run (checkpoints, exports: GBs each),
    removed when the process exits, so that repeated benchmarks do not fill the disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
