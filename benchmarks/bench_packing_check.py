"""The packing self-test's drift (guards.packing_drift) on real MNLI rows, for each attention
implementation and precision, and for an attention that ignores the position-id restarts: the
measurements behind guards.PACKING_TOLERANCE.

    .venv/bin/python benchmarks/bench_packing_check.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from t2tune.config import ModelConfig
from t2tune.data import load_examples
from t2tune.guards import packing_drift
from t2tune.models import load_model
from t2tune.packing import pack
from t2tune.tasks import get_task
from t2tune.tokenize import encode_for_training

MNLI = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnli"


def _ignores_restarts(module, query, key, value, attention_mask, **kwargs):
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    AttentionInterface.register("ignores_restarts", _ignores_restarts)
    task = get_task("mnli")
    rows = load_examples(task, str(MNLI), "validation", limit=64)
    results = {}
    for impl in ("sdpa", "eager", "ignores_restarts"):
        loaded = load_model(ModelConfig(name=args.model, attn_implementation=impl))
        examples, _ = encode_for_training(task, rows, loaded.tokenizer, 256, truncate=True)
        packed = pack(examples, "isolated", 256, "target", loaded.tokenizer.pad_token_id)
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            drift = packing_drift(loaded.model, packed, precision)
            results[f"{impl} {precision}"] = {"drift": drift, "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
