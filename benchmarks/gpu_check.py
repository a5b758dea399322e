"""One-call GPU check: throughput, MFU and memory through t2tune's own training path.

    python benchmarks/gpu_check.py            # on the GPU machine (about 5 minutes on an H100)
    python benchmarks/gpu_check.py --tiny     # CPU dry run with tiny shapes (what CI-less hosts can do)

1. the card's bf16 matmul peak, measured here;
2. a GPT-J-6B-shaped model (real config, random weights made in bf16 on the GPU) on packed
   1024-token rows: LoRA, then full fine-tune if memory allows (bf16 weights and AdamW state),
   each with tokens/s, MFU, peak GPU memory and validation examples/s (greedy, 3 new tokens
   after 256-token prompts, through ``generate_texts``);
3. the SmolLM2-135M architecture (config only) at a batch that fills the card;
4. correctness: tiny-gptj fp32 losses on the GPU equal the CPU's within 1e-4;
5. FSDP2 (``configs/accelerate/fsdp.yaml``) through the real CLI on every GPU: validation during
   training, a checkpoint, a resume and an export, against one process (``--tiny``: the same
   harness under DDP on 2 CPU processes, since FSDP needs GPUs).
Rows for 1-4 are random token ids (no tokenizer or dataset needed on the machine); everything
else is t2tune's LossModule / train_step, the same code ``t2tune train`` runs.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from t2tune.loss import LossModule
from t2tune.packing import PackedRow
from t2tune.training import Engine, make_optimizer, make_scheduler, train_step


def train_cfg(**kw):
    base = dict(
        steps=6,
        micro_batch_size=4,
        global_batch_size=4,
        lr=1e-4,
        betas=[0.9, 0.95],
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        warmup_fraction=0.0,
        schedule="constant",
        min_lr_ratio=0.0,
        grad_clip=1.0,
        precision="bf16",
        seed=0,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def random_rows(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[PackedRow]:
    rng = random.Random(seed)
    return [
        PackedRow([rng.randrange(vocab) for _ in range(seq_len + 1)], list(range(seq_len)), [True] * seq_len)
        for _ in range(n)
    ]


def peak_bf16(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model, cfg, rows, device, warm: int = 2) -> dict:
    """``cfg.steps`` optimizer steps of t2tune's own train_step over ``rows`` in order."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device.type == "cpu")
    module = acc.prepare(LossModule(model))
    opt = acc.prepare(make_optimizer(module, cfg))
    engine = Engine(acc, module, opt, make_scheduler(opt, cfg), pad_id=0)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    size = cfg.global_batch_size
    for step in range(cfg.steps):
        result = train_step(engine, rows[step * size : (step + 1) * size], cfg)
        _sync(device)
        times.append(time.perf_counter())
        losses.append(result.loss)
    tokens = cfg.global_batch_size * (len(rows[0].tokens) - 1) * (len(times) - warm)
    seconds = times[-1] - (times[warm - 1] if warm else start)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": tokens / seconds, "peak_mem_gib": mem, "losses": losses}


class _IdsOnly:
    """What greedy validation needs of a tokenizer when the prompts are token ids already."""

    pad_token_id, eos_token_id = 0, 50256

    @staticmethod
    def decode(ids, skip_special_tokens=False) -> str:
        return " ".join(map(str, ids))


