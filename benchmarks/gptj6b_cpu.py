"""GPT-J 6B at its real size on a CPU machine: train, kill and resume, validate, export, reload.

    make bench-gptj6b      # = .venv/bin/python benchmarks/gptj6b_cpu.py --steps 3 [--work runs/gptj6b-cpu]

No hub here, so the model is GPT-J 6B's public config (EleutherAI/gpt-j-6B) with random bf16
weights (seeded, each tensor made in bf16 on its own: no fp32 copy, no whole model in memory),
saved as the hub lays it out: sharded safetensors, config, GPT-J's tokenizer. The folder is
reused when it is there. Then every stage is the real CLI in its own process:

1. ``train`` A: LoRA r 8 on every linear projection, ``model.dtype: bfloat16`` computing in
   fp32 (``model.compute_dtype``: this CPU has no bf16 matrix units, and bf16 autocast would be
   emulated ~460× slower), ``train.seq_len`` 256, micro batch 1, a checkpoint every step, one
   validation (generate, 4 rows) at the end, the merged bf16 export and its gate. A few steps'
   LoRA update is mostly below bf16's resolution at the base weights, so the gate may refuse
   the merge (the run then says how much of the update the rounding lost); the same merge is
   then written by ``t2tune export`` without a gate, to measure it;
2. ``train`` B, the same run exporting the adapter (``export.merge=false``, gated bit for bit):
   ``kill -9`` during its last step, then the same command resumes it; its last checkpoint's
   adapter must equal A's bit for bit;
3. ``evaluate`` of B's export (base + adapter), generate and score modes, 4 rows each;
4. a plain ``transformers`` ``from_pretrained`` of A's merged export (bf16, no missing keys);
5. ``train`` Q: A's run with ``train.method=qlora`` (NF4 4-bit base weights, bitsandbytes' CPU
   backend), its merged export dequantized to bf16 and gated; its tokens/s against A's.

Each stage reports wall time, peak RSS (the child's, sampled every 0.2 s and from ``wait4``;
and its anonymous part, without the file pages of memory-mapped weights;
the training runs also report their own per-stage peaks), disk written (growth of the work
folder) and, for training, tokens/s and MFU from the run's own summary. Results: printed, and
written to ``<work>/results.json``. Disk: ~12 GB for the model and ~12 GB per export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from t2tune.files import read_marker  # noqa: E402
from t2tune.runfolder import RunFolder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mnli"
GIB = 1024**3
SEED = 1234
MARKER = "t2tune-random-gptj-6b.json"  # written last: a folder without it is not a finished build


# --- the random model ----------------------------------------------------------------------


def _init(name: str, like: Any, index: int) -> Any:
    """A tensor of ``like``'s shape, made directly in bf16: LayerNorm weight 1, biases 0, the
    rest N(0, 0.02) from its own seeded generator (the same tensor whatever the write order)."""
    import torch

    if name.endswith(".bias"):
        return torch.zeros(like.shape, dtype=like.dtype)
    if ".ln_" in name or name.startswith("transformer.ln_f"):
        return torch.ones(like.shape, dtype=like.dtype)
    generator = torch.Generator().manual_seed(SEED + index)
    return torch.empty(like.shape, dtype=like.dtype).normal_(0.0, 0.02, generator=generator)


def build_model(folder: Path, shape: str = "6b") -> dict[str, Any]:
    """The random GPT-J folder (``shape`` 6b, or the 2-layer tiny-gptj to try this script
    quickly); reused when complete, built in ``<folder>.partial`` otherwise."""
    if (folder / MARKER).is_file():
        return {"reused": True}
    if folder.exists():
        raise SystemExit(
            f"{folder}: exists but is not a finished random GPT-J 6B (no {MARKER}); pass another --work or remove it"
        )
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from t2tune.export import write_safetensors
    from t2tune.models import gptj_6b_config, gptj_tokenizer, tiny_gptj_config

    partial = folder.with_name(folder.name + ".partial")  # this script's own, left by a killed build
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = gptj_6b_config() if shape == "6b" else tiny_gptj_config()
    config.dtype = "bfloat16"
    config.architectures = ["GPTJForCausalLM"]
    with init_empty_weights():  # names and shapes only: no memory
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = skeleton.state_dict()
    tensors = {
        name: (like, lambda n=name, t=like, i=i: _init(n, t, i)) for i, (name, like) in enumerate(shapes.items())
    }
    write_safetensors(partial, tensors, shard_bytes=1 << 30)
    config.save_pretrained(partial)
    gptj_tokenizer().save_pretrained(partial)
    params = sum(t.numel() for t in shapes.values())
    (partial / MARKER).write_text(json.dumps({"config": "EleutherAI/gpt-j-6B", "seed": SEED, "parameters": params}))
    partial.rename(folder)
    return {"reused": False, "parameters": params}


# --- running and measuring a stage ---------------------------------------------------------


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _rss(pid: int) -> tuple[int, int]:
    """(resident, anonymous resident) bytes. The difference is file pages mapped in, such as
    weights ``from_pretrained`` memory-maps: they count as resident, but the kernel can drop
    them under pressure and read them again, where anonymous memory it can only OOM-kill."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssAnon:")):
                found[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("RssAnon", 0)


class Stage:
    """One child process: its wall time, sampled and final peak RSS, and the disk it added."""

    def __init__(self, name: str, argv: list[str], work: Path, log: Path) -> None:
        self.name, self.work, self.log = name, work, log
        self.before = _tree_bytes(work)
        self.start = time.perf_counter()
        self.out = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, text=True)
        self.sampled = self.anon = 0
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.is_set():
            rss, anon = _rss(self.proc.pid)
            self.sampled, self.anon = max(self.sampled, rss), max(self.anon, anon)
            self._done.wait(0.2)

    def running(self) -> bool:
        """Alive and not a zombie; asked without reaping the child, so that wait4 still can."""
        try:
            return Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def wait(self, **extra: Any) -> dict[str, Any]:
        """Reap the child; its result, with ``extra`` and (``out_dir``) the run's own summary."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._done.set()
        self.out.close()
        peak = max(self.sampled, usage.ru_maxrss * 1024)
        out_dir, printed = extra.pop("out_dir", None), extra.pop("printed", False)
        result = {
            "stage": self.name,
            "rc": self.proc.returncode,
            "wall_s": round(time.perf_counter() - self.start, 1),
            "peak_rss_gib": round(peak / GIB, 2),
            "peak_anon_rss_gib": round(self.anon / GIB, 2),
            "disk_written_gb": round((_tree_bytes(self.work) - self.before) / 1e9, 2),
            **extra,
        }
        if out_dir is not None:
            result.update(_summary(out_dir))
        if self.proc.returncode == 2:  # t2tune's one-line refusal
            result["refused"] = next(
                (line for line in self.log.read_text().splitlines() if line.startswith("t2tune: error:")), None
            )
        if printed:  # the JSON line the command printed last
            result["result"] = _last_line(self.log)
        print(json.dumps(result), flush=True)
        return result


def _cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "t2tune", *map(str, args)]


def _summary(out_dir: Path) -> dict[str, Any]:
    """The run's numbers from its metrics.jsonl: its summary when it ended (a run stopped by the
    export gate has none), per-step times and losses from its train events."""
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    end = ([e for e in events if e["event"] == "end"] or [{}])[-1]
    steps = [e for e in events if e["event"] == "train"]
    keys = ("tokens_per_s", "mfu", "train_seconds", "eval_seconds", "gate_drift", "merge_rounding_lost")
    if not end and steps:
        end = {"tokens_per_s": steps[-1]["tokens_per_s"], "mfu": steps[-1]["mfu"]}  # the last step's
    return {
        **{k: end.get(k) for k in keys},
        "rss_by_stage_gib": end.get("peak_rss_gib"),
        "losses": [e["loss"] for e in steps],
        "step_s": [
            round(b["train_seconds"] - a, 1) for a, b in zip([0.0] + [e["train_seconds"] for e in steps], steps)
        ],
    }


def _last_line(log: Path) -> dict[str, Any]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _adapters_equal(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    left, right = (load_file(next(p.glob("adapter_model*.safetensors"))) for p in (a, b))
    same = left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)
    diff = (
        max(float((left[k].float() - right[k].float()).abs().max()) for k in left)
        if left.keys() == right.keys()
        else float("inf")
    )
    return {"identical": same, "tensors": len(left), "max_abs_diff": diff}


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto", output_loading_info=True)
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "dtypes": dtypes,
                  "missing": len(info["missing_keys"]), "unexpected": len(info["unexpected_keys"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "gptj6b-cpu"), help="model, runs and logs (~40 GB)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each training run")
    parser.add_argument(
        "--shape",
        choices=("6b", "tiny"),
        default="6b",
        help="tiny: the 2-layer tiny-gptj, to try the script in a minute",
    )
    parser.add_argument(
        "--arms",
        choices=("all", "lora", "qlora"),
        default="all",
        help="lora: stages 1-4; qlora: stage 5 alone (results-qlora.json)",
    )
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"random-gptj-{args.shape}"
    results: dict[str, Any] = {
        "command": f"benchmarks/gptj6b_cpu.py --steps {args.steps} --shape {args.shape} --arms {args.arms}",
        "cpu_threads": os.cpu_count(),
        "stages": [],
    }
    stages = results["stages"]

    before, start = _tree_bytes(work), time.perf_counter()
    built = build_model(model_dir, args.shape)
    stages.append(
        {
            "stage": f"build random GPT-J {args.shape} (bf16)",
            "wall_s": round(time.perf_counter() - start, 1),
            "disk_written_gb": round((_tree_bytes(work) - before) / 1e9, 2),
            **built,
        }
    )
    print(json.dumps(stages[-1]), flush=True)

    config = work / "gptj6b-lora-cpu.yaml"
    config.write_text(f"""task: mnli
