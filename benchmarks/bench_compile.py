"""train.compile against eager, same run, same machine: step time, compile time, break-even, losses.

    .venv/bin/python benchmarks/bench_compile.py [--steps 12] [--settings "tiny fp32,demo bf16"]
        [--out runs/bench/bench_compile.json]

Each arm is ``t2tune``'s own recipe in its own process (``recipe.prepare`` + ``train``, no
validation rows), eager and ``train.compile: true`` alternated, each compiled arm with an empty
inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so its first step pays the whole compile:

- ``demo``: the demo's training settings (bundled SmolLM2-135M, seq 256, micro batch 8, isolated
  packing, answer-only loss, bf16 autocast) on ../shared/data/mnli, and the same in fp32;
- ``tiny``: tiny-gptj (2 layers of width 64), fp32, the test suite's model.

Step time is the median of the steps after the first two. Compile time is the compiled arm's
first two steps minus the eager arm's; break-even is that over the per-step saving. Losses are
compared step by step (the same rows in the same order: same seed). MFU is the median of the
timed steps' own MFU, against the peak each arm's run measured at its start. With both demo
settings, the bf16 arms' losses are also compared with eager fp32's: the distance of eager bf16
from fp32 is the measured tolerance that compiled bf16 is held to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, claim_out, scratch_dir

DATA = ROOT.parent / "shared" / "data" / "mnli"
WARM = 2
SETTINGS = {
    "demo bf16": {
        "model.name": "smollm2-135m",
        "train.precision": "bf16",
        "train.seq_len": 256,
        "train.micro_batch_size": 8,
        "train.global_batch_size": 8,
    },
    "demo fp32": {
        "model.name": "smollm2-135m",
        "train.precision": "fp32",
        "train.seq_len": 256,
        "train.micro_batch_size": 8,
        "train.global_batch_size": 8,
    },
    "tiny fp32": {
        "model.name": "tiny-gptj",
        "train.precision": "fp32",
        "train.seq_len": 256,
        "train.micro_batch_size": 8,
        "train.global_batch_size": 8,
    },
}


def worker(setting: str, compiled: bool, steps: int) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from t2tune import recipe
    from t2tune.config import build_config
    from t2tune.runtime import keep_freed_memory

    keep_freed_memory()  # what the t2tune CLI applies
    out = scratch_dir("bench-compile-")
    cfg = build_config(
        {
            "task": "mnli",
            "out_dir": str(out),
            "train.steps": steps,
            "train.lr": 2e-4,
            "train.loss_on": "target",
            "train.packing": "isolated",
            "train.dropout": 0.0,
            "train.compile": compiled,
            "checkpoint.every": 0,
            "data.train": str(DATA),
            "data.validation": str(DATA),
            "eval.limit": 1,
            "export.gate": False,
            **SETTINGS[setting],
        }
    )
    run = recipe.prepare(cfg, eval_rows=[])  # training speed only: nothing to validate
    run.train()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    seconds = [b["train_seconds"] - a["train_seconds"] for a, b in zip([{"train_seconds": 0.0}] + train, train)]
    start, end = next(e for e in events if e["event"] == "start"), events[-1]
    return {
        "losses": [e["loss"] for e in train],
        "step_seconds": seconds,
        "tokens_per_s": (train[-1]["tokens_seen"] - train[WARM - 1]["tokens_seen"]) / sum(seconds[WARM:]),
        "peak_rss_gib": end.get("peak_rss_gib", {}).get("train"),
        # each step's MFU against the peak this process measured at its own start
        "mfu": statistics.median(e["mfu"] for e in train[WARM:]),
        "peak_tflops": start["peak_tflops"],
    }


def _largest_rel_diff(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def bf16_rounding(bf16: dict, fp32: dict) -> dict:
    """The tolerance for compiled bf16: how far eager bf16's own losses stand from eager fp32's
    (the same rows and order), beside how far compiled bf16's do. bf16 has no exact answer to
    match, so compiled bf16 is held to the distance bf16 itself already has from fp32."""
    reference = fp32["eager"]["losses"]
    return {
        "eager_bf16": _largest_rel_diff(bf16["eager"]["losses"], reference),
        "compiled_bf16": _largest_rel_diff(bf16["compiled"]["losses"], reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--out", default="runs/bench/bench_compile.json")
    parser.add_argument("--worker", choices=list(SETTINGS))
    parser.add_argument("--compiled", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.compiled, args.steps)))
        return
    claim_out(parser, args.out, "bench_compile")  # its own earlier JSON is written over, nothing else
    rows = []
    for setting in args.settings.split(","):
        arms = {}
        for compiled in (False, True):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(scratch_dir("inductor-")))
            command = [sys.executable, __file__, "--worker", setting, "--steps", str(args.steps)]
            started = time.perf_counter()
            proc = subprocess.run(
                command + (["--compiled"] if compiled else []), capture_output=True, text=True, env=env
            )
            line = [text for text in proc.stdout.splitlines() if text.startswith("RESULT ")]
            if not line:
                sys.exit(f"{setting} compiled={compiled} failed:\n{proc.stderr[-3000:]}")
            arms[compiled] = json.loads(line[0][7:]) | {"process_seconds": time.perf_counter() - started}
        eager, compiled = arms[False], arms[True]
        step_e = statistics.median(eager["step_seconds"][WARM:])
        step_c = statistics.median(compiled["step_seconds"][WARM:])
        extra = sum(compiled["step_seconds"][:WARM]) - sum(eager["step_seconds"][:WARM])
        saving = step_e - step_c
        diffs = [abs(a - b) / abs(a) for a, b in zip(eager["losses"], compiled["losses"])]
        rows.append(
            {
                "setting": setting,
                "eager_step_s": step_e,
                "compiled_step_s": step_c,
                "speedup": step_e / step_c,
                "compile_s": extra,
                "break_even_steps": extra / saving if saving > 0 else None,
                "max_rel_loss_diff": max(diffs),
                "eager": eager,
                "compiled": compiled,
            }
        )
        row = rows[-1]
        even = f"{row['break_even_steps']:.0f}" if row["break_even_steps"] is not None else "never"
        print(
            f"{setting:<11} eager {step_e:.3f} s/step, compiled {step_c:.3f} ({row['speedup']:.2f}x); "
            f"compile {extra:.0f} s, break-even {even} steps; max rel loss diff {row['max_rel_loss_diff']:.2e}; "
            f"train peak RSS {eager['peak_rss_gib']} vs {compiled['peak_rss_gib']} GiB; "
            f"MFU {eager['mfu']:.1%} vs {compiled['mfu']:.1%} of the run-start peaks "
            f"({eager['peak_tflops']} / {compiled['peak_tflops']} TFLOP/s)",
            flush=True,
        )
    by_setting = {row["setting"]: row for row in rows}
    rounding = bf16_rounding(by_setting["demo bf16"], by_setting["demo fp32"]) if "demo fp32" in by_setting else None
    if rounding:
        print(
            f"against eager fp32's losses, step by step: eager bf16 {rounding['eager_bf16']:.2e}, "
            f"compiled bf16 {rounding['compiled_bf16']:.2e} (largest relative difference)"
        )
    report = {
        "benchmark": "bench_compile",
        "bf16_vs_fp32": rounding,
        "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
