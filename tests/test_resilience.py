"""Crash safety: real `kill -9` of a training process at random moments (also inside a checkpoint
write), then the same command resumes and ends with the same weights as an uninterrupted run."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_args
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
STEPS = 10


def _command(tmp_path: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "t2tune",
        *tiny_train_args(tmp_path, copies=6),
        f"out_dir={out}",
        f"train.steps={STEPS}",
        "train.seq_len=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.lr=1e-3",
        "train.dropout=0.1",
        "train.threads=1",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "eval.limit=2",
        "eval.max_new_tokens=2",
    ]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "hf" / "model.safetensors")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "out"
    subprocess.run(_command(tmp, out), check=True, capture_output=True)
    return _weights(out)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.kill()  # SIGKILL
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


@pytest.mark.parametrize("trial", ["random-1", "random-2", "during-checkpoint-write"])
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, reference, trial):
    out = tmp_path / "out"
    cmd = _command(tmp_path, out)
    ckpts = out / "checkpoints"
    if trial.startswith("random"):
        rng = random.Random(trial)
        target = rng.randint(1, STEPS - 2)

        def ready():
            return (ckpts / f"step-{target}").is_dir() and time.sleep(rng.random() * 0.05) is None
    else:

        def ready():
            return ckpts.is_dir() and any(p.name.startswith(".step-") for p in ckpts.iterdir())

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = _kill_when(proc, ready)
    assert killed, "the run finished before it could be killed"
    assert not (out / "hf").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same(_weights(out), reference)
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert steps == list(range(1, STEPS + 1))
    assert len(list(ckpts.glob("step-*"))) == 2 and not list(ckpts.glob(".step-*"))


def test_sigterm_writes_checkpoint_and_exits(tmp_path, reference):
    out = tmp_path / "out"
    cmd = _command(tmp_path, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-2").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "checkpoint written" in err
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and (out / "checkpoints" / f"step-{stopped[0]['step']}").is_dir()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    _assert_same(_weights(out), reference)


def test_rotation_killed_while_deleting_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """The CI failure of 2026-11-28: a kill inside rotation's delete left ``step-4`` without its
    ``state.json``; it was then neither a checkpoint nor ever rotated."""
    import shutil

    from t2tune import checkpoint

    root = tmp_path / "checkpoints"
    for step in (4, 6, 7):
        (root / f"step-{step}" / "model").mkdir(parents=True)
        (root / f"step-{step}" / "model" / "w.bin").write_bytes(b"x")
        (root / f"step-{step}" / "state.json").write_text("{}")
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "state.json").unlink()  # deleted first, then the "kill"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.RunFolder(tmp_path).rotate(keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-6", "step-7"]
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.RunFolder(tmp_path).rotate(keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-6", "step-7"]
