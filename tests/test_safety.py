"""Safety guarantees, each class tested through the real CLI in a subprocess: nothing is deleted or
overwritten that t2tune did not write; one run per folder; values that can only produce garbage
are refused; every user mistake is one stderr line and exit code 2, never a traceback."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    MNLI_ROWS,
    SHARED_DATA,
    TINY,
    copy_run,
    error_line,
    in_process,
    snapshot,
    t2tune,
    tiny_train_args,
    user_folder,
    write_jsonl,
)

pytestmark = pytest.mark.slow
# --- data loss -----------------------------------------------------------------------------


def test_export_refuses_a_folder_it_did_not_write(trained, tmp_path):
    run, _ = trained
    dest = user_folder(tmp_path / "mine")
    before = snapshot(dest)
    error_line(t2tune("export", run / "checkpoints" / "step-2", "--out", dest), "--out", "did not create")
    assert snapshot(dest) == before


def test_export_refuses_a_checkpoint(trained, tmp_path):
    run, _ = copy_run(trained, tmp_path)
    step = run / "checkpoints" / "step-1"
    before = snapshot(step)
    error_line(t2tune("export", run / "checkpoints" / "step-2", "--out", step), "a t2tune checkpoint")
    error_line(t2tune("export", run / "checkpoints" / "step-2", "--out", run), "a t2tune run folder")
    assert snapshot(step) == before


def test_export_replaces_its_own_export_but_not_added_files(trained, tmp_path):
    from safetensors.torch import load_file

    run, _ = trained
    out = tmp_path / "export"
    umask = lambda: os.umask(0o022)  # noqa: E731
    assert t2tune("export", run / "checkpoints" / "step-2", "--out", out, preexec_fn=umask).returncode == 0
    proc = t2tune("export", run / "checkpoints" / "step-1", "--out", out, preexec_fn=umask)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = (
        load_file(out / "model.safetensors"),
        load_file(run / "checkpoints" / "step-1" / "model" / "model.safetensors"),
    )
    assert all((got[k] == want[k]).all() for k in want)
    assert oct(out.stat().st_mode & 0o777) == "0o755" and oct((out / "config.json").stat().st_mode & 0o777) == "0o644"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary or old copies
    (out / "notes.txt").write_text("added by hand")
    before = snapshot(out)
    error_line(
        t2tune("export", run / "checkpoints" / "step-2", "--out", out), "files t2tune did not write", "notes.txt"
    )
    assert snapshot(out) == before


def test_evaluate_writes_over_only_its_own_predictions_and_plots(trained, tmp_path):
    run, _ = trained
    write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS[:2])
    preds, plots = tmp_path / "p.jsonl", tmp_path / "plots"
    evaluate = [
        "evaluate",
        run / "hf",
        "--task",
        "mnli",
        "--data",
        tmp_path / "v.jsonl",
        "--mode",
        "score",
        "--out",
        preds,
        "--plots",
        plots,
    ]
    preds.write_text('{"id": 1, "label": "mine"}\n')
    error_line(t2tune(*evaluate), "--out:", "not a file t2tune wrote")
    assert preds.read_text() == '{"id": 1, "label": "mine"}\n'
    preds.write_text("")  # an empty file holds nothing to lose
    plots.mkdir()
    (plots / "confusion.png").write_bytes(b"\x89PNG my own figure")
    error_line(t2tune(*evaluate), "--plots:", "confusion.png", "not a file t2tune wrote")
    assert (plots / "confusion.png").read_bytes() == b"\x89PNG my own figure" and preds.read_text() == ""
    (plots / "confusion.png").unlink()
    for _ in range(2):  # the second run writes over the first's files, which it recognises
        proc = t2tune(*evaluate)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(preds.read_text().splitlines()) == 2
    assert sorted(p.name for p in plots.iterdir()) == ["confusion.png", "reliability.png"]


def test_train_refuses_a_foreign_folder_and_overwrite_moves_it_aside(tmp_path):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    args = [*tiny_train_args(tmp_path, copies=2), f"out_dir={out}", *TINY]
    error_line(t2tune(*args), "not empty and was not created by t2tune", "--overwrite")
    assert snapshot(out) == before
    proc = t2tune(*args, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert snapshot(aside) == before and (out / "hf" / "model.safetensors").is_file()


def test_one_run_per_folder_and_kill_9_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    args = [*tiny_train_args(tmp_path, copies=2), f"out_dir={out}", *TINY]
    first = subprocess.Popen(
        [sys.executable, "-m", "t2tune", *args, "train.steps=100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-1").is_dir() and time.time() < deadline:
            time.sleep(0.05)
        error_line(t2tune(*args, "train.steps=100000"), "in use by another t2tune process", f"PID {first.pid}")
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        first.wait()
    assert (out / ".t2tune.lock").read_text() == str(first.pid)
    proc = t2tune(*args)  # the dead holder's lock is not taken for a live one
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_run_folder_without_its_config_refuses_to_resume(trained, tmp_path):
    run, args = copy_run(trained, tmp_path)
    (run / "config.yaml").unlink()
    before = snapshot(run)
    error_line(t2tune(*args, "train.lr=0.5"), "no config.yaml")
    assert snapshot(run) == before


# --- values that can only produce garbage ------------------------------------------------


@pytest.mark.parametrize(
    "override,expect",
    [
        ("train.lr=nan", "train.lr: must be a finite number"),
        ("train.lr=1e999", "train.lr: must be a finite number"),
        ("train.eps=.inf", "train.eps: must be a finite number"),
        ("train.betas=[0.9, .nan]", "train.betas: must be a finite number"),
        ("train.grad_clip=-1", "train.grad_clip: must be > 0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio: must be in [0, 1]"),
        ("train.max_minutes=-inf", "train.max_minutes: must be a finite number"),
        ("train.lr=0", "train.lr: must be > 0"),
    ],
)
def test_out_of_range_config_values(tmp_path, capsys, override, expect):
    args = (*tiny_train_args(tmp_path, copies=1), f"out_dir={tmp_path / 'o'}", override)
    # the first case through a real process; the others' message is cli.main's alone
    error_line(t2tune(*args) if override == "train.lr=nan" else in_process(capsys, *args), expect)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--limit", "0"),
        ("--seq-len", "-1"),
        ("--batch-size", "0"),
        ("--max-new-tokens", "0"),
        ("--threads", "0"),
        ("--limit", "many"),
    ],
)
def test_out_of_range_evaluate_flags(tmp_path, capsys, flag, value):
    write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS)
    args = ("evaluate", "tiny-gptj", "--task", "mnli", "--data", tmp_path / "v.jsonl", flag, value)
    error_line(t2tune(*args) if (flag, value) == ("--limit", "0") else in_process(capsys, *args), flag)


def test_diverging_loss_stops_keeps_checkpoint_exports_nothing(tmp_path):
    out = tmp_path / "out"
    proc = t2tune(*tiny_train_args(tmp_path, copies=2), f"out_dir={out}", *TINY, "train.steps=6", "train.lr=1e30")
    line = error_line(proc, "diverged at step 2", "step-1", only=False)
    assert "nothing was exported" in line and not (out / "hf").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == 2


# --- user mistakes: one line, exit 2 --------------------------------------------------------


@pytest.mark.parametrize(
    "spec,expect",
    [
        ({"prompt": "x {} target:"}, "'prompt': placeholder {} must be a plain column name"),
        ({"prompt": "{premise:>10} target:"}, "may not have a format spec"),
        ({"prompt": "{premise.__class__} target:"}, "placeholder {premise.__class__} must be a plain column name"),
        ({"prompt": "{premise[0]} target:"}, "placeholder {premise[0]} must be a plain column name"),
        ({"prompt": "{premise target:"}, "'prompt': "),
        ({"prompt": "{premise} target:", "target": 5}, "'target' must be a string"),
        (
            {"prompt": "{premise} target:", "labels": [1, 2]},
            "'labels' must be a list of at least two non-empty strings",
        ),
        ({"prompt": "{premise} target:", "labels": ["a", "b"], "aliases": {"x": 1}}, "'aliases' must map"),
        ({"prompt": "{premise} target:", "labels": ["a", "b"], "metric": ["accuracy"]}, "'metric' must be"),
        ({"prompt": "{premise} {label} target:", "labels": ["a", "b"]}, "{label}, which is the target"),
        ({"prompt": "{premise} target:", "labels": ["a", "b", "a"]}, "'a' is given twice"),
    ],
)
def test_custom_task_templates_checked_at_load(tmp_path, capsys, spec, expect):
    import yaml

    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"name": "t", **spec}))
    args = (*tiny_train_args(tmp_path, copies=1), f"task={task}", f"out_dir={tmp_path / 'o'}")
    # the first case through a real process; the others' message is cli.main's alone
    first = spec == {"prompt": "x {} target:"}
    error_line(t2tune(*args) if first else in_process(capsys, *args), str(task), expect)
    assert not (tmp_path / "o").exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ.get('EVIL_MARK', '/tmp/evil'))}",))


@pytest.mark.parametrize(
    "victim,content,expect",
    [
        ("config.yaml", "- a\n- b\n", "broken config.yaml"),
        ("checkpoints/step-2/state.json", "[1, 2]", "state.json holds a list"),
        ("checkpoints/step-2/state.json", '{"optimizer_step": "two"}', "'optimizer_step' has the wrong type"),
        ("checkpoints/step-2/optimizer.pt", "evil", "corrupt or incomplete checkpoint"),
        ("checkpoints/step-2/rng.pt", "evil", "corrupt or incomplete checkpoint"),
    ],
)
def test_run_files_of_the_wrong_shape(trained, tmp_path, victim, content, expect):
    run, args = copy_run(trained, tmp_path)
    mark = tmp_path / "evil-ran"
    if content == "evil":
        os.environ["EVIL_MARK"] = str(mark)
        (run / victim).write_bytes(pickle.dumps({"optimizer": Evil(), "scheduler": {}}))
    else:
        (run / victim).write_text(content)
    before = snapshot(run)
    error_line(t2tune(*args, "train.steps=3"), expect, only=victim == "config.yaml")
    assert snapshot(run) == before and not mark.exists()


@pytest.mark.parametrize("kind", ["pickle-only", "adapter-of-itself", "corrupt-safetensors"])
def test_model_folders(trained, tmp_path, kind):
    run, _ = trained
    model = tmp_path / "model"
    shutil.copytree(run / "hf", model)
    if kind == "pickle-only":
        (model / "model.safetensors").unlink()
        (model / "pytorch_model.bin").write_bytes(b"not loaded")
        expect = "safetensors only"
    elif kind == "adapter-of-itself":
        (model / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
        expect = "is itself an adapter (this one)"
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:2000])
        expect = "corrupt or truncated safetensors"
    write_jsonl(tmp_path / "v.jsonl", MNLI_ROWS[:2])
    error_line(t2tune("evaluate", model, "--task", "mnli", "--data", tmp_path / "v.jsonl"), expect)


def test_yaml_alias_bomb_is_bounded(tmp_path):
    """5^12 strings and 4^12 mappings by alias, all under known keys: refused fast, echoed short."""
    lists = ['&l0 ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx"]']
    lists += [f"&l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}]" for i in range(1, 12)]
    maps = ["&d0 {a: 1, b: 1, c: 1, d: 1}"]
    maps += [f"&d{i} {{a: *d{i - 1}, b: *d{i - 1}, c: *d{i - 1}, d: *d{i - 1}}}" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"
    mapping = ", ".join(f"k{i}: {m}" for i, m in enumerate(maps))
    bomb.write_text(f"train:\n  betas: [{', '.join(lists)}]\n  lr: {{{mapping}}}\ntask: *l11\nmodel:\n  name: *d11\n")
    start = time.perf_counter()
    proc = t2tune("train", bomb)
    line = error_line(proc, "train.betas: expected", "train.lr: expected", "task: expected", "model.name: expected")
    assert len(proc.stderr) < 2000 and len(line) < 2000 and time.perf_counter() - start < 30


def test_huge_row_is_refused_streaming(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "validation.jsonl", MNLI_ROWS)
    with open(data / "train.jsonl", "w") as handle:
        handle.write(json.dumps(MNLI_ROWS[0]) + "\n")
        handle.write(json.dumps({**MNLI_ROWS[1], "premise": "word " * 10_000_000}) + "\n")  # 50 MB
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    # VmHWM is this process's own peak (ru_maxrss would carry pytest's across exec)
    code = (
        "import re, sys\nfrom t2tune.cli import main\ncode = main(sys.argv[1:])\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\nsys.exit(code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", str(config), f"data.train={data}", f"out_dir={tmp_path / 'o'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    error_line(proc, "train.jsonl:2: line longer than 4 MiB")
    assert int(proc.stdout.split()[-1]) < 1_500_000  # KiB: the 50 MB line was never held whole


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path):
    out = tmp_path / "out"
    code = (
        "import errno, sys, torch\nreal, calls = torch.save, [0]\n"
        "def save(obj, f, *a, **k):\n    calls[0] += 1\n"
        "    if calls[0] > 2:\n        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\nfrom t2tune.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *tiny_train_args(tmp_path, copies=2), f"out_dir={out}", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    error_line(proc, "step-2: could not write the checkpoint (No space left on device)", "kept: step-1", only=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"] and not (out / "hf").exists()


def test_sigterm_during_export_exits_130_and_keeps_the_old_export(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "export"
    assert t2tune("export", run / "checkpoints" / "step-1", "--out", out).returncode == 0
    before = snapshot(out)
    for _ in range(5):  # the write takes a fraction of a second: try until the signal lands inside it
        proc = subprocess.Popen(
            [sys.executable, "-m", "t2tune", "export", str(run / "checkpoints" / "step-2"), "--out", str(out)],
            stderr=subprocess.PIPE,
            text=True,
        )
        while proc.poll() is None and not any(p.name.startswith(".export.tmp-") for p in tmp_path.iterdir()):
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 130:
            break
        assert proc.returncode == 0, err[-2000:]
        before = snapshot(out)  # missed the window: that export finished; try again
    assert proc.returncode == 130 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert snapshot(out) == before


def test_files_from_common_tools(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    header = "premise,hypothesis,label\n" + "".join(
        f"{r['premise']},{r['hypothesis']},{r['label']}\n" for r in MNLI_ROWS
    )
    (data / "train.csv").write_bytes(b"\xef\xbb\xbf" + header.encode())  # Excel's UTF-8 with BOM
    (data / "validation.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in MNLI_ROWS).encode())
    from t2tune.data import load_examples
    from t2tune.tasks import get_task

    assert len(load_examples(get_task("mnli"), str(data), "train")) == 6
    assert len(load_examples(get_task("mnli"), str(data), "validation")) == 6
    write_jsonl(data / "train.jsonl", MNLI_ROWS)
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    error_line(
        t2tune("train", config, f"data.train={data}", f"out_dir={tmp_path / 'o'}"),
        "several train files (train.jsonl, train.csv)",
    )


@pytest.mark.parametrize(
    "args,expect",
    [
        (["=5"], "override '=5': the key before '=' is empty"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_small_mistakes(tmp_path, capsys, args, expect):
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\n")
    error_line(t2tune("train", config, *args) if args == ["=5"] else in_process(capsys, "train", config, *args), expect)


def test_duplicate_yaml_keys_and_home_expansion(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\ntrain:\n  lr: 1.0e-4\n  steps: 3\n  lr: 1.0\n")
    error_line(t2tune("train", config), f"{config}: line 5: key 'lr' is given twice")
    from t2tune.config import load_config

    assert load_config(None, ["out_dir=~/runs/x"]).out_dir == str(Path.home() / "runs" / "x")


def test_compile_without_a_cpp_compiler_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """train.compile on the CPU needs inductor's C++ compiler; without one, one line before the
    model loads instead of an inductor traceback at the first step."""
    from torch._inductor import config as inductor

    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("task: mnli\nmodel:\n  name: tiny-gptj\n")
    out = tmp_path / "o"
    # torch's own patch: monkeypatch's undo would delete the key from torch's config module
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        proc = in_process(
            capsys, "train", config, f"data.train={SHARED_DATA / 'mnli'}", f"out_dir={out}", "train.compile=true"
        )
    error_line(proc, "train.compile: torch.compile on the CPU builds C++ kernels", "train.compile=false")
    assert not out.exists()  # refused before the run folder was made
