"""Task mixtures: the mixing rule, exact resume of a mixed run, per-task validation."""

import json

import pytest
import torch
from conftest import MNLI_ROWS, write_jsonl

from t2tune.config import build_config
from t2tune.errors import ConfigError, UserError
from t2tune.mixture import epoch_counts, epoch_mix, epoch_size, mixing_rates
from t2tune.recipe import train
from t2tune.runfolder import RunFolder

pytestmark = pytest.mark.slow  # trains tiny models end to end

SST2_ROWS = [
    {"sentence": "a gorgeous, witty film", "label": "positive"},
    {"sentence": "dull and lifeless", "label": "negative"},
    {"sentence": "one of the year's best", "label": "positive"},
]


def test_rates_follow_t5s_rule_cap_and_temperature():
    sizes = {"mnli": 14694, "rte": 2490, "sst2": 67349}
    plain = mixing_rates(sizes)
    assert plain["sst2"] == pytest.approx(67349 / 84533) and sum(plain.values()) == pytest.approx(1)
    capped = mixing_rates(sizes, cap=10_000)  # min(n, K): 10000, 2490, 10000
    assert capped == pytest.approx({"mnli": 10000 / 22490, "rte": 2490 / 22490, "sst2": 10000 / 22490})
    hot = mixing_rates(sizes, "temperature", cap=10_000, temperature=2)  # sqrt: 100, 49.9, 100
    assert hot["rte"] == pytest.approx(2490**0.5 / (2 * 100 + 2490**0.5))
    assert mixing_rates(sizes, "temperature", temperature=1) == pytest.approx(plain)
    assert mixing_rates(sizes, "weights", weights={"mnli": 2, "rte": 1, "sst2": 1})["mnli"] == 0.5
    size = epoch_size(sizes, cap=10_000)
    counts = epoch_counts(capped, size)
    assert size == 22490 and counts == {"mnli": 10000, "rte": 2490, "sst2": 10000}
    assert sum(epoch_counts(hot, size).values()) == size


def test_each_epoch_draws_the_counts_and_continues_each_tasks_stream():
    a, b = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(2)]
    first, second = epoch_mix([a, b], [3, 3], 1, 0), epoch_mix([a, b], [3, 3], 1, 1)
    assert sum(x.startswith("a") for x in first) == 3 and sum(x.startswith("b") for x in first) == 3
    in_first = {x for x in first if x.startswith("a")}
    # epoch 1 continues a's shuffle: the two not drawn yet, then the first of a new shuffle
    assert len(in_first) == 3 and in_first | {x for x in second if x.startswith("a")} == set(a)
    assert epoch_mix([a, b], [3, 3], 1, 1) == second  # a pure function of (seed, epoch)


@pytest.fixture
def glue2(tmp_path):
    for name, rows in (("mnli", MNLI_ROWS), ("sst2", SST2_ROWS)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "train.jsonl", rows * 3)
        write_jsonl(tmp_path / name / "validation.jsonl", rows[:3])
    return tmp_path


def _mixed(out, data, **overrides):
    values = {
        "out_dir": str(out),
        "model.name": "tiny-gptj",
        "tasks.mnli.train": str(data / "mnli"),
        "tasks.sst2.train": str(data / "sst2"),
        "mix.rule": "temperature",
        "mix.temperature": 2.0,
        "train.steps": 4,
        "train.seq_len": 64,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.lr": 1e-3,
        "train.dropout": 0.0,
        "train.packing": "isolated",
        "checkpoint.every": 2,
        "eval.every": 2,
        "eval.max_new_tokens": 3,
        "eval.batch_size": 4,
        "export.from": "last",
    }
    values.update(overrides)
    return build_config(values)


def _events(out):
    return [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]


def test_a_mixture_resumes_exactly_and_validates_per_task(tmp_path, glue2):
    straight = train(_mixed(tmp_path / "a", glue2))
    train(_mixed(tmp_path / "b", glue2, **{"train.steps": 2}))
    resumed = train(_mixed(tmp_path / "b", glue2))
    assert straight.state.epoch >= 1  # the mixed order crossed an epoch, which is packed anew
    a, b = _events(tmp_path / "a"), _events(tmp_path / "b")
    losses = lambda events: [(e["step"], e["loss"]) for e in events if e["event"] == "train"]  # noqa: E731
    assert losses(a) == losses(b)
    assert (straight.state.epoch, straight.state.row_in_epoch) == (resumed.state.epoch, resumed.state.row_in_epoch)
    from safetensors.torch import load_file

    one, two = (load_file(tmp_path / run / "hf" / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    start = a[0]
    assert start["mix"]["mnli"]["examples"] == 18 and start["mix"]["sst2"]["examples"] == 9
    assert start["mix"]["mnli"]["per_epoch"] + start["mix"]["sst2"]["per_epoch"] == 27
    evals = [e for e in a if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert {"mnli/accuracy", "sst2/accuracy", "sst2/f1", "mean"} <= set(e)
        assert e["mean"] == pytest.approx((e["mnli/accuracy"] + e["sst2/accuracy"]) / 2)
        assert e["tasks"]["mnli"]["n"] == 3 and e["tasks"]["sst2"]["mode"] == "generate"
    assert (tmp_path / "a" / "plots" / "sst2-confusion.png").is_file()
    assert straight.state.best["step"] in (2, 4) and "mean" in straight.state.best
    card = (tmp_path / "a" / "hf" / "README.md").read_text()
    assert "# mnli + sst2 fine-tune of tiny-gptj" in card and "sst2 sentence: <sentence> target:" in card


def test_mixture_config_errors_name_the_task_and_key(tmp_path, glue2):
    with pytest.raises(UserError, match="tasks.nope: .*nope"):
        train(_mixed(tmp_path / "x", glue2, **{"tasks.nope.train": str(glue2 / "mnli")}))
    with pytest.raises(ConfigError, match="data.train: a multi-task run takes its data from tasks.<name>.train"):
        _mixed(tmp_path / "x", glue2, **{"data.train": str(glue2)})
    with pytest.raises(ConfigError, match="tasks.sst2.weight: weights apply under mix.rule: weights"):
        _mixed(tmp_path / "x", glue2, **{"tasks.sst2.weight": 2})
    with pytest.raises(ConfigError, match="tasks.mnli.mode: must be one of generate, score"):
        _mixed(tmp_path / "x", glue2, **{"tasks.mnli.mode": "vote"})
