"""Validation without a trainer: greedy generation (the reference's method) or label scoring.

generate: prompts sorted by length (less padding), left-padded batches, greedy decoding with
          the KV cache through ``transformers``' ``generate``, stopping once every row has
          produced EOS; then the task's postprocess (cut at EOS, strip, exact label match).
score:    one forward pass per prompt scores every label's whole token sequence (label + EOS).
          The prompt is computed once: each label's tokens are appended after it in the same
          row, with a mask letting every label see the prompt and itself but not the others::

              prompt  p p p p | l1 l1 e | l2 e | l3 l3 l3 e
              l2 row sees     ✓ ✓ ✓ ✓ |  ✗  ✗ ✗ |  causal | ✗ ...

          The label with the highest total log-likelihood wins; it is never invalid. Each row's
          ``probabilities`` are the softmax of its label scores (the labels' share of the model's
          belief), from which the metrics add the expected calibration error (``ece``).

precision: fp32; bf16 (autocast: about 1.8× faster on an AVX512-BF16 CPU, but a few close
          calls flip); or bf16-checked: bf16, then every row whose decision was close (a greedy
          step, or the best label's score, within ``CHECK_MARGIN`` of the runner-up) is redone in
          fp32, so predictions match fp32 while most rows run at bf16 speed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EvalConfig
from .data import public_fields
from .engines import is_sharded
from .errors import ConfigError, say
from .metrics import calibration_metrics, compute_metrics
from .models import decoder_and_head
from .precision import compute_dtype_of, precision_context
from .tasks import Task
from .tokenize import answer_ids, encode_prompts, generation_length

# bf16 autocast moved the fp32 gap between the top token and any other by at most 0.30 logits
# (512 MNLI validation prompts, demo model; median 0.16): a decision wider than this margin
# is taken the same way in fp32.
CHECK_MARGIN = 0.5


def _autocast_precision(precision: str) -> str:
    return "bf16" if precision == "bf16-checked" else precision


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, task: Task, mode: str) -> dict[str, Any]:
        """The flat summary line: headline numbers first, nested breakdowns left out."""
        n = len(self.records)
        flat = {k: v for k, v in self.metrics.items() if not isinstance(v, dict)}
        return {
            "task": task.name,
            "n": n,
            **flat,
            "invalid": self.metrics.get("invalid", 0),
            "examples_per_s": round(n / self.seconds, 3) if self.seconds else None,
            "mode": mode,
            "seconds": round(self.seconds, 3),
        }


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    precision: str = "fp32",
    stats: dict[str, int] | None = None,
    batches: list[list[int]] | None = None,
    synced: bool = False,
) -> list[str]:
    """Greedy continuations (decoded, special tokens kept so EOS can be cut) in input order.
    With ``bf16-checked``, ``stats["rechecked_fp32"]`` counts the rows redone in fp32.
    ``batches`` (index lists) replaces the length-sorted batching, e.g. with one process's share;
    ``synced`` keeps every process stepping until all are done (sharded weights)."""
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    checked = precision == "bf16-checked"
    unsure: list[int] = []
    out: list[str] = [""] * len(prompt_ids)
    for batch in batches if batches is not None else _batches_by_length([len(p) for p in prompt_ids], batch_size):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompt_ids[i])
            ids[row, width - n :] = torch.tensor(prompt_ids[i])  # left padding
            mask[row, width - n :] = 1
        with precision_context(_autocast_precision(precision), device):
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                output_scores=checked,
                return_dict_in_generate=checked,
                synced_gpus=synced,
            )
        if checked:
            unsure.extend(batch[row] for row in _close_calls(generated, width, eos_id))
            generated = generated.sequences
        for row, i in enumerate(batch):
            new = generated[row, width:].tolist()
            if tokenizer.eos_token_id in new:  # drop the padding generate adds after EOS
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            out[i] = tokenizer.decode(new, skip_special_tokens=False)
    if checked:
        _redo_in_fp32(
            out,
            unsure,
            lambda subset: generate_texts(model, tokenizer, subset, max_new_tokens, batch_size),
            prompt_ids,
            stats,
        )
    return out


def _redo_in_fp32(
    results: list[Any],
    unsure: list[int],
    run_fp32: Callable[[list[list[int]]], list[Any]],
    prompt_ids: Sequence[list[int]],
    stats: dict[str, int] | None,
) -> None:
    """bf16-checked's second pass: replace the close calls' results by an fp32 run over their
    prompts, and count them in ``stats["rechecked_fp32"]``."""
    if unsure:
        for i, value in zip(unsure, run_fp32([prompt_ids[i] for i in unsure])):
            results[i] = value
    if stats is not None:
        stats["rechecked_fp32"] = stats.get("rechecked_fp32", 0) + len(unsure)


def _close_calls(generated: Any, width: int, eos_id: int) -> list[int]:
    """Rows where some greedy step (up to the row's EOS) had a runner-up within CHECK_MARGIN."""
    steps = torch.stack(generated.scores, dim=1).float()  # (B, S, V)
    top2 = steps.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # (B, S)
    is_eos = generated.sequences[:, width:] == eos_id  # (B, S)
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # padding steps once a row is done
    margin = margin.masked_fill(after_eos, float("inf"))
    return (margin.min(dim=1).values < CHECK_MARGIN).nonzero().flatten().tolist()


@torch.no_grad()
def score_labels(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    labels: Sequence[str],
    batch_size: int,
    precision: str = "fp32",
    stats: dict[str, int] | None = None,
    batches: list[list[int]] | None = None,
) -> list[list[float]]:
    """Total log-likelihood of every label (with EOS) after every prompt, one forward per prompt.
    With ``bf16-checked``, prompts whose two best labels are within CHECK_MARGIN are rescored in fp32.
    ``batches`` as for :func:`generate_texts` (rows outside them get no scores)."""
    if precision == "bf16-checked":
        scores = score_labels(model, tokenizer, prompt_ids, labels, batch_size, "bf16", batches=batches)
        unsure = [i for i, row in enumerate(scores) if len(row) > 1 and _gap(row) < CHECK_MARGIN]
        _redo_in_fp32(
            scores, unsure, lambda subset: score_labels(model, tokenizer, subset, labels, batch_size), prompt_ids, stats
        )
        return scores
    device = next(model.parameters()).device
    conts = answer_ids(tokenizer, labels)  # each label as trained
    extra = sum(len(c) for c in conts)
    scores: list[list[float]] = [[] for _ in prompt_ids]
    for batch in batches if batches is not None else _batches_by_length([len(p) for p in prompt_ids], batch_size):
        width = max(len(prompt_ids[i]) for i in batch) + extra
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        allow = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding sees itself
        where: list[list[tuple[int, list[int]]]] = []  # per row: (start, tokens) of each label
        for row, i in enumerate(batch):
            prompt = prompt_ids[i]
            n = len(prompt)
            ids[row, :n] = torch.tensor(prompt)
            pos[row, :n] = torch.arange(n)
            allow[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            start, spans = n, []
            for cont in conts:
                k = len(cont)
                ids[row, start : start + k] = torch.tensor(cont)
                pos[row, start : start + k] = torch.arange(n, n + k)
                allow[row, start : start + k, :n] = True
                allow[row, start : start + k, start : start + k] = torch.ones(k, k, dtype=torch.bool).tril()
                spans.append((start, cont))
                start += k
            where.append(spans)
        dtype = compute_dtype_of(model) if precision != "bf16" else torch.bfloat16
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)[:, None]
        # token j of a label is predicted at the position before it: the prompt's last token
        # for j = 0, else the label's own token j - 1
        rows_, cols, targets = [], [], []
        for row, i in enumerate(batch):
            n = len(prompt_ids[i])
            for start, cont in where[row]:
                rows_.extend([row] * len(cont))
                cols.extend([n - 1] + list(range(start, start + len(cont) - 1)))
                targets.extend(cont)
        with precision_context(precision, device):
            logits = _logits_at(
                model,
                ids.to(device),
                pos.to(device),
                mask.to(device),
                torch.tensor(rows_, device=device),
                torch.tensor(cols, device=device),
            )
        picked = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(targets)), torch.tensor(targets)].cpu()
        offset = 0
        for row, i in enumerate(batch):
            totals = []
            for _, cont in where[row]:
                totals.append(float(picked[offset : offset + len(cont)].sum()))
                offset += len(cont)
            scores[i] = totals
    return scores


