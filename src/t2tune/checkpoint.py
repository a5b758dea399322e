"""Step checkpoints: writing one that survives a crash, reading one back safely, and the
:class:`Checkpointer` that a run saves, resumes and restores its best step through. Where each
file lives is :mod:`t2tune.runfolder`'s; the Hugging Face export is :mod:`t2tune.export`'s.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import wrong_types
from .engines import is_sharded
from .errors import UserError, say, short
from .files import atomic_dir, parse_json
from .runfolder import NF4_FILE, STEP_DIR, RunFolder, StepFolder
from .training import TrainState

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


def write_checkpoint(
    folder: RunFolder,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    model_state: dict[str, Any] | None = None,
    engine_state: Path | None = None,
    average: dict[str, Any] | None = None,
) -> StepFolder:
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
        raise UserError(
            f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _is_tied(model: Any, key: str) -> bool:
    out = model.get_output_embeddings()
    return (
        out is not None
        and key.endswith("weight")
        and key.startswith("lm_head")
        and out.weight is model.get_input_embeddings().weight
    )


def read_checkpoint(step: StepFolder) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train state (a dict), optimizer+scheduler state and RNG state of a checkpoint, loaded
    safely (``weights_only``) and checked for shape: a tampered or truncated file is one error."""
    try:
        state = parse_json(step.state.read_text(encoding="utf-8"))
        opt = torch.load(step.optimizer, weights_only=True, map_location="cpu")
        rng = torch.load(step.rng, weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"{step.path}: corrupt or incomplete checkpoint ({reason}); delete it to resume from an older one"
        ) from None
    problem = _shape_problem(state, opt, rng) or _range_problem(state, step)
    if problem:
        raise UserError(f"{step.path}: corrupt checkpoint ({problem}); delete it to resume from an older one")
    return state, opt, rng


def read_average(step: StepFolder) -> Any:
    """The weight averages (``train.ema``) of a checkpoint that :func:`read_checkpoint` has
    accepted, mapped rather than read: the optimizer state beside them stays on disk."""
    try:
        return torch.load(step.optimizer, weights_only=True, map_location="cpu", mmap=True).get("ema")
    except Exception as exc:
        raise UserError(f"{step.optimizer}: corrupt checkpoint ({str(exc)[:200]})") from None


def use_average(model: torch.nn.Module, average: Any, step: StepFolder) -> bool:
    """Put ``average``, the weight averages (``train.ema``) read from checkpoint ``step``, into
    ``model`` loaded from ``step.model`` (which holds the raw weights), so that the step is the
    model its run validated and would export. False, and the model untouched, when ``average``
    is None (the run had no train.ema)."""
    if average is None:
        return False
    params = dict(model.named_parameters())
    if not isinstance(average, dict) or any(
        name not in params or not isinstance(value, torch.Tensor) or value.shape != params[name].shape
        for name, value in average.items()
    ):
        raise UserError(f"{step.optimizer}: the weight averages (train.ema) do not match the weights in {step.model}")
    with torch.no_grad():
        for name, value in average.items():
            params[name].copy_(value)
    return True


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
        if state.get(key) and (
            not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= state.get("optimizer_step", 0)
        ):
            return f"state.json: '{key}' names step {short(at, 40)}, which this checkpoint has not reached"
    return None


def _shape_problem(state: Any, opt: Any, rng: Any) -> str | None:
    if not isinstance(state, dict):
        return f"state.json holds a {type(state).__name__}, not a mapping"
    wrong = wrong_types(TrainState, state)
    if wrong:
        return f"state.json: '{wrong[0]}' has the wrong type"
    if not isinstance(opt, dict) or not isinstance(opt.get("scheduler"), dict):
        return "optimizer.pt holds no scheduler state"
    if "optimizer" in opt and not isinstance(opt["optimizer"], dict):
        return "optimizer.pt: the optimizer state is not a mapping"
    if not isinstance(rng, dict) or not all(isinstance(rng.get(k), torch.Tensor) for k in ("torch", "python")):
        return "rng.pt holds no torch and Python RNG state"
    return None


