"""Training throughput: t2tune train against Hugging Face Trainer, same run, same machine.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--out runs/bench/bench_train.json]

Same model (bundled SmolLM2-135M), same data (../shared/data/mnli/train.jsonl), same rows
(run_clm-style group_texts: examples concatenated and cut into 256-token blocks; t2tune's
``packing: concat`` is the same layout), micro batch 8, lr 2e-4 constant. Two objectives: all
tokens, and target tokens only (Trainer: prompt tokens masked to -100). t2tune runs at
``precision: bf16`` (autocast), Trainer with ``bf16=True``. Each run is its own process, so
peak RSS is per run. Tokens/s excludes the first two (warm-up) steps. The two runners draw
batches in their own shuffled orders, so losses are compared as the mean over all steps. Also reports achieved
training FLOP/s (6 × parameters × tokens/s) against this CPU's measured bf16 matmul peak.
Two more rows per objective make the comparison honest: the Trainer with t2tune's allocator
setting (``t2tune.runtime``), so that lever's share is visible, and t2tune at micro batch 4 with
2 accumulation steps (same rows per step, lower peak RSS), and t2tune at global batch 16 in one
micro batch (twice the rows per step: is a larger batch faster per token here?).

TRL is the second peer (``pip install trl``, a benchmark dependency only): ``SFTTrainer`` on
prompt/completion pairs (loss on the completion for the target objective), ``packing=True``
with ``packing_strategy`` ``bfd`` (padding-free, per-example position ids: what the demo's
isolated packing trains) and ``wrapped`` (blocks cut across examples, which see each other).
Their tokens are counted by the Trainer's ``num_input_tokens_seen``, all real (no padding).
``--runners`` and ``--objectives`` pick a subset (comma-separated).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, claim_out, scratch_dir

DATA = ROOT.parent / "shared" / "data" / "mnli"
SEQ_LEN, MICRO, LR, WARM = 256, 8, 2e-4, 2


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_t2tune(objective: str, steps: int, micro: int = MICRO, batch: int = MICRO) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from t2tune import recipe
    from t2tune.config import build_config
    from t2tune.runtime import keep_freed_memory

    keep_freed_memory()  # what the t2tune CLI applies
    out = scratch_dir("bench-train-")
    # the whole recipe, as `t2tune train` runs it; no validation rows. Tokens/s comes from the
    # loop's own clock (train_seconds counts optimizer steps only, not the final checkpoint/export)
    cfg = build_config(
        {
            "task": "mnli",
            "out_dir": str(out),
            "model.name": "smollm2-135m",
            "train.steps": steps,
            "train.seq_len": SEQ_LEN,
            "train.micro_batch_size": micro,
            "train.global_batch_size": batch,
            "train.lr": LR,
            "train.precision": "bf16",
            "train.loss_on": objective,
            "train.packing": "concat",
            "train.dropout": 0.0,
            "checkpoint.every": 0,
            "data.train": str(DATA),
            "data.validation": str(DATA),
            "eval.limit": 1,
        }
    )
    run = recipe.prepare(cfg, eval_rows=[])  # training speed only: nothing to validate
    run.train()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    timed = train[WARM:]
    tokens = timed[-1]["tokens_seen"] - train[WARM - 1]["tokens_seen"]
    seconds = timed[-1]["train_seconds"] - train[WARM - 1]["train_seconds"]
    n_params = sum(p.numel() for p in run.model.parameters())
    return {
        "tokens_per_s": tokens / seconds,
        "final_loss": train[-1]["loss"],
        "mean_loss": sum(e["loss"] for e in train) / len(train),
        "peak_rss_mib": _peak_rss_mib(),
        "params": n_params,
    }


def _hf_settings(steps: int) -> dict:
    """What the Trainer and TRL arms share with t2tune's: batch, steps, lr, bf16 on the CPU."""
    return dict(
        output_dir=str(scratch_dir("bench-train-hf-")),
        per_device_train_batch_size=MICRO,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
    )