model: {{name: {model_dir}, dtype: bfloat16, compute_dtype: float32}}
data: {{train: {DATA}}}
train: {{method: lora, steps: {args.steps}, seq_len: 256, micro_batch_size: 1, global_batch_size: 1, lr: 2.0e-4,
         precision: fp32, loss_on: target, packing: isolated, packing_check: false, seed: 42}}
lora: {{r: 8, alpha: 16, dropout: 0.05}}
checkpoint: {{every: 1, keep: 2}}
eval: {{every: {args.steps}, limit: 4, batch_size: 4, seq_len: 256, mode: generate}}
""")
    run_a, run_b, run_q = work / "run-a", work / "run-b", work / "run-q"
    runs = {"all": (run_a, run_b, run_q), "lora": (run_a, run_b), "qlora": (run_q,)}[args.arms]
    for run in runs:  # a rerun starts the runs over: only t2tune run folders are removed
        if run.exists() and (read_marker(run) or {}).get("kind") != "run":
            raise SystemExit(f"{run}: exists and is not a t2tune run folder; pass another --work")
        shutil.rmtree(run, ignore_errors=True)
    if args.arms != "qlora":
        _lora_arms(args, work, config, run_a, run_b, results)
    if args.arms != "lora":
        _qlora_arm(work, config, run_q, results)
    name = "results.json" if args.arms == "all" else f"results-{args.arms}.json"
    (work / name).write_text(json.dumps(results, indent=1))
    print(f"results: {work / name}")
    # a gate refusing a lossy merge is a finding the stage reports, not a failure of the benchmark
    failed = [
        s for s in stages if s.get("rc") not in (0, None, -9) and "export gate failed" not in (s.get("refused") or "")
    ]
    if failed or not results.get("resume", {"identical": True})["identical"]:
        raise SystemExit(1)


def _qlora_arm(work: Path, config: Path, run_q: Path, results: dict[str, Any]) -> None:
    """5. ``train`` Q: A's run over NF4 4-bit base weights (QLoRA), exported merged (dequantized
    to bf16) with its gate; tokens/s against A's when both ran."""
    q = Stage(
        "train Q (QLoRA: NF4 base, same LoRA; merged bf16 export + gate)",
        _cli("train", config, f"out_dir={run_q}", "train.method=qlora"),
        work,
        work / "train-q.log",
    )
    results["stages"].append(q.wait(out_dir=run_q))
    lora = next((s for s in results["stages"] if s["stage"].startswith("train A")), None)
    if lora and lora.get("tokens_per_s") and results["stages"][-1].get("tokens_per_s"):
        results["qlora_vs_lora_tokens_per_s"] = round(results["stages"][-1]["tokens_per_s"] / lora["tokens_per_s"], 3)
        print(json.dumps({"qlora_vs_lora_tokens_per_s": results["qlora_vs_lora_tokens_per_s"]}), flush=True)


