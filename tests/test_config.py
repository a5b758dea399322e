import pytest

from t2tune.config import ConfigError, load_config, parse_override


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
    for key in ("train.stepz: unknown key", "train.lr: expected float", "foo: unknown key",
                "eval.batch_size: expected int", "train.packing: must be one of"):
        assert key in msg, msg


def test_value_checks():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=0", "train.global_batch_size=6", "train.micro_batch_size=4",
                           "train.packing=zip"])
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
