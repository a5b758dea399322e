"""The run folder and everything written into it: its layout (one object, :class:`RunFolder`),
step checkpoints that survive crashes, their rotation, and loading them back (the Hugging Face
export is :mod:`t2tune.export`).

Layout of an ``out_dir`` (no other module spells these names)::

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

import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import short
from .errors import UserError
from .files import (
    LOCK,
    MARKER,
    FolderLock,
    atomic_dir,
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
            refuse_links(self.root, [MARKER, LOCK, self.config.name, self.metrics.name, self.plots.name,
                                     self.trackers.name, self.export.name, self.checkpoints_root.name],
                         {self.plots.name: 1, self.checkpoints_root.name: 2})
        if self.root.exists() and not self._is_run():
            if not self.root.is_dir():
                raise UserError(f"out_dir: {self.root} is a file, not a folder")
            if any(self.root.iterdir()):
                if not overwrite:
                    raise UserError(f"out_dir: {self.root} is not empty and was not created by t2tune; nothing "
                                    "was changed. Use another out_dir, or --overwrite to move it aside")
                aside = move_aside(self.root)
        lock = self._lock()
        try:
            problem = self._config_problem(cfg)
            if problem and not overwrite:
                raise UserError(f"out_dir: {self.root} {problem}; use another out_dir, or --overwrite to move "
                                "the old run aside and start afresh")
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

        from .config import RESUME_SAFE, config_diff, read_yaml

        if not self.config.is_file():
            if self.checkpoints():
                return ("holds checkpoints but no config.yaml, so they cannot be checked against this config "
                        "(restore config.yaml to resume)")
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


# --- writing -------------------------------------------------------------------------------

def save_hf(model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, Any] | None = None) -> None:
    """save_pretrained for model, tokenizer and generation config, into ``folder``."""
    set_generation_ids(model, tokenizer)
    if hasattr(model, "peft_config"):  # adapter only; the base model is known by name
        model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=False)
        base = model.get_base_model()
        if getattr(base, "is_loaded_in_4bit", False):  # trained over 4-bit weights: t2tune loads the base so
            quantization = base.config.quantization_config.to_json_string(use_diff=False)
            (folder / NF4_FILE).write_text(quantization, encoding="utf-8")
    else:
        model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def set_generation_ids(model: Any, tokenizer: Any) -> None:
    """The generation config's eos / pad ids, from the tokenizer (what generate() will stop on)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(_py_state(), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state() -> list[int]:
    version, internal, gauss = random.getstate()
    return [version, *internal, -1 if gauss is None else 0]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    values = state["python"].tolist()
    random.setstate((values[0], tuple(values[1:-1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(folder: RunFolder, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                     state: dict[str, Any], model_state: dict[str, Any] | None = None,
                     engine_state: Path | None = None, average: dict[str, Any] | None = None) -> StepFolder:
    """Commit ``step-N/``: HF weights (``model/``), optimizer + scheduler (``optimizer.pt``) or the
    engine's own save (``engine/``, when ``engine_state`` is given), the weight averages of
    ``train.ema`` (``optimizer.pt``), RNG and train state."""
    final = folder.step(step)
    with atomic_dir(final.path) as tmp:
        parts = StepFolder(tmp)
        save_hf(model, tokenizer, parts.model, state_dict=model_state)
        saved = {"scheduler": scheduler.state_dict(), **({"ema": average} if average is not None else {})}
        if engine_state is not None:
            os.replace(engine_state, parts.engine)
        else:
            saved["optimizer"] = optimizer.state_dict()
        torch.save(saved, parts.optimizer)
        torch.save(rng_state(), parts.rng)
        parts.state.write_text(json.dumps(state, indent=1), encoding="utf-8")
    return final


# --- reading -------------------------------------------------------------------------------

def load_weights(model: Any, folder: Path) -> None:
    """Load safetensors weights saved by :func:`save_hf` into ``model`` (full model or adapter)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (corrupt checkpoint?)")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    result = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not _is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise UserError(f"{folder}: weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")


def _is_tied(model: Any, key: str) -> bool:
    out = model.get_output_embeddings()
    return out is not None and key.endswith("weight") and key.startswith("lm_head") and \
        out.weight is model.get_input_embeddings().weight


def read_checkpoint(step: StepFolder) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train state (a dict), optimizer+scheduler state and RNG state of a checkpoint, loaded
    safely (``weights_only``) and checked for shape: a tampered or truncated file is one error."""
    try:
        state = parse_json(step.state.read_text(encoding="utf-8"))
        opt = torch.load(step.optimizer, weights_only=True, map_location="cpu")
        rng = torch.load(step.rng, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 (I/O, truncation, and pickles weights_only refuses all end here)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{step.path}: corrupt or incomplete checkpoint ({reason}); "
                        "delete it to resume from an older one") from None
    problem = _shape_problem(state, opt, rng) or _range_problem(state, step)
    if problem:
        raise UserError(f"{step.path}: corrupt checkpoint ({problem}); delete it to resume from an older one")
    return state, opt, rng


def read_average(step: StepFolder) -> Any:
    """The weight averages (``train.ema``) of a checkpoint that :func:`read_checkpoint` has
    accepted, mapped rather than read: the optimizer state beside them stays on disk."""
    try:
        return torch.load(step.optimizer, weights_only=True, map_location="cpu", mmap=True).get("ema")
    except Exception as exc:  # noqa: BLE001 (as in read_checkpoint)
        raise UserError(f"{step.optimizer}: corrupt checkpoint ({str(exc)[:200]})") from None


_STATE_TYPES = {"optimizer_step": int, "epoch": int, "row_in_epoch": int, "tokens_seen": int,
                "train_seconds": (int, float), "eval_seconds": (int, float), "wall_seconds": (int, float),
                "model_flops": (int, float),
                "best": dict, "last_eval": dict, "stale": int}


_COUNTS = ("optimizer_step", "epoch", "row_in_epoch", "tokens_seen", "stale")
_AMOUNTS = ("train_seconds", "eval_seconds", "wall_seconds", "model_flops")


def _range_problem(state: dict[str, Any], step: StepFolder) -> str | None:
    """Values of state.json that no run writes: negative counts, times that are not finite,
    a step other than the folder's, a best step after it. (The data position is checked
    against the run's rows when it resumes.)"""
    for key in _COUNTS:
        if state.get(key, 0) < 0:
            return f"state.json: '{key}' is negative ({state[key]})"
    for key in _AMOUNTS:
        value = state.get(key, 0.0)
        if not (math.isfinite(value) and value >= 0):
            return f"state.json: '{key}' is not a finite number >= 0 ({value})"
    match = STEP_DIR.match(step.path.name)
    if match and state.get("optimizer_step") != int(match.group(1)):
        return f"state.json: 'optimizer_step' is {state.get('optimizer_step')}, not this folder's step {match.group(1)}"
    for key in ("best", "last_eval"):
        at = state.get(key, {}).get("step") if state.get(key) else None
        if state.get(key) and (not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= state.get(
                "optimizer_step", 0)):
            return f"state.json: '{key}' names step {short(at, 40)}, which this checkpoint has not reached"
    return None


def _shape_problem(state: Any, opt: Any, rng: Any) -> str | None:
    if not isinstance(state, dict):
        return f"state.json holds a {type(state).__name__}, not a mapping"
    for key, kind in _STATE_TYPES.items():
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            return f"state.json: '{key}' has the wrong type"
    if not isinstance(opt, dict) or not isinstance(opt.get("scheduler"), dict):
        return "optimizer.pt holds no scheduler state"
    if "optimizer" in opt and not isinstance(opt["optimizer"], dict):
        return "optimizer.pt: the optimizer state is not a mapping"
    if not isinstance(rng, dict) or not all(isinstance(rng.get(k), torch.Tensor) for k in ("torch", "python")):
        return "rng.pt holds no torch and Python RNG state"
    return None
