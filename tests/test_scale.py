"""GPT-J 6B's needs, checked on tiny-gptj through the same code: bf16 weights computing in
fp32, an export that leaves the model as it was, a gate without a second copy of the model,
the refusal of a run that cannot fit, and peak memory by stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line, t2tune, tiny_config
from safetensors.torch import load_file

from t2tune import guards, memory, runtime
from t2tune.config import ConfigError, EvalConfig, ModelConfig, load_config
from t2tune.errors import UserError
from t2tune.evaluation import evaluate
from t2tune.export import MergeLoss, export, lora_merged_tensors, merge_lora_weights
from t2tune.guards import gate_adapter, gate_export, last_token_logits
from t2tune.loss import LossModule
from t2tune.memory import estimate
from t2tune.models import gptj_6b_config, gptj_tokenizer, load_model, wrap_lora
from t2tune.recipe import train
from t2tune.runfolder import RunFolder
from t2tune.tasks import get_task

pytestmark = pytest.mark.slow  # trains tiny models end to end

IDS = [[50256, 1212, 318, 257, 1332, 13], [40, 588, 340]]


def _bf16_lora(compute_dtype=None):
    loaded = load_model(ModelConfig(name="tiny-gptj", dtype="bfloat16", compute_dtype=compute_dtype))
    model = wrap_lora(loaded.model, load_config(None, ["lora.r=4"]).lora, "tiny-gptj")
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: the merge changes the weights
            param.data.normal_(0, 0.5)
    return model, loaded.tokenizer


def test_bf16_lora_export_leaves_the_base_weights_bit_identical(tmp_path):
    model, tokenizer = _bf16_lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export(model, tokenizer, tmp_path / "hf")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    written = load_file(tmp_path / "hf" / "model.safetensors")
    expected = merge_lora_weights(model, after)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)
    name = "transformer.h.0.attn.q_proj.weight"
    assert written[name].dtype == torch.bfloat16
    assert not torch.equal(written[name], before["base_model.model.transformer.h.0.attn.q_proj.base_layer.weight"])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert reloaded.dtype == torch.bfloat16


def test_compute_dtype_float32_is_fp32_arithmetic_over_bf16_weights():
    wide = load_model(ModelConfig(name="tiny-gptj", dtype="bfloat16", compute_dtype="float32")).model
    plain = load_model(ModelConfig(name="tiny-gptj")).model
    plain.load_state_dict({k: v.float() for k, v in wide.state_dict().items()})  # the same rounded weights
    assert all(p.dtype == torch.bfloat16 for p in wide.parameters())
    ids = torch.tensor([IDS[0] * 4])
    with torch.no_grad():
        a, b = wide(ids).logits, plain(ids).logits
    assert a.dtype == torch.float32 and float((a - b).abs().max()) < 1e-4
    # the training loss through the fused output layer, and the gradient of a bf16 weight
    positions = torch.arange(ids.shape[1] - 1)[None]
    losses = []
    for model in (wide, plain):
        model.zero_grad()
        loss = LossModule(model)(ids[:, :-1], positions, ids[:, 1:])
        loss.backward()
        losses.append((float(loss), model.transformer.h[0].mlp.fc_in.weight.grad.float()))
    assert abs(losses[0][0] - losses[1][0]) < 1e-4 * abs(losses[1][0])
    assert wide.transformer.h[0].mlp.fc_in.weight.grad.dtype == torch.bfloat16
    assert float((losses[0][1] - losses[1][1]).norm() / losses[1][1].norm()) < 1e-2  # bf16-rounded gradient
    # label scoring builds its own attention mask: in the dtype the layers compute in
    task, tokenizer = get_task("mnli"), gptj_tokenizer()
    rows = [{"premise": "A man eats.", "hypothesis": "Someone eats.", "label": "entailment"}] * 2
    scored = [evaluate(m, tokenizer, task, rows, EvalConfig(mode="score", batch_size=2)).records for m in (wide, plain)]
    assert [r["prediction"] for r in scored[0]] == [r["prediction"] for r in scored[1]]


def test_the_gate_runs_the_export_from_disk_one_layer_at_a_time(tmp_path, monkeypatch):
    model, tokenizer = _bf16_lora("float32")
    export(model, tokenizer, tmp_path / "hf")
    reference = last_token_logits(model, IDS)
    from transformers import AutoModelForCausalLM

    def no_second_copy(*a, **k):
        raise AssertionError("the gate loaded a full second model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_second_copy)
    most = []
    real_init = guards._StreamedWeights.__init__

    def counting_init(self, skeleton, folder):
        real_init(self, skeleton, folder)

        def count(*_):
            most.append(sum(p.numel() for p in skeleton.parameters() if p.device.type != "meta"))

        self.hooks += [m.register_forward_hook(count) for m in skeleton.modules()]

    monkeypatch.setattr(guards._StreamedWeights, "__init__", counting_init)
    report = gate_export(tmp_path / "hf", reference, IDS, torch.float32)
    total = sum(p.numel() for p in model.get_base_model().parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.get_base_model().modules())
    assert report.drift < report.tolerance and report.dtype == "bfloat16"  # bf16 rounding of the merge
    assert most and max(most) <= largest < total / 2


def test_a_run_that_cannot_fit_is_refused_before_anything_loads(tmp_path, mnli_dir):
    folder = tmp_path / "gptj-6b-config-only"  # no weights, no tokenizer: the refusal must come first
    gptj_6b_config().save_pretrained(folder)
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\n")
    proc = t2tune(
        "train", config, f"model.name={folder}", "train.method=full", f"data.train={mnli_dir}", f"out_dir={out}"
    )
    line = error_line(proc, "needs about", "weights 22.5", "optimizer states 45.1", "train.method=lora")
    assert "GiB" in line and not out.exists()
    lora = load_config(
        None,
        [
            "train.method=lora",
            "model.dtype=bfloat16",
            "model.compute_dtype=float32",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
        ],
    )
    assert estimate(gptj_6b_config(), lora).total < 20 * 1024**3  # what the 6B benchmark runs fits


def test_fp32_compute_and_bf16_autocast_are_refused_together():
    with pytest.raises(ConfigError, match="train.precision: bf16 autocasts to bf16, but model.compute_dtype"):
        load_config(None, ["model.dtype=bfloat16", "model.compute_dtype=float32", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="eval.precision: bf16-checked autocasts"):
        load_config(None, ["model.compute_dtype=float32", "eval.precision=bf16-checked"])


def test_peak_memory_is_reported_by_stage(tmp_path, mnli_dir, capsys):
    train(
        tiny_config(
            tmp_path / "run",
            mnli_dir,
            **{"train.steps": 2, "model.dtype": "bfloat16", "model.compute_dtype": "float32", "train.method": "lora"},
        )
    )
    events = [json.loads(line) for line in RunFolder(tmp_path / "run").metrics.read_text().splitlines()]
    peaks = events[-1]["peak_rss_gib"]
    assert {"load", "train", "validate", "checkpoint", "export", "run"} <= peaks.keys()
    assert all(0 < v <= peaks["run"] for v in peaks.values())
    summary = capsys.readouterr().err
    line = next(line for line in summary.splitlines() if line.startswith("t2tune: peak RSS (GiB) by stage: "))
    assert all(f"{stage} {peaks[stage]:.2f}" in line for stage in ("load", "train", "validate", "export", "run"))
    # the MFU peak was measured at this run's start (train.peak_tflops unset), and the line says so
    start = events[0]
    assert start["peak_source"] == "measured at start" and start["peak_probes"]["best"] == start["peak_tflops"]
    assert f"measured at start {start['peak_measured_at'][11:16]} UTC; probes min" in summary
    assert events[-1]["gate_drift"] is not None


def test_merge_loss_measures_what_rounding_to_bf16_takes_from_the_update():
    model, _ = _bf16_lora()
    big = MergeLoss()
    [make() for _, make in lora_merged_tensors(model, loss=big).values()]
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(1e-4)  # an update below bf16's resolution at weights of ~0.02
    small = MergeLoss()
    [make() for _, make in lora_merged_tensors(model, loss=small).values()]
    assert big.share < 0.05 and 0.5 < small.share <= 1.0


def test_an_unmerged_export_is_the_adapter_checked_bit_for_bit(tmp_path, mnli_dir):
    result = train(
        tiny_config(
            tmp_path / "run", mnli_dir, **{"train.method": "lora", "train.steps": 2, "lora.r": 4, "export.merge": False}
        )
    )
    assert (result.export / "adapter_config.json").is_file() and not (result.export / "model.safetensors").exists()
    assert "bit for bit" in (result.export / "README.md").read_text()
    reloaded = load_model(ModelConfig(name=str(result.export)))
    assert hasattr(reloaded.model, "peft_config")
    expected = {k: v.clone() for k, v in load_file(result.export / "adapter_model.safetensors").items()}
    assert gate_adapter(result.export, expected).tensors == len(expected)
    key = next(iter(expected))
    expected[key][0, 0] += 1
    with pytest.raises(UserError, match=f"different \\['{key}'\\]"):
        gate_adapter(result.export, expected)


def test_a_failed_gate_after_a_lossy_merge_names_the_way_out(tmp_path, mnli_dir, monkeypatch):
    def refuse(*_args):
        raise UserError("export gate failed: the export reloaded from disk differs from the trained model")

    monkeypatch.setattr(guards, "gate_export", refuse)
    cfg = tiny_config(
        tmp_path / "run",
        mnli_dir,
        **{
            "train.method": "lora",
            "train.steps": 1,
            "lora.r": 4,
            "model.dtype": "bfloat16",
            "model.compute_dtype": "float32",
            "train.lr": 1e-7,
        },
    )
    with pytest.raises(UserError, match=r"The merge rounded away \d+% of the LoRA update .*export.merge=false"):
        train(cfg)


def _anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _freed_block_returned() -> int:
    """Bytes of resident memory a freed 1 GiB block gives back to the system (larger than any
    free space a tiny run leaves in the heap, which glibc would reuse before it maps anew)."""
    block = torch.ones(2**28)
    held = _anon_rss()
    del block
    return held - _anon_rss()


def test_trimming_hands_kept_memory_back_and_keeps_the_setting():
    """The loop's periodic trim: freed memory that the kept-heap setting holds goes back to the
    system, and freed memory is kept again afterwards (the setting stays in force)."""
    if not runtime.keep_freed_memory():
        pytest.skip("glibc's mallopt is not available here")
    block = torch.ones(2**28)
    del block
    kept = _anon_rss()
    assert runtime.trim_freed_memory()
    assert kept - _anon_rss() > 2**29
    assert _freed_block_returned() < 2**24


def test_a_run_that_needs_most_of_memory_gives_freed_memory_back(tmp_path, mnli_dir, monkeypatch, capsys):
    if not runtime.keep_freed_memory():
        pytest.skip("glibc's mallopt is not available here")
    try:
        assert _freed_block_returned() < 2**24  # kept, as the CLI sets it for speed
        train(tiny_config(tmp_path / "roomy", mnli_dir, **{"train.steps": 1}))
        assert "freed memory goes back" not in capsys.readouterr().err
        assert _freed_block_returned() < 2**24
        roomy = memory.RUNTIME_BYTES * 1.6  # tiny-gptj needs a little more than the runtime allowance
        monkeypatch.setattr(memory, "available_bytes", lambda: (roomy, "available on this machine"))
        train(tiny_config(tmp_path / "tight", mnli_dir, **{"train.steps": 1}))
        assert "freed memory goes back to the system" in capsys.readouterr().err
        assert _freed_block_returned() > 2**29
    finally:
        runtime.keep_freed_memory()


def test_qlora_trains_over_4bit_weights_and_exports_what_it_validated(tmp_path, mnli_dir):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    cfg = tiny_config(
        tmp_path / "run",
        mnli_dir,
        **{
            "train.method": "qlora",
            "train.steps": 2,
            "lora.r": 4,
            "model.dtype": "bfloat16",
            "model.compute_dtype": "float32",
        },
    )
    result = train(cfg)  # the export gate runs the written (dequantized, merged) export against it
    assert "export gate passed" in (result.export / "README.md").read_text()
    last = RunFolder(tmp_path / "run").step(2).model
    assert (last / "t2tune-nf4.json").is_file()  # the checkpoint reloads over the same 4-bit base
    reloaded = load_model(ModelConfig(name=str(last), dtype="bfloat16", compute_dtype="float32"))
    assert isinstance(reloaded.model.get_base_model().transformer.h[0].attn.q_proj.base_layer, Linear4bit)
    exported = load_file(result.export / "model.safetensors")
    assert exported["transformer.h.0.attn.q_proj.weight"].shape == (64, 64)
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert not [k for k in exported if "absmax" in k or "quant" in k]
    assert "quantization_config" not in json.loads((result.export / "config.json").read_text())
