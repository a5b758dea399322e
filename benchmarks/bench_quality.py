"""Accuracy against training time: the demo recipe against the reference's, same budget, one invocation.

    make bench-quality     # = .venv/bin/python benchmarks/bench_quality.py
    .venv/bin/python benchmarks/bench_quality.py [--minutes 56] [--eval-every 100] [--limit 923]
        [--seed 42] [--arms t2tune,reference] [--out DIR]

First the machine's bf16 matmul peak is measured, so that curves from different machines can be
put side by side (minutes × peak is the compute spent). Then, one after the other:
t2tune: ``t2tune train configs/mnli-smollm2-cpu.yaml`` (the demo: steps: auto, warmup and decay
   over the time budget) with ``train.max_minutes`` = the budget.
reference: the reference's recipe through Hugging Face ``Trainer``: all-token loss, examples
   concatenated and cut into 256-token blocks (group_texts), constant lr after warmup, bf16, batch 8,
   stopped when its optimizer steps have taken the budget.
Both validate by greedy generation (t2tune's evaluate, the reference's method) on the first
``--limit`` rows of ``../shared/data/mnli/validation.jsonl`` every ``--eval-every`` steps and at
the end; the x axis is training time only (validation excluded). Writes bench_quality.json,
bench_quality.md (the table) and bench_quality.png to --out; takes about 2 × (budget + validation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnli"
sys.path.insert(0, str(ROOT / "src"))


Point = tuple[int, float, float]  # optimizer step, training minutes, accuracy


def run_t2tune(minutes: float, eval_every: int, limit: int, seed: int, out: Path) -> list[Point]:
    cmd = [
        sys.executable,
        "-m",
        "t2tune",
        "train",
        str(ROOT / "configs" / "mnli-smollm2-cpu.yaml"),
        f"data.train={DATA}",
        f"data.validation={DATA}",
        f"out_dir={out}",
        f"train.max_minutes={minutes}",
        f"train.seed={seed}",
        f"eval.every={eval_every}",
        f"eval.limit={limit}",
        "checkpoint.every=0",
        "export.gate=false",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["train_seconds"] / 60, e["accuracy"]) for e in events if e["event"] == "eval"]


def run_reference(minutes: float, eval_every: int, limit: int, seed: int, out: Path) -> list[Point]:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from t2tune.config import ModelConfig
    from t2tune.data import load_examples
    from t2tune.evaluation import evaluate
    from t2tune.models import load_model
    from t2tune.tasks import get_task

    task = get_task("mnli")
    loaded = load_model(ModelConfig(name="smollm2-135m"))
    tok = loaded.tokenizer
    rows = load_examples(task, str(DATA), "train")
    val = load_examples(task, str(DATA), "validation", limit=limit)
    stream = []
    for ids in tok([task.train_text(r, tok.eos_token) for r in rows], add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    blocks = [stream[i : i + 256] for i in range(0, len(stream) - 255, 256)]
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    curve: list[Point] = []

    class Budget(TrainerCallback):
        def __init__(self) -> None:
            self.trained, self.since = 0.0, None

        def on_step_begin(self, args, state, control, **kw):
            self.since = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.trained += time.perf_counter() - self.since
            done = self.trained >= minutes * 60
            if state.global_step % eval_every == 0 or done:
                result = evaluate(
                    model,
                    tok,
                    task,
                    val,
                    mode="generate",
                    max_new_tokens=5,
                    batch_size=64,
                    seq_len=256,
                    precision="bf16",
                )
                model.train()
                curve.append((state.global_step, self.trained / 60, result.metrics["accuracy"]))
                print(f"reference: step {state.global_step}, {curve[-1][1]:.1f} min → {curve[-1][2]:.1%}", flush=True)
            control.should_training_stop = done

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=100_000,
        learning_rate=2e-4,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=20,
        bf16=True,
        use_cpu=True,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        weight_decay=0.0,
    )
    Trainer(
        model=loaded.model, args=args, train_dataset=ds, data_collator=default_data_collator, callbacks=[Budget()]
    ).train()
    return curve


def table(curves: dict[str, list[Point]], peak: float, machine: str, args: argparse.Namespace) -> str:
    lines = [
        f"bf16 matmul peak of this machine: **{peak:.3f} TFLOP/s** ({machine}), measured at the start.",
        f"Budget: {args.minutes:g} training minutes per arm, seed {args.seed}; validation: the first "
        f"{args.limit} rows of MNLI validation.jsonl, greedy generation. {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "| arm | step | training minutes | accuracy |",
        "|---|---|---|---|",
    ]
    for name, curve in curves.items():
        lines += [f"| {name} | {step} | {minutes:.1f} | {accuracy:.1%} |" for step, minutes, accuracy in curve]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[Point]], peak: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        ax.plot([m for _, m, _ in curve], [a for _, _, a in curve], marker="o", label=name)
    ax.set(
        xlabel=f"training minutes (machine's bf16 matmul peak: {peak:.3f} TFLOP/s)",
        ylabel="MNLI validation accuracy (greedy generation)",
        title="accuracy against training time",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=56)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--limit", type=int, default=923)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="an empty or new folder; default runs/bench/quality-<date-time>")
    parser.add_argument("--arms", default="t2tune,reference", help="comma-separated subset of t2tune,reference")
    args = parser.parse_args()
    arms = set(args.arms.split(","))
    if not arms or arms - {"t2tune", "reference"}:
        parser.error(f"--arms: expected t2tune and/or reference, got {args.arms!r}")
    args.out = args.out or ROOT / "runs" / "bench" / time.strftime("quality-%Y%m%d-%H%M%S")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out: {args.out} is not empty (an earlier run's?); name another folder")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from t2tune import speed

    cpu = torch.device("cpu")
    peak, machine = speed.measure_peak_tflops(cpu, torch.bfloat16, seconds=2.0), speed.machine(cpu, torch.bfloat16)
    print(f"bf16 matmul peak: {peak:.3f} TFLOP/s ({machine})", flush=True)
    curves: dict[str, list[Point]] = {}
    if "t2tune" in arms:
        curves["t2tune demo recipe"] = run_t2tune(
            args.minutes, args.eval_every, args.limit, args.seed, args.out / "t2tune"
        )
    if "reference" in arms:
        curves["reference recipe (HF Trainer)"] = run_reference(
            args.minutes, args.eval_every, args.limit, args.seed, args.out / "reference"
        )
    text = table(curves, peak, machine, args)
    print(text)
    (args.out / "bench_quality.md").write_text(text)
    (args.out / "bench_quality.json").write_text(
        json.dumps(
            {
                "minutes": args.minutes,
                "limit": args.limit,
                "seed": args.seed,
                "peak_tflops_bf16": peak,
                "machine": machine,
                "date": time.strftime("%Y-%m-%d"),
                "curves": {
                    name: [{"step": s, "minutes": m, "accuracy": a} for s, m, a in curve]
                    for name, curve in curves.items()
                },
            },
            indent=1,
        )
    )
    plot(curves, peak, args.out / "bench_quality.png")
    print(f"table, JSON and PNG in {args.out}")


if __name__ == "__main__":
    main()
