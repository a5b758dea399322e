"""Best checkpoint, export.from and early stopping, driven by a scripted validation metric."""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from t2tune.errors import ConfigError
from t2tune.recipe import train
from t2tune.runfolder import RunFolder

pytestmark = pytest.mark.slow  # trains tiny models end to end


def scripted(*accuracies):
    """A metric that reports the given accuracies, one per validation."""
    values = iter(accuracies)
    return lambda predictions, references: {"accuracy": next(values)}


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_survives_rotation_and_is_exported(tmp_path, mnli_dir):
    cfg = tiny_config(
        tmp_path / "run", mnli_dir, **{"train.steps": 4, "eval.every": 1, "checkpoint.every": 1, "checkpoint.keep": 1}
    )
    result = train(cfg, metric=scripted(0.5, 0.9, 0.6, 0.7))
    folder = RunFolder(tmp_path / "run")
    assert [n for n, _ in folder.checkpoints()] == [2, 4]  # the newest, and the best
    assert result.state.best["step"] == 2 and result.state.best["accuracy"] == 0.9
    assert _same(_weights(folder.export), _weights(folder.step(2).model))
    assert not _same(_weights(folder.export), _weights(folder.step(4).model))
    card = (folder.export / "README.md").read_text()
    assert "step 2 of 4, the best validation accuracy (0.9000" in card and "export gate passed" in card
    end = [json.loads(line) for line in folder.metrics.read_text().splitlines()][-1]
    assert end["event"] == "end" and end["exported_step"] == 2


def test_resume_keeps_the_best(tmp_path, mnli_dir):
    values = {"eval.every": 1, "checkpoint.every": 1, "checkpoint.keep": 1}
    train(tiny_config(tmp_path / "run", mnli_dir, **{"train.steps": 3}, **values), metric=scripted(0.5, 0.9, 0.6))
    result = train(tiny_config(tmp_path / "run", mnli_dir, **{"train.steps": 5}, **values), metric=scripted(0.7, 0.8))
    folder = RunFolder(tmp_path / "run")
    assert result.state.optimizer_step == 5 and result.state.best["step"] == 2 and result.state.stale == 3
    assert [n for n, _ in folder.checkpoints()] == [2, 5]
    assert _same(_weights(folder.export), _weights(folder.step(2).model))


def test_early_stopping_stops_after_patience(tmp_path, mnli_dir):
    cfg = tiny_config(
        tmp_path / "run", mnli_dir, **{"train.steps": 10, "eval.every": 1, "eval.patience": 2, "checkpoint.every": 0}
    )
    result = train(cfg, metric=scripted(0.5, 0.6, 0.6, 0.55, 0.9, 0.9))
    assert result.stopped == "patience" and result.state.optimizer_step == 4  # a tie is no improvement
    folder = RunFolder(tmp_path / "run")
    assert [n for n, _ in folder.checkpoints()] == [1, 2, 4]  # each new best, and the end
    assert _same(_weights(folder.export), _weights(folder.step(2).model))


def test_export_from_last_and_a_lower_is_better_metric(tmp_path, mnli_dir):
    cfg = tiny_config(
        tmp_path / "run",
        mnli_dir,
        **{"train.steps": 3, "eval.every": 1, "eval.metric": "invalid", "export.from": "last"},
    )
    invalid = iter([3, 1, 2])
    result = train(cfg, metric=lambda p, r: {"accuracy": 0.0, "invalid": next(invalid)})
    assert result.state.best["step"] == 2  # invalid: fewer is better
    folder = RunFolder(tmp_path / "run")
    assert _same(_weights(folder.export), _weights(folder.step(3).model))


def test_unknown_eval_metric_is_one_line(tmp_path, mnli_dir):
    with pytest.raises(
        ConfigError,
        match=r"eval.metric: 'f1' is not reported by this run's validation "
        r"\(mnli in generate mode\)",
    ):
        train(tiny_config(tmp_path / "run", mnli_dir, **{"eval.metric": "f1"}))
