"""The Hugging Face export: full weights (LoRA merged in) written tensor by tensor.

``save_pretrained`` builds each shard's bytes in memory (transformers' default shard is 50 GB,
so all of GPT-J 6B's 12.1 GB at once), and merging LoRA through peft changes the live base
weights and unmerges them afterwards, which in bf16 does not give the same weights back. Here
every tensor of the export is produced on its own and written straight to its shard:

- a LoRA-targeted weight is computed as ``W + scale · B @ A`` in fp32 from the live tensors,
  rounded once to W's dtype and written; the model in memory is never modified, so it is
  bit-identical after an export, in bf16 too;
- any other tensor is written from the model's own storage, without a copy.

Peak memory above the model is one tensor (GPT-J's 50400 × 4096 embedding: 0.4 GB in bf16).
The folder is a standard sharded safetensors checkpoint (``model-0000k-of-0000n.safetensors``
with ``model.safetensors.index.json``, or one ``model.safetensors``), which
``from_pretrained`` reads and :mod:`t2tune.guards`' export gate streams back layer by layer.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_hf, set_generation_ids
from .errors import UserError
from .files import atomic_dir, files_below, write_marker
from .runfolder import check_export_target

SHARD_BYTES = 2 * 1024**3  # the hub's GPT-J shards are ~1-10 GB; 2 GB keeps each file easy to move
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
PEFT_PREFIX = "base_model.model."

Producer = Callable[[], torch.Tensor]
MERGE_LOSS_HINT = 0.05  # a merge whose rounding lost this share of the LoRA update is worth a word


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(
    folder: Path, tensors: dict[str, tuple[torch.Tensor, Producer]], shard_bytes: int = SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` (name → (a tensor of the output's shape and dtype, the function that
    makes the output)) as safetensors shards into ``folder``, one tensor in memory at a time.
    Returns the file names written.

    >>> import tempfile
    >>> from safetensors.torch import load_file
    >>> d = Path(tempfile.mkdtemp())
    >>> w = torch.arange(6.0).reshape(2, 3)
    >>> write_safetensors(d, {"w": (w, lambda: w * 2), "b": (w[0], lambda: w[0])}, shard_bytes=24)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    >>> load_file(d / "model-00001-of-00002.safetensors")["w"].tolist()
    [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, (like, _) in tensors.items():  # planned from shapes alone: nothing is made yet
        if shards[-1] and size + _nbytes(like) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(like)
    many = len(shards) > 1
    names = [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if many else "model.safetensors"
        for i in range(len(shards))
    ]
    weight_map: dict[str, str] = {}
    for file, members in zip(names, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in members:
            like = tensors[name][0]
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[like.dtype],
                "shape": list(like.shape),
                "data_offsets": [offset, offset + _nbytes(like)],
            }
            offset += _nbytes(like)
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format's 8-byte alignment of the data
        with open(folder / file, "xb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in members:
                like, make = tensors[name]
                tensor = make().detach().to("cpu").contiguous()
                if tensor.shape != like.shape or tensor.dtype != like.dtype:
                    raise RuntimeError(
                        f"export: {name} came out {tuple(tensor.shape)} {tensor.dtype}, "
                        f"planned {tuple(like.shape)} {like.dtype}"
                    )
                if tensor.numel():
                    out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
    if many:
        total = sum(_nbytes(tensors[n][0]) for n in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append("model.safetensors.index.json")
    return names


class MergeLoss:
    """How much of the LoRA update the merge's rounding to the base weights' dtype loses:
    ``‖round(W + ΔW) − W − ΔW‖ / ‖ΔW‖`` over every merged weight. In bf16 an update entry
    below half of bf16's step at its base weight (2⁻⁹ of it) rounds away entirely; early in
    a run, or with a small learning rate, most of ΔW can be lost that way."""

    def __init__(self) -> None:
        self.error_sq = 0.0
        self.update_sq = 0.0

    def add(self, weight: torch.Tensor, update: torch.Tensor, merged: torch.Tensor) -> None:
        self.error_sq += float((merged.float() - weight.float() - update).square().sum())
        self.update_sq += float(update.square().sum())

    @property
    def share(self) -> float:
        return (self.error_sq / self.update_sq) ** 0.5 if self.update_sq else 0.0


class ShardReader:
    """The tensors of a folder's safetensors files, each read with plain file reads when asked
    for. safetensors' own reader maps the files into memory, and every page it touches then
    counts in the process's resident memory until the mapping closes (12 GB for GPT-J 6B); read
    this way, only the tensor asked for is held, and the page cache stays the kernel's."""

    def __init__(self, folder: Path) -> None:
        by_code = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
        self.where: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self.where[name] = (file, by_code[info["dtype"]], info["shape"], 8 + size + start, end - start)

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        file, dtype, shape, offset, length = self.where[name]
        data = bytearray(length)
        with open(file, "rb") as f:
            f.seek(offset)
            if f.readinto(data) != length:
                raise OSError(f"{file}: truncated at {name}")
        if not length:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _merged(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, loss: MergeLoss | None = None
) -> torch.Tensor:
    """``W + scale · B @ A`` in fp32, rounded once to W's dtype."""
    update = scale * (b.float() @ a.float())
    merged = (weight.float() + update).to(weight.dtype)
    if loss is not None:
        loss.add(weight, update, merged)
    return merged


def lora_merged_tensors(
    peft_model: Any, weights: dict[str, torch.Tensor] | None = None, loss: MergeLoss | None = None
) -> dict[str, tuple[torch.Tensor, Producer]]:
    """The base model's tensors with every LoRA pair merged in, keyed as the base model names
    them, each made only when asked for. ``weights``: a full peft state dict gathered from a
    sharded engine (the model object then holds only a shard); by default the live model's.
    ``loss`` gathers what rounding takes from the update (:class:`MergeLoss`)."""
    state = (
        weights
        if weights is not None
        else {PEFT_PREFIX + k: v for k, v in peft_model.get_base_model().state_dict().items()}
    )
    wide = dequantized(peft_model.get_base_model()) if weights is None else {}
    packed = tuple(f"{name}." for name in wide)  # a 4-bit weight's quantization state: not exported
    out: dict[str, tuple[torch.Tensor, Producer]] = {}
    for key, value in state.items():
        bare = key.removeprefix(PEFT_PREFIX)
        if "lora_" in key or bare.startswith(packed):
            continue
        like, make = wide.get(bare, (value, lambda v=value: v))
        name = bare.replace(".base_layer.", ".")
        if ".base_layer.weight" in key:
            module = bare.removesuffix(".base_layer.weight")
            a = state[f"{PEFT_PREFIX}{module}.lora_A.default.weight"]
            b = state[f"{PEFT_PREFIX}{module}.lora_B.default.weight"]
            # looked up from the base model: on the peft wrapper, Llama's `model.` prefix would
            # resolve to the wrapped LlamaForCausalLM instead of its inner `model`
            scale = peft_model.get_base_model().get_submodule(module).scaling["default"]
            out[name] = (like, lambda w=make, a=a, b=b, s=scale: _merged(w(), a, b, s, loss))
        else:
            out[name] = (like, make)
    return out


