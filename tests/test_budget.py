"""A time-budgeted run (train.steps: auto, train.max_minutes): the schedule follows the fraction
of the budget spent, the run stops within one step of the budget, and a killed and resumed run
ends at the same budget."""

import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import tiny_config, tiny_train_args

from t2tune.config import ConfigError, TrainConfig, load_config
from t2tune.training import budget_factor


def test_budget_schedule_is_a_function_of_the_fraction_spent():
    cfg = SimpleNamespace(warmup_fraction=0.2, schedule="cosine", min_lr_ratio=0.1)
    got = [round(budget_factor(f, cfg), 4) for f in (0.0, 0.1, 0.2, 0.6, 1.0)]
    assert got == [0.005, 0.5, 1.0, 0.55, 0.1]
    cfg = SimpleNamespace(warmup_fraction=0.0, schedule="constant", min_lr_ratio=0.0)
    assert [budget_factor(f, cfg) for f in (0.0, 0.7, 1.2)] == [1.0, 1.0, 1.0]


def test_auto_steps_needs_a_budget():
    with pytest.raises(ConfigError, match="train.steps: auto trains for a time budget; set train.max_minutes"):
        load_config(None, ["train.steps=auto"])


def test_warmup_is_given_one_way():
    with pytest.raises(
        ConfigError,
        match="train.warmup_steps: 5 with train.steps: auto, whose warmup is "
        "train.warmup_fraction of the budget; set one of them",
    ):
        load_config(None, ["train.steps=auto", "train.max_minutes=1", "train.warmup_steps=5"])
    with pytest.raises(ConfigError, match="train.warmup_steps: 5 with train.warmup_fraction: 0.1; set one"):
        load_config(None, ["train.steps=50", "train.warmup_steps=5", "train.warmup_fraction=0.1"])
    assert load_config(None, ["train.steps=50", "train.warmup_fraction=0.1"]).train.warmup_fraction == 0.1


def _events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_ends_at_budget(events, budget_s, lr, warmup=0.0):
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == list(range(1, len(train) + 1))
    steps = [b["train_seconds"] - a["train_seconds"] for a, b in zip([{"train_seconds": 0.0}] + train, train)]
    end = train[-1]["train_seconds"]
    assert budget_s <= end < budget_s + max(steps) + 1e-6, (end, budget_s, max(steps))  # within one step
    # decayed by the end (linear to 0): the last lr was set at most two steps before the end, so
    # at no less than that fraction of the budget (slow steps on a loaded machine end further up)
    spent = (end - 2 * max(steps)) / budget_s
    assert train[-1]["lr"] <= lr * min(1.0, 1 - (spent - warmup) / (1 - warmup)) + 1e-12, (train[-1], spent)
    return train


@pytest.mark.slow  # trains end to end against a 1.8 s clock: a busy machine gives it too few steps
def test_budgeted_run_stops_within_one_step_of_the_budget(tmp_path, mnli_dir):
    from t2tune import recipe

    cfg = tiny_config(
        tmp_path / "run",
        mnli_dir,
        **{
            "train.steps": "auto",
            "train.max_minutes": 0.03,
            "train.schedule": "linear",
            "train.warmup_fraction": 0.2,
            "checkpoint.every": 0,
        },
    )
    result = recipe.train(cfg)
    assert result.stopped == "max_minutes" and result.export is not None
    train = _check_ends_at_budget(_events(tmp_path / "run"), 1.8, cfg.train.lr, warmup=0.2)
    lrs = [e["lr"] for e in train]
    assert len(train) >= 5 and lrs.index(max(lrs)) > 0  # warmed up first


@pytest.mark.slow
def test_killed_budgeted_run_resumes_the_same_budget(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "t2tune",
        *tiny_train_args(tmp_path, copies=4),
        f"out_dir={out}",
        "train.steps=auto",
        "train.max_minutes=0.05",
        "train.schedule=linear",
        "train.seq_len=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.threads=1",
        "checkpoint.every=2",
        "eval.limit=1",
        "eval.max_new_tokens=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-4").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = _events(out)
    assert [e["resumed"] for e in events if e["event"] == "start"][-1] is True
    _check_ends_at_budget(events, 3.0, TrainConfig().lr)
