"""Packing tokenized examples into fixed training rows, and rows into batches: pure functions
over token lists.

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

from .tokenize import Encoded

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    tokens: list[int]  # seq_len + 1 tokens (fewer in "none" mode: the batch pads them)
    positions: list[int]  # position id of each input token, len(tokens) - 1
    loss_mask: list[bool]  # whether the label of each input position counts, len(tokens) - 1
    real: int = 0  # input positions holding real (non-padding) tokens

    def __post_init__(self) -> None:
        if not self.real:
            self.real = len(self.tokens) - 1


def _labels_count(example: Encoded, loss_on: str) -> list[bool]:
    """Per token of the example: does predicting *this* token count in the loss?"""
    n = len(example.ids)
    if loss_on == "all":
        return [True] * n
    return [i >= example.n_prompt for i in range(n)]


def pack_concat(examples: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int) -> list[PackedRow]:
    """The reference's packing: concatenate everything, cut rows of ``seq_len + 1`` tokens.

    >>> rows = pack_concat([Encoded([1, 2, 9], 2), Encoded([3, 9], 1)], seq_len=2, loss_on="all", pad_id=0)
    >>> [(r.tokens, r.loss_mask) for r in rows]  # the ragged tail [3, 9] is dropped
    [([1, 2, 9], [True, True])]
    """
    stream: list[int] = []
    counts: list[bool] = []
    for example in examples:
        stream.extend(example.ids)
        counts.extend(_labels_count(example, loss_on))
    width = seq_len + 1
    rows = []
    for start in range(0, len(stream), width):
        tokens, count = stream[start : start + width], counts[start : start + width]
        if len(tokens) < width and rows:
            break  # drop the ragged tail once there is at least one full row
        real = len(tokens)
        tokens = tokens + [pad_id] * (width - real)
        # label of input t is token t+1: counts when that token is real and asked for
        mask = [t + 1 < real and count[t + 1] for t in range(seq_len)]
        rows.append(PackedRow(tokens, list(range(seq_len)), mask, min(real, seq_len)))
    return rows


def pack_isolated(
    examples: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int, window: int = 64
) -> list[PackedRow]:
    """Whole examples per row (first fit among the last ``window`` open rows); no attention or
    label crosses an example border.

    >>> rows = pack_isolated([Encoded([1, 2, 9], 2), Encoded([3, 9], 1)], seq_len=5, loss_on="target", pad_id=0)
    >>> [(r.tokens, r.positions, r.loss_mask) for r in rows]
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
    tokens: list[int] = []
    positions: list[int] = []
    counts: list[bool] = []
    for example in members:
        tokens.extend(example.ids)
        positions.extend(range(len(example.ids)))
        wanted = _labels_count(example, loss_on)
        # the first token of an example is never predicted from the one before it
        counts.extend([False] + wanted[1:])
    real = min(len(tokens), seq_len)
    pad = seq_len + 1 - len(tokens)
    tokens.extend([pad_id] * pad)
    positions.extend(range(pad))  # padding is a segment of its own
    counts.extend([False] * pad)
    return PackedRow(tokens, positions[:seq_len], counts[1:], real)


def pack_none(examples: Sequence[Encoded], seq_len: int, loss_on: str, pad_id: int) -> list[PackedRow]:
    """One example per row; the batch pads rows to its longest (right padding needs no mask
    in a causal model: real tokens never look at later positions).

    >>> [(r.tokens, r.loss_mask) for r in pack_none([Encoded([1, 2, 9], 2)], 4, "target", 0)]
    [([1, 2, 9], [False, True])]
    """
    rows = []
    for example in examples:
        n = len(example.ids)
        if n > seq_len + 1:
            raise ValueError(f"example of {n} tokens does not fit a row of {seq_len + 1}")
        counts = _labels_count(example, loss_on)
        rows.append(PackedRow(list(example.ids), list(range(n - 1)), counts[1:]))
    return rows


PACKERS = {"concat": pack_concat, "isolated": pack_isolated, "none": pack_none}


def pack(examples: Sequence[Encoded], mode: str, seq_len: int, loss_on: str, pad_id: int) -> list[PackedRow]:
    return PACKERS[mode](examples, seq_len, loss_on, pad_id)


def collate(rows: Sequence[PackedRow], pad_id: int) -> dict[str, Any]:
    """Rows → tensors ``input_ids``, ``labels``, ``position_ids`` of shape (B, T).

    >>> b = collate([PackedRow([5, 6, 7], [0, 1], [False, True])], pad_id=0)
    >>> b["input_ids"].tolist(), b["labels"].tolist()
    ([[5, 6]], [[-100, 7]])
    """
    import torch

    width = max(len(r.tokens) for r in rows) - 1
    input_ids, labels, positions = [], [], []
    for row in rows:
        inputs, targets = row.tokens[:-1], row.tokens[1:]
        pad = width - len(inputs)
        input_ids.append(inputs + [pad_id] * pad)
        labels.append(
            [tok if keep else IGNORE_INDEX for tok, keep in zip(targets, row.loss_mask)] + [IGNORE_INDEX] * pad
        )
        positions.append(row.positions + list(range(len(row.positions), len(row.positions) + pad)))
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(positions),
    }