def dequantized(model: Any) -> dict[str, tuple[torch.Tensor, Producer]]:
    """Every 4-bit (bitsandbytes) weight of ``model`` and its bias by state-dict name: a stand-in
    of the real shape and dtype holding one element, and the function that makes the tensor
    (the weight dequantized: what every forward pass of the model computes with)."""
    out: dict[str, tuple[torch.Tensor, Producer]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        quant = getattr(weight, "quant_state", None)
        if quant is None:
            continue
        from bitsandbytes.functional import dequantize_4bit

        like = torch.zeros(1, dtype=quant.dtype).expand(quant.shape)  # its own storage: not a tied alias
        out[f"{name}.weight"] = (like, lambda w=weight, q=quant: dequantize_4bit(w.data, q))
        if module.bias is not None:  # bitsandbytes widens it to the compute dtype in place (losslessly)
            like = torch.zeros(1, dtype=quant.dtype).expand(module.bias.shape)
            out[f"{name}.bias"] = (like, lambda b=module.bias, d=quant.dtype: b.detach().to(d))
    return out


def merge_lora_weights(peft_model: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """Base weights with every LoRA pair merged in, as a plain state dict (tests compare
    exports with it)."""
    return {name: make() for name, (_, make) in lora_merged_tensors(peft_model, weights).items()}


def _untied(tensors: dict[str, tuple[torch.Tensor, Producer]], model: Any) -> dict[str, tuple[torch.Tensor, Producer]]:
    """Drop the aliases of tied weights (safetensors holds no aliasing), keeping the name that
    ``from_pretrained`` expects, by transformers' own rule."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    kept = remove_tied_weights_from_state_dict({k: like for k, (like, _) in tensors.items()}, model)
    return {k: v for k, v in tensors.items() if k in kept}


def save_full(
    model: Any,
    tokenizer: Any,
    folder: Path,
    merge: bool = True,
    weights: dict[str, Any] | None = None,
    loss: MergeLoss | None = None,
) -> None:
    """Write ``model`` as a Hugging Face folder of full weights: config, generation config,
    tokenizer and safetensors shards (LoRA merged when ``merge``; an adapter folder otherwise).
    ``weights``: full weights gathered from a sharded engine; ``loss``: see :class:`MergeLoss`."""
    peft = hasattr(model, "peft_config")
    if peft and not merge:
        save_hf(model, tokenizer, folder, state_dict=weights)
        return
    base = model.get_base_model() if peft else model
    if peft:
        tensors = lora_merged_tensors(model, weights, loss)
    else:
        source = weights if weights is not None else base.state_dict()
        tensors = {k: (v, lambda v=v: v) for k, v in source.items()}
    tensors = _untied(tensors, base)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # 4-bit weights are written dequantized
        del config.quantization_config
    floats = [like.dtype for like, _ in tensors.values() if like.is_floating_point()]
    config.dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.")  # what "auto" loads
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    save_hf_extras(base, tokenizer, folder)
    write_safetensors(folder, tensors)


def save_hf_extras(model: Any, tokenizer: Any, folder: Path) -> None:
    """The generation config (with the tokenizer's eos / pad ids) and the tokenizer."""
    set_generation_ids(model, tokenizer)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def export(
    model: Any,
    tokenizer: Any,
    out: Path,
    merge: bool = True,
    card: str | Callable[[Any], str] | None = None,
    what: str = "export",
    weights: dict[str, Any] | None = None,
    check: Callable[[Path], Any] | None = None,
    loss: MergeLoss | None = None,
) -> Any:
    """Write a Hugging Face folder atomically; peft adapters are merged unless ``merge`` is False.
    ``weights`` are full weights gathered from a sharded engine (the model object holds only a
    shard). ``check(folder)`` inspects the written folder before it is renamed into place (the
    export gate): if it raises, nothing is written; what it returns goes to ``card`` when that
    is a function, and is returned. An existing ``out`` is replaced only when it is empty or a
    t2tune export holding nothing but what t2tune wrote (``what`` names the setting in the refusal)."""
    check_export_target(out, what)
    with atomic_dir(out) as tmp:
        save_full(model, tokenizer, tmp, merge=merge, weights=weights, loss=loss)
        report = check(tmp) if check is not None else None
        if callable(card):
            card = card(report)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        write_marker(tmp, "export", files_below(tmp))
    return report


def export_run(
    model: Any,
    tokenizer: Any,
    out: Path,
    cfg: Any,
    tasks: list[Any],
    state: Any,
    exported: dict[str, Any],
    why: str,
    *,
    base_name: str | None = None,
    merge: bool = True,
    weights: dict[str, Any] | None = None,
    check: Callable[[Path], Any] | None = None,
    loss: MergeLoss | None = None,
    what: str = "export",
    hint: str = "",
) -> Any:
    """The one export of a run's weights, for the recipe at the end of training and for
    ``t2tune export`` of a checkpoint alike: the Hugging Face folder (:func:`export`) with its
    model card, which names every task of the run, the exported step's validation
    (``exported``, {} when none ran at that step) and ``why`` that step. Returns the gate's
    report; a write that fails is one line naming ``out`` (``hint``: what the user can do)."""
    from .report import model_card

    def card(report: Any) -> str:
        return model_card(cfg, tasks, base_name or cfg.model.name, state, exported, why, report)

    try:
        return export(model, tokenizer, out, merge=merge, card=card, what=what, weights=weights, check=check, loss=loss)
    except OSError as exc:
        raise UserError(f"{out}: could not write the export ({exc.strerror}){hint}") from None


def exported_line(state: Any, exported: dict[str, Any], best_key: str, export_from: str) -> str:
    """The model card's line on which step a run exported and why."""
    step = exported.get("step", state.optimizer_step)
    if not state.best:
        return f"Exported weights: step {step}, the last (no validation ran)."
    if export_from == "last":
        return f"Exported weights: step {step}, the last (export.from: last)."
    return (
        f"Exported weights: step {step} of {state.optimizer_step}, the best validation {best_key} "
        f"({state.best[best_key]:.4f}; export.from: best)."
    )
