"""AdamW's fused kernel against its for-loop, in the demo's training steps (#28).

    .venv/bin/python benchmarks/bench_optimizer.py [--steps 6] [--rounds 2] [--threads 2]

Runs ``recipe.prepare`` + ``train`` of the demo config (``configs/mnli-smollm2-cpu.yaml``) for
``--steps`` steps, alternating the optimizer's implementation (torch's ``fused`` flag on every
parameter group) round by round in one process, and prints each run's median step time and its
losses. Run it alone on the machine. Writes nothing but temporary run folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT.parent / "shared" / "data" / "mnli"


def run(fused: bool, steps: int, out: Path) -> tuple[float, list[float]]:
    import torch

    from t2tune import recipe
    from t2tune.config import load_config

    cfg = load_config(
        ROOT / "configs" / "mnli-smollm2-cpu.yaml",
        [
            f"data.train={DATA}",
            f"data.validation={DATA}",
            f"out_dir={out}",
            f"train.steps={steps}",
            "train.max_minutes=null",
            "eval.limit=1",
            "export.gate=false",
            "train.packing_check=false",
        ],
    )
    run = recipe.prepare(cfg)
    optimizer = run.parts.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
    run.train()
    train = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]
    seconds = sorted(b["train_seconds"] - a["train_seconds"] for a, b in zip(train, train[1:]))
    return seconds[len(seconds) // 2], [e["loss"] for e in train]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for fused in (False, True):
                median, losses = run(fused, args.steps, Path(tmp) / f"{round_}-{fused}")
                print(
                    f"fused={fused} round {round_}: median step {median:.3f} s, losses {[round(x, 5) for x in losses]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
