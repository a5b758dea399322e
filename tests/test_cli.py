"""The command line: bad input gives one line and exit code 2; end-to-end runs on real models."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import MNLI_ROWS, SHARED_DATA, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from t2tune.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path, text=""):
    path = tmp_path / "c.yaml"
    path.write_text(
        "task: mnli\nmodel:\n  name: tiny-gptj\ntrain:\n  steps: 2\n  seq_len: 64\n"
        "  micro_batch_size: 2\n  global_batch_size: 2\n" + text
    )
    return str(path)


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["train.steps=0"], "train.steps: must be > 0"),
        (["train.global_batch_size=3"], "train.global_batch_size: 3 is not a multiple"),
        (
            ["train.stepz=3", "train.lr=abc"],
            "train.stepz: unknown key (did you mean train.steps?); train.lr: expected float",
        ),
        (["task=nosuch"], "task: unknown task 'nosuch'"),
        (["model.name=./no/such/model"], "model.name: path ./no/such/model does not exist"),
        (["data.train=DATA/missing.jsonl"], "missing.jsonl: data file not found"),
        (["data.train=DATA/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
        (["data.train=DATA/long.jsonl", "train.seq_len=16"], "long.jsonl:1: example is"),
        (["data.train=DATA/empty.jsonl"], "empty.jsonl: no rows"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, extra, expect):
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "train.jsonl", MNLI_ROWS)
    write_jsonl(data / "validation.jsonl", MNLI_ROWS)
    (data / "bad.jsonl").write_text(json.dumps(MNLI_ROWS[0]) + "\n{oops\n")
    write_jsonl(data / "long.jsonl", [{**MNLI_ROWS[0], "premise": "many words " * 30}])
    (data / "empty.jsonl").write_text("")
    args = [a.replace("DATA", str(data)) for a in extra]
    code, out, err = run_cli(
        capsys,
        "train",
        _config(tmp_path),
        f"data.train={data}",
        f"data.validation={data}",
        f"out_dir={tmp_path / 'out'}",
        *args,
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err


def test_out_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", _config(tmp_path), f"out_dir={blocker}/sub")
    assert code == 2 and "out_dir: cannot write to" in err


def test_changed_config_refused_then_overwrite_moves_old_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".t2tune").write_text('{"kind": "run"}')  # a t2tune run folder (a foreign one is refused outright)
    (out / "config.yaml").write_text("task: mnli\ntrain:\n  lr: 0.5\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    code, _, err = run_cli(capsys, "train", _config(tmp_path), f"out_dir={out}", "data.train=/nonexistent.jsonl")
    assert code == 2 and "holds a run with a different config" in err and "train.lr" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing lost
    code, _, err = run_cli(
        capsys, "train", _config(tmp_path), f"out_dir={out}", "data.train=/nonexistent.jsonl", "--overwrite"
    )
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").is_file()


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "t2tune", "train", _config(tmp_path), "train.packing=zip"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "t2tune: error: invalid config: train.packing: must be one of concat, isolated, none, got 'zip'"
    )


def test_tasks_and_models_lists(capsys):
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and "mnli hypothesis: {hypothesis} premise: {premise} target:" in out and "conll2003" in out
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "tiny-gptj" in out and "smollm2-135m" in out


@pytest.mark.slow
def test_smollm2_end_to_end_on_shared_mnli(tmp_path, capsys):
    """A few steps of the bundled SmolLM2 on 64 real MNLI rows, export, reload, evaluate, export again."""
    source = SHARED_DATA / "mnli" / "train.jsonl"
    if not source.is_file():
        pytest.skip("../shared/data/mnli not present")
    lines = source.read_text(encoding="utf-8").splitlines()[:64]
    data = tmp_path / "mnli"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "validation.jsonl").write_text("\n".join(lines[:8]) + "\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "train",
        "configs/mnli-smollm2-cpu.yaml",
        f"data.train={data}",
        f"data.validation={data}",
        f"out_dir={out}",
        "train.steps=2",
        "train.seq_len=256",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "checkpoint.every=1",
        "eval.every=0",
        "eval.limit=4",
    )
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["last_eval"]["n"] == 4
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert tok.eos_token == "<|im_end|>" and not hasattr(model.config, "quantization_config")
    ids = torch.tensor([[1, 2, 3, 4]])
    from t2tune.checkpoint import load_weights, read_average, use_average
    from t2tune.config import ModelConfig
    from t2tune.models import load_model
    from t2tune.runfolder import StepFolder

    fresh = load_model(ModelConfig(name="smollm2-135m"))
    step = StepFolder(out / "checkpoints" / "step-2")
    load_weights(fresh.model, step.model)
    assert use_average(fresh.model, read_average(step), step)  # the demo recipe exports train.ema's average
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fresh.model(ids).logits, atol=1e-5)
    code, stdout, err = run_cli(
        capsys,
        "evaluate",
        str(out / "hf"),
        "--task",
        "mnli",
        "--data",
        str(data),
        "--limit",
        "4",
        "--mode",
        "score",
        "--out",
        str(tmp_path / "p.jsonl"),
    )
    assert code == 0, err
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["n"] == 4 and last["mode"] == "score" and last["invalid"] == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {"premise", "scores", "prediction", "label"} <= set(preds[0])
    code, stdout, err = run_cli(capsys, "export", str(out / "checkpoints" / "step-1"), "--out", str(tmp_path / "e"))
    assert code == 0, err
    assert "mnli hypothesis: <hypothesis> premise: <premise> target:" in (tmp_path / "e" / "README.md").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "e")


@pytest.mark.parametrize("task,folder", [("squad", "xquad_en"), ("conll2003", "conll2003")])
def test_free_text_tasks_train_and_validate(tmp_path, capsys, task, folder):
    source = SHARED_DATA / folder / "validation.jsonl"
    if not source.is_file():
        pytest.skip(f"../shared/data/{folder} not present")
    data = tmp_path / "d"
    data.mkdir()
    lines = source.read_text(encoding="utf-8").splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (data / "validation.jsonl").write_text("\n".join(lines[-4:]) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"task: {task}\nmodel:\n  name: tiny-gptj\n")
    code, stdout, err = run_cli(
        capsys,
        "train",
        str(path),
        f"data.train={data}",
        f"data.validation={data}",
        f"out_dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.seq_len=256",
        "train.truncate=true",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "train.packing=isolated",
        "train.loss_on=target",
        "eval.max_new_tokens=8",
    )
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    key = "exact_match" if task == "squad" else "malformed"
    assert key in summary["last_eval"] and summary["last_eval"]["n"] == 4
    code, _, err = run_cli(
        capsys, "evaluate", str(tmp_path / "run"), "--task", task, "--data", str(data), "--mode", "score"
    )
    assert code == 2 and "score mode needs a label task" in err


@pytest.mark.parametrize(
    "victim,expect",
    [
        ("model/model.safetensors", "corrupt or truncated safetensors file"),
        ("optimizer.pt", "corrupt or incomplete checkpoint"),
    ],
)
def test_corrupt_checkpoint_is_one_line(tmp_path, capsys, victim, expect):
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "train.jsonl", MNLI_ROWS)
    write_jsonl(data / "validation.jsonl", MNLI_ROWS[:2])
    args = [
        "train",
        _config(tmp_path),
        f"data.train={data}",
        f"data.validation={data}",
        f"out_dir={tmp_path / 'out'}",
        "checkpoint.every=1",
        "eval.limit=1",
        "eval.max_new_tokens=1",
    ]
    assert run_cli(capsys, *args)[0] == 0
    path = tmp_path / "out" / "checkpoints" / "step-2" / victim
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, *args, "train.steps=3")
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics  # nothing lost


def test_qlora_without_bitsandbytes_stops_at_start(tmp_path, capsys, monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else found(name, *a)
    )
    code, _, err = run_cli(capsys, "train", _config(tmp_path), "train.method=qlora", f"out_dir={tmp_path / 'o'}")
    assert code == 2 and "train.method=qlora needs the bitsandbytes package" in err
    assert not (tmp_path / "o").exists()


def test_predict_unlabeled_rows(tmp_path, capsys):
    rows = [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in MNLI_ROWS[:3]]
    write_jsonl(tmp_path / "in.jsonl", rows)
    code, out, err = run_cli(
        capsys,
        "predict",
        "tiny-gptj",
        "--task",
        "mnli",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(tmp_path / "p.jsonl"),
        "--mode",
        "score",
    )
    assert code == 0, err
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(p["prediction"] in ("entailment", "neutral", "contradiction") for p in preds)
    assert "label" not in preds[0] and preds[0]["premise"] == rows[0]["premise"]
    write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["EU", "rejects", "German", "call"]}])
    code, out, err = run_cli(
        capsys,
        "predict",
        "tiny-gptj",
        "--task",
        "conll2003",
        "--input",
        str(tmp_path / "ner.jsonl"),
        "--out",
        str(tmp_path / "n.jsonl"),
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    (pred,) = [json.loads(line) for line in (tmp_path / "n.jsonl").read_text().splitlines()]
    assert pred["sentence"] == "EU rejects German call" and "generated" in pred


def test_hub_data_without_network_says_how_to_pass_local_data(tmp_path, capsys, monkeypatch):
    """The hub code path is the real one; with the hub unreachable it fails fast with one sentence."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy either
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "train", "configs/mnli-smollm2-cpu.yaml", f"out_dir={tmp_path / 'o'}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "could not load 'nyu-mll/glue' (mnli, split train)" in err and "make demo DATA=" in err
    assert time.perf_counter() - start < 30
