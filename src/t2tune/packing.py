"""Packing tokenized examples into fixed training rows, and rows into batches: pure functions
over token arrays.

A row holds ``seq_len + 1`` tokens. The label shift is defined here and nowhere else:
input position ``t`` (``row[:-1][t]``) predicts token ``row[t + 1]`` (``labels = row[1:]``).
Positions whose label must not count get :data:`IGNORE_INDEX`.

Three ways to fill rows (``train.packing``)::

    concat    |a a a A A e b b B e c c|c C e ...   the reference: one token stream cut every
                                                   seq_len + 1 tokens; examples see each other
                                                   and may straddle rows
    isolated  |a a a A A e|b b B e|pad|            whole examples, first-fit; position ids
              |0 1 2 3 4 5|0 1 2 3|0  |            restart per example, so attention is
                                                   block-diagonal and no label crosses a border
    none      |a a a A A e|pad pad ...             one example per row

Packing keeps boundaries (position ids), never dense masks; the model library derives the
block-diagonal mask from the position ids when a batch is run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tokenize import TOKEN_DTYPE, Encoded

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """One training row as numpy arrays (lists given are converted): int32 ``tokens`` and
    ``positions``, a bool ``loss_mask``. Rows may be read-only views into one shared array."""

    tokens: np.ndarray  # seq_len + 1 tokens (fewer in "none" mode: the batch pads them)
    positions: np.ndarray  # position id of each input token, len(tokens) - 1
    loss_mask: np.ndarray  # whether the label of each input position counts, len(tokens) - 1
    real: int = 0  # input positions holding real (non-padding) tokens

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=TOKEN_DTYPE)
        self.positions = np.asarray(self.positions, dtype=TOKEN_DTYPE)
        self.loss_mask = np.asarray(self.loss_mask, dtype=bool)
        if not self.real:
            self.real = len(self.tokens) - 1


def _labels_count(example: Encoded, loss_on: str) -> np.ndarray:
    """Per token of the example: does predicting *this* token count in the loss?"""
    n = len(example.ids)
    if loss_on == "all":
        return np.ones(n, dtype=bool)
    return np.arange(n) >= example.n_prompt


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # rows are views into it: none may change the others
    return array


def pack_concat(examples: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int) -> list[PackedRow]:
    """The reference's packing: concatenate everything, cut rows of ``seq_len + 1`` tokens.

    >>> rows = pack_concat([Encoded([1, 2, 9], 2), Encoded([3, 9], 1)], seq_len=2, loss_on="all", pad_id=0)
    >>> [(r.tokens.tolist(), r.loss_mask.tolist()) for r in rows]  # the ragged tail [3, 9] is dropped
    [([1, 2, 9], [True, True])]
    """
    if not examples:
        return []
    stream = _frozen(np.concatenate([example.ids for example in examples]))
    counts = _frozen(np.concatenate([_labels_count(example, loss_on) for example in examples]))
    positions = _frozen(np.arange(seq_len, dtype=TOKEN_DTYPE))  # every row's, shared
    width = seq_len + 1
    rows = []
    for start in range(0, len(stream), width):
        real = min(width, len(stream) - start)
        if real < width and rows:
            break  # drop the ragged tail once there is at least one full row
        # label of input t is token t+1: counts when that token is real and asked for
        tokens, mask = stream[start : start + width], counts[start + 1 : start + width]
        if real < width:  # the only row there is: padded, a copy
            tokens = np.concatenate([tokens, np.full(width - real, pad_id, dtype=TOKEN_DTYPE)])
            mask = np.concatenate([mask, np.zeros(seq_len - len(mask), dtype=bool)])
        rows.append(PackedRow(tokens, positions, mask, min(real, seq_len)))
    return rows


def pack_isolated(
    examples: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int, window: int = 64
) -> list[PackedRow]:
    """Whole examples per row (first fit among the last ``window`` open rows); no attention or
    label crosses an example border.

    >>> rows = pack_isolated([Encoded([1, 2, 9], 2), Encoded([3, 9], 1)], seq_len=5, loss_on="target", pad_id=0)
    >>> [(r.tokens.tolist(), r.positions.tolist(), r.loss_mask.tolist()) for r in rows]
    [([1, 2, 9, 3, 9, 0], [0, 1, 2, 0, 1], [False, True, False, True, False])]
    """
    width = seq_len + 1
    bins: list[list[Encoded]] = []
    space: list[int] = []
    for example in examples:
        n = len(example.ids)
        if n > width:
            raise ValueError(f"example of {n} tokens does not fit a row of {width}")
        for index in range(max(0, len(bins) - window), len(bins)):
            if space[index] >= n:
                bins[index].append(example)
                space[index] -= n
                break
        else:
            bins.append([example])
            space.append(width - n)
    return [_isolated_row(members, seq_len, loss_on, pad_id) for members in bins]


def _isolated_row(members: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int) -> PackedRow:
    sizes = [len(example.ids) for example in members]
    used = sum(sizes)
    pad = seq_len + 1 - used
    tokens = np.concatenate([example.ids for example in members] + [np.full(pad, pad_id, dtype=TOKEN_DTYPE)])
    # position ids restart per example; the padding is a segment of its own
    positions = np.concatenate([np.arange(n, dtype=TOKEN_DTYPE) for n in [*sizes, pad]])
    counts = np.concatenate([_labels_count(example, loss_on) for example in members] + [np.zeros(pad, dtype=bool)])
    counts[np.cumsum([0, *sizes[:-1]])] = False  # an example's first token is never predicted from the one before
    return PackedRow(tokens, positions[:seq_len], counts[1:], min(used, seq_len))


def pack_none(examples: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int) -> list[PackedRow]:
    """One example per row; the batch pads rows to its longest (right padding needs no mask
    in a causal model: real tokens never look at later positions).

    >>> [(r.tokens.tolist(), r.loss_mask.tolist()) for r in pack_none([Encoded([1, 2, 9], 2)], 4, "target", 0)]
    [([1, 2, 9], [False, True])]
    """
    rows = []
    for example in examples:
        n = len(example.ids)
        if n > seq_len + 1:
            raise ValueError(f"example of {n} tokens does not fit a row of {seq_len + 1}")
        rows.append(PackedRow(example.ids, np.arange(n - 1, dtype=TOKEN_DTYPE), _labels_count(example, loss_on)[1:]))
    return rows


PACKERS = {"concat": pack_concat, "isolated": pack_isolated, "none": pack_none}


def pack(examples: Sequence[Encoded], mode: str, seq_len: int, loss_on: str, pad_id: int) -> list[PackedRow]:
    return PACKERS[mode](examples, seq_len, loss_on, pad_id)


def collate(rows: Sequence[PackedRow], pad_id: int) -> dict[str, Any]:
    """Rows → int64 tensors ``input_ids``, ``labels``, ``position_ids`` of shape (B, T), padded
    on the right to the longest row (labels with :data:`IGNORE_INDEX`, positions counting on).

    >>> b = collate([PackedRow([5, 6, 7], [0, 1], [False, True])], pad_id=0)
    >>> b["input_ids"].tolist(), b["labels"].tolist()
    ([[5, 6]], [[-100, 7]])
    """
    import torch

    width = max(len(r.tokens) for r in rows) - 1
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    for i, row in enumerate(rows):
        n = len(row.tokens) - 1
        input_ids[i, :n] = row.tokens[:-1]
        labels[i, :n] = np.where(row.loss_mask, row.tokens[1:], IGNORE_INDEX)
        positions[i, :n] = row.positions
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }
