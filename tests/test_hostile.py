"""The second hostile review (#24), each class through the real CLI: no wrong result with exit
0, no write outside the run folder or over a user's file, no process that a signal cannot stop,
and one stderr line with exit code 2 instead of a traceback. Every class has a case in a
subprocess (``bounded``); its further instances call the same ``cli.main`` in this process
(``inside``), which saves the interpreter's start-up. Every case runs under a wall-clock bound
and compares the user's files (sha256) before and after."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import MNLI_ROWS, TINY, copy_run, error_line, t2tune, tiny_train_args, write_jsonl

pytestmark = pytest.mark.slow
BOUND = 120  # seconds any refused case may take (a tiny model's start-up is ~10 s here)


def digests(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file below ``folder`` (links as their target text), ``skip`` left out."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_symlink():
            out[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def bounded(*args, timeout=BOUND, **kw) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    proc = t2tune(*args, timeout=timeout, **kw)
    assert time.perf_counter() - start < timeout
    return proc


@pytest.fixture
def inside(capsys):
    """``cli.main`` in this process, as a CompletedProcess, under the same wall-clock bound."""
    from t2tune.cli import main

    def call(*args, cwd=None):
        start, here = time.perf_counter(), os.getcwd()
        try:
            if cwd is not None:
                os.chdir(cwd)
            code = main([str(a) for a in args])
        finally:
            os.chdir(here)
        out = capsys.readouterr()
        assert time.perf_counter() - start < BOUND
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return call


def victim(tmp_path: Path) -> Path:
    """A user's file that must come through byte for byte."""
    path = tmp_path / "mine" / "precious.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("the user's own words\n")
    return path


def task_file(tmp_path: Path, labels: list[str], name: str = "t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "prompt": "{premise} target:", "labels": labels}))
    return path


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- wrong results with exit 0 -------------------------------------------------------------


def test_a_label_named_invalid_is_no_sentinel(tmp_path):
    """A random model answers nothing valid: accuracy 0 and every row invalid, even where the
    gold label is the word 'invalid' (it used to score 1.0)."""
    task = task_file(tmp_path, ["invalid", "valid"])
    data = write_jsonl(tmp_path / "v.jsonl", [{"premise": f"p {i}", "label": "invalid"} for i in range(4)])
    proc = bounded(
        "evaluate", "tiny-gptj", "--task", task, "--data", data, "--max-new-tokens", "2", "--out", tmp_path / "p.jsonl"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["accuracy"] == 0.0 and summary["invalid"] == 4
    assert all(r["prediction"] is None and r["label"] == "invalid" for r in predictions(tmp_path / "p.jsonl"))


def test_digit_label_words_are_words_first(tmp_path):
    """Labels ["1", "0"]: the value 1 (string or int) is the word "1", never the index of "0";
    labels ["1", "2"] (Winogrande) are accepted as words."""
    rows = [{"premise": "a", "label": "1"}, {"premise": "b", "label": 1}, {"premise": "c", "label": " 0 "}]
    data = write_jsonl(tmp_path / "v.jsonl", rows)
    proc = bounded(
        "evaluate",
        "tiny-gptj",
        "--task",
        task_file(tmp_path, ["1", "0"]),
        "--data",
        data,
        "--mode",
        "score",
        "--out",
        tmp_path / "p.jsonl",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["label"] for r in predictions(tmp_path / "p.jsonl")] == ["1", "1", "0"]
    data = write_jsonl(tmp_path / "w.jsonl", [{"premise": "a", "label": "2"}, {"premise": "b", "label": 1}])
    proc = bounded(
        "evaluate",
        "tiny-gptj",
        "--task",
        task_file(tmp_path, ["1", "2"], "w"),
        "--data",
        data,
        "--mode",
        "score",
        "--out",
        tmp_path / "q.jsonl",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["label"] for r in predictions(tmp_path / "q.jsonl")] == ["2", "1"]


@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--max-new-tokens", "16", "--seq-len", "16"], "--max-new-tokens): 16 generated tokens leave no room"),
        (["--mode", "score", "--seq-len", "4"], "score mode puts all 3 labels"),
    ],
)
def test_prompts_are_never_cut_to_nothing(tmp_path, inside, flags, expect):
    data = write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS)
    call = bounded if flags[0] == "--mode" else inside
    error_line(call("evaluate", "tiny-gptj", "--task", "mnli", "--data", data, *flags), expect)


