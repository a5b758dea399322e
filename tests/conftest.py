"""Shared fixtures: tiny models built from configs, the real tokenizers from local files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from t2tune.config import ModelConfig, build_config
from t2tune.models import load_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

MNLI_ROWS = [
    {
        "premise": "A man is playing a guitar on stage.",
        "hypothesis": "A man is performing music.",
        "label": "entailment",
    },
    {"premise": "Two dogs run through a field.", "hypothesis": "The dogs are asleep.", "label": "contradiction"},
    {"premise": "A woman reads a book in the park.", "hypothesis": "The woman is a teacher.", "label": "neutral"},
    {"premise": "Children are building a sandcastle.", "hypothesis": "Kids are at the beach.", "label": "neutral"},
    {"premise": "The chef is cooking pasta.", "hypothesis": "Someone is preparing food.", "label": "entailment"},
    {"premise": "A cat sleeps on the sofa.", "hypothesis": "The cat is chasing a mouse.", "label": "contradiction"},
]


# what the suite's largest test writes at once (the SmolLM2 run: two checkpoints with optimizer
# state and an export); a passed test's folder is removed as it ends (pyproject's retention)
DISK_NEEDED_GIB = 5


def pytest_sessionstart(session):
    """A disk too full for the suite says so first (``-q`` too), before a hundred ``No space
    left on device`` errors."""
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    if free < DISK_NEEDED_GIB:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(
            f"WARNING: {tempfile.gettempdir()} has {free:.1f} GiB free; the suite needs ~{DISK_NEEDED_GIB} GiB"
        )


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    return load_model(ModelConfig(name="tiny-gptj"))


@pytest.fixture(scope="session")
def smollm():
    return load_model(ModelConfig(name="smollm2-135m"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def mnli_dir(tmp_path):
    folder = tmp_path / "mnli"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", MNLI_ROWS * 4)
    write_jsonl(folder / "validation.jsonl", MNLI_ROWS)
    return folder


def tiny_config(out_dir: Path, data: Path, **overrides) -> object:
    values = {
        "task": "mnli",
        "out_dir": str(out_dir),
        "model.name": "tiny-gptj",
        "data.train": str(data),
        "data.validation": str(data),
        "train.steps": 3,
        "train.seq_len": 64,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.lr": 1e-3,
        "train.precision": "fp32",
        "train.dropout": 0.0,
        "checkpoint.every": 1,
        "checkpoint.keep": 3,
        "eval.limit": 4,
        "eval.max_new_tokens": 3,
        "eval.batch_size": 4,
    }
    values.update(overrides)
    return build_config(values)


def tiny_train_args(tmp_path: Path, copies: int) -> list[str]:
    """`train CONFIG data.train=... data.validation=...` for a tiny-gptj MNLI run in a subprocess."""
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        write_jsonl(data / "train.jsonl", MNLI_ROWS * copies)
        write_jsonl(data / "validation.jsonl", MNLI_ROWS[:2])
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    return ["train", str(config), f"data.train={data}", f"data.validation={data}"]


# --- the real CLI in a subprocess (tests/test_safety.py, tests/test_hostile.py) ----------------

TINY = [
    "train.steps=2",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "train.threads=1",
    "checkpoint.every=1",
    "checkpoint.keep=3",
    "eval.limit=1",
    "eval.max_new_tokens=1",
]


def t2tune(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "t2tune", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )


def in_process(capsys, *args) -> SimpleNamespace:
    """``cli.main`` in this process, shaped like a finished subprocess (returncode, stdout,
    stderr): for messages that need no process of their own (a subprocess costs seconds of
    imports); one case of each class still runs through :func:`t2tune`."""
    from t2tune.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors end the process
        code = exc.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def error_line(proc, *needles, only=True) -> str:
    """Exit 2, no traceback, one `t2tune: error:` line holding every needle (``only``: and
    nothing else on stderr, for failures before any progress bar)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("t2tune: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    if only:
        assert lines == errors, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (the lock file, which only holds a PID, left out)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".t2tune.lock"
    }


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "hf").mkdir()
    (path / "hf" / "config.json").write_text("{}")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "keep.bin").write_bytes(b"\x00\x01")
    (path / "metrics.jsonl").write_text('{"mine": true}\n')
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished tiny run, shared by the CLI safety tests: checkpoints step-1 and step-2, and
    its export hf/ (tests copy it before changing anything)."""
    tmp = tmp_path_factory.mktemp("trained")
    args = [*tiny_train_args(tmp, copies=2), f"out_dir={tmp / 'run'}", *TINY]
    proc = t2tune(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", args


def copy_run(trained, tmp_path) -> tuple[Path, list[str]]:
    run, args = trained
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest, [a if not a.startswith("out_dir=") else f"out_dir={dest}" for a in args]