def _gap(scores: list[float]) -> float:
    best, second = sorted(scores, reverse=True)[:2]
    return best - second


def _logits_at(
    model: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Output logits at (rows, cols) only: the decoder runs once, the output layer only where a
    label token is scored ((N, V) instead of (B, T, V))."""
    split = decoder_and_head(model)
    if split is None:
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        return logits[rows, cols]
    decoder, head = split
    hidden = decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)[0]
    return head(hidden[rows, cols])


def share(batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], list[int]]:
    """One process's part of the batches: whole batches dealt round-robin (so each row is
    computed in the very batch it has on one process), padded with a repeat of a batch so that
    every process runs as many forward passes (sharded engines run them together). Returns the
    batches to run and the rows this process reports.

    >>> share([[0, 1], [2, 3], [4]], rank=1, world=2)
    ([[2, 3], [2, 3]], [2, 3])
    """
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    padded = mine + [(mine or batches)[0]] * (rounds - len(mine))
    return padded, [i for batch in mine for i in batch]


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    rows: Sequence[dict[str, Any]],
    config: EvalConfig | None = None,
    with_metrics: bool = True,
    processes: Any = None,
    targets: Sequence[str] | None = None,
    **settings: Any,
) -> EvalResult:
    """Predict every row and (when rows have targets) compute the task's metrics.

    ``config`` (default: ``EvalConfig()``) gives mode, max_new_tokens, batch_size, seq_len and
    precision; keyword ``settings`` replace single fields of it. ``processes`` (an accelerate
    ``Accelerator`` or ``PartialState``) splits the rows over every process; all of them must
    call this, the main process gets every record and the metrics. ``targets`` (the training
    targets) measure ``max_new_tokens: auto`` for free-text tasks; without them the rows' own
    references do. Generations that reach the limit without EOS are counted as ``truncated``."""
    ec = dataclasses.replace(config or EvalConfig(), **settings)
    mode, precision, max_new_tokens, batch_size = ec.mode, ec.precision, ec.max_new_tokens, ec.batch_size
    world = processes.num_processes if processes is not None else 1
    sharded = processes is not None and is_sharded(processes)
    if sharded and precision == "bf16-checked":
        raise ConfigError(
            "eval.precision: bf16-checked redoes a different number of rows on each process, which "
            "sharded weights (FSDP, DeepSpeed) cannot do; use bf16 or fp32"
        )
    if mode == "score" and not task.is_label_task:
        raise ConfigError(
            f"eval.mode: score mode needs a label task; '{task.name}' has free-text answers, use --mode generate"
        )
    weights = next(model.parameters()).dtype
    if precision == "bf16-checked" and weights != torch.float32:
        raise ConfigError(
            "precision bf16-checked redoes close calls in fp32, but the model's weights are "
            f"{weights}; load it in float32 or use --precision bf16"
        )
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    full = encode_prompts(tokenizer, [task.prompt_text(r) for r in rows], sys.maxsize)
    if mode == "generate" and max_new_tokens == "auto":
        max_new_tokens = _auto_length(task, tokenizer, rows, targets, ec.seq_len, full)
    budget = ec.seq_len - _room_after_prompt(task, tokenizer, mode, max_new_tokens, ec.seq_len)
    prompt_ids = [p[-budget:] for p in full]  # cut from the left: the end holds "target:"
    cut = sum(len(p) > budget for p in full)  # counted, never silent
    if mode == "score":
        batch_size = _score_rows_per_pass(model, tokenizer, task, ec.seq_len, batch_size)
    batches = _batches_by_length([len(p) for p in prompt_ids], batch_size)
    if world > 1:
        batches, owned = share(batches, processes.process_index, world)
    records = []
    stats: dict[str, int] = {}
    if mode == "generate":
        texts = generate_texts(
            model, tokenizer, prompt_ids, max_new_tokens, batch_size, precision, stats, batches=batches, synced=sharded
        )
        if world > 1:
            texts, stats = _gathered(texts, owned, stats)
        for row, text in zip(rows, texts):
            records.append(
                {
                    **public_fields(row),
                    "generated": text,
                    "prediction": task.postprocess(text, tokenizer.eos_token),
                    "truncated": tokenizer.eos_token not in text,
                }
            )
        stats["truncated"] = sum(r["truncated"] for r in records)
        stats["max_new_tokens"] = max_new_tokens
    else:
        all_scores = score_labels(
            model, tokenizer, prompt_ids, task.labels, batch_size, precision, stats, batches=batches
        )
        if world > 1:
            all_scores, stats = _gathered(all_scores, owned, stats)
        for row, scores in zip(rows, all_scores):
            best = max(range(len(scores)), key=scores.__getitem__)
            probabilities = torch.tensor(scores, dtype=torch.float64).softmax(0).tolist()  # over the labels
            records.append(
                {
                    **public_fields(row),
                    "scores": dict(zip(task.labels, scores)),
                    "probabilities": dict(zip(task.labels, probabilities)),
                    "prediction": task.labels[best],
                }
            )
    stats["prompts_cut"] = cut
    seconds = time.perf_counter() - start
    model.train(was_training)
    metrics: dict[str, Any] = {}
    main = processes is None or processes.is_main_process
    if with_metrics and main and rows and _has_targets(task, rows[0]):  # once, on the main process
        refs = [task.references(r) for r in rows]
        for record, ref in zip(records, refs):
            record["label"] = ref[0] if len(ref) == 1 else ref
        metrics = compute_metrics(task, [r["prediction"] for r in records], refs, ec.entity_parsing)
        if mode == "score":
            metrics.update(
                calibration_metrics(
                    [list(r["probabilities"].values()) for r in records],
                    [r["prediction"] for r in records],
                    [ref[0] for ref in refs],
                )
            )
    if main and stats.get("truncated"):
        say(
            f"warning: {stats['truncated']} of {len(records)} generations reached max_new_tokens={max_new_tokens} "
            "without their end-of-text token, so their answers may be cut off; raise eval.max_new_tokens "
            "(--max-new-tokens)"
        )
    if main and cut:
        say(
            f"warning: {cut} of {len(records)} prompts were longer than the {budget} tokens that eval.seq_len="
            f"{ec.seq_len} leaves for them and were cut from the left (counted as prompts_cut); raise eval.seq_len "
            "(--seq-len)"
        )
    return EvalResult({**metrics, **stats}, records, seconds)


def check_fits(model: Any, tokenizer: Any, task: Task, config: EvalConfig) -> None:
    """The checks of :func:`evaluate` that need no rows, for a run to make before it trains:
    a validation that could only cut its prompts to nothing, or not fit in memory, is refused."""
    if config.mode == "score" and task.is_label_task:
        _room_after_prompt(task, tokenizer, "score", 0, config.seq_len)
        _score_rows_per_pass(model, tokenizer, task, config.seq_len, config.batch_size)
    elif isinstance(config.max_new_tokens, int):
        _room_after_prompt(task, tokenizer, "generate", config.max_new_tokens, config.seq_len)


def _room_after_prompt(task: Task, tokenizer: Any, mode: str, max_new_tokens: int, seq_len: int) -> int:
    """Tokens of ``seq_len`` that follow the prompt: the generated ones, or (score mode) every
    label's tokens. A ConfigError when that leaves the prompt no room: a metric over prompts
    cut to nothing would be a wrong result."""
    if mode == "generate":
        if max_new_tokens >= seq_len:
            raise ConfigError(
                f"eval.max_new_tokens (--max-new-tokens): {max_new_tokens} generated tokens leave "
                f"no room for the prompt in eval.seq_len (--seq-len) {seq_len}; raise eval.seq_len "
                "or lower eval.max_new_tokens"
            )
        return max_new_tokens
    labels = task.labels or ()
    tokens = sum(map(len, answer_ids(tokenizer, labels)))
    if tokens >= seq_len:
        raise ConfigError(
            f"eval.seq_len (--seq-len): score mode puts all {len(labels)} labels ({tokens} tokens) after "
            f"each prompt, which leaves no room for the prompt in {seq_len} tokens; raise eval.seq_len "
            "or use generate mode"
        )
    return tokens


SCORE_PASS_BYTES = 2 << 30  # what one score-mode forward may hold in masks and label logits


def _score_rows_per_pass(model: Any, tokenizer: Any, task: Task, seq_len: int, batch_size: int) -> int:
    """How many prompts one score-mode forward takes: ``batch_size``, fewer when their attention
    mask (seq_len² per row) and label logits (label tokens × vocabulary per row) would pass
    ``SCORE_PASS_BYTES``; a ConfigError, with the estimate, when one prompt alone would."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else len(tokenizer)
    tokens = sum(map(len, answer_ids(tokenizer, task.labels or ())))
    per_row = seq_len * seq_len * 5 + tokens * vocab * 4 * 3  # bool + float mask; logits, float copy, log-softmax
    if per_row > SCORE_PASS_BYTES:
        raise ConfigError(
            f"eval.mode: score mode with {len(task.labels or ())} labels ({tokens} tokens) needs about "
            f"{per_row / 2**30:.1f} GiB per prompt (more than {SCORE_PASS_BYTES >> 30} GiB); "
            "use generate mode (--mode generate), or fewer labels"
        )
    return max(1, min(batch_size, SCORE_PASS_BYTES // per_row))


def _auto_length(
    task: Task,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    targets: Sequence[str] | None,
    seq_len: int,
    prompt_ids: Sequence[list[int]],
) -> int:
    """``max_new_tokens: auto`` for these rows (see :func:`t2tune.tokenize.generation_length`)."""
    if targets is None and not task.is_label_task:
        if not rows or not _has_targets(task, rows[0]):
            raise ConfigError(
                "eval.max_new_tokens: auto measures the answers of training data or labelled rows, "
                "and these rows have none; give a number (--max-new-tokens N)"
            )
        targets = [answer for row in rows for answer in task.references(row)]
    longest_prompt = max((len(p) for p in prompt_ids), default=0)
    return generation_length(task, tokenizer, targets or [], seq_len, longest_prompt)


def _gathered(results: list[Any], owned: list[int], stats: dict[str, int]) -> tuple[list[Any], dict[str, int]]:
    """Every process's results for the rows it owns, in input order, and summed stats."""
    from accelerate.utils import gather_object

    merged = list(results)
    for index, value in gather_object([(i, results[i]) for i in owned]):
        merged[index] = value
    total: dict[str, int] = {}
    for part in gather_object([stats]):
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return merged, total


def _has_targets(task: Task, row: dict[str, Any]) -> bool:
    return all(f in row for f in task.target_fields) or "references" in row
