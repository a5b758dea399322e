"""Start-up at MNLI's real size: a training file of 400k rows against the shared 14.7k-row one.

    .venv/bin/python benchmarks/bench_bigdata.py [--rows 14694,400000] [--out runs/bench/bench_bigdata.json]

MNLI's training split has 392,702 pairs; the shared folder holds a 14,694-row stand-in. This
writes a file of each size into a temporary folder (the shared rows repeated in order; never
into the tree), runs the demo config on it through the real CLI, and measures, from the
command's start: the seconds until the run's ``start`` event (data read, tokenised, packed;
model loaded; packing self-test and peak probe done) and until its first optimizer step, and
the process's memory at those moments: resident now (VmRSS) and its high-water mark (VmHWM).
The process is then stopped. Run it alone on the machine: the seconds are wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, claim_out

DATA = ROOT.parent / "shared" / "data" / "mnli"
CONFIG = ROOT / "configs" / "mnli-smollm2-cpu.yaml"


def write_rows(folder: Path, rows: int) -> None:
    shared = (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(shared[i % len(shared)])
    validation = (DATA / "validation.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "validation.jsonl").write_text("".join(validation[:8]), encoding="utf-8")


def _memory_gib(pid: int, field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (the resident high-water mark) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(rows: int, work: Path) -> dict:
    data = work / f"data-{rows}"
    data.mkdir()
    write_rows(data, rows)
    out = work / f"run-{rows}"
    cmd = [
        sys.executable,
        "-m",
        "t2tune",
        "train",
        str(CONFIG),
        f"data.train={data}",
        f"data.validation={data}",
        f"out_dir={out}",
        "train.steps=3",
        "train.max_minutes=null",
        "eval.limit=8",
        "checkpoint.every=0",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict = {}
    try:
        while proc.poll() is None and "train" not in seen:
            time.sleep(0.2)
            metrics = out / "metrics.jsonl"
            events = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            for event in events:
                if event["event"] in ("start", "train") and event["event"] not in seen:
                    seen[event["event"]] = {
                        "seconds": time.perf_counter() - start,
                        "rss_gib": _memory_gib(proc.pid, "VmRSS"),
                        "peak_gib": _memory_gib(proc.pid, "VmHWM"),
                        **({"rows": event["rows"]} if event["event"] == "start" else {}),
                    }
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if "train" not in seen:
        sys.exit(f"{rows} rows: the run ended before its first step:\n{proc.stderr.read()[-3000:]}")
    return {
        "rows": rows,
        "packed_rows": seen["start"]["rows"],
        "to_start_s": round(seen["start"]["seconds"], 1),
        "to_first_step_s": round(seen["train"]["seconds"], 1),
        "rss_at_first_step_gib": round(seen["train"]["rss_gib"], 2),
        "peak_at_start_gib": round(seen["start"]["peak_gib"], 2),
        "peak_at_first_step_gib": round(seen["train"]["peak_gib"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="14694,400000")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "bench_bigdata.json"))
    args = parser.parse_args()
    out = claim_out(parser, args.out, "bench_bigdata")
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(int(n), Path(tmp)) for n in args.rows.split(",")]
    print(
        "| training rows | packed rows | to start event | to first step | RSS at first step "
        "| peak RSS at start event | peak RSS at first step |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['packed_rows']:,} | {r['to_start_s']} s | {r['to_first_step_s']} s "
            f"| {r['rss_at_first_step_gib']} GiB | {r['peak_at_start_gib']} GiB | {r['peak_at_first_step_gib']} GiB |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"benchmark": "bench_bigdata", "command": " ".join(sys.argv), "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
