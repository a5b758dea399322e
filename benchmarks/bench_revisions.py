"""Did a change slow training down? Each revision's own t2tune, alternated in one run.

    .venv/bin/python benchmarks/bench_revisions.py [--revisions f40ef23,74fad70,HEAD] [--rounds 2]
        [--steps 12] [--objective all] [--out runs/bench/bench_revisions.json]

Every revision is checked out into a temporary git worktree (removed afterwards; the checkout
itself is not touched), and its own ``benchmarks/bench_train.py --worker t2tune`` runs there, in
a process of its own, importing that revision's ``src/``. The revisions take turns, round after
round (A B C A B C ...), so that a machine that speeds up or slows down during the run moves
them alike; the table gives each one's median tokens/s over the rounds and its ratio to the
first revision's. Run it alone on the machine: the tokens/s are wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, claim_out


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def run_worker(tree: Path, objective: str, steps: int) -> dict:
    """One timed run of a revision's own t2tune worker; its result line, parsed."""
    proc = subprocess.run(
        [
            sys.executable,
            str(tree / "benchmarks" / "bench_train.py"),
            "--worker",
            "t2tune",
            "--objective",
            objective,
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        cwd=tree,
    )
    line = [text for text in proc.stdout.splitlines() if text.startswith("RESULT ")]
    if not line:
        sys.exit(f"{tree.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", default="f40ef23,74fad70,HEAD", help="comma-separated git revisions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--objective", choices=["all", "target"], default="all")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "bench_revisions.json"))
    args = parser.parse_args()
    out = claim_out(parser, args.out, "bench_revisions")
    revisions = args.revisions.split(",")
    try:
        commits = {rev: _git("rev-parse", "--short", f"{rev}^{{commit}}") for rev in revisions}
    except subprocess.CalledProcessError as exc:
        parser.error(f"--revisions: {exc.stderr.strip()}")
    runs: dict[str, list[dict]] = {rev: [] for rev in revisions}
    with tempfile.TemporaryDirectory() as tmp:
        # a worktree's benchmarks read ../shared/data beside it, as they do beside the checkout
        (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        trees = {rev: Path(tmp) / f"rev-{commits[rev]}" for rev in revisions}
        try:
            for rev in revisions:
                _git("worktree", "add", "--detach", str(trees[rev]), commits[rev])
            for round_ in range(args.rounds):
                for rev in revisions:
                    result = run_worker(trees[rev], args.objective, args.steps)
                    runs[rev].append(result)
                    print(
                        f"round {round_ + 1}, {rev} ({commits[rev]}): {result['tokens_per_s']:.0f} tokens/s", flush=True
                    )
        finally:
            for tree in trees.values():
                if tree.exists():
                    _git("worktree", "remove", "--force", str(tree))
    first = statistics.median(r["tokens_per_s"] for r in runs[revisions[0]])
    table = []
    for rev in revisions:
        rates = [r["tokens_per_s"] for r in runs[rev]]
        table.append(
            {
                "revision": rev,
                "commit": commits[rev],
                "tokens_per_s": rates,
                "median_tokens_per_s": statistics.median(rates),
                "ratio_to_first": statistics.median(rates) / first,
                "mean_loss": [r["mean_loss"] for r in runs[rev]],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[rev]),
            }
        )
    print("| revision | tokens/s, each round | median | × first | mean loss | peak RSS |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['revision']} ({row['commit']}) | {', '.join(f'{r:.0f}' for r in row['tokens_per_s'])} "
            f"| {row['median_tokens_per_s']:.0f} | {row['ratio_to_first']:.2f} "
            f"| {', '.join(f'{loss:.4f}' for loss in row['mean_loss'])} | {row['peak_rss_mib'] / 1024:.1f} GiB |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_revisions",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "objective": args.objective,
        "steps": args.steps,
        "rows": table,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
