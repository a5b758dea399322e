"""The training loop: one explicit ``fit`` over packed rows, on accelerate.

Counters say what they count: ``micro_step`` is one forward/backward of ``micro_batch_size``
rows on one process; ``optimizer_step`` is one update of ``global_batch_size`` rows summed over
all processes. The loss of an optimizer step is the mean over every counted label token of
the global batch, however the rows are split across processes and micro-batches, so 1 and N
processes follow the same curve.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import TrainState
from .linear_ce import linear_cross_entropy
from .models import decoder_and_head, precision_context
from .packing import IGNORE_INDEX, PackedRow, collate


class LossModule(torch.nn.Module):
    """Wraps the language model so DDP/FSDP see one forward that returns the summed token loss.

    It runs the decoder, keeps the hidden states of positions that carry a label, and applies
    the output layer to those alone: (B, T, H) → (N, H) → loss, never (B, T, V). With a plain
    ``nn.Linear`` output layer, the layer and the cross-entropy run fused and chunked
    (``linear_ce``), so not even the (N, V) logits exist.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.fast = decoder_and_head(model) is not None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels != IGNORE_INDEX  # (B, T)
        # position_ids without an attention mask: transformers derives the block-diagonal
        # causal mask of isolated packing from restarts in position_ids
        split = decoder_and_head(self.model)
        if split is not None:
            decoder, head = split
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]  # (B, T, H)
            # ZeRO-3 gathers a module's weight only when the module itself is called
            if type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id"):
                return linear_cross_entropy(hidden[keep], head.weight, head.bias, labels[keep])
            logits = head(hidden[keep])  # (N, V)
        else:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[keep]
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW; weight decay skips biases and norm weights (every parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, cfg: Any) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup, then the schedule.

    >>> from types import SimpleNamespace as N
    >>> c = N(warmup_steps=2, steps=6, schedule="linear", min_lr_ratio=0.0)
    >>> [round(lr_factor(s, c), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of an epoch; a pure function of (seed, epoch), so resume needs
    only the position in it."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=gen).tolist()


def next_global_batch(n_rows: int, state: TrainState, size: int, seed: int) -> list[int]:
    """Row indices of the next optimizer step, advancing ``state`` (wraps into new epochs)."""
    picked: list[int] = []
    while len(picked) < size:
        order = epoch_order(n_rows, seed, state.epoch)
        take = order[state.row_in_epoch:state.row_in_epoch + size - len(picked)]
        picked.extend(take)
        state.row_in_epoch += len(take)
        if state.row_in_epoch >= n_rows:
            state.epoch += 1
            state.row_in_epoch = 0
    return picked


@dataclass
class StepResult:
    loss: float
    tokens: int  # real input tokens of the global batch
    grad_norm: float | None


def train_step(loss_module: Any, accelerator: Any, optimizer: Any, scheduler: Any, rows: Sequence[PackedRow],
               indices: list[int], cfg: Any, pad_id: int) -> StepResult:
    """One optimizer step over this process's share of the global batch."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = indices[rank::world]
    micro = cfg.micro_batch_size
    batches = [collate([rows[i] for i in mine[s:s + micro]], pad_id) for s in range(0, len(mine), micro)]
    device = accelerator.device
    counts = torch.tensor([float(sum((b["labels"] != IGNORE_INDEX).sum().item() for b in batches)),
                           float(sum(rows[i].real for i in mine))], device=device)
    counts = accelerator.reduce(counts, reduction="sum")
    label_tokens = max(1.0, counts[0].item())
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        # gradients sync on the last micro-batch only
        sync = accelerator.no_sync(loss_module) if index < len(batches) - 1 else contextlib.nullcontext()
        with sync:  # the backward too must run inside no_sync, or DDP all-reduces every micro-batch
            with precision_context(cfg.precision, device):
                summed = loss_module(**batch)
            # DDP averages gradients over processes; scaling by `world` makes the result the
            # gradient of (sum of token losses over the global batch) / (its label tokens)
            accelerator.backward(summed * world / label_tokens)
        loss_sum += summed.detach()
    grad_norm = None
    if cfg.grad_clip is not None:
        grad_norm = float(accelerator.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = accelerator.reduce(loss_sum, reduction="sum").item()
    return StepResult(total / label_tokens, int(counts[1].item()), grad_norm)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (then checkpoints, exits)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def fit(loss_module: Any, accelerator: Any, optimizer: Any, scheduler: Any, rows: Sequence[PackedRow],
        state: TrainState, cfg: Any, pad_id: int, on_step: Callable[[StepResult, float], None],
        should_stop: Callable[[], bool] = lambda: False) -> TrainState:
    """Run optimizer steps until ``cfg.steps`` (or a stop request); ``on_step`` logs, validates
    and checkpoints after each step."""
    loss_module.train()
    while state.optimizer_step < cfg.steps and not should_stop():
        start = time.perf_counter()
        indices = next_global_batch(len(rows), state, cfg.global_batch_size, cfg.seed)
        result = train_step(loss_module, accelerator, optimizer, scheduler, rows, indices, cfg, pad_id)
        elapsed = time.perf_counter() - start
        state.optimizer_step += 1
        state.tokens_seen += result.tokens
        state.train_seconds += elapsed
        on_step(result, elapsed)
    return state

