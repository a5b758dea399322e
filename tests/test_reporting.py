"""What a run reports besides its model: tracker copies of metrics.jsonl (TensorBoard read back
with its own reader), speed figures, and calibration in score mode."""

import json
import math

import pytest
import torch
from conftest import MNLI_ROWS, tiny_config

from t2tune import speed
from t2tune.config import ModelConfig
from t2tune.errors import UserError
from t2tune.evaluation import evaluate
from t2tune.models import load_model
from t2tune.recipe import train
from t2tune.report import plot_reliability
from t2tune.runfolder import RunFolder
from t2tune.speed import Peak, machine, matmul_parameters, model_flops, peak_tflops
from t2tune.tasks import get_task


def _events(folder):
    return [json.loads(line) for line in RunFolder(folder).metrics.read_text().splitlines()]


def test_tensorboard_holds_the_losses_and_the_eval_accuracy(tmp_path, mnli_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path / "run", mnli_dir, **{"train.steps": 3, "eval.every": 2, "log.to": ["tensorboard"]})
    train(cfg)
    logs = RunFolder(tmp_path / "run").trackers / "run"
    reader = EventAccumulator(str(logs), size_guidance={"images": 0})
    reader.Reload()
    events = _events(tmp_path / "run")
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert [round(s.value, 5) for s in reader.Scalars("train/loss")] == [round(x, 5) for x in losses]
    assert [s.step for s in reader.Scalars("eval/accuracy")] == [2, 3]
    assert [s.value for s in reader.Scalars("eval/accuracy")] == pytest.approx(
        [e["accuracy"] for e in events if e["event"] == "eval"]
    )
    assert "eval/confusion" in reader.Tags()["images"]


def test_a_missing_tracker_package_is_one_line(tmp_path, mnli_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"log.to: wandb needs the wandb package: pip install 't2tune\[wandb\]'"):
        train(tiny_config(tmp_path / "run", mnli_dir, **{"log.to": ["wandb"]}))
    assert not (tmp_path / "run").exists()


def test_speed_figures_in_metrics_jsonl(tmp_path, mnli_dir):
    cfg = tiny_config(
        tmp_path / "run", mnli_dir, **{"train.steps": 2, "train.packing": "isolated", "train.peak_tflops": 0.5}
    )
    train(cfg)
    events = _events(tmp_path / "run")
    start, end = events[0], events[-1]
    assert start["peak_tflops"] == 0.5 and start["peak_source"] == "train.peak_tflops"
    assert end["peak_tflops"] == 0.5 and start["peak_probes"] == {} and start["peak_measured_at"] is None
    assert 0 < start["packing_efficiency"] <= 1 and start["packing_check"]["drift"] < 1e-3
    assert all(e["mfu"] > 0 for e in events if e["event"] == "train")
    assert end["event"] == "end" and 0 < end["validation_share"] < 1 and end["mfu"] > 0
    assert end["wall_seconds"] >= end["train_seconds"] + end["eval_seconds"] * 0.99


def test_model_flops_count_matmul_parameters(tiny):
    model = tiny.model
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    bias = model.get_output_embeddings().bias.numel()
    assert matmul_parameters(model) == (total - embedding - head, 0, head)  # its bias counts with the decoder
    flops = model_flops(model, 100)  # 2 layers of width 64, 100 tokens: 12 · 2 · 64 · 100 attention FLOPs
    assert flops.per_token == 6 * (total - embedding - head) + 12 * 2 * 64 * 100 and flops.per_label == 6 * head
    assert flops.of(10, 2) == 10 * flops.per_token + 2 * 6 * head and bias == 50400
    smol = load_model(ModelConfig(name="smollm2-135m")).model
    trained, frozen, tied = matmul_parameters(smol)  # tied: the output matmul counts, the lookup does not
    assert frozen == 0 and trained + tied == sum(p.numel() for p in smol.parameters()) and tied == 49152 * 576


def test_the_peak_is_measured_at_each_start_and_the_cache_is_only_a_labelled_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("T2TUNE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    (tmp_path / "peak_tflops.json").write_text(json.dumps({machine(cpu, torch.float32): 999.0}))
    peak = peak_tflops(cpu, torch.float32)  # a stale (or busy-day) figure in the cache is not used
    assert peak.source == "measured at start" and 0 < peak.tflops < 999 and peak.tflops == max(peak.probes)
    assert len(peak.probes) >= 5 and peak.spread["min"] <= peak.spread["median"] <= peak.spread["best"]
    assert peak.describe().startswith(f"measured at start {peak.measured_at[11:16]} UTC; probes min ")
    monkeypatch.setattr(speed, "measure_peak_probes", lambda *a: (_ for _ in ()).throw(RuntimeError("no bf16")))
    fallback = peak_tflops(cpu, torch.float32)
    assert (fallback.tflops, fallback.source) == (round(peak.tflops, 4), f"cached, measured {peak.measured_at}")
    (tmp_path / "peak_tflops.json").unlink()
    assert peak_tflops(cpu, torch.float32).tflops == 0.0  # no figure at all: MFU is not claimed
    assert peak_tflops(cpu, torch.float32, given=3.0) == Peak(3.0, "train.peak_tflops")


def test_score_mode_reports_probabilities_and_calibration(tiny, tmp_path):
    rows = MNLI_ROWS * 3
    result = evaluate(tiny.model, tiny.tokenizer, get_task("mnli"), rows, mode="score", batch_size=4)
    for record in result.records:
        probabilities = record["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert max(probabilities, key=probabilities.get) == record["prediction"]
    bins: dict = {}  # 15 bins (k/15, (k+1)/15]: per bin, (confidence, correct) pairs
    for record in result.records:
        confidence = max(record["probabilities"].values())
        k = min(14, max(0, math.ceil(confidence * 15) - 1))
        bins.setdefault(k, []).append((confidence, record["prediction"] == record["label"]))
    expected = sum(abs(sum(c for c, _ in pairs) - sum(ok for _, ok in pairs)) for pairs in bins.values()) / len(rows)
    assert result.metrics["ece"] == pytest.approx(expected)
    assert sum(result.metrics["calibration"]["count"]) == len(rows)
    assert plot_reliability(result.metrics, tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
