"""train.ema: the moving average of the weights is validated, checkpointed, resumed exactly and
exported in place of the raw weights; the raw weights train on untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from t2tune import validation
from t2tune.api import Trainer
from t2tune.averaging import WeightAverage, decay_at
from t2tune.checkpoint import read_average
from t2tune.data import load_examples
from t2tune.models import load_model
from t2tune.runfolder import RunFolder
from t2tune.tasks import get_task

pytestmark = pytest.mark.slow  # trains tiny models end to end

DECAY = 0.5  # large steps of the average, so that it is far from the raw weights after 3 steps


def _train(cfg, data, loaded=None):
    loaded = loaded or load_model(cfg.model)
    task = get_task(cfg.task)
    trainer = Trainer(
        cfg,
        loaded.model,
        load_examples(task, str(data), "train"),
        load_examples(task, str(data), "validation"),
        cfg.eval,
        loaded.tokenizer,
        task=task,
    )
    trainer.train()
    return trainer


def _weights(folder) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_the_average_is_exported_and_the_raw_weights_train_untouched(tmp_path, mnli_dir):
    """Full fine-tune: hf/ holds the average computed by hand from the initial weights and each
    step's checkpointed raw weights; validating the average at every step leaves the raw
    weights bit for bit as a run that never validates."""
    same = {"train.ema": DECAY, "export.from": "last", "checkpoint.every": 1, "checkpoint.keep": 3}
    loaded = load_model(tiny_config(tmp_path, mnli_dir).model)
    initial = {k: v.detach().clone() for k, v in loaded.model.named_parameters()}
    _train(tiny_config(tmp_path / "a", mnli_dir, **same, **{"eval.every": 1}), mnli_dir, loaded)
    _train(tiny_config(tmp_path / "b", mnli_dir, **same, **{"eval.every": 0, "eval.limit": 1}), mnli_dir)

    a, b = RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")
    expected = {k: v.float() for k, v in initial.items()}
    for step, folder in a.checkpoints():
        raw = _weights(folder.model)
        assert all(torch.equal(raw[k], v) for k, v in _weights(b.step(step).model).items()), step
        for name in expected:
            if name in raw:
                expected[name] = torch.lerp(expected[name], raw[name].float(), 1 - decay_at(step, DECAY))
    exported = _weights(a.export)
    last_raw = _weights(a.step(3).model)
    moved = max((exported[k] - last_raw[k]).abs().max().item() for k in exported)
    assert moved > 1e-4  # the export is not the raw weights
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_validation_measures_the_average(tmp_path, mnli_dir, monkeypatch):
    seen = []
    real = validation.evaluate

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(validation, "evaluate", spy)
    trainer = _train(
        tiny_config(
            tmp_path / "run", mnli_dir, **{"train.ema": DECAY, "train.steps": 2, "eval.every": 1, "export.from": "last"}
        ),
        mnli_dir,
    )
    averages = read_average(RunFolder(tmp_path / "run").step(2))
    assert len(seen) == 2
    for name, value in averages.items():
        assert torch.equal(seen[-1][name], value), name
    assert trainer.last_eval["step"] == 2


def test_lora_average_resumes_exactly_and_is_the_exported_adapter(tmp_path, mnli_dir):
    """LoRA: only the adapter is averaged; 3 steps straight = 2 steps + resume, bit for bit, and
    the unmerged export is the averaged adapter."""
    same = {"train.method": "lora", "lora.r": 4, "train.ema": DECAY, "export.from": "last", "export.merge": False}
    straight = _train(tiny_config(tmp_path / "a", mnli_dir, **{"train.steps": 3}, **same), mnli_dir)
    _train(tiny_config(tmp_path / "b", mnli_dir, **{"train.steps": 2}, **same), mnli_dir)
    resumed = _train(tiny_config(tmp_path / "b", mnli_dir, **{"train.steps": 3}, **same), mnli_dir)
    averages = read_average(RunFolder(tmp_path / "a").step(3))
    assert averages and all("lora_" in name for name in averages)
    assert averages.keys() == read_average(RunFolder(tmp_path / "b").step(3)).keys()
    for name, value in read_average(RunFolder(tmp_path / "b").step(3)).items():
        assert torch.equal(averages[name], value), name
    for (name, x), (_, y) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(x, y), name
    adapter = _weights(tmp_path / "a" / "hf")
    assert len(adapter) == len(averages)
    for name, value in averages.items():
        key = name.replace(".default", "")
        assert torch.equal(adapter[key], value.to(adapter[key].dtype)), name


def test_the_average_keeps_bf16_weights_exact_around_validation():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    average = WeightAverage(model, 0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(0.37)
    average.update(1)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with average.applied():
        assert not torch.equal(model.weight, raw["weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name
    assert average.average["weight"].dtype == torch.float32
    expected = torch.lerp(before["weight"].float(), raw["weight"].float(), 1 - decay_at(1, 0.9))
    assert torch.equal(average.average["weight"], expected)


@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_ema_out_of_range_is_one_config_error(value):
    from t2tune.config import load_config
    from t2tune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.ema: must be in \[0, 1\)"):
        load_config(None, [f"train.ema={value}"])


def _spy_on_evaluate(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The weights each ``t2tune evaluate`` call measures."""
    from t2tune import evaluation

    seen, real = [], evaluation.evaluate

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    return seen


