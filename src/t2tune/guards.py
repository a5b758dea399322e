"""Two checks that a run makes on itself, so that a silent numeric fault becomes a clear stop.

**Packing self-test** (``train.packing: isolated``, before the first step). Isolated packing
relies on the attention implementation to turn the position-id restarts into a block-diagonal
mask. One that ignores them (or a model class that builds its own causal mask) lets every
example attend to the examples before it in its row, and training quietly learns from a
different distribution than inference sees. The test runs a few packed rows and each of their
examples alone, with the run's attention implementation, precision and device, and requires
each example's mean token loss to agree within :data:`PACKING_TOLERANCE`.

**Export gate** (after ``hf/`` is written, before it is renamed into place). The export is
run from disk, as a fresh model built from its config whose layers stream their weights from
the written files one layer at a time (no second copy of the model in memory, at any size),
and its last-token logits on a few validation prompts are compared with the trained model in
memory (LoRA adapters active, so the merge is what is checked). Drift beyond
:data:`GATE_TOLERANCE` (relative to the largest logit), or a changed greedy prediction that was
not a near tie, fails the export and leaves the checkpoints as they are.

Tolerances, per the precision the numbers are computed in. Measured on SmolLM2-135M with 64 MNLI
validation rows in rows of 256 tokens (benchmarks/bench_packing_check.py): a packed example and
the same example alone agree to 2e-6 nats/token in fp32 and 2.4e-2 under bf16 autocast (8 bits
of mantissa) with sdpa, so the self-test allows 1e-3 and 1e-1; an attention that ignores the
restarts moves them by 2.2 nats/token (1e-2 on a randomly initialised tiny model, which only
the fp32 tolerance catches). The gate allows 1e-4 of the
logits' scale for fp32 weights and 2e-2 for bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .engines import is_sharded
from .errors import ConfigError, UserError
from .export import MERGE_LOSS_HINT, ShardReader
from .packing import PackedRow
from .precision import compute_in, precision_context
from .tokenize import encode_prompts

PACKING_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-1}  # nats per token
GATE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # of max |logit|
PACKING_ROWS = 2  # rows checked; each holds several examples


def segments(row: PackedRow) -> list[tuple[int, int]]:
    """Input spans ``[start, end)`` of the examples in an isolated row (positions restart at 0)
    that count in the loss.

    >>> segments(PackedRow([1, 2, 9, 3, 9, 0], [0, 1, 2, 0, 1], [False, True, False, True, False]))
    [(0, 3), (3, 5)]
    """
    starts = [*np.flatnonzero(row.positions == 0).tolist(), len(row.positions)]
    return [(a, b) for a, b in zip(starts, starts[1:]) if row.loss_mask[a:b].any()]


def _token_losses(model: Any, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=device)
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.long, device=device)
    logits = model(input_ids=tokens[None, :-1], position_ids=positions[None], use_cache=False).logits
    return F.cross_entropy(logits[0].float(), tokens[1:], reduction="none").cpu()


@torch.no_grad()
def packing_drift(model: Any, rows: Sequence[PackedRow], precision: str) -> float:
    """The largest difference (nats per token) between an example's mean token loss inside a
    packed row and alone, over the first rows holding two or more examples. Every token the
    example predicts of itself counts, whatever ``train.loss_on`` trains on (more tokens, less
    noise)."""
    device = next(model.parameters()).device
    checked = [row for row in rows if len(segments(row)) > 1][:PACKING_ROWS]
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        with precision_context(precision, device):
            for row in checked:
                packed = _token_losses(model, row.tokens, row.positions)
                for start, end in segments(row):  # every token the example predicts of itself
                    alone = _token_losses(model, row.tokens[start:end], list(range(end - start - 1)))
                    worst = max(worst, abs(float(packed[start : end - 1].mean() - alone.mean())))
    finally:
        model.train(was_training)
    return worst


def check_packing(model: Any, rows: Sequence[PackedRow], precision: str) -> float:
    """Raise ConfigError when packed rows leak between examples; else return the drift."""
    drift = packing_drift(model, rows, precision)
    if drift > PACKING_TOLERANCE[precision]:
        impl = getattr(model.config, "_attn_implementation", None) or "the model's default"
        raise ConfigError(
            f"train.packing: isolated packing leaks across examples with attention implementation '{impl}' "
            f"(an example's loss changes by {drift:.3g} nats/token when packed, tolerance "
            f"{PACKING_TOLERANCE[precision]:g} in {precision}): set model.attn_implementation=sdpa (or eager), "
            "or train.packing=none"
        )
    return drift


# --- export gate -----------------------------------------------------------------------------


@dataclass
class GateReport:
    prompts: int  # 0: an adapter export, checked tensor by tensor
    drift: float  # max |Δ logit| ÷ max(1, max |logit|)
    dtype: str
    tolerance: float
    tensors: int = 0

    def line(self) -> str:
        if not self.prompts:
            return (
                f"export gate passed: the written adapter's {self.tensors} tensors equal the trained ones bit for bit"
            )
        return (
            f"export gate passed: the reloaded export matches the trained model on {self.prompts} prompts "
            f"(last-token logits within {self.drift:.2g} of their scale, tolerance {self.tolerance:g} "
            f"in {self.dtype}; same greedy predictions)"
        )


def gate_adapter(folder: Path, expected: dict[str, torch.Tensor]) -> GateReport:
    """An unmerged LoRA export: the written adapter tensors must equal ``expected`` (peft's
    adapter state dict of the trained model) bit for bit, name for name. The base weights are
    ``model.name``'s own, untouched, so that is the whole of what the adapter changes."""
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    written: dict[str, torch.Tensor] = {}
    if file.is_file():
        with safe_open(str(file), framework="pt") as f:
            written = {k: f.get_tensor(k) for k in f.keys()}
    differ = sorted(
        k
        for k in expected.keys() & written.keys()
        if written[k].dtype != expected[k].dtype or not torch.equal(written[k], expected[k].cpu())
    )
    if written.keys() != expected.keys() or differ:
        raise UserError(
            f"export gate failed: the written adapter {file} does not hold the trained LoRA weights "
            f"(missing {sorted(expected.keys() - written.keys())[:3]}, unexpected "
            f"{sorted(written.keys() - expected.keys())[:3]}, different {differ[:3]}); the export was "
            "not written, the checkpoints are kept"
        )
    return GateReport(0, 0.0, "adapter", 0.0, tensors=len(written))


