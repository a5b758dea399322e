"""The mixture against single-task runs at equal training time, one arm after the other.

    .venv/bin/python benchmarks/bench_mixture.py --minutes 8 --out /tmp/bench-mixture

Arms: MNLI + RTE + SST-2 mixed as configs/glue3-smollm2-cpu.yaml mixes them, then MNLI, RTE
and SST-2 alone with the same training settings; every arm trains for --minutes of training
time (train.steps: auto) and validates once at the end (up to 300 rows per task; RTE has 277).
Prints a markdown table of each task's validation accuracy per arm, with its steps and
training minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COMMON = ["checkpoint.every=0", "eval.every=0", "eval.limit=300", "export.gate=false"]


def run(args: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "t2tune", "train", *args, f"out_dir={out}", *COMMON]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    budget = [f"train.max_minutes={args.minutes}"]
    rows: dict[str, dict[str, float]] = {}
    mixed = run(["configs/glue3-smollm2-cpu.yaml", *budget], args.out / "mixture")
    final = [e for e in mixed if e["event"] == "eval"][-1]
    end = mixed[-1]
    rows["mixture (MNLI + RTE + SST-2)"] = {
        **{t: final[f"{t}/accuracy"] for t in ("mnli", "rte", "sst2")},
        "steps": end["step"],
        "train_minutes": end["train_seconds"] / 60,
    }
    for task in ("mnli", "rte", "sst2"):
        # the demo config holds the same train.* keys as glue3's (steps: auto, warmup_fraction 0.05)
        single = [
            "configs/mnli-smollm2-cpu.yaml",
            *budget,
            f"task={task}",
            f"data.train={DATA / task}",
            f"data.validation={DATA / task}",
            "data.hub_config=null",
            "eval.max_new_tokens=auto",
            "train.truncate=true",
        ]
        events = run(single, args.out / task)
        last = [e for e in events if e["event"] == "eval"][-1]
        rows[f"{task} alone"] = {
            task: last["accuracy"],
            "steps": events[-1]["step"],
            "train_minutes": events[-1]["train_seconds"] / 60,
        }
    print(f"\n{args.minutes:g} minutes of training per arm\n")
    print("| arm | MNLI | RTE | SST-2 | steps | training minutes |\n|---|---|---|---|---|---|")
    for name, values in rows.items():
        cells = [f"{values[t]:.3f}" if t in values else "" for t in ("mnli", "rte", "sst2")]
        print(f"| {name} | {' | '.join(cells)} | {values['steps']} | {values['train_minutes']:.1f} |")


if __name__ == "__main__":
    main()
