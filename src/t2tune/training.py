"""Training building blocks: the state a resume needs, the optimizer and learning-rate
schedule, the data order, one optimizer step, and when the loop logs, validates, checkpoints
and stops (:class:`Schedule`, pure). The loop itself reads top to bottom in
:func:`t2tune.recipe.fit`.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import TrainConfig
from .packing import IGNORE_INDEX, PackedRow, collate
from .precision import precision_context


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs."""

    optimizer_step: int = 0
    epoch: int = 0  # data epochs started
    row_in_epoch: int = 0  # next row (in this epoch's shuffled order)
    tokens_seen: int = 0  # real (non-padding) input tokens trained on
    model_flops: float = 0.0  # their model FLOPs (speed.py), for MFU
    train_seconds: float = 0.0  # the optimizer steps' time (the time budget's clock)
    eval_seconds: float = 0.0  # validation's time
    wall_seconds: float = 0.0  # everything from the first step on (model loading excluded)
    best: dict[str, Any] = field(default_factory=dict)  # the best validation's summary, with its step
    last_eval: dict[str, Any] = field(default_factory=dict)  # the last validation's summary, with its step
    stale: int = 0  # validations since the best (eval.patience)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def restore(self, saved: TrainState) -> None:
        """Take on ``saved``'s values in place (a resume): whatever holds this state sees them."""
        for name, value in saved.to_dict().items():
            setattr(self, name, value)


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay skips biases and norm weights (every parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused kernel makes one pass over each tensor where the default makes a dozen: the
    # optimizer step of SmolLM2-135M on a CPU core takes 0.24 s instead of 1.3 s; the updates
    # are the same up to rounding (docs/performance.md)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps`` (or, when that is 0, ``warmup_fraction`` of ``steps``), then the schedule.

    Written here rather than taken from transformers' ``get_scheduler``: its warmup gives the
    first step a learning rate of 0 (a wasted step), this one ``lr / warmup_steps``, and its
    linear decay has no floor; the numbers of every run so far come from this function.

    >>> from types import SimpleNamespace as N
    >>> c = N(warmup_steps=2, warmup_fraction=0.0, steps=6, schedule="linear", min_lr_ratio=0.0)
    >>> [round(lr_factor(s, c), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    >>> c = N(warmup_steps=0, warmup_fraction=0.25, steps=8, schedule="constant", min_lr_ratio=0.0)
    >>> [round(lr_factor(s, c), 2) for s in range(4)]
    [0.5, 1.0, 1.0, 1.0]
    """
    warmup = cfg.warmup_steps or round(cfg.warmup_fraction * cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    return decay_factor(min(1.0, (step - warmup) / span), cfg)


def decay_factor(progress: float, cfg: TrainConfig) -> float:
    """The schedule after warmup at ``progress`` ∈ [0, 1] of the decay: constant, or linear /
    cosine from 1 down to ``min_lr_ratio``; by steps and by time budget alike.

    >>> from types import SimpleNamespace as N
    >>> [round(decay_factor(p, N(schedule="linear", min_lr_ratio=0.2)), 3) for p in (0.0, 0.5, 1.0)]
    [1.0, 0.6, 0.2]
    """
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of an epoch; a pure function of (seed, epoch), so resume needs
    only the position in it."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=gen).tolist()


FIRST_FRACTION = 1e-3  # a budgeted warmup starts here, so that its first step trains


def budget_factor(fraction: float, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` when ``fraction`` of the time budget is spent (``steps: auto``):
    linear warmup over the first ``warmup_fraction``, then the schedule over the rest. The
    fraction is the training time (validation excluded) measured before the step it sets.

    >>> from types import SimpleNamespace as N
    >>> c = N(warmup_fraction=0.1, schedule="linear", min_lr_ratio=0.2)
    >>> [round(budget_factor(f, c), 3) for f in (0.0, 0.05, 0.1, 0.55, 1.0, 1.3)]
    [0.01, 0.5, 1.0, 0.6, 0.2, 0.2]
    >>> c = N(warmup_fraction=0.0, schedule="cosine", min_lr_ratio=0.0)
    >>> [round(budget_factor(f, c), 3) for f in (0.0, 0.5, 1.0)]
    [1.0, 0.5, 0.0]
    """
    fraction = max(fraction, FIRST_FRACTION)
    warmup = cfg.warmup_fraction
    if fraction < warmup:
        return fraction / warmup
    return decay_factor(min(1.0, (fraction - warmup) / (1 - warmup)), cfg)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, budget_spent: Callable[[], float] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule: by optimizer step, or (``budget_spent`` given: ``steps: auto``) by the
    fraction of the time budget spent."""
    if budget_spent is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: budget_factor(budget_spent(), cfg))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def next_positions(rows_in: Callable[[int], int], state: TrainState, size: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, row) of each row of the next optimizer step, advancing ``state`` (wraps into new
    epochs); ``rows_in(epoch)`` is the epoch's row count (a mixture packs each epoch anew)."""
    picked: list[tuple[int, int]] = []
    while len(picked) < size:
        n_rows = rows_in(state.epoch)
        if n_rows <= 0 or not 0 <= state.row_in_epoch < n_rows:  # (would never advance)
            raise ValueError(f"data position {state.row_in_epoch} is outside epoch {state.epoch}'s {n_rows} rows")
        order = epoch_order(n_rows, seed, state.epoch)
        take = order[state.row_in_epoch : state.row_in_epoch + size - len(picked)]
        picked.extend((state.epoch, index) for index in take)
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
    label_tokens: int = 0  # tokens whose label counted in the loss


@dataclass
class TrainParts:
    """What one optimizer step runs on, as accelerate prepared it."""

    accelerator: Any
    loss_module: Any  # LossModule, wrapped by DDP / FSDP / DeepSpeed
    optimizer: Any
    scheduler: Any
    pad_id: int


def train_step(engine: TrainParts, batch: Sequence[PackedRow], cfg: TrainConfig) -> StepResult:
    """One optimizer step over this process's share of the global ``batch``."""
    acc = engine.accelerator
    world, rank = acc.num_processes, acc.process_index
    mine = list(batch[rank::world])
    micro = cfg.micro_batch_size
    batches = [collate(mine[s : s + micro], engine.pad_id) for s in range(0, len(mine), micro)]
    device = acc.device
    counts = torch.tensor(
        [float(sum((b["labels"] != IGNORE_INDEX).sum().item() for b in batches)), float(sum(row.real for row in mine))],
        device=device,
    )
    counts = acc.reduce(counts, reduction="sum")
    label_tokens = max(1.0, counts[0].item())
    loss_sum = torch.zeros((), device=device)
    for tensors in batches:
        tensors = {k: v.to(device) for k, v in tensors.items()}
        # accumulate() syncs gradients (DDP) or steps the engine (DeepSpeed) on the last
        # micro-batch only; the backward runs inside it, or DDP all-reduces every micro-batch
        with acc.accumulate(engine.loss_module):
            with precision_context(cfg.precision, device):
                summed = engine.loss_module(**tensors)
            # DDP and DeepSpeed average gradients over processes and accelerate divides by the
            # micro-batch count; scaling by both makes the result the gradient of
            # (sum of token losses over the global batch) / (its label tokens)
            acc.backward(summed * world * acc.gradient_accumulation_steps / label_tokens)
        loss_sum += summed.detach()
    grad_norm = None
    if cfg.grad_clip is not None:  # DeepSpeed clips inside its step and reports the norm here
        norm = acc.clip_grad_norm_(engine.loss_module.parameters(), cfg.grad_clip)
        grad_norm = None if norm is None else float(norm)
    engine.optimizer.step()
    engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    total = acc.reduce(loss_sum, reduction="sum").item()
    return StepResult(total / label_tokens, int(counts[1].item()), grad_norm, int(counts[0].item()))


@dataclass(frozen=True)
class Schedule:
    """Which optimizer steps log, validate and checkpoint during the loop. Validation and the
    checkpoint of the last step happen after the loop, once, whatever stopped it.

    >>> s = Schedule(steps=6, log_every=4, eval_every=2, checkpoint_every=3)
    >>> [(n, s.logs(n), s.validates(n), s.checkpoints(n)) for n in (2, 3, 4, 6)]
    [(2, False, True, False), (3, False, False, True), (4, True, True, False), (6, True, False, False)]
    >>> Schedule(steps=6, patience=2).out_of_patience(2), Schedule(steps=6).out_of_patience(9)
    (True, False)
    """

    steps: int
    log_every: int = 1
    eval_every: int = 0  # 0: validate only after the loop
    checkpoint_every: int = 0  # 0: checkpoint only after the loop
    patience: int = 0  # validations without a new best before stopping; 0: never

    def out_of_patience(self, stale: int) -> bool:
        return bool(self.patience) and stale >= self.patience

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def validates(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0 and step < self.steps

    def checkpoints(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < self.steps


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM inside an interruptible part of the loop (validation, a checkpoint)."""


class StopRequest:
    """SIGINT/SIGTERM while the loop runs. During a step and its bookkeeping a signal is a flag
    the loop reads when the step is done (it then checkpoints and stops): a step cut in half
    would leave the optimizer and the counters out of step. Inside :meth:`interruptible` parts
    (validation, writing a checkpoint: each can take minutes, and atomic writes leave nothing
    half-written) it raises :class:`Interrupted` at once, which the loop turns into the same
    stop. With several processes every signal is a flag (the others would wait forever in a
    collective). A second signal raises KeyboardInterrupt at once."""

    def __init__(self, immediate: bool = True) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        self._immediate, self._open = immediate, False

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self._open = self._immediate
        try:
            yield
        finally:
            self._open = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        if self._open:
            raise Interrupted(f"stopped by signal {signum}")

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
