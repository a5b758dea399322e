"""Every text → token-ids rule: training examples (prompt + answer + EOS), the length policy for
over-long examples, validation prompts, and label sequences for scoring.

The answer that follows a prompt is :func:`t2tune.tasks.answer_text` (a space, then the target)
and ends with the tokenizer's EOS id, in training and in scoring alike (:func:`answer_ids`).
Prompt and answer are tokenized apart, so the prompt's tokens are exactly those the model sees
at validation, and the prompt/answer border is known for target-only loss.

Length policy: an example longer than a training row is an error, unless truncation is asked
for; then the task's truncatable field (e.g. the QA context) is cut, and an example whose answer
would be cut away is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError
from .tasks import Task, answer_text

TOKEN_DTYPE = np.int32  # every vocabulary t2tune meets is far below 2**31 ids


@dataclass
class Encoded:
    """One tokenized example: prompt tokens then answer tokens (the answer ends with EOS).

    ``ids`` is a 1-D int32 array (any sequence of ints given is converted): at MNLI's real size
    (393k examples, ~28M tokens) Python ints in lists cost ~9× the memory of the array.
    """

    ids: np.ndarray
    n_prompt: int

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=TOKEN_DTYPE)


TOKENIZE_CHUNK = 8192  # texts per tokenizer call: the tokenizer's per-text objects live for one chunk


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, without special tokens. In chunks and without attention
    masks: at MNLI's real size (393k pairs) one call over every text held 2.9 GB of the
    tokenizer's per-text objects at once."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        ids.extend(tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    return ids


def answer_ids(tokenizer: Any, targets: Sequence[str]) -> list[list[int]]:
    """Token ids of each target as it follows a prompt: leading space, the target, EOS. Each
    distinct target is tokenized once, and its rows share that one list (a label task has a
    handful): treat the lists as read-only."""
    texts = [answer_text(t) for t in targets]
    distinct = list(dict.fromkeys(texts))
    ids_of = {text: ids + [tokenizer.eos_token_id] for text, ids in zip(distinct, token_ids(tokenizer, distinct))}
    return [ids_of[text] for text in texts]


def encode_examples(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[Encoded]:
    """Batched fast tokenization of (prompt, target) pairs into training examples."""
    prompt_ids = token_ids(tokenizer, prompts)
    return [Encoded(p + t, len(p)) for p, t in zip(prompt_ids, answer_ids(tokenizer, targets))]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Validation prompts, cut from the left to ``max_len`` tokens (the end holds ``target:``)."""
    return [p[-max_len:] for p in token_ids(tokenizer, prompts)]


def encode_for_training(
    task: Task, rows: Sequence[dict[str, Any]], tokenizer: Any, seq_len: int, truncate: bool
) -> tuple[list[Encoded], int]:
    """Returns the encoded examples and how many were dropped because truncation cut their answer."""
    limit = seq_len + 1
    out: list[Encoded] = []
    dropped = 0
    for row, example in zip(rows, _encode_rows(task, rows, tokenizer)):
        if len(example.ids) <= limit:
            out.append(example)
            continue
        if not truncate:
            raise DataError(
                f"{row.get('_where', '?')}: example is {len(example.ids)} tokens, longer than a "
                f"training row (train.seq_len + 1 = {limit}); raise train.seq_len or set "
                "train.truncate=true"
            )
        fitted = _truncate(task, row, example, tokenizer, limit)
        if fitted is None:
            dropped += 1
        else:
            out.append(fitted)
    if not out:
        raise DataError("no training example fits train.seq_len; raise train.seq_len")
    return out, dropped


def _encode_rows(task: Task, rows: Sequence[dict[str, Any]], tokenizer: Any) -> Iterator[Encoded]:
    """The rows' examples, a tokenizer chunk at a time: only one chunk's prompt texts and Python
    id lists are alive at once, whatever the number of rows."""
    for start in range(0, len(rows), TOKENIZE_CHUNK):
        chunk = rows[start : start + TOKENIZE_CHUNK]
        yield from encode_examples(
            tokenizer, [task.prompt_text(r) for r in chunk], [task.target_text(r) for r in chunk]
        )


def _shorten_field(task: Task, row: dict[str, Any], tokenizer: Any, excess: int) -> dict[str, Any] | None:
    field = task.truncate_field
    ids = tokenizer(row[field], add_special_tokens=False)["input_ids"]
    keep = len(ids) - excess - 1
    if keep <= 0:
        return None
    text = tokenizer.decode(ids[:keep]).rstrip()
    # free-text answers must survive in the shortened field (extractive QA)
    if "answer" in row and row["answer"] not in text:
        return None
    return {**row, field: text}


def _truncate(task: Task, row: dict[str, Any], example: Encoded, tokenizer: Any, limit: int) -> Encoded | None:
    if task.truncate_field:
        current = row
        for _ in range(4):  # re-tokenizing joined text can differ by a token or two
            current = _shorten_field(task, current, tokenizer, len(example.ids) - limit)
            if current is None:
                return None
            (example,) = encode_examples(tokenizer, [task.prompt_text(current)], [task.target_text(current)])
            if len(example.ids) <= limit:
                return example
        return None
    target = example.ids[example.n_prompt :]
    if len(target) >= limit:
        return None
    keep = limit - len(target)  # keep the end of the prompt: it holds "target:"
    prompt = example.ids[: example.n_prompt][-keep:]
    return Encoded(np.concatenate([prompt, target]), len(prompt))


def generation_length(task: Task, tokenizer: Any, targets: Sequence[str], seq_len: int, longest_prompt: int) -> int:
    """``eval.max_new_tokens: auto``. Label tasks: the longest label with EOS (nothing longer can
    be a valid answer). Free text: the longest of ``targets`` with EOS (the training targets,
    or labelled evaluation rows), plus a margin of a quarter and at least 4 tokens; capped by
    what ``seq_len`` leaves after the longest prompt, but never below the longest target itself
    (the prompt is then cut from the left instead).

    >>> from types import SimpleNamespace as N
    >>> tok = lambda texts, add_special_tokens, **options: {"input_ids": [t.split() for t in texts]}
    >>> tok.eos_token_id = 0
    >>> generation_length(N(labels=None), tok, ["a b c", "d"], seq_len=100, longest_prompt=20)  # 4 + 4
    8
    >>> generation_length(N(labels=None), tok, ["a b c", "d"], seq_len=26, longest_prompt=20)  # capped at 6
    6
    """
    if task.labels:
        return max(len(ids) for ids in answer_ids(tokenizer, task.labels))
    if not targets:
        raise ValueError("no targets to measure")
    longest = max(len(ids) for ids in answer_ids(tokenizer, targets))
    wanted = longest + max(4, -(-longest // 4))
    return min(wanted, max(seq_len - longest_prompt, longest))