class Checkpointer:
    """How a run saves its steps, resumes the newest one and restores the one to export. Every
    process holds one: under sharded engines saving, resuming and gathering are collective."""

    def __init__(
        self, cfg: Any, folder: RunFolder, parts: Any, model: Any, tokenizer: Any, average: Any = None
    ) -> None:
        self.cfg, self.folder, self.parts, self.model, self.tokenizer = cfg, folder, parts, model, tokenizer
        self.accelerator = parts.accelerator
        self.main = self.accelerator.is_main_process
        self.average = average  # train.ema's WeightAverage, saved and restored with the step

    def full_weights(self) -> dict[str, Any] | None:
        """Under FSDP / DeepSpeed, the full weights gathered to the main process (a collective:
        every process calls it); None elsewhere, and where the model object holds them itself."""
        if not is_sharded(self.accelerator):
            return None
        state = self.accelerator.get_state_dict(self.parts.loss_module)
        if not self.main or state is None:
            return None
        return {k.removeprefix("model."): v for k, v in state.items()}

    def save(self, state: Any) -> dict[str, Any] | None:
        """Write ``step-N/`` for ``state.optimizer_step``; rotation keeps the best step. Returns
        the gathered full weights on the main process of a sharded engine, None elsewhere, for
        the export to reuse."""
        acc, step = self.accelerator, state.optimizer_step
        model_state = self.full_weights()
        engine = None
        fmt = self.cfg.checkpoint.format
        if fmt == "accelerate" or (fmt == "auto" and is_sharded(acc)):
            engine = self.folder.engine_staging(step)
            if self.main:
                shutil.rmtree(engine, ignore_errors=True)  # left by a run killed mid-save
            acc.wait_for_everyone()
            acc.save_state(str(engine))  # collective: each process writes its shards
            acc.wait_for_everyone()
        if self.main:
            p = self.parts
            try:
                write_checkpoint(
                    self.folder,
                    step,
                    self.model,
                    self.tokenizer,
                    p.optimizer,
                    p.scheduler,
                    state.to_dict(),
                    model_state,
                    engine,
                    average=self.average.state_dict() if self.average is not None else None,
                )
            except OSError as exc:  # a full disk: the temporary folder is gone, older checkpoints stay
                kept = [f"step-{n}" for n, _ in self.folder.checkpoints()]
                raise UserError(
                    f"{self.folder.step(step).path}: could not write the checkpoint ({exc.strerror}); "
                    f"kept: {', '.join(kept) or 'no older checkpoint'}"
                ) from None
            self.folder.rotate(self.cfg.checkpoint.keep, protect=state.best.get("step"))
        acc.wait_for_everyone()
        return model_state

    def resume(self, rows_in: Any) -> Any:
        """Load the newest complete checkpoint (weights, optimizer, scheduler, averages, RNG) and
        return its train state; None when there is none. ``rows_in(epoch)``: that epoch's rows."""
        found = self.folder.checkpoints()
        if not found:
            return None
        _, path = found[-1]
        saved, opt, rng = read_checkpoint(path)
        state = TrainState.from_dict(saved)
        self._check_resumable(state, path, [n for n, _ in found], rows_in)
        if path.engine.is_dir():  # sharded model + optimizer, every process reads its part
            self.accelerator.load_state(str(path.engine))
        elif "optimizer" in opt:
            load_weights(self.model, path.model)
            self.parts.optimizer.load_state_dict(opt["optimizer"])
        else:
            raise UserError(
                f"{path.path}: optimizer state missing (no optimizer.pt entry, no engine/ folder); "
                "delete this checkpoint to resume from an older one"
            )
        self.parts.scheduler.load_state_dict(opt["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(opt.get("ema"), path.optimizer)
        set_rng_state(rng)
        return state

    def _check_resumable(self, state: Any, path: StepFolder, steps: list[int], rows_in: Any) -> None:
        """What ``read_checkpoint`` cannot know: the data position lies inside its epoch's rows
        of this run, and the best step's checkpoint is there to export."""
        rows = rows_in(state.epoch)
        if not state.row_in_epoch < rows:
            raise UserError(
                f"{path.state}: corrupt checkpoint (data position {state.row_in_epoch} of epoch "
                f"{state.epoch}, which has {rows} rows); delete it to resume from an older one"
            )
        best = state.best.get("step") if state.best else None
        if best is not None and best not in steps and self.cfg.export.from_ == "best":
            raise UserError(
                f"{path.state}: the best step {best} has no checkpoint in {self.folder.checkpoints_root} "
                "to export; restore it, or set export.from=last"
            )

    def restore_exported(self, state: Any, weights: dict[str, Any] | None) -> tuple[dict[str, Any], Any]:
        """Put the step to export (``export.from``) into the model: the best step's weights when
        it is not the last, and under ``train.ema`` that step's averages. Returns its validation
        summary, and the weights to export (gathered ones under sharded engines, else None)."""
        best, last, last_eval = state.best, state.optimizer_step, state.last_eval
        if self.cfg.export.from_ == "last" or not best or best.get("step") == last:
            if self.average is not None:
                self.average.apply()
            return {**(last_eval if last_eval.get("step") == last else {}), "step": last}, weights
        step = self.folder.step(best["step"])
        if step.engine.is_dir():  # sharded: every process loads its part, then the weights are gathered
            self.accelerator.load_state(str(step.engine))
            return best, self.full_weights()
        if is_sharded(self.accelerator):
            say(
                f"warning: the best step ({best['step']}) has no engine state to restore under a sharded engine "
                f"(checkpoint.format: hf); exporting the last step ({last}) instead"
            )
            return {**last_eval, "step": last}, weights
        load_weights(self.model, step.model)
        if self.average is not None:  # that step's averages, as its validation measured them
            self.average.load_state_dict(read_average(step), step.optimizer)
            self.average.apply()
        return best, None