@torch.no_grad()
def last_token_logits(model: Any, prompt_ids: Sequence[list[int]], device: torch.device | None = None) -> torch.Tensor:
    """(prompts, vocabulary) fp32 logits at each prompt's last token, one prompt at a time (no
    padding to differ between the two models). Under ZeRO-3 every process must call it."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        rows = [
            model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float().cpu()
            for ids in prompt_ids
        ]
    finally:
        model.train(was_training)
    return torch.stack(rows)


class _StreamedWeights:
    """A model skeleton (parameters on the meta device) whose layers read their parameters
    from a folder's safetensors files just before they run and drop them right after, so the
    export is checked by running it from disk with one layer in memory at a time, not as a
    second copy of the model. Every file tensor must belong to a parameter and every
    parameter must have a file tensor (tied weights read their one stored tensor)."""

    def __init__(self, model: torch.nn.Module, folder: Path):
        self.reader = ShardReader(folder)
        self.where = self.reader.where
        by_param: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(param), []).append(name)
        stored = {pid: next((n for n in names if n in self.where), None) for pid, names in by_param.items()}
        missing = sorted(names[0] for pid, names in by_param.items() if stored[pid] is None)
        used = {n for n in stored.values() if n is not None}
        extra = sorted(set(self.where) - used - {n for names in by_param.values() for n in names})
        if missing or extra:
            raise UserError(
                f"export gate failed: the written export does not match the model's parameters "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); the export was not written, "
                "the checkpoints are kept"
            )
        self.hooks = []
        for module in model.modules():
            own = {n: stored[id(p)] for n, p in module._parameters.items() if p is not None}
            if own:
                self.hooks.append(module.register_forward_pre_hook(self._loader(own)))
                self.hooks.append(module.register_forward_hook(self._dropper(dict(module._parameters))))

    def _loader(self, own: dict[str, str]) -> Callable[..., None]:
        def load(module: torch.nn.Module, _args: Any) -> None:
            for attr, key in own.items():
                module._parameters[attr] = torch.nn.Parameter(self.reader.get(key), requires_grad=False)

        return load

    @staticmethod
    def _dropper(skeleton: dict[str, Any]) -> Callable[..., None]:
        def drop(module: torch.nn.Module, _args: Any, _out: Any) -> None:
            module._parameters.update(skeleton)  # back to the meta tensors: the weights are freed

        return drop

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


@contextlib.contextmanager
def _plain_construction() -> Iterator[None]:
    """While a ZeRO-3 config is registered (a DeepSpeed run), transformers builds every model
    partitioned across processes, a collective; the gate's reload is the main process's own,
    so it is built as a plain model."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    registered = ref() if ref is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def gate_export(
    folder: Path, reference: torch.Tensor, prompt_ids: Sequence[list[int]], compute_dtype: torch.dtype | None = None
) -> GateReport:
    """Run ``folder`` from disk (a skeleton built from its config, streaming its weights layer
    by layer, :class:`_StreamedWeights`) on the prompts and compare its logits with
    ``reference`` (the trained model's, :func:`last_token_logits`). ``compute_dtype``: the
    trained model's ``model.compute_dtype``. Raises UserError on drift."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(torch, str(getattr(config, "dtype", None) or "float32").removeprefix("torch."))
    with _plain_construction(), init_empty_weights(include_buffers=False):  # buffers are real
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.tie_weights()  # on the meta device construction leaves tied weights apart
    if compute_dtype is not None:
        compute_in(fresh, compute_dtype)
    streamed = _StreamedWeights(fresh, folder)
    try:
        reloaded = last_token_logits(fresh, prompt_ids, device=torch.device("cpu"))
    finally:
        streamed.close()
        del fresh
    scale = max(1.0, float(reference.abs().max()))
    drift = float((reloaded - reference).abs().max()) / scale
    tolerance = GATE_TOLERANCE.get(dtype, 2e-2)
    top2 = reference.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * tolerance * scale  # near ties may flip within tolerance
    flipped = int(((reloaded.argmax(-1) != reference.argmax(-1)) & decided).sum())
    name = str(dtype).removeprefix("torch.")
    if drift > tolerance or flipped:
        raise UserError(
            f"export gate failed: the export reloaded from disk differs from the trained model "
            f"(last-token logits drift {drift:.3g} of their scale, tolerance {tolerance:g} in {name}; "
            f"{flipped} of {len(prompt_ids)} greedy predictions changed); the export was not written, "
            "the checkpoints are kept"
        )
    return GateReport(len(prompt_ids), drift, name, tolerance)


def export_gate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    seq_len: int,
    processes: Any,
    *,
    merge: bool,
    weights: dict[str, Any] | None,
    dtype_name: str,
    compute_dtype: torch.dtype | None,
    merge_loss: Any,
) -> Callable[[Path], GateReport] | None:
    """The export gate's check for a run's export, or None where there is nothing to check on
    this process. A merged export: the trained model's last-token logits on ``prompts`` now
    (every process, as sharded weights need), the reload's compared with them later. An
    unmerged adapter (``merge`` False): its written tensors against the trained ones. A merge
    that fails says how much of the LoRA update its rounding lost (``merge_loss``)."""
    if hasattr(model, "peft_config") and not merge:
        if not processes.is_main_process:
            return None
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model, state_dict=weights)
        return lambda folder: gate_adapter(folder, expected)
    if not prompts:
        return None
    ids = encode_prompts(tokenizer, prompts, seq_len)
    if not (processes.is_main_process or is_sharded(processes)):
        return None
    reference = last_token_logits(model, ids)

    def check(folder: Path) -> GateReport:
        try:
            return gate_export(folder, reference, ids, compute_dtype)
        except UserError as exc:
            if merge_loss.share < MERGE_LOSS_HINT:
                raise
            raise UserError(
                f"{exc}. The merge rounded away {merge_loss.share:.0%} of the LoRA update (entries "
                f"below {dtype_name}'s resolution at their base weights): export.merge=false exports "
                "the adapter exactly, or `t2tune export <checkpoint> --adapter-only` writes it from a "
                "kept checkpoint"
            ) from None

    return check
