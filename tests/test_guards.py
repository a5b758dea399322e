"""The packing self-test and the export gate: each passes on sound runs and fails on a planted fault."""

import pytest
from conftest import MNLI_ROWS, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from t2tune import export
from t2tune.checkpoint import save_hf
from t2tune.errors import ConfigError, UserError
from t2tune.guards import gate_export, last_token_logits, packing_drift
from t2tune.packing import pack
from t2tune.recipe import train
from t2tune.runfolder import RunFolder
from t2tune.tasks import get_task
from t2tune.tokenize import encode_for_training


def _ignores_restarts(module, query, key, value, attention_mask, **kwargs):
    """An attention that drops the mask: every token sees all earlier tokens of its row."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


AttentionInterface.register("ignores_restarts", _ignores_restarts)


def test_packing_drift_is_tiny_for_real_attention_and_large_for_a_leak(tiny):
    examples, _ = encode_for_training(get_task("mnli"), MNLI_ROWS * 2, tiny.tokenizer, 128, False)
    rows = pack(examples, "isolated", 128, "target", tiny.tokenizer.pad_token_id)
    assert packing_drift(tiny.model, rows, "fp32") < 1e-4
    tiny.model.set_attn_implementation("ignores_restarts")
    try:
        assert packing_drift(tiny.model, rows, "fp32") > 1e-3
    finally:
        tiny.model.set_attn_implementation("sdpa")


def test_a_leaking_attention_stops_an_isolated_run(tmp_path, mnli_dir):
    values = {"train.packing": "isolated", "model.attn_implementation": "ignores_restarts"}
    with pytest.raises(
        ConfigError,
        match="leaks across examples with attention implementation 'ignores_restarts'"
        ".*model.attn_implementation=sdpa.*train.packing=none",
    ):
        train(tiny_config(tmp_path / "leak", mnli_dir, **values))
    assert not RunFolder(tmp_path / "leak").checkpoints()
    skipped = train(
        tiny_config(tmp_path / "skip", mnli_dir, **values, **{"train.packing_check": False, "train.steps": 1})
    )
    assert skipped.state.optimizer_step == 1


def test_the_export_gate_passes_and_catches_a_changed_weight(tiny, tmp_path):
    ids = [[10, 20, 30], [40, 50, 60, 70]]
    save_hf(tiny.model, tiny.tokenizer, tmp_path / "good")
    reference = last_token_logits(tiny.model, ids)
    report = gate_export(tmp_path / "good", reference, ids)
    assert report.drift < 1e-6 and "passed" in report.line()
    weights = load_file(tmp_path / "good" / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.fc_in.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, tmp_path / "good" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="export gate failed"):
        gate_export(tmp_path / "good", reference, ids)


def test_a_failed_gate_writes_no_export_and_keeps_the_checkpoints(tmp_path, mnli_dir, monkeypatch):
    real = export.write_safetensors

    def corrupting(folder, tensors, **kw):
        like, make = tensors["lm_head.weight"]
        tensors["lm_head.weight"] = (like, lambda: make() + 0.5)  # a merge or cast that silently changed the weights
        return real(folder, tensors, **kw)

    monkeypatch.setattr(export, "write_safetensors", corrupting)
    with pytest.raises(UserError, match="export gate failed.*the checkpoints are kept"):
        train(tiny_config(tmp_path / "run", mnli_dir, **{"train.steps": 2, "checkpoint.every": 0}))
    folder = RunFolder(tmp_path / "run")
    assert not folder.export.exists() and [n for n, _ in folder.checkpoints()] == [2]
    assert not [p for p in folder.root.iterdir() if p.name.startswith(".hf")]  # no temporary folder left


def test_gate_compares_a_lora_merge(tmp_path, mnli_dir):
    result = train(
        tiny_config(
            tmp_path / "lora", mnli_dir, **{"train.method": "lora", "train.steps": 2, "lora.r": 4, "train.lr": 1e-2}
        )
    )
    card = (result.export / "README.md").read_text()
    assert "export gate passed" in card and "float32" in card
