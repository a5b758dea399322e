"""Accuracy against training time: the demo config versus the reference's recipe, same budget.

    .venv/bin/python benchmarks/bench_quality.py [--minutes 60] [--eval-every 50] [--limit 923]
        [--arms t2tune,reference]

A: ``t2tune train configs/mnli-smollm2-cpu.yaml`` with ``train.max_minutes`` = the budget.
B: the reference's recipe through Hugging Face ``Trainer``: all-token loss, examples concatenated
   and cut into 256-token blocks (group_texts), constant lr after warmup, bf16, batch 8.
Both validate by greedy generation (t2tune's evaluate, the reference's method) on
``../shared/data/mnli/validation.jsonl`` every ``--eval-every`` steps; the x axis is training
time only (validation time excluded). Writes JSON and a PNG of both curves; takes about
2 × (budget + validation time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnli"
sys.path.insert(0, str(ROOT / "src"))


def run_t2tune(minutes: float, eval_every: int, limit: int, out: Path) -> list[tuple[float, float]]:
    steps = max(10, int(minutes * 60 / 6.0))  # the cosine schedule spans the budget (~6 s/step here)
    cmd = [str(ROOT / ".venv" / "bin" / "t2tune"), "train", str(ROOT / "configs" / "mnli-smollm2-cpu.yaml"),
           f"data.train={DATA}", f"data.validation={DATA}", f"out_dir={out}", f"train.steps={steps}",
           f"train.max_minutes={minutes}", f"eval.every={eval_every}", f"eval.limit={limit}", "checkpoint.every=0",
           "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(e["train_seconds"] / 60, e["accuracy"]) for e in events if e["event"] == "eval"]


def run_reference(minutes: float, eval_every: int, limit: int) -> list[tuple[float, float]]:
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
    blocks = [stream[i:i + 256] for i in range(0, len(stream) - 255, 256)]
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    curve: list[tuple[float, float]] = []

    class Budget(TrainerCallback):
        def __init__(self) -> None:
            self.trained, self.since = 0.0, None

        def on_step_begin(self, args, state, control, **kw):
            self.since = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.trained += time.perf_counter() - self.since
            done = self.trained >= minutes * 60
            if state.global_step % eval_every == 0 or done:
                result = evaluate(model, tok, task, val, mode="generate", max_new_tokens=5, batch_size=64,
                                  seq_len=256, precision="bf16")
                model.train()
                curve.append((self.trained / 60, result.metrics["accuracy"]))
                print(f"reference: step {state.global_step}, {curve[-1][0]:.1f} min → {curve[-1][1]:.1%}", flush=True)
            control.should_training_stop = done

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=100_000,
                             learning_rate=2e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=20,
                             bf16=True, use_cpu=True, logging_steps=50, save_strategy="no", report_to=[], seed=42,
                             dataloader_num_workers=0, weight_decay=0.0)
    Trainer(model=loaded.model, args=args, train_dataset=ds, data_collator=default_data_collator,
            callbacks=[Budget()]).train()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--limit", type=int, default=923)
    parser.add_argument("--out", default="runs/bench/bench_quality")
    parser.add_argument("--arms", default="t2tune,reference", help="comma-separated subset of t2tune,reference")
    args = parser.parse_args()
    arms = set(args.arms.split(","))
    if not arms or arms - {"t2tune", "reference"}:
        parser.error(f"--arms: expected t2tune and/or reference, got {args.arms!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    if "t2tune" in arms:
        curves["t2tune demo config"] = run_t2tune(args.minutes, args.eval_every, args.limit, out / "t2tune")
    if "reference" in arms:
        curves["reference recipe (HF Trainer)"] = run_reference(args.minutes, args.eval_every, args.limit)
    for name, curve in curves.items():
        print(f"{name}: " + ", ".join(f"{m:.1f} min → {a:.1%}" for m, a in curve))
    (out / "bench_quality.json").write_text(json.dumps({"minutes": args.minutes, "limit": args.limit,
                                                        "date": time.strftime("%Y-%m-%d"), "curves": curves}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([m for m, _ in curve], [a for _, a in curve], marker="o", label=name)
    ax.set(xlabel="training minutes (2-core CPU)", ylabel="MNLI validation accuracy", title="accuracy vs time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_quality.png", dpi=100)
    print(f"JSON and PNG in {out}")


if __name__ == "__main__":
    main()
