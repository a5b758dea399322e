"""Validation without a trainer: greedy generation (the reference's method) or label scoring.

generate: prompts sorted by length (less padding), left-padded batches, greedy decoding with
          the KV cache through ``transformers``' ``generate``, stopping once every row has
          produced EOS; then the task's postprocess (cut at EOS, strip, exact label match).
score:    one forward pass per prompt scores every label's whole token sequence (label + EOS).
          The prompt is computed once: each label's tokens are appended after it in the same
          row, with a mask letting every label see the prompt and itself but not the others::

              prompt  p p p p | l1 l1 e | l2 e | l3 l3 l3 e
              l2 row sees     ✓ ✓ ✓ ✓ |  ✗  ✗ ✗ |  causal | ✗ ...

          The label with the highest total log-likelihood wins; it is never invalid.

precision: fp32; bf16 (autocast: about 1.8× faster on an AVX512-BF16 CPU, but a few close
          calls flip); or bf16-checked: bf16, then every row whose decision was close (a greedy
          step, or the best label's score, within ``CHECK_MARGIN`` of the runner-up) is redone in
          fp32, so predictions match fp32 while most rows run at bf16 speed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EvalConfig
from .data import public_fields
from .errors import ConfigError
from .loss import precision_context
from .metrics import compute_metrics
from .models import decoder_and_head
from .tasks import Task
from .tokenize import answer_ids, encode_prompts

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
        return {"task": task.name, "n": n, **flat, "invalid": self.metrics.get("invalid", 0),
                "examples_per_s": round(n / self.seconds, 3) if self.seconds else None, "mode": mode,
                "seconds": round(self.seconds, 3)}


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int, precision: str = "fp32", stats: dict[str, int] | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens kept so EOS can be cut) in input order.
    With ``bf16-checked``, ``stats["rechecked_fp32"]`` counts the rows redone in fp32."""
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    checked = precision == "bf16-checked"
    unsure: list[int] = []
    out: list[str] = [""] * len(prompt_ids)
    for batch in _batches_by_length([len(p) for p in prompt_ids], batch_size):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompt_ids[i])
            ids[row, width - n:] = torch.tensor(prompt_ids[i])  # left padding
            mask[row, width - n:] = 1
        with precision_context(_autocast_precision(precision), device):
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                       pad_token_id=pad_id, num_beams=1, temperature=None, top_p=None, top_k=None,
                                       output_scores=checked, return_dict_in_generate=checked)
        if checked:
            unsure.extend(batch[row] for row in _close_calls(generated, width, eos_id))
            generated = generated.sequences
        for row, i in enumerate(batch):
            new = generated[row, width:].tolist()
            if tokenizer.eos_token_id in new:  # drop the padding generate adds after EOS
                new = new[:new.index(tokenizer.eos_token_id) + 1]
            out[i] = tokenizer.decode(new, skip_special_tokens=False)
    if checked:
        _redo_in_fp32(out, unsure, lambda subset: generate_texts(model, tokenizer, subset, max_new_tokens,
                                                                 batch_size), prompt_ids, stats)
    return out


def _redo_in_fp32(results: list[Any], unsure: list[int], run_fp32: Callable[[list[list[int]]], list[Any]],
                  prompt_ids: Sequence[list[int]], stats: dict[str, int] | None) -> None:
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
def score_labels(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], labels: Sequence[str],
                 batch_size: int, precision: str = "fp32", stats: dict[str, int] | None = None) -> list[list[float]]:
    """Total log-likelihood of every label (with EOS) after every prompt, one forward per prompt.
    With ``bf16-checked``, prompts whose two best labels are within CHECK_MARGIN are rescored in fp32."""
    if precision == "bf16-checked":
        scores = score_labels(model, tokenizer, prompt_ids, labels, batch_size, "bf16")
        unsure = [i for i, row in enumerate(scores) if len(row) > 1 and _gap(row) < CHECK_MARGIN]
        _redo_in_fp32(scores, unsure, lambda subset: score_labels(model, tokenizer, subset, labels, batch_size),
                      prompt_ids, stats)
        return scores
    device = next(model.parameters()).device
    conts = answer_ids(tokenizer, labels)  # each label as trained
    extra = sum(len(c) for c in conts)
    scores: list[list[float]] = [[] for _ in prompt_ids]
    for batch in _batches_by_length([len(p) for p in prompt_ids], batch_size):
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
                ids[row, start:start + k] = torch.tensor(cont)
                pos[row, start:start + k] = torch.arange(n, n + k)
                allow[row, start:start + k, :n] = True
                allow[row, start:start + k, start:start + k] = torch.ones(k, k, dtype=torch.bool).tril()
                spans.append((start, cont))
                start += k
            where.append(spans)
        dtype = next(model.parameters()).dtype if precision != "bf16" else torch.bfloat16
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
            logits = _logits_at(model, ids.to(device), pos.to(device), mask.to(device),
                                torch.tensor(rows_, device=device), torch.tensor(cols, device=device))
        picked = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(targets)), torch.tensor(targets)].cpu()
        offset = 0
        for row, i in enumerate(batch):
            totals = []
            for _, cont in where[row]:
                totals.append(float(picked[offset:offset + len(cont)].sum()))
                offset += len(cont)
            scores[i] = totals
    return scores


