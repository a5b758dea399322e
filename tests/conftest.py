"""Shared fixtures: tiny models built from configs, the real tokenizers from local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from t2tune.config import ModelConfig, build_config
from t2tune.models import load_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

MNLI_ROWS = [
    {"premise": "A man is playing a guitar on stage.", "hypothesis": "A man is performing music.",
     "label": "entailment"},
    {"premise": "Two dogs run through a field.", "hypothesis": "The dogs are asleep.", "label": "contradiction"},
    {"premise": "A woman reads a book in the park.", "hypothesis": "The woman is a teacher.", "label": "neutral"},
    {"premise": "Children are building a sandcastle.", "hypothesis": "Kids are at the beach.", "label": "neutral"},
    {"premise": "The chef is cooking pasta.", "hypothesis": "Someone is preparing food.", "label": "entailment"},
    {"premise": "A cat sleeps on the sofa.", "hypothesis": "The cat is chasing a mouse.", "label": "contradiction"},
]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    return load_model(ModelConfig(name="tiny-gptj"))


@pytest.fixture(scope="session")
def smollm():
    return load_model(ModelConfig(name="smollm2-135m"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def mnli_dir(tmp_path):
    folder = tmp_path / "mnli"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", MNLI_ROWS * 4)
    write_jsonl(folder / "validation.jsonl", MNLI_ROWS)
    return folder


def tiny_config(out_dir: Path, data: Path, **overrides) -> object:
    values = {"task": "mnli", "out_dir": str(out_dir), "model.name": "tiny-gptj", "data.train": str(data),
              "data.validation": str(data), "train.steps": 3, "train.seq_len": 64, "train.micro_batch_size": 2,
              "train.global_batch_size": 4, "train.lr": 1e-3, "train.precision": "fp32",
              "train.dropout": 0.0, "checkpoint.every": 1, "checkpoint.keep": 3, "eval.limit": 4,
              "eval.max_new_tokens": 3, "eval.batch_size": 4}
    values.update(overrides)
    return build_config(values)


def tiny_train_args(tmp_path: Path, copies: int) -> list[str]:
    """`train CONFIG data.train=... data.validation=...` for a tiny-gptj MNLI run in a subprocess."""
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        write_jsonl(data / "train.jsonl", MNLI_ROWS * copies)
        write_jsonl(data / "validation.jsonl", MNLI_ROWS[:2])
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    return ["train", str(config), f"data.train={data}", f"data.validation={data}"]
