"""Task mixtures: several tasks in one training run, mixed by a documented rule.

The rate of task ``i`` (its share of every epoch's examples), with ``n_i`` training examples:

    proportional   r_i ∝ min(n_i, K)                 (T5's examples-proportional mixing, mix.cap = K)
    temperature    r_i ∝ min(n_i, K) ^ (1 / T)       (mix.temperature = T; T = 1 is proportional,
                                                      larger T moves towards equal rates)
    weights        r_i ∝ w_i                         (tasks.<name>.weight)

An epoch holds ``Σ min(n_i, K)`` examples (every example once when there is no cap), of which
task ``i`` contributes ``round(r_i · size)`` (largest remainders, so the counts add up). Each
task's examples are drawn from an endless stream of its own shuffles, so an epoch that takes
more than ``n_i`` repeats them and one that takes fewer continues where the last one stopped.
The epoch's examples are shuffled together and packed (packing works across tasks as within
one). Everything is a pure function of (seed, epoch): resume needs only the position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Item = TypeVar("Item")


def mixing_rates(
    sizes: dict[str, int],
    rule: str = "proportional",
    cap: int | None = None,
    temperature: float = 1.0,
    weights: dict[str, float] | None = None,
) -> dict[str, float]:
    """Each task's share of an epoch's examples (they sum to 1).

    >>> mixing_rates({"a": 300, "b": 100})
    {'a': 0.75, 'b': 0.25}
    >>> mixing_rates({"a": 300, "b": 100}, cap=100)
    {'a': 0.5, 'b': 0.5}
    >>> {k: round(v, 3) for k, v in mixing_rates({"a": 400, "b": 100}, "temperature", temperature=2).items()}
    {'a': 0.667, 'b': 0.333}
    >>> mixing_rates({"a": 400, "b": 100}, "weights", weights={"a": 1, "b": 3})
    {'a': 0.25, 'b': 0.75}
    """
    if rule == "weights":
        raw = {name: float((weights or {}).get(name, 1.0)) for name in sizes}
    else:
        counted = {name: float(min(n, cap) if cap else n) for name, n in sizes.items()}
        if rule == "proportional" or temperature == 1:
            raw = counted
        else:  # n ** (1 / T) in log space, relative to the largest task: it overflows for a small T
            logs = {name: math.log(max(n, 1.0)) / temperature for name, n in counted.items()}
            top = max(logs.values())
            raw = {name: math.exp(value - top) for name, value in logs.items()}
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def epoch_size(sizes: dict[str, int], cap: int | None = None) -> int:
    """Examples in one epoch of the mixture: Σ min(n_i, K)."""
    return sum(min(n, cap) if cap else n for n in sizes.values())


def epoch_counts(rates: dict[str, float], size: int) -> dict[str, int]:
    """Examples per task in an epoch of ``size``: ``rate · size`` rounded by largest remainders.

    >>> epoch_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 7)
    {'a': 4, 'b': 2, 'c': 1}
    """
    exact = {name: rate * size for name, rate in rates.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    short = size - sum(counts.values())
    for name in sorted(exact, key=lambda k: counts[k] - exact[k])[:short]:
        counts[name] += 1
    return counts


def _stream(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start + count`` of an endless stream of shuffles of ``range(n)``
    (shuffle ``c`` seeded by ``(seed, c)``)."""
    picked: list[int] = []
    while len(picked) < count:
        cycle, offset = divmod(start + len(picked), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + cycle)).tolist()
        picked.extend(order[offset : offset + count - len(picked)])
    return picked


def epoch_mix(tasks: Sequence[Sequence[Item]], counts: Sequence[int], seed: int, epoch: int) -> list[Item]:
    """The shuffled examples of ``epoch``: ``counts[i]`` items of ``tasks[i]`` each, a pure
    function of (seed, epoch).

    >>> epoch_mix([["a1", "a2", "a3"], ["b1"]], [2, 2], seed=0, epoch=0) == epoch_mix([["a1", "a2", "a3"], ["b1"]],
    ...                                                                                [2, 2], seed=0, epoch=0)
    True
    >>> sorted(epoch_mix([["a1", "a2", "a3"], ["b1"]], [2, 2], seed=0, epoch=0))[2:]
    ['b1', 'b1']
    """
    items: list[Item] = []
    for index, (examples, count) in enumerate(zip(tasks, counts)):
        task_seed = seed * 131 + index
        items.extend(examples[i] for i in _stream(len(examples), task_seed, epoch * count, count))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
    return [items[i] for i in order]


class EpochRows:
    """The packed rows of each epoch of a mixture (``rows(epoch)``), built on first use; the
    newest epoch and the one before it are kept, since a step that crosses an epoch boundary
    reads rows of both. ``pack`` turns an epoch's examples into rows."""

    def __init__(
        self, tasks: Sequence[Sequence[Item]], counts: Sequence[int], seed: int, pack: Callable[[list[Item]], list]
    ):
        self.tasks, self.counts, self.seed, self.pack = tasks, counts, seed, pack
        self._cached: dict[int, list] = {}

    def rows(self, epoch: int) -> list:
        if epoch not in self._cached:
            self._cached = {e: rows for e, rows in self._cached.items() if e == epoch - 1}
            self._cached[epoch] = self.pack(epoch_mix(self.tasks, self.counts, self.seed, epoch))
        return self._cached[epoch]