def validation_rate(model, device, seq: int, n: int = 64, batch: int = 32) -> float:
    """Examples per second of t2tune's greedy validation (``generate_texts``: left-padded
    batches, 3 new tokens, an MNLI label's length) on random prompts of ``seq`` tokens."""
    from t2tune.evaluation import generate_texts

    rng = random.Random(2)
    prompts = [[rng.randrange(1, 50000) for _ in range(seq - rng.randrange(seq // 4))] for _ in range(n)]
    generate_texts(model, _IdsOnly(), prompts[:batch], 3, batch)  # warm-up
    _sync(device)
    start = time.perf_counter()
    generate_texts(model, _IdsOnly(), prompts, 3, batch)
    _sync(device)
    return n / (time.perf_counter() - start)


def engine_check(tiny: bool) -> list[str]:
    """5.: ``t2tune train`` under accelerate launch, stopped at step 2 and resumed to 4, against
    one process: loss curve, validation, engine checkpoint, export."""
    import json
    import os
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    n = 2 if tiny else torch.cuda.device_count()
    launcher = (
        ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if tiny
        else ["--config_file", str(root / "configs" / "accelerate" / "fsdp.yaml")]
    )
    tmp = Path(tempfile.mkdtemp())
    (tmp / "data").mkdir()
    labels = ["entailment", "neutral", "contradiction"]
    rows = "".join(
        json.dumps(
            {"premise": f"Sentence number {i} about a cat.", "hypothesis": f"A claim {i % 7}.", "label": labels[i % 3]}
        )
        + "\n"
        for i in range(64)
    )
    for split in ("train", "validation"):
        (tmp / "data" / f"{split}.jsonl").write_text(rows)
    (tmp / "c.yaml").write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    args = [
        "train",
        str(tmp / "c.yaml"),
        f"data.train={tmp / 'data'}",
        f"data.validation={tmp / 'data'}",
        "train.seq_len=128",
        "train.micro_batch_size=2",
        f"train.global_batch_size={2 * n}",
        "train.lr=1e-3",
        "train.dropout=0.0",
        "checkpoint.every=2",
        "eval.every=2",
        "eval.limit=8",
        "eval.max_new_tokens=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}

    def run(launch: list[str], out: str, steps: int) -> list[dict]:
        proc = subprocess.run(
            [*launch, "-m", "t2tune", *args, f"out_dir={tmp / out}", f"train.steps={steps}"],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return [json.loads(line) for line in (tmp / out / "metrics.jsonl").read_text().splitlines()]

    one = run([sys.executable], "one", 4)
    launch = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(n)]
    run(launch, "many", 2)
    many = run(launch, "many", 4)  # resumed
    losses = [[e["loss"] for e in events if e["event"] == "train"] for events in (one, many)]
    evals = [e["step"] for e in many if e["event"] == "eval"]
    from safetensors.torch import load_file

    a, b = load_file(tmp / "one" / "hf" / "model.safetensors"), load_file(tmp / "many" / "hf" / "model.safetensors")
    drift = max((a[k] - b[k]).abs().max().item() for k in a)
    engine = (tmp / "many" / "checkpoints" / "step-4" / "engine").is_dir()
    name = "DDP on 2 CPU processes" if tiny else f"FSDP2 on {n} GPU(s)"
    worst = max(abs(x - y) for x, y in zip(*losses))
    return [
        f"{name}: losses max |1 - {n} processes| {worst:.2e} over {len(losses[1])} steps (resumed at 2), "
        f"validation at steps {evals}, engine/ checkpoint {'yes' if engine else 'no'}, "
        f"export max |diff| {drift:.2e}{'  OK' if worst < 1e-3 and drift < 1e-3 else '  MISMATCH'}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with tiny shapes")
    args = parser.parse_args()
    from transformers import GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

    from t2tune.models import gptj_6b_config, tiny_gptj_config, wrap_lora

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = peak_bf16(device, 256 if args.tiny else 8192)
    table = []
    seq = 64 if args.tiny else 1024

    def shaped_gptj():  # random weights made in bf16 on the device: no fp32 copy
        cfg = tiny_gptj_config() if args.tiny else gptj_6b_config()
        with torch.device(device):
            return GPTJForCausalLM._from_config(cfg, dtype=torch.bfloat16)

    for method in ("lora", "full"):
        name = f"GPT-J 6B shape, {method}, bf16"
        try:
            model = shaped_gptj()
            n_params = sum(p.numel() for p in model.parameters())
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if method == "lora":
                model = wrap_lora(model, SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=None), "gptj")
            micro = 2 if args.tiny else 8
            # bf16 weights (no autocast needed): what model.dtype=bfloat16 gives
            cfg = train_cfg(micro_batch_size=micro, global_batch_size=micro, precision="fp32")
            res = run(model, cfg, random_rows(micro * cfg.steps, seq, 50400), device)
            # LoRA skips the frozen weights' gradients: ~4N FLOPs per token instead of 6N
            flops = (4 if method == "lora" else 6) * n_params * res["tokens_per_s"]
            rate = validation_rate(model, device, seq // 4)
            table.append((name, res["tokens_per_s"], flops / peak, res["peak_mem_gib"], rate))
        except torch.OutOfMemoryError:
            table.append((name + " (out of memory)", float("nan"), float("nan"), float("nan"), float("nan")))
        model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    smol = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    if args.tiny:
        smol.num_hidden_layers = 2
    with torch.device(device):
        model = LlamaForCausalLM(smol)
    n_params = sum(p.numel() for p in model.parameters())
    micro = 2 if args.tiny else 64
    cfg = train_cfg(micro_batch_size=micro, global_batch_size=micro, precision="bf16")
    res = run(model, cfg, random_rows(micro * cfg.steps, seq, 49152), device)
    table.append(
        (
            "SmolLM2-135M shape, full, bf16 autocast",
            res["tokens_per_s"],
            6 * n_params * res["tokens_per_s"] / peak,
            res["peak_mem_gib"],
            float("nan"),
        )
    )
    model = None
    gc.collect()

    losses = {}
    for where in ("cpu", device.type):
        torch.manual_seed(0)
        model = GPTJForCausalLM(tiny_gptj_config()).to(where)
        cfg = train_cfg(steps=4, micro_batch_size=2, global_batch_size=2, precision="fp32", lr=1e-3)
        losses[where] = run(model, cfg, random_rows(8, 64, 50400, seed=1), torch.device(where), warm=1)["losses"]
    worst = max(abs(a - b) for a, b in zip(losses["cpu"], losses[device.type]))

    print(
        f"\ndevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
        f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; date {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'run':<44}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'val ex/s':>10}")
    for name, tps, mfu, mem, rate in table:
        print(f"{name:<44}{tps:>12,.0f}{mfu:>8.1%}{mem:>10.1f}{rate:>10.1f}")
    print(
        f"{'tiny-gptj fp32 losses, max |cpu - ' + device.type + '|':<44}{worst:>12.2e}"
        f"{'  OK' if worst < 1e-4 else '  MISMATCH'}"
    )
    if args.tiny or device.type == "cuda":
        try:
            for line in engine_check(args.tiny):
                print(line)
        except RuntimeError as exc:
            print(f"engine check FAILED: {exc}")


if __name__ == "__main__":
    main()
