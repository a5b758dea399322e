"""The run folder: its layout (one object, :class:`RunFolder`; no other module spells these
names), claiming it for a run, and rotating its checkpoints.

Layout of an ``out_dir``::

    config.yaml             the resolved config
    metrics.jsonl           one JSON object per event
    plots/                  PNG curves, confusion matrix, reliability diagram
    trackers/               experiment trackers' local files (log.to)
    hf/                     the Hugging Face export
    checkpoints/step-N/     one complete checkpoint (written under a temporary name, then renamed):
        model/              Hugging Face folder (or a peft adapter folder) + tokenizer
        optimizer.pt        optimizer and scheduler state, train.ema's averages (weights_only=True)
        engine/             instead of the optimizer entry: accelerate's sharded save_state
        rng.pt              torch and Python RNG state      (loaded with weights_only=True)
        state.json          optimizer step, data position, tokens seen, time, best validation
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import (
    LOCK,
    MARKER,
    FolderLock,
    check_replaceable,
    move_aside,
    open_inside,
    parse_json,
    read_marker,
    refuse_links,
    write_marker,
)

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class StepFolder:
    """``checkpoints/step-N/``: where each part of one checkpoint lives."""

    path: Path

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    @property
    def engine(self) -> Path:
        return self.path / "engine"

    @property
    def rng(self) -> Path:
        return self.path / "rng.pt"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def run(self) -> RunFolder | None:
        """The run folder this checkpoint belongs to, when it sits in one."""
        parent = self.path.parent
        return RunFolder(parent.parent) if parent.name == "checkpoints" else None


@dataclass(frozen=True)
class RunFolder:
    """An ``out_dir`` and the paths inside it."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def export(self) -> Path:
        return self.root / "hf"

    @property
    def checkpoints_root(self) -> Path:
        return self.root / "checkpoints"

    @property
    def trackers(self) -> Path:
        return self.root / "trackers"

    def claim(self, cfg: Any, overwrite: bool) -> tuple[FolderLock, Path | None]:
        """Make ``out_dir`` this run's, before anything slow starts. Returns the held lock and
        where a previous folder was moved (``overwrite``), if it was. Nothing is ever deleted.

        - a non-empty folder t2tune did not create is refused (``overwrite``: moved aside);
        - a second process on the same folder is refused, naming the first one's PID;
        - an existing run must have this config, up to resume-safe keys (``overwrite``: moved
          aside); a run whose config.yaml is missing (with checkpoints) or broken is refused;
        - ``hf/`` must be replaceable by the final export.
        """
        aside = None
        if self.root.is_dir() and self._is_run():
            # before anything is opened or written in it: no link may lead out of the folder
            refuse_links(
                self.root,
                [
                    MARKER,
                    LOCK,
                    self.config.name,
                    self.metrics.name,
                    self.plots.name,
                    self.trackers.name,
                    self.export.name,
                    self.checkpoints_root.name,
                ],
                {self.plots.name: 1, self.checkpoints_root.name: 2},
            )
        if self.root.exists() and not self._is_run():
            if not self.root.is_dir():
                raise UserError(f"out_dir: {self.root} is a file, not a folder")
            if any(self.root.iterdir()):
                if not overwrite:
                    raise UserError(
                        f"out_dir: {self.root} is not empty and was not created by t2tune; nothing "
                        "was changed. Use another out_dir, or --overwrite to move it aside"
                    )
                aside = move_aside(self.root)
        lock = self._lock()
        try:
            problem = self._config_problem(cfg)
            if problem and not overwrite:
                raise UserError(
                    f"out_dir: {self.root} {problem}; use another out_dir, or --overwrite to move "
                    "the old run aside and start afresh"
                )
            if problem:
                lock.release()
                aside = move_aside(self.root)
                lock = self._lock()
            check_export_target(self.export, "out_dir")
            if read_marker(self.root) is None:
                write_marker(self.root, "run")
        except BaseException:
            lock.release()
            raise
        return lock, aside

    def _is_run(self) -> bool:
        """A run folder: marked as one, or written by a t2tune from before markers (a config.yaml
        beside checkpoints or a metrics.jsonl that t2tune started)."""
        marker = read_marker(self.root)
        if marker is not None:
            return marker["kind"] == "run"
        if not self.config.is_file():
            return False
        if self.checkpoints_root.is_dir():
            return True
        try:
            with open_inside(self.metrics) as handle:
                first = parse_json(handle.readline(1 << 16))
        except (OSError, ValueError, UserError):
            return False
        return isinstance(first, dict) and first.get("event") == "start" and "t2tune" in first

    def _lock(self) -> FolderLock:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return FolderLock(self.root).acquire("out_dir")
        except OSError as exc:
            raise UserError(f"out_dir: cannot write to {self.root} ({exc.strerror})") from None

    def _config_problem(self, cfg: Any) -> str | None:
        """Why this run folder cannot continue under ``cfg``, or None."""
        import yaml

        from .config import RESUME_SAFE, config_diff
        from .yamlfile import read_yaml

        if not self.config.is_file():
            if self.checkpoints():
                return (
                    "holds checkpoints but no config.yaml, so they cannot be checked against this config "
                    "(restore config.yaml to resume)"
                )
            return None
        try:
            old = read_yaml(self.config)
        except (UserError, yaml.YAMLError) as exc:
            return f"has a broken config.yaml ({str(exc).splitlines()[0][:200]})"
        if not isinstance(old, dict):
            return f"has a broken config.yaml (a {type(old).__name__}, not a mapping of keys)"
        changed = [k for k in config_diff(old, cfg.to_dict()) if k not in RESUME_SAFE]
        if changed:
            return f"holds a run with a different config ({', '.join(changed)} changed)"
        return None

    def step(self, n: int) -> StepFolder:
        return StepFolder(self.checkpoints_root / f"step-{n}")

    def engine_staging(self, n: int) -> Path:
        """Where every process writes its part of an engine (accelerate) save: a fixed name, so
        all processes agree on it; moved into the checkpoint when that is committed."""
        return self.checkpoints_root / f".step-{n}.engine"

    def checkpoints(self) -> list[tuple[int, StepFolder]]:
        """Complete checkpoints, oldest first (temporary folders never match ``step-N``)."""
        if not self.checkpoints_root.is_dir():
            return []
        found = []
        for child in self.checkpoints_root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and StepFolder(child).state.is_file():
                found.append((int(match.group(1)), StepFolder(child)))
        return sorted(found, key=lambda pair: pair[0])

    def rotate(self, keep: int, protect: int | None = None) -> None:
        """Keep the newest ``keep`` checkpoints, and step ``protect`` (the best) besides. Each
        older one is first renamed to a temporary name, then deleted: a process killed while
        deleting leaves a ``.step-*`` folder (removed by the next call), never a half-deleted
        ``step-N`` that would look like a checkpoint or escape rotation."""
        for n, step in self.checkpoints()[:-keep]:
            if n == protect:
                continue
            doomed = step.path.with_name(f".{step.path.name}.deleting-{os.getpid()}")
            os.replace(step.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        root = self.checkpoints_root
        for child in root.iterdir() if root.is_dir() else ():
            incomplete = STEP_DIR.match(child.name) and not StepFolder(child).state.is_file()
            if child.name.startswith(".step-") or incomplete:  # left by a killed run (or older versions)
                shutil.rmtree(child, ignore_errors=True)


def check_export_target(out: Path, what: str) -> None:
    """Raise unless an export may be written to ``out`` (see :func:`files.check_replaceable`);
    a checkpoint there is named as one."""
    check_replaceable(out, "export", what, "a t2tune checkpoint" if StepFolder(out).state.is_file() else None)


def weights_folder(path: Path) -> Path:
    """The Hugging Face folder inside a t2tune output (``out_dir/hf``, ``step-N/model``), or
    ``path`` itself."""
    for inner in (RunFolder(path).export, StepFolder(path).model):
        if (inner / "config.json").is_file() or (inner / "adapter_config.json").is_file():
            return inner
    return path


NF4_FILE = "t2tune-nf4.json"  # in an adapter folder: the 4-bit quantization its base was trained in (QLoRA)