def test_cut_prompts_are_counted(tmp_path, inside):
    data = write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS)
    proc = inside("evaluate", "tiny-gptj", "--task", "mnli", "--data", data, "--seq-len", "12", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["prompts_cut"] == len(MNLI_ROWS)
    assert "6 of 6 prompts were longer than the 10 tokens" in proc.stderr


def test_train_refuses_a_validation_that_cannot_fit_before_training(tmp_path):
    out = tmp_path / "o"
    proc = bounded(*tiny_train_args(tmp_path, copies=1), f"out_dir={out}", *TINY, "eval.max_new_tokens=600")
    error_line(proc, "eval.max_new_tokens", "leave no room", only=False)
    assert not (out / "checkpoints").exists()


def test_thousands_of_labels_in_score_mode_are_bounded(tmp_path):
    task = task_file(tmp_path, [f"label{i}" for i in range(10_000)])
    data = write_jsonl(tmp_path / "v.jsonl", [{"premise": "a", "label": "label7"}])
    error_line(
        bounded("evaluate", "tiny-gptj", "--task", task, "--data", data, "--mode", "score", "--seq-len", "100000"),
        "score mode with 10000 labels",
        "GiB per prompt",
        "generate mode",
    )


# --- writes outside the run, or over a user's file -----------------------------------------


@pytest.mark.parametrize(
    "planted,alone",
    [
        (".t2tune.lock", True),
        ("plots", True),
        (".t2tune", False),
        ("metrics.jsonl", False),
        ("trackers", False),
        ("checkpoints/step-2", False),
        ("plots/confusion.png", False),
    ],
)
def test_links_inside_a_run_folder_are_never_followed(trained, tmp_path, inside, planted, alone):
    run, args = copy_run(trained, tmp_path)
    target = victim(tmp_path)
    link = run / planted
    if link.is_dir():
        import shutil

        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(target.parent if planted in ("plots", "trackers", "checkpoints/step-2") else target)
    before = digests(tmp_path / "mine")
    error_line((bounded if alone else inside)(*args, "train.steps=3"), planted.split("/")[-1], "symbolic link")
    assert digests(tmp_path / "mine") == before


def test_a_marker_listing_outside_files_is_not_ours(trained, tmp_path):
    """An export whose marker names ../ files is not taken for t2tune's: it is not replaced."""
    run, _ = copy_run(trained, tmp_path)
    out = tmp_path / "export"
    assert bounded("export", run / "checkpoints" / "step-1", "--out", out).returncode == 0
    marker = json.loads((out / ".t2tune").read_text())
    (out / ".t2tune").write_text(json.dumps({**marker, "files": [*marker["files"], "../mine/precious.txt"]}))
    victim(tmp_path)
    before = digests(tmp_path)
    error_line(bounded("export", run / "checkpoints" / "step-2", "--out", out), "a folder t2tune did not create")
    assert digests(tmp_path) == before


@pytest.mark.parametrize("name", ["../x", "/abs/x", ".hidden"])
def test_mixture_task_names_are_plain(tmp_path, inside, name):
    config = tmp_path / "mix.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny-gptj"},
                "out_dir": str(tmp_path / "o"),
                "tasks": {name: {"task": "mnli", "train": str(tmp_path)}, "rte": {}},
            }
        )
    )
    before = digests(tmp_path)
    error_line((bounded if name == "../x" else inside)("train", config), f"tasks.{name}", "plain name")
    assert digests(tmp_path) == before and not (tmp_path / "o").exists()


