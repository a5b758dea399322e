import pytest

from t2tune.config import ConfigError, build_config, load_config, parse_override


def test_overrides_parse_yaml_scalars():
    assert parse_override("train.lr=1e-4") == ("train.lr", "1e-4")  # coerced by the schema below
    assert parse_override("eval.limit=null") == ("eval.limit", None)
    assert parse_override("train.betas=[0.9, 0.95]") == ("train.betas", [0.9, 0.95])


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: rte\ntrain:\n  lr: 1e-4\n  steps: 5\n")
    cfg = load_config(path, ["train.steps=7", "model.name=tiny-gptj"])
    assert cfg.task == "rte" and cfg.train.lr == 1e-4 and cfg.train.steps == 7
    assert cfg.model.name == "tiny-gptj"


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 5\n  lr: fast\n  packing: zip\nfoo: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["eval.batch_size=many"])
    msg = str(err.value)
    for key in (
        "train.stepz: unknown key",
        "train.lr: expected float",
        "foo: unknown key",
        "eval.batch_size: expected int",
        "train.packing: must be one of",
    ):
        assert key in msg, msg


def test_value_checks():
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["train.steps=0", "train.global_batch_size=6", "train.micro_batch_size=4", "train.packing=zip"]
        )
    msg = str(err.value)
    assert "train.steps: must be > 0" in msg
    assert "train.global_batch_size: 6 is not a multiple" in msg
    assert "train.packing: must be one of" in msg


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_precision_split_old_value_names_new_home():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.precision=bf16-weights"])
    assert "train.precision: 'bf16-weights' was split" in str(err.value) and "model.dtype=bfloat16" in str(err.value)
    cfg = load_config(None, ["eval.precision=bf16-checked"])
    assert cfg.eval.precision == "bf16-checked"


def test_the_derived_tables_keep_every_key_as_declared_before():
    """CHOICES, RANGES and RESUME_SAFE are made from the fields' declarations now; they hold
    what the hand-written tables held (train.ema's range is new)."""
    from t2tune.config import CHOICES, RANGES, RESUME_SAFE

    assert CHOICES == {
        "model.dtype": {"float32", "bfloat16", "float16"},
        "model.compute_dtype": {"float32"},
        "train.schedule": {"constant", "linear", "cosine"},
        "train.precision": {"fp32", "bf16"},
        "eval.precision": {"fp32", "bf16", "bf16-checked"},
        "eval.entity_parsing": {"lenient", "strict"},
        "train.loss_on": {"all", "target"},
        "train.packing": {"concat", "isolated", "none"},
        "train.method": {"full", "lora", "qlora"},
        "eval.mode": {"generate", "score"},
        "checkpoint.format": {"auto", "hf", "accelerate"},
        "export.from": {"best", "last"},
        "mix.rule": {"proportional", "temperature", "weights"},
    }
    pos, nonneg, fraction, prob = "> 0", ">= 0", "in [0, 1]", "in [0, 1)"
    assert RANGES == {
        "train.steps": pos,
        "train.seq_len": pos,
        "train.micro_batch_size": pos,
        "train.global_batch_size": pos,
        "train.lr": pos,
        "train.eps": pos,
        "train.weight_decay": nonneg,
        "train.warmup_steps": nonneg,
        "train.min_lr_ratio": fraction,
        "train.warmup_fraction": prob,
        "train.dropout": prob,
        "train.grad_clip": pos,
        "train.seed": "in [0, 2**32)",
        "train.ema": prob,
        "train.log_every": pos,
        "train.threads": pos,
        "train.max_minutes": pos,
        "lora.r": pos,
        "lora.alpha": pos,
        "lora.dropout": prob,
        "checkpoint.every": nonneg,
        "checkpoint.keep": pos,
        "eval.every": nonneg,
        "eval.max_new_tokens": pos,
        "eval.batch_size": pos,
        "eval.seq_len": pos,
        "eval.limit": pos,
        "eval.patience": nonneg,
        "train.peak_tflops": pos,
        "mix.cap": pos,
        "mix.temperature": pos,
    }
    assert RESUME_SAFE == {
        "out_dir",
        "train.steps",
        "checkpoint.every",
        "checkpoint.keep",
        "eval.every",
        "eval.limit",
        "eval.batch_size",
        "eval.max_new_tokens",
        "eval.seq_len",
        "eval.mode",
        "eval.precision",
        "eval.entity_parsing",
        "train.log_every",
        "train.threads",
        "train.max_minutes",
        "data.validation",
        "data.validation_split",
        "eval.patience",
        "export.from",
        "export.gate",
        "export.merge",
        "log.to",
        "train.peak_tflops",
        "train.packing_check",
        "train.compile",
    }


def test_every_key_is_documented_and_the_readme_table_is_the_declared_one():
    from pathlib import Path

    from t2tune.config import ENTRY_KEYS, KEYS, key_table

    assert all(f.metadata.get("doc") for f in {**KEYS, **ENTRY_KEYS}.values() if f.metadata)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    copy = readme.split("<!-- t2tune keys -->\n", 1)[1].split("<!-- /t2tune keys -->", 1)[0]
    assert copy == key_table(), "README's key table is out of date: paste `t2tune keys` between its markers"


def test_a_mixture_entry_is_checked_by_its_declarations():
    with pytest.raises(ConfigError) as err:
        build_config({"tasks": {"a": {"mode": "dream", "weight": -1, "train": 3}}, "mix.rule": "weights"})
    message = str(err.value)
    assert "tasks.a.mode: must be one of generate, score, got 'dream'" in message
    assert "tasks.a.weight: must be > 0, got -1" in message
    assert "tasks.a.train: expected" in message
