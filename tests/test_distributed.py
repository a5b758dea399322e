"""Two processes on CPU (gloo) follow the same loss curve as one with the same global batch."""

import json
import subprocess
import sys

import pytest
from conftest import tiny_train_args

pytestmark = pytest.mark.slow


def _run(tmp_path, out, processes, steps, *extra):
    # on a machine without GPUs, --multi_gpu starts CPU processes (gloo); --cpu would start only one
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else \
        [sys.executable]
    cmd = launch + ["-m", "t2tune", *tiny_train_args(tmp_path, copies=4), f"out_dir={out}",
                    f"train.steps={steps}", "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=1e-3", "train.dropout=0.0", "train.threads=1",
                    "checkpoint.every=2", "eval.limit=2", "eval.max_new_tokens=2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(events):
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


def test_two_processes_match_one(tmp_path):
    one = _losses(_run(tmp_path, tmp_path / "one", 1, 4))
    two_events = _run(tmp_path, tmp_path / "two", 2, 2)
    assert [e["processes"] for e in two_events if e["event"] == "start"] == [2]
    two = _losses(_run(tmp_path, tmp_path / "two", 2, 4))  # resumed under 2 processes
    assert [s for s, _ in two] == [1, 2, 3, 4]  # written once, by the main process
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and abs(a - b) < 1e-4, (one, two)


def test_engine_checkpoints_resume_under_two_processes(tmp_path):
    """checkpoint.format=accelerate (the path FSDP and DeepSpeed take: the engine's own
    save_state / load_state) resumes exactly too; checked here under DDP, the engine CPUs run."""
    one = _losses(_run(tmp_path, tmp_path / "one", 1, 4))
    run = tmp_path / "two"
    _run(tmp_path, run, 2, 2, "checkpoint.format=accelerate")
    assert (run / "checkpoints" / "step-2" / "engine").is_dir()
    two = _losses(_run(tmp_path, run, 2, 4, "checkpoint.format=accelerate"))
    assert [s for s, _ in two] == [1, 2, 3, 4]
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and abs(a - b) < 1e-4, (one, two)
    assert (run / "hf" / "model.safetensors").is_file()
