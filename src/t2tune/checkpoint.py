"""Checkpoints that survive crashes, exact resume state, and Hugging Face export.

Layout of ``out_dir/checkpoints/step-N/`` (written into a temporary folder, then renamed, so a
folder named ``step-N`` is always complete)::

    model/            Hugging Face folder (or a peft adapter folder) + tokenizer
    optimizer.pt      optimizer and scheduler state     (loaded with weights_only=True)
    rng.pt            torch RNG state                   (loaded with weights_only=True)
    state.json        optimizer step, data position, tokens seen, best validation
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs."""

    optimizer_step: int = 0
    epoch: int = 0  # data epochs started
    row_in_epoch: int = 0  # next row (in this epoch's shuffled order)
    tokens_seen: int = 0  # real (non-padding) input tokens trained on
    train_seconds: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)  # {"step", metric: value} of the best validation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside DDP/FSDP/peft wrappers' outer layers (peft kept)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save_hf(model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, Any] | None = None) -> None:
    """save_pretrained for model, tokenizer and generation config, into ``folder`` (must not exist)."""
    model = unwrap(model)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
    if hasattr(model, "peft_config"):  # adapter only; the base model is known by name
        model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=False)
    else:
        model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def atomic_dir(final: Path) -> Path:
    """A fresh temporary folder beside ``final``; pass it to :func:`commit_dir` when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames only; an old ``final`` is removed after the swap."""
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


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


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders never match ``step-N``)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def rotate(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints. Each older one is first renamed to a temporary name,
    then deleted: a process killed while deleting leaves a ``.step-*`` folder (removed by the next
    call), never a half-deleted ``step-N`` that would look like a checkpoint or escape rotation."""
    root = out_dir / "checkpoints"
    for _, path in list_checkpoints(out_dir)[:-keep]:
        doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for child in root.iterdir() if root.is_dir() else ():
        incomplete = STEP_DIR.match(child.name) and not (child / "state.json").is_file()
        if child.name.startswith(".step-") or incomplete:  # left by a killed run (or older versions)
            shutil.rmtree(child, ignore_errors=True)


def engine_dir(out_dir: Path, step: int) -> Path:
    """Where every process writes its part of an engine (accelerate) save: a fixed name, so all
    processes agree on it; moved into the checkpoint when that is committed."""
    return out_dir / "checkpoints" / f".step-{step}.engine"


def write_checkpoint(out_dir: Path, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                     state: TrainState, model_state: dict[str, Any] | None = None,
                     engine_state: Path | None = None) -> Path:
    """Commit ``step-N/``: HF weights (``model/``), optimizer + scheduler (``optimizer.pt``) or the
    engine's own save (``engine/``, when ``engine_state`` is given), RNG and train state."""
    final = out_dir / "checkpoints" / f"step-{state.optimizer_step}"
    tmp = atomic_dir(final)
    try:
        save_hf(model, tokenizer, tmp / "model", state_dict=model_state)
        saved = {"scheduler": scheduler.state_dict()}
        if engine_state is not None:
            os.replace(engine_state, tmp / "engine")
        else:
            saved["optimizer"] = optimizer.state_dict()
        torch.save(saved, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_weights(model: Any, folder: Path) -> None:
    """Load safetensors weights saved by :func:`save_hf` into ``model`` (full model or adapter)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    inner = unwrap(model)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (corrupt checkpoint?)")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    if hasattr(inner, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(inner, weights)
        return
    result = inner.load_state_dict(weights, strict=False)
    tied = set(getattr(inner, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not _is_tied(inner, k)]
    if missing or result.unexpected_keys:
        raise UserError(f"{folder}: weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")


def _is_tied(model: Any, key: str) -> bool:
    out = model.get_output_embeddings()
    return out is not None and key.endswith("weight") and key.startswith("lm_head") and \
        out.weight is model.get_input_embeddings().weight


def read_checkpoint(path: Path) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """State, optimizer+scheduler state and RNG state of a checkpoint, loaded safely."""
    try:
        state = TrainState.from_dict(json.loads((path / "state.json").read_text(encoding="utf-8")))
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise UserError(f"{path}: corrupt or incomplete checkpoint ({str(exc).splitlines()[0][:200]}); "
                        "delete it to resume from an older one") from None
    return state, opt, rng


def _save_merged(peft_model: Any, tokenizer: Any, folder: Path) -> None:
    """Save base weights with the adapters merged in, leaving the peft model as it was
    (merge, copy the state without LoRA tensors, unmerge): no second copy of the model."""
    peft_model.merge_adapter()
    try:
        base = peft_model.get_base_model()
        merged = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        save_hf(base, tokenizer, folder, state_dict=merged)
    finally:
        peft_model.unmerge_adapter()


def export(model: Any, tokenizer: Any, out: Path, merge: bool = True, card: str | None = None) -> Path:
    """Write a Hugging Face folder atomically; peft adapters are merged unless ``merge`` is False."""
    inner = unwrap(model)
    tmp = atomic_dir(out)
    try:
        if merge and hasattr(inner, "peft_config"):
            _save_merged(inner, tokenizer, tmp)
        else:
            save_hf(inner, tokenizer, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