class _Clock:
    """Each step's end time, input tokens seen and logged loss, from a Trainer callback."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                clock.stamps.append(time.perf_counter())
                clock.tokens.append(state.num_input_tokens_seen)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses.append(logs["loss"])

        return Callback()


def worker_hf(objective: str, steps: int, malloc: bool = False) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    sys.path.insert(0, str(ROOT / "src"))
    if malloc:  # what t2tune's allocator setting alone gives the Trainer
        from t2tune.runtime import keep_freed_memory

        keep_freed_memory()
    from t2tune.config import ModelConfig
    from t2tune.data import load_examples
    from t2tune.models import load_model
    from t2tune.tasks import get_task

    task = get_task("mnli")
    loaded = load_model(ModelConfig(name="smollm2-135m"))
    tok = loaded.tokenizer
    rows = load_examples(task, str(DATA), "train")
    prompts = tok([task.prompt_text(r) for r in rows], add_special_tokens=False)["input_ids"]
    targets = tok([" " + task.target_text(r) for r in rows], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for p, t in zip(prompts, targets):  # run_clm's group_texts, with labels carried alongside
        ids.extend(p + t + [tok.eos_token_id])
        labels.extend(([-100] * len(p) if objective == "target" else p) + t + [tok.eos_token_id])
    blocks = len(ids) // SEQ_LEN
    ds = Dataset.from_dict(
        {
            "input_ids": [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(blocks)],
            "labels": [labels[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(blocks)],
        }
    )
    clock = _Clock()
    args = TrainingArguments(**_hf_settings(steps))
    Trainer(
        model=loaded.model,
        args=args,
        train_dataset=ds,
        data_collator=default_data_collator,
        callbacks=[clock.callback()],
    ).train()
    stamps, losses = clock.stamps, clock.losses
    seconds = stamps[-1] - stamps[WARM - 1]
    tokens = (len(stamps) - WARM) * MICRO * SEQ_LEN
    return {
        "tokens_per_s": tokens / seconds,
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "peak_rss_mib": _peak_rss_mib(),
        "params": sum(p.numel() for p in loaded.model.parameters()),
    }


def worker_trl(objective: str, steps: int, strategy: str = "bfd") -> dict:
    """What a TRL user writes for the demo's objective: ``SFTTrainer`` on prompt/completion
    pairs of the same prompts, loss on the completion, packed. ``bfd``: best-fit decreasing,
    padding-free (per-example position ids; without FlashAttention on CPU a micro batch is one
    2,048-token sequence under a block-diagonal mask); ``wrapped``: 256-token blocks cut across
    examples, which then attend to each other (cheaper, and not what the demo trains)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(ROOT / "src"))
    from t2tune.config import ModelConfig
    from t2tune.data import load_examples
    from t2tune.models import load_model
    from t2tune.tasks import get_task

    task = get_task("mnli")
    loaded = load_model(ModelConfig(name="smollm2-135m"))
    rows = load_examples(task, str(DATA), "train")
    ds = Dataset.from_dict(
        {"prompt": [task.prompt_text(r) for r in rows], "completion": [" " + task.target_text(r) for r in rows]}
    )
    clock = _Clock()
    # every token of a packed batch is real: bfd is padding-free, wrapped fills its blocks
    args = SFTConfig(
        **_hf_settings(steps),
        max_length=SEQ_LEN,
        packing=True,
        packing_strategy=strategy,
        completion_only_loss=objective == "target",
        include_num_input_tokens_seen="all",
        dataset_num_proc=None,
    )
    SFTTrainer(
        model=loaded.model, args=args, train_dataset=ds, processing_class=loaded.tokenizer, callbacks=[clock.callback()]
    ).train()
    stamps, tokens, losses = clock.stamps, clock.tokens, clock.losses
    seconds = stamps[-1] - stamps[WARM - 1]
    return {
        "tokens_per_s": (tokens[-1] - tokens[WARM - 1]) / seconds,
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "peak_rss_mib": _peak_rss_mib(),
        "params": sum(p.numel() for p in loaded.model.parameters()),
    }


def bf16_matmul_peak() -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - start)


RUNNERS = {
    "HF Trainer": worker_hf,
    "HF Trainer + malloc": lambda objective, steps: worker_hf(objective, steps, malloc=True),
    "t2tune": worker_t2tune,
    "t2tune micro 4 x 2": lambda objective, steps: worker_t2tune(objective, steps, micro=4),
    "t2tune batch 16": lambda objective, steps: worker_t2tune(objective, steps, micro=16, batch=16),
    "TRL SFT bfd": worker_trl,
    "TRL SFT wrapped": lambda objective, steps: worker_trl(objective, steps, strategy="wrapped"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="runs/bench/bench_train.json")
    parser.add_argument("--worker", choices=list(RUNNERS))
    parser.add_argument("--objective", choices=["all", "target"], default="all")
    parser.add_argument("--objectives", default="all,target", help="comma-separated: all, target")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated, of: {', '.join(RUNNERS)}")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(RUNNERS[args.worker](args.objective, args.steps)))
        return
    claim_out(parser, args.out, "bench_train")  # its own earlier JSON is written over, nothing else
    peak = bf16_matmul_peak()
    table = []
    runners = args.runners.split(",")
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        parser.error(f"--runners: unknown {', '.join(unknown)} (known: {', '.join(RUNNERS)})")
    for objective in args.objectives.split(","):
        for who in runners:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", who, "--objective", objective, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
            )
            line = [text for text in proc.stdout.splitlines() if text.startswith("RESULT ")]
            if not line:
                sys.exit(f"{who}/{objective} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(line[0][7:])
            result.update(objective=objective, runner=who)
            result["flops_per_s"] = 6 * result["params"] * result["tokens_per_s"]
            result["fraction_of_bf16_peak"] = result["flops_per_s"] / peak
            table.append(result)
    print(
        f"{'objective':<10}{'runner':<22}{'tokens/s':>10}{'ratio':>7}{'final loss':>12}{'mean loss':>11}"
        f"{'peak RSS MiB':>14}"
        f"{'of bf16 peak':>14}"
    )
    for row in table:
        base = next((r for r in table if r["objective"] == row["objective"] and r["runner"] == "HF Trainer"), row)
        row["ratio_vs_hf"] = row["tokens_per_s"] / base["tokens_per_s"]
        trl = [r["tokens_per_s"] for r in table if r["objective"] == row["objective"] and r["runner"].startswith("TRL")]
        row["ratio_vs_faster_trl"] = row["tokens_per_s"] / max(trl) if trl else None
        print(
            f"{row['objective']:<10}{row['runner']:<22}{row['tokens_per_s']:>10.0f}{row['ratio_vs_hf']:>7.2f}"
            f"{row['final_loss']:>12.4f}{row['mean_loss']:>11.4f}{row['peak_rss_mib']:>14.0f}"
            f"{row['fraction_of_bf16_peak']:>14.2f}"
            + (f"  {row['ratio_vs_faster_trl']:.2f}x the faster TRL arm" if row["ratio_vs_faster_trl"] else "")
        )
    report = {
        "benchmark": "bench_train",
        "steps": args.steps,
        "seq_len": SEQ_LEN,
        "micro_batch": MICRO,
        "bf16_matmul_peak_flops": peak,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s; JSON: {args.out}")


if __name__ == "__main__":
    main()
