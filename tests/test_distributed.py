"""Several processes on CPU (gloo): DDP and DeepSpeed ZeRO-2/3 follow the loss curve of one
process with the same global batch; validation splits its rows over every process and gives
the same records; an engine the machine cannot run is refused at start."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MNLI_ROWS, SHARED_DATA, tiny_train_args

pytestmark = pytest.mark.slow


def _run(tmp_path, out, processes, steps, *extra):
    # on a machine without GPUs, --multi_gpu starts CPU processes (gloo); --cpu would start only one
    launch = (
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if processes > 1
        else [sys.executable]
    )
    cmd = launch + [
        "-m",
        "t2tune",
        *tiny_train_args(tmp_path, copies=4),
        f"out_dir={out}",
        f"train.steps={steps}",
        "train.seq_len=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.lr=1e-3",
        "train.dropout=0.0",
        "train.threads=1",
        "checkpoint.every=2",
        "eval.limit=2",
        "eval.max_new_tokens=2",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(events):
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


def _evals(events):
    return [(e["step"], e["n"], e["accuracy"]) for e in events if e["event"] == "eval"]


def test_two_processes_match_one(tmp_path):
    one_events = _run(tmp_path, tmp_path / "one", 1, 4)
    one = _losses(one_events)
    two_events = _run(tmp_path, tmp_path / "two", 2, 2)
    assert [e["processes"] for e in two_events if e["event"] == "start"] == [2]
    two_events = _run(tmp_path, tmp_path / "two", 2, 4)  # resumed under 2 processes
    two = _losses(two_events)
    assert [s for s, _ in two] == [1, 2, 3, 4]  # written once, by the main process
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and abs(a - b) < 1e-4, (one, two)
    assert _evals(two_events)[-1] == _evals(one_events)[-1]  # validation split over both processes


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


def test_weight_average_under_two_processes_matches_one(tmp_path):
    """train.ema under DDP: each process averages its own (identical) weights, with no
    collective; the averaged export and its validation are one process's, also across a resume."""
    from safetensors.torch import load_file

    ema = ("train.ema=0.5", "export.from=last")
    one_events = _run(tmp_path, tmp_path / "one", 1, 4, *ema)
    _run(tmp_path, tmp_path / "two", 2, 2, *ema)
    two_events = _run(tmp_path, tmp_path / "two", 2, 4, *ema)  # resumed under 2 processes
    for (s1, a), (s2, b) in zip(_losses(one_events), _losses(two_events)):
        assert s1 == s2 and abs(a - b) < 1e-4
    assert _evals(two_events)[-1] == _evals(one_events)[-1]
    one, two = (load_file(tmp_path / run / "hf" / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-4, msg=name)


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
DDP = [
    *LAUNCH,
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize(
    "model,mode",
    [("tiny-gptj", "generate"), ("tiny-gptj", "score"), ("smollm2-135m", "generate"), ("smollm2-135m", "score")],
)
def test_evaluate_splits_rows_over_processes_with_identical_records(tmp_path, model, mode):
    """5 rows in batches of 2: three batches over two processes, so one process also runs a
    padding batch. The prediction file is byte-identical to one process's."""
    source = SHARED_DATA / "mnli" / "validation.jsonl"
    rows = source.read_text().splitlines()[:5] if source.is_file() else [json.dumps(r) for r in MNLI_ROWS[:5]]
    (tmp_path / "v.jsonl").write_text("\n".join(rows) + "\n")
    outputs = []
    for launch in ([sys.executable], DDP):
        out = tmp_path / f"p{len(outputs)}.jsonl"
        proc = subprocess.run(
            [
                *launch,
                "-m",
                "t2tune",
                "evaluate",
                model,
                "--task",
                "mnli",
                "--data",
                str(tmp_path / "v.jsonl"),
                "--batch-size",
                "2",
                "--mode",
                mode,
                "--max-new-tokens",
                "3",
                "--threads",
                "1",  # same kernels, so the same float sums, on both sides
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append((out.read_bytes(), json.loads(proc.stdout.strip().splitlines()[-1])))
    (one, one_summary), (two, two_summary) = outputs
    assert one == two and len(one.splitlines()) == 5
    for key in ("n", "accuracy", "invalid", "macro_f1"):
        assert one_summary[key] == two_summary[key]


def test_fsdp_without_gpus_is_refused_not_run_twice(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *LAUNCH,
            "--config_file",
            str(CONFIGS / "fsdp.yaml"),
            "--num_processes",
            "2",
            "-m",
            "t2tune",
            *tiny_train_args(tmp_path, copies=2),
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    # one line from each process (they may interleave on the shared stderr)
    assert proc.stderr.count("t2tune: error: accelerate launch asked for FSDP but MULTI_CPU started") == 2
    # the launcher prints its own ChildFailedError traceback; none comes from t2tune
    assert "FSDP needs GPUs; use DeepSpeed ZeRO-3 or DDP" in proc.stderr and "t2tune/" not in proc.stderr
    assert not out.exists()


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= tol, key


DS_ARGS = [
    "train.seq_len=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.lr=1e-3",
    "train.dropout=0.0",
    "train.threads=1",
    "train.warmup_steps=2",
    "train.schedule=linear",
    "checkpoint.every=2",
    "eval.every=2",
    "eval.limit=3",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
]


def _ds_run(tmp_path, out, stage, steps, *extra, kill_at=None):
    config = CONFIGS / f"deepspeed-zero{stage}.yaml"
    cmd = [
        *LAUNCH,
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "-m",
        "t2tune",
        *tiny_train_args(tmp_path, copies=4),
        f"out_dir={out}",
        f"train.steps={steps}",
        *DS_ARGS,
        *extra,
    ]
    if kill_at is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step-{kill_at}").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    # the launcher and both workers, no cleanup; torch's launcher starts each worker in a
    # session of its own, so they are found by their command line
    workers = _processes_with(f"out_dir={out}")
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while _processes_with(f"out_dir={out}") and time.time() < deadline + 30:
        time.sleep(0.05)  # gone only once the kernel has released their files (and the out_dir lock)
    return None


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_two_processes_match_one(tmp_path, stage):
    """ZeRO-3 (and ZeRO-2) on 2 CPU processes: the loss curve within 1e-4 of one process,
    validation during training, engine checkpoints, a kill -9 and re-run ending at the
    uninterrupted weights, and an export of the gathered weights that plain transformers loads."""
    pytest.importorskip("deepspeed")
    one_events = _run_plain(tmp_path, tmp_path / "one", 6)
    run = tmp_path / "ds"
    _ds_run(tmp_path, run, stage, 6, kill_at=4)
    events = _ds_run(tmp_path, run, stage, 6)
    assert [e["processes"] for e in events if e["event"] == "start"][-1] == 2
    one, two = _losses(one_events), _losses(events)
    assert [s for s, _ in two] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)
    assert [step for step, _, _ in _evals(events)] == [2, 4, 6] and _evals(events) == _evals(one_events)
    assert (run / "checkpoints" / "step-6" / "engine").is_dir()
    # the best step's weights (restored through the engine's load_state, then gathered)
    best = events[-1]["exported_step"]
    assert best == one_events[-1]["exported_step"] and (run / "checkpoints" / f"step-{best}" / "engine").is_dir()
    exported = _weights(run / "hf")
    _close(exported, _weights(run / "checkpoints" / f"step-{best}" / "model"), 0.0)  # the gathered weights
    _close(exported, _weights(tmp_path / "one" / "hf"), 1e-5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "hf")


def test_lora_under_deepspeed_zero3(tmp_path):
    """peft's LoRA trains under ZeRO-3; the merged export (merged from the gathered adapter and
    base weights) equals one process's."""
    pytest.importorskip("deepspeed")
    lora = ["train.method=lora", "lora.r=4", "lora.dropout=0.0"]
    one = _losses(_run_plain(tmp_path, tmp_path / "one", 3, *lora))
    two = _losses(_ds_run(tmp_path, tmp_path / "ds", 3, 3, *lora))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)
    _close(_weights(tmp_path / "ds" / "hf"), _weights(tmp_path / "one" / "hf"), 1e-5)


def _run_plain(tmp_path, out, steps, *extra):
    cmd = [
        sys.executable,
        "-m",
        "t2tune",
        *tiny_train_args(tmp_path, copies=4),
        f"out_dir={out}",
        f"train.steps={steps}",
        *DS_ARGS,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