def _gap(scores: list[float]) -> float:
    best, second = sorted(scores, reverse=True)[:2]
    return best - second


def _logits_at(model: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
    """Output logits at (rows, cols) only: the decoder runs once, the output layer only where a
    label token is scored ((N, V) instead of (B, T, V))."""
    split = decoder_and_head(model)
    if split is None:
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        return logits[rows, cols]
    decoder, head = split
    hidden = decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)[0]
    return head(hidden[rows, cols])


def evaluate(model: Any, tokenizer: Any, task: Task, rows: Sequence[dict[str, Any]],
             config: EvalConfig | None = None, with_metrics: bool = True, **settings: Any) -> EvalResult:
    """Predict every row and (when rows have targets) compute the task's metrics.

    ``config`` (default: ``EvalConfig()``) gives mode, max_new_tokens, batch_size, seq_len and
    precision; keyword ``settings`` replace single fields of it."""
    ec = dataclasses.replace(config or EvalConfig(), **settings)
    mode, precision, max_new_tokens, batch_size = ec.mode, ec.precision, ec.max_new_tokens, ec.batch_size
    if mode == "score" and not task.is_label_task:
        raise ConfigError(f"eval.mode: score mode needs a label task; '{task.name}' has free-text answers, "
                          "use --mode generate")
    weights = next(model.parameters()).dtype
    if precision == "bf16-checked" and weights != torch.float32:
        raise ConfigError("precision bf16-checked redoes close calls in fp32, but the model's weights are "
                          f"{weights}; load it in float32 or use --precision bf16")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    budget = ec.seq_len - (max_new_tokens if mode == "generate" else sum(map(len, answer_ids(
        tokenizer, task.labels or ()))))
    prompt_ids = encode_prompts(tokenizer, [task.prompt_text(r) for r in rows], max(1, budget))
    records = []
    stats: dict[str, int] = {}
    if mode == "generate":
        texts = generate_texts(model, tokenizer, prompt_ids, max_new_tokens, batch_size, precision, stats)
        for row, text in zip(rows, texts):
            records.append({**public_fields(row), "generated": text,
                            "prediction": task.postprocess(text, tokenizer.eos_token)})
    else:
        all_scores = score_labels(model, tokenizer, prompt_ids, task.labels, batch_size, precision, stats)
        for row, scores in zip(rows, all_scores):
            best = max(range(len(scores)), key=scores.__getitem__)
            records.append({**public_fields(row), "scores": dict(zip(task.labels, scores)),
                            "prediction": task.labels[best]})
    seconds = time.perf_counter() - start
    model.train(was_training)
    metrics: dict[str, Any] = {}
    if with_metrics and rows and _has_targets(task, rows[0]):
        refs = [task.references(r) for r in rows]
        for record, ref in zip(records, refs):
            record["label"] = ref[0] if len(ref) == 1 else ref
        metrics = compute_metrics(task, [r["prediction"] for r in records], refs)
    return EvalResult({**metrics, **stats}, records, seconds)


def _has_targets(task: Task, row: dict[str, Any]) -> bool:
    return all(f in row for f in task.target_fields) or "references" in row