# --- processes that cannot be stopped ------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,expect,alone",
    [
        ("row_in_epoch", -1, "'row_in_epoch' is negative", True),
        ("row_in_epoch", 10**6, "data position 1000000", False),
        ("optimizer_step", 7, "not this folder's step 2", False),
        ("train_seconds", -5.0, "'train_seconds' is not a finite number", False),
        ("best", {"step": 9, "accuracy": 1.0}, "'best' names step 9", False),
    ],
)
def test_tampered_state_is_refused_at_once(trained, tmp_path, inside, field, value, expect, alone):
    run, args = copy_run(trained, tmp_path)
    state_file = run / "checkpoints" / "step-2" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), field: value}))
    before = digests(run)
    error_line((bounded if alone else inside)(*args, "train.steps=4"), "step-2", expect, only=False)
    assert {k: v for k, v in digests(run).items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


def _wait_for(predicate, proc, seconds=BOUND):
    deadline = time.time() + seconds
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def test_sigterm_before_the_loop_ends_the_run(tmp_path):
    """SIGTERM while the run starts (imports, data, model): exit 130 within seconds, no traceback,
    nothing half-written."""
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "t2tune", *tiny_train_args(tmp_path, copies=2), f"out_dir={out}", *TINY],
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (out / ".t2tune").exists(), proc)  # the folder is claimed: the model loads next
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert time.perf_counter() - sent < 20
    assert not (out / "checkpoints").exists() and not (out / "hf").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_sigterm_during_validation_stops_within_seconds(tmp_path):
    """A long validation inside the loop is cut short by SIGTERM: the run checkpoints its step
    and exits 130 without finishing (or writing) that validation."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", MNLI_ROWS * 2)
    write_jsonl(data / "validation.jsonl", MNLI_ROWS * 1000)  # 6,000 rows: a minute or more of generation
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "t2tune",
            "train",
            str(config),
            f"data.train={data}",
            f"data.validation={data}",
            f"out_dir={out}",
            *TINY,
            "train.steps=5",
            "eval.every=1",
            "eval.limit=6000",
            "eval.max_new_tokens=8",
            "eval.batch_size=4",
            "checkpoint.every=0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and '"event": "train"' in metrics.read_text(), proc)
    time.sleep(1.0)  # inside the validation after step 1
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert time.perf_counter() - sent < 15
    events = [json.loads(line)["event"] for line in metrics.read_text().splitlines()]
    assert "eval" not in events and events[-1] == "stopped"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]


# --- tracebacks instead of one line ----------------------------------------------------------


@pytest.mark.parametrize(
    "line,expect,alone",
    [
        (
            '{"premise": "p", "hypothesis": "h", "label": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "nested too deeply",
            True,
        ),
        ('{"premise": "p", "hypothesis": "h", "label": ' + "7" * 5000 + "}", "malformed JSON", False),
        ('{"premise": "p", "hypothesis": "h", "label": "\u00b2"}', "unknown label", False),
        ('{"premise": "p", "hypothesis": "h", "label": true}', "is a boolean", False),
    ],
)
def test_hostile_data_lines(tmp_path, inside, line, expect, alone):
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps(MNLI_ROWS[0]) + "\n" + line + "\n")
    error_line(
        (bounded if alone else inside)("evaluate", "tiny-gptj", "--task", "mnli", "--data", data), f"{data}:2:", expect
    )


@pytest.mark.parametrize(
    "override,expect",
    [
        ("train.seed=4294967296", "train.seed: must be in [0, 2**32)"),
        ("tasks=[a, b]", "tasks: expected a mapping"),
    ],
)
def test_hostile_config_values(tmp_path, inside, override, expect):
    call = bounded if override.startswith("train.seed") else inside
    error_line(call(*tiny_train_args(tmp_path, copies=1), f"out_dir={tmp_path / 'o'}", override), expect)
    assert not (tmp_path / "o").exists()


def test_config_problems_are_reported_together(tmp_path, inside):
    proc = inside("train", tiny_train_args(tmp_path, copies=1)[1], "train.stepz=5", "train.packing=zip", "train.lr=-1")
    error_line(proc, "train.stepz: unknown key", "train.packing: must be one of", "train.lr: must be > 0")


def test_tiny_temperature_and_commented_out_tasks_load():
    from t2tune.config import load_config
    from t2tune.mixture import mixing_rates

    assert mixing_rates({"a": 400, "b": 100}, "temperature", temperature=1e-300) == {"a": 1.0, "b": 0.0}
    assert load_config(None, ["tasks=null"]).tasks == {}


def test_out_dir_that_cannot_be_moved_aside(tmp_path, inside):
    work = tmp_path / "work"
    work.mkdir()
    target = victim(work)
    args = tiny_train_args(tmp_path, copies=1)
    before = digests(tmp_path)
    for out_dir, call in ((".", bounded), ("..", inside)):
        error_line(call(*args, f"out_dir={out_dir}", "--overwrite", cwd=work), "cannot be moved aside")
    assert digests(tmp_path) == before and target.is_file()


@pytest.mark.parametrize("kind", ["out-under-a-file", "plots-is-a-file", "unwritable"])
def test_output_paths_that_cannot_be_written(tmp_path, inside, kind):
    data = write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS[:2])
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    flags = {
        "out-under-a-file": ["--out", blocker / "p.jsonl"],
        "plots-is-a-file": ["--plots", blocker],
        "unwritable": ["--out", "/proc/t2tune-predictions.jsonl"],
    }[kind]
    before = digests(tmp_path)
    expect = {"out-under-a-file": "is a file", "plots-is-a-file": "is not a folder", "unwritable": "/proc"}[kind]
    call = bounded if kind == "unwritable" else inside
    error_line(call("evaluate", "tiny-gptj", "--task", "mnli", "--data", data, *flags), expect, only=False)
    assert digests(tmp_path) == before


def test_garbage_gguf_and_a_cache_that_is_a_file(tmp_path):
    data = write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS[:2])
    cut = tmp_path / "model.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(4000))
    env = {**os.environ, "T2TUNE_CACHE": str(tmp_path / "cache")}
    error_line(bounded("evaluate", cut, "--task", "mnli", "--data", data, env=env), str(cut), "not a readable GGUF")
    (tmp_path / "cache").write_text("not a folder")
    error_line(bounded("evaluate", cut, "--task", "mnli", "--data", data, env=env), "T2TUNE_CACHE", "not a folder")