def _lora_arms(args: Any, work: Path, config: Path, run_a: Path, run_b: Path, results: dict[str, Any]) -> None:
    """Stages 1-4 of the module's docstring."""
    stages = results["stages"]

    # A exports merged (the default); its gate may refuse: a few steps' update is small against
    # bf16's resolution, which the run then reports. B exports the adapter (exact), gated too.
    a = Stage(
        "train A (uninterrupted, merged bf16 export + gate)",
        _cli("train", config, f"out_dir={run_a}"),
        work,
        work / "train-a.log",
    )
    stages.append(a.wait(out_dir=run_a))
    gate_refused = "export gate failed" in (stages[-1].get("refused") or "")
    if stages[-1]["rc"] != 0 and not gate_refused:
        raise SystemExit(f"train A failed: see {work / 'train-a.log'}")
    step_s = stages[-1]["step_s"][-1]
    merged = run_a / "hf"
    if gate_refused:  # the same merge, written without the gate, to measure its export and reload
        merged = run_a / "merged-ungated"
        m = Stage(
            "t2tune export of A's last checkpoint (merged bf16, no gate)",
            _cli("export", RunFolder(run_a).step(args.steps).path, "--out", merged),
            work,
            work / "export.log",
        )
        stages.append(m.wait(printed=True))

    adapter = ["export.merge=false"]
    b = Stage(
        "train B, killed in its last step",
        _cli("train", config, f"out_dir={run_b}", *adapter),
        work,
        work / "train-b.log",
    )
    while not RunFolder(run_b).step(args.steps - 1).path.is_dir() and b.running():
        time.sleep(1)
    time.sleep(step_s / 3)  # a third of the way into the last step
    finished = RunFolder(run_b).step(args.steps).path.is_dir()
    b.kill()
    stages.append(b.wait(killed_after_step=args.steps - 1, last_step_already_written=finished))
    r = Stage(
        "train B resumed (adapter export + gate)",
        _cli("train", config, f"out_dir={run_b}", *adapter),
        work,
        work / "train-b-resume.log",
    )
    stages.append(r.wait(out_dir=run_b))
    results["resume"] = _adapters_equal(*(RunFolder(run).step(args.steps).model for run in (run_a, run_b)))
    print(json.dumps({"resume": results["resume"]}), flush=True)

    export = run_b / "hf"  # the adapter: base model + LoRA, as a user evaluates it
    for mode in ("generate", "score"):
        e = Stage(
            f"evaluate B's export ({mode}, 4 rows)",
            _cli(
                "evaluate",
                export,
                "--task",
                "mnli",
                "--data",
                DATA,
                "--mode",
                mode,
                "--limit",
                4,
                "--batch-size",
                4,
                "--dtype",
                "bfloat16",
                "--compute-dtype",
                "float32",
            ),
            work,
            work / f"evaluate-{mode}.log",
        )
        stages.append(e.wait(printed=True))
    p = Stage(
        "plain transformers reload of A's merged export",
        [sys.executable, "-c", RELOAD, str(merged)],
        work,
        work / "reload.log",
    )
    stages.append(p.wait(printed=True))


if __name__ == "__main__":
    main()
