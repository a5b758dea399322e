"""glibc's allocator settings on GPT-J 6B (random weights, LoRA, bf16 weights computing in fp32):
time and peak anonymous memory of training steps, every setting in one process, one model load.

    .venv/bin/python benchmarks/gptj6b_allocator.py [--model runs/gptj6b-cpu/random-gptj-6b] [--steps 2]

Settings, in this order (the kept heap only grows, so it goes last):
- ``returned``: both thresholds at 128 KiB (glibc's start values, fixed), heap trimmed;
- ``capped``: mmap threshold 32 MiB, trim threshold 64 MiB (where glibc's dynamic threshold tops out);
- ``kept``: :func:`t2tune.runtime.keep_freed_memory` (nothing unmapped or trimmed).
A first step, not timed, warms up. Each setting reports its step times and the peak of RssAnon
sampled every 50 ms. The model folder is the one ``benchmarks/gptj6b_cpu.py`` builds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import torch  # noqa: E402

from t2tune import runtime  # noqa: E402
from t2tune.config import LoraConfig, ModelConfig  # noqa: E402
from t2tune.models import load_model, wrap_lora  # noqa: E402

GIB = 1024**3
MIB = 1024**2


def anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    def __init__(self) -> None:
        self.value, self._stop = 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, anon())
            self._stop.wait(0.05)

    def reset(self) -> None:
        self.value = anon()


def settle(name: str) -> None:
    libc = runtime._libc()
    if name == "kept":
        runtime.keep_freed_memory()
        return
    runtime.return_freed_memory()  # drops the kept setting if it was on, and trims
    mmap, trim = (128 * 1024, 128 * 1024) if name == "returned" else (32 * MIB, 64 * MIB)
    libc.mallopt(runtime._M_MMAP_THRESHOLD, mmap)
    libc.mallopt(runtime._M_TRIM_THRESHOLD, trim)
    libc.malloc_trim(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "runs" / "gptj6b-cpu" / "random-gptj-6b"))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting")
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    settle("returned")
    model = load_model(ModelConfig(name=args.model, dtype="bfloat16", compute_dtype="float32")).model
    model = wrap_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0), args.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 50000, (1, args.seq))
    peak = Peak()

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    results = {"model": args.model, "seq": args.seq, "warmup_s": round(step(), 1), "settings": []}
    print(json.dumps(results), flush=True)
    for name in ("returned", "capped", "kept"):
        settle(name)
        peak.reset()
        times = [round(step(), 1) for _ in range(args.steps)]
        results["settings"].append({"setting": name, "step_s": times, "peak_anon_gib": round(peak.value / GIB, 2)})
        print(json.dumps(results["settings"][-1]), flush=True)


if __name__ == "__main__":
    main()
