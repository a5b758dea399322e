"""Weight averaging (``train.ema``): an exponential moving average of the trained weights, which
validation measures and the export writes in place of the raw weights.

After optimizer step ``n`` every trainable parameter ``p`` moves its average ``a`` by

    a ← a + (1 − d_n) · (p − a),   d_n = min(decay, (1 + n) / (10 + n))

The warm-up of ``d_n`` lets the first steps count fully (a pretrained model's starting point
would otherwise weigh ``decay ** n`` in the average for the whole of a short run); it depends
only on ``n``, which the train state already holds, so a resume needs the averages alone.

Only trainable parameters are averaged (under LoRA: the adapter; frozen weights equal their
own average). The averages are kept in float32 whatever the weights' dtype: an update of
``1 − decay`` of a step's change is below bf16's resolution. Each process updates its own copy
from its own (identical, under DDP) weights, so no communication is needed. Memory: 4 bytes per
trainable parameter (SmolLM2-135M fully trained: 0.54 GB), plus, while the average is in the
model, one copy of the raw weights where their dtype is not float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def decay_at(step: int, decay: float) -> float:
    """The decay applied after optimizer step ``step`` (1-based).

    >>> [round(decay_at(n, 0.99), 4) for n in (1, 10, 100, 1000)]
    [0.1818, 0.55, 0.9182, 0.99]
    """
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The moving average of ``model``'s trainable parameters."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().to(torch.float32, copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step ``step`` into the average."""
        weight = 1.0 - decay_at(step, self.decay)
        averages = list(self.average.values())
        torch._foreach_lerp_(averages, [p.detach().float() for p in self.params.values()], weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (validation), the raw ones after it,
        bit for bit. A float32 weight trades places with its average, one tensor at a time; any
        other weight is kept aside as it was."""
        kept = {}
        with torch.no_grad():
            for name, p in self.params.items():
                if p.dtype == torch.float32:
                    self._swap(p, self.average[name])
                else:
                    kept[name] = p.detach().clone()
                    p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    if name in kept:
                        p.copy_(kept[name])
                    else:
                        self._swap(p, self.average[name])

    @staticmethod
    def _swap(p: torch.Tensor, average: torch.Tensor) -> None:
        raw = p.detach().clone()
        p.copy_(average)
        average.copy_(raw)

    @torch.no_grad()
    def apply(self) -> None:
        """Write the averages into the model for good (the end of a run: export)."""
        for name, p in self.params.items():
            p.copy_(self.average[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    def load_state_dict(self, state: Any, where: str) -> None:
        """Averages saved by :meth:`state_dict`; ``where`` names the file for a mismatch."""
        if (
            not isinstance(state, dict)
            or set(state) != set(self.average)
            or any(not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape for k, v in self.average.items())
        ):
            from .errors import UserError

            raise UserError(
                f"{where}: the weight averages (train.ema) do not match this model's trainable "
                "parameters; delete this checkpoint to resume from an older one"
            )
        for name, value in state.items():
            self.average[name].copy_(value)
