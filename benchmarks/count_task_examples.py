"""Training examples per task that a run's first N optimizer steps hold, replayed from the data
order (a pure function of the seed), without training.

    .venv/bin/python benchmarks/count_task_examples.py configs/glue3-smollm2-cpu.yaml --steps 90

With the count for RTE, an RTE-only run of as many RTE examples is the mixture's
"same RTE examples seen" comparison (bench_mixture.py compares at equal time). Each isolated
packed row's examples are told apart by their position-id restarts, and named by their first
word (the task prefix of T5-style prompts). Needs train.packing: isolated.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from t2tune.config import load_config
from t2tune.guards import segments
from t2tune.recipe import prepare
from t2tune.training import TrainState, next_positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(args.config, [f"out_dir={scratch}/run"])
        run = prepare(cfg)
        try:
            state, counts = TrainState(), {}
            for _ in range(args.steps):
                for epoch, index in next_positions(
                    lambda e: len(run.rows_of(e)), state, cfg.train.global_batch_size, cfg.train.seed
                ):
                    row = run.rows_of(epoch)[index]
                    for start, _ in segments(row):
                        name = run.tokenizer.decode(row.tokens[start : start + 3]).split()[0]
                        counts[name] = counts.get(name, 0) + 1
        finally:
            run.lock.release()
    print(json.dumps({"steps": args.steps, "mix": run.mix, "examples_seen": counts}))


if __name__ == "__main__":
    main()
