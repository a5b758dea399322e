"""Validation speed: t2tune evaluate (generate and score) against a plain transformers loop.

    .venv/bin/python benchmarks/bench_eval.py [--model smollm2-135m] [--n 512] [--out runs/bench/bench_eval.json]

t2tune runs at fp32 (as the baseline), with bf16 autocast, and bf16-checked (bf16, close calls
redone in fp32). The baseline is what users would write: batches of 16 in dataset order, left
padding, ``generate(do_sample=False, max_new_tokens=5)``, fp32. The CPU's limit for this work is
the tokens/s of one large batched forward pass of the same model over the same prompts (no
padding), measured in fp32 and in bf16; each row's "of limit" is its prompt tokens/s divided by
the limit of its precision (bf16 for bf16-checked). All in one process, same threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from common import ROOT, claim_out

sys.path.insert(0, str(ROOT / "src"))

from t2tune.config import ModelConfig
from t2tune.data import load_examples
from t2tune.evaluation import evaluate
from t2tune.models import load_model
from t2tune.precision import precision_context
from t2tune.runtime import keep_freed_memory
from t2tune.tasks import get_task


def plain_generate_loop(loaded, prompts: list[str], batch_size: int = 16) -> list[str]:
    tok = loaded.tokenizer
    tok.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = loaded.model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)
        out.extend(tok.decode(row) for row in gen[:, enc["input_ids"].shape[1] :])
    return out


def forward_limit(loaded, prompt_ids: list[list[int]], precision: str, batch_tokens: int = 8192) -> float:
    """Tokens/s of large forward passes over the prompts packed end to end (no padding at all)."""
    stream = [t for ids in prompt_ids for t in ids]
    width = 512
    rows = [stream[s : s + width] for s in range(0, len(stream) - width + 1, width)][: max(1, batch_tokens // width)]
    batch = torch.tensor(rows)
    with torch.no_grad(), precision_context(precision, torch.device("cpu")):
        loaded.model(input_ids=batch[:1], use_cache=False, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        loaded.model(input_ids=batch, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    return batch.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnli" / "validation.jsonl"))
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-dir", default=None, help="evaluate this model instead (e.g. an out_dir)")
    parser.add_argument("--out", default="runs/bench/bench_eval.json")
    args = parser.parse_args()
    claim_out(parser, args.out, "bench_eval")  # its own earlier JSON is written over, nothing else
    keep_freed_memory()  # as the CLI does; the baseline loop runs in this process and profits too
    task = get_task("mnli")
    rows = load_examples(task, args.data, "validation", limit=args.n)
    loaded = load_model(ModelConfig(name=args.model_dir or args.model))
    loaded.model.eval()
    prompts = [task.prompt_text(r) for r in rows]
    prompt_ids = loaded.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prompt_tokens = sum(map(len, prompt_ids))

    results = {}
    start = time.perf_counter()
    baseline = plain_generate_loop(loaded, prompts)
    results["plain generate loop (batch 16)"] = {"seconds": time.perf_counter() - start}
    base_pred = [task.postprocess(t, loaded.eos_text) for t in baseline]
    results["plain generate loop (batch 16)"]["precision"] = "fp32"
    for precision in ("fp32", "bf16", "bf16-checked"):
        for mode in ("generate", "score"):
            res = evaluate(
                loaded.model,
                loaded.tokenizer,
                task,
                rows,
                mode=mode,
                max_new_tokens=5,
                batch_size=args.batch_size,
                seq_len=512,
                precision=precision,
            )
            preds = [r["prediction"] for r in res.records]
            results[f"t2tune {mode} {precision}"] = {
                "seconds": res.seconds,
                "accuracy": res.metrics["accuracy"],
                "precision": precision,
                "agree_with_plain": sum(a == b for a, b in zip(preds, base_pred)),
                "rechecked_fp32": res.metrics.get("rechecked_fp32", 0),
            }
    limits = {p: forward_limit(loaded, prompt_ids, p) for p in ("fp32", "bf16")}
    base_s = results["plain generate loop (batch 16)"]["seconds"]
    print(f"{'method':<32}{'examples/s':>11}{'× plain':>9}{'of limit':>10}{'agree':>10}{'redone fp32':>13}")
    for name, r in results.items():
        r["examples_per_s"] = len(rows) / r["seconds"]
        r["ratio_vs_plain"] = base_s / r["seconds"]
        r["fraction_of_forward_limit"] = prompt_tokens / r["seconds"] / limits[r["precision"].split("-")[0]]
        agree = r.get("agree_with_plain", len(rows))
        print(
            f"{name:<32}{r['examples_per_s']:>11.2f}{r['ratio_vs_plain']:>9.2f}"
            f"{r['fraction_of_forward_limit']:>10.2f}{agree:>6}/{len(rows)}{r.get('rechecked_fp32', 0):>13}"
        )
    report = {
        "benchmark": "bench_eval",
        "model": args.model_dir or args.model,
        "n": len(rows),
        "prompt_tokens": prompt_tokens,
        "forward_limit_tokens_per_s": limits,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(
        f"forward-pass limit: {limits['fp32']:,.0f} (fp32) / {limits['bf16']:,.0f} (bf16) prompt tokens/s; "
        f"JSON: {args.out}"
    )


if __name__ == "__main__":
    main()