def test_a_checkpoint_is_exported_and_evaluated_as_its_run_validated_it(tmp_path, mnli_dir, monkeypatch, capsys):
    """A checkpoint's model/ holds the raw weights; `t2tune export` and `t2tune evaluate` of the
    step use its averages, as the run's own validation and export do (they used the raw weights,
    under a model card showing the average's validation)."""
    from t2tune.cli import main

    _train(tiny_config(tmp_path / "run", mnli_dir, **{"train.ema": DECAY, "eval.every": 1}), mnli_dir)
    step = RunFolder(tmp_path / "run").step(2)  # not the last step: no run export holds it
    averages = read_average(step)
    raw = _weights(step.model)
    assert max((averages[k] - raw[k].float()).abs().max().item() for k in averages) > 1e-4

    assert main(["export", str(step.path), "--out", str(tmp_path / "x")]) == 0
    exported = _weights(tmp_path / "x")
    for name, value in averages.items():
        assert torch.equal(exported[name], value.to(exported[name].dtype)), name
    assert "moving average (train.ema)" in (tmp_path / "x" / "README.md").read_text()

    seen = _spy_on_evaluate(monkeypatch)
    capsys.readouterr()
    args = ["--task", "mnli", "--data", str(mnli_dir), "--limit", "2"]
    assert main(["evaluate", str(step.path), *args]) == 0
    assert "evaluating the step's moving average" in capsys.readouterr().err
    assert main(["evaluate", str(step.model), *args]) == 0  # the HF folder inside: its own weights
    assert "moving average" not in capsys.readouterr().err
    for name, value in averages.items():
        assert torch.equal(seen[0][name], value.to(seen[0][name].dtype)), name
        assert torch.equal(seen[1][name], raw[name]), name


def test_a_lora_checkpoint_exports_its_averaged_adapter(tmp_path, mnli_dir):
    from t2tune.cli import main

    same = {"train.method": "lora", "lora.r": 4, "train.ema": DECAY}
    _train(tiny_config(tmp_path / "run", mnli_dir, **same), mnli_dir)
    step = RunFolder(tmp_path / "run").step(2)
    assert main(["export", str(step.path), "--out", str(tmp_path / "x"), "--adapter-only"]) == 0
    adapter, averages = _weights(tmp_path / "x"), read_average(step)
    assert averages and len(adapter) == len(averages)
    for name, value in averages.items():
        key = name.replace(".default", "")
        assert torch.equal(adapter[key], value.to(adapter[key].dtype)), name
