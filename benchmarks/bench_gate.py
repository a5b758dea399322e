"""The export gate's measured drift on a trained model, for fp32 and bf16 exports.

    .venv/bin/python benchmarks/bench_gate.py --model-dir runs/mnli-smollm2-cpu/hf

For each dtype it exports the model through t2tune's own export (gate on) and prints the
drift the gate measured: the reloaded export against the same model in memory. It also prints
how far a bf16 export is from the fp32 model it was cast from, which is the drift a user would
see comparing the two (the gate compares like with like, so a cast is not a failure).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from t2tune.config import ModelConfig
from t2tune.data import load_examples
from t2tune.export import export
from t2tune.guards import gate_export, last_token_logits
from t2tune.models import load_model
from t2tune.tasks import get_task
from t2tune.tokenize import encode_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnli"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    task = get_task("mnli")
    rows = load_examples(task, str(SHARED), "validation", None, limit=args.prompts)
    loaded = load_model(ModelConfig(name=args.model_dir))
    ids = encode_prompts(loaded.tokenizer, [task.prompt_text(r) for r in rows], 256)
    fp32_reference = last_token_logits(loaded.model, ids)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            model = loaded.model.to(dtype)
            reference = last_token_logits(model, ids)
            reports = []
            export(
                model,
                loaded.tokenizer,
                Path(tmp) / str(dtype),
                card=lambda r, reports=reports: reports.append(r) or "",
                check=lambda folder, reference=reference: gate_export(folder, reference, ids),
            )
            name = str(dtype).removeprefix("torch.")
            scale = max(1.0, float(fp32_reference.abs().max()))
            results[name] = {
                "gate_drift": reports[0].drift,
                "tolerance": reports[0].tolerance,
                "vs_fp32_model": float((reference - fp32_reference).abs().max()) / scale,
                "greedy_agree_with_fp32": int((reference.argmax(-1) == fp32_reference.argmax(-1)).sum()),
            }
    print(json.dumps({"prompts": len(ids), **results}, indent=1))


if __name__ == "__main__":
    main()
