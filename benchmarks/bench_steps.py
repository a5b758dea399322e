"""Accuracy per step: recipe arms at an equal number of optimizer steps (#26).

    .venv/bin/python benchmarks/bench_steps.py [--steps 420] [--seed 42] [--arms base,lr3e-4,...]
        [--out runs/bench-steps]

Each arm is the demo config (``configs/mnli-smollm2-cpu.yaml``) at a fixed ``train.steps``
instead of its time budget, so that the machine's speed of the day cancels out, plus the arm's
overrides. Every arm is validated once, at its last step, on all rows of
``../shared/data/mnli/validation.jsonl``: in generate mode by the run itself, then in score mode
by ``t2tune evaluate`` on its export. Arms run one after the other; an arm whose result file
exists is not run again, and a killed arm resumes from its checkpoint when the command is run
again, so the table can be filled over several sittings. Writes ``<out>/<arm>.json`` per arm and
prints the table (markdown) of every finished arm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT

DATA = ROOT.parent / "shared" / "data" / "mnli"
CONFIG = ROOT / "configs" / "mnli-smollm2-cpu.yaml"
# arm → its overrides of the demo config. Each arm names its learning rate and EMA, so that an arm
# means the same recipe whatever the demo's defaults are (the demo took lr3e-4+ema in #26); "base"
# is the demo recipe before that. The global batch arm sees the same examples in half the steps,
# in one micro batch of 16 (what bench_train's "t2tune batch 16" times per token)
BASE = ["train.lr=2e-4", "train.ema=null"]
ARMS: dict[str, list[str]] = {
    "base": BASE,
    "lr3e-4": ["train.lr=3e-4", "train.ema=null"],
    "lr5e-4": ["train.lr=5e-4", "train.ema=null"],
    "warmup2%": [*BASE, "train.warmup_fraction=0.02"],
    "ema": ["train.lr=2e-4", "train.ema=0.99"],
    "lr3e-4+ema": ["train.lr=3e-4", "train.ema=0.99"],
    "batch16": [*BASE, "train.global_batch_size=16", "train.micro_batch_size=16", "half_steps"],
    "compile": [*BASE, "train.compile=true"],  # the same steps, compiled: does the accuracy hold?
}


def arm_command(arm: str, steps: int, seed: int, out: Path, threads: int | None = None) -> list[str]:
    overrides = [o for o in ARMS[arm] if o != "half_steps"]
    if "half_steps" in ARMS[arm]:
        steps //= 2
    return [
        sys.executable,
        "-m",
        "t2tune",
        "train",
        str(CONFIG),
        f"data.train={DATA}",
        f"data.validation={DATA}",
        f"out_dir={out}",
        f"train.steps={steps}",
        "train.max_minutes=null",
        f"train.seed={seed}",
        "eval.every=0",
        "eval.limit=null",
        "checkpoint.every=50",
        "checkpoint.keep=1",
        *overrides,
        *([f"train.threads={threads}"] if threads else []),
    ]


def run_arm(arm: str, steps: int, seed: int, out: Path, threads: int | None) -> dict:
    run_dir = out / f"{arm}-seed{seed}-{steps}"
    train = arm_command(arm, steps, seed, run_dir, threads)
    subprocess.run(train, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in reversed(events) if e["event"] == "end")
    generate = next(e for e in reversed(events) if e["event"] == "eval")
    score_cmd = [
        sys.executable,
        "-m",
        "t2tune",
        "evaluate",
        str(run_dir / "hf"),
        "--task",
        "mnli",
        "--data",
        str(DATA),
        "--mode",
        "score",
        "--precision",
        "bf16",
    ]
    printed = subprocess.run(score_cmd, check=True, capture_output=True, text=True).stdout
    score = json.loads(printed.strip().splitlines()[-1])
    return {
        "benchmark": "bench_steps",
        "arm": arm,
        "overrides": ARMS[arm],
        "seed": seed,
        "steps": end["exported_step"],
        "examples": generate["n"],
        "generate": generate["accuracy"],
        "score": score["accuracy"],
        "tokens_per_s": end["tokens_per_s"],
        "final_loss": next(e["loss"] for e in reversed(events) if e["event"] == "train"),
        "command": " ".join(train[1:]),
        "score_command": " ".join(score_cmd[1:]),
    }


def table(results: list[dict]) -> str:
    lines = ["| arm | overrides | seed | steps | generate | score | last loss |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['arm']} | {' '.join(r['overrides']) or '(the demo recipe)'} | {r['seed']} | {r['steps']} "
            f"| {r['generate']:.4f} | {r['score']:.4f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=420)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--arms", default="base,lr3e-4,lr5e-4,warmup2%,ema,batch16")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-steps"))
    parser.add_argument("--threads", type=int, help="train.threads of every arm (two arms side by side: 1 each)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for arm in arms:
        result_file = out / f"{arm}-seed{args.seed}-{args.steps}.json"
        if not result_file.exists():
            result = run_arm(arm, args.steps, args.seed, out, args.threads)
            result_file.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{arm}: {result_file.read_text()}", file=sys.stderr)
    print(table([json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]))


if __name__ == "__main__":
    main()
