"""Command line: parses arguments, calls the library, turns known errors into one line + exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError, say
from .runtime import keep_freed_memory

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


# --- train ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .recipe import train
    from .runfolder import RunFolder

    cfg = load_config(args.config, args.overrides)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)  # a process setting: the CLI's to make
    start = time.perf_counter()
    result = train(cfg, overwrite=args.overwrite)
    if result.stopped == "diverged":
        kept = [str(step.path) for _, step in RunFolder(Path(cfg.out_dir)).checkpoints()]
        raise UserError(
            f"training diverged at step {result.state.optimizer_step + 1}: the loss or gradient norm "
            f"is not finite; nothing was exported (last good checkpoint: {kept[-1] if kept else 'none'}); "
            "lower train.lr or set train.grad_clip"
        )
    if result.stopped == "signal":
        say(
            f"stopped by signal {result.signal} at step {result.state.optimizer_step}; "
            "checkpoint written, run the same command to resume"
        )
        return EXIT_INTERRUPTED
    if result.main_process:
        state = result.state
        wall = round(time.perf_counter() - start, 1)
        summary = {
            "out_dir": cfg.out_dir,
            "stopped": result.stopped,
            "steps": state.optimizer_step,
            "tokens_seen": state.tokens_seen,
            "train_seconds": round(state.train_seconds, 1),
            "wall_seconds": wall,
            "best": state.best,
            "last_eval": result.last_eval,
            "export": str(result.export),
        }
        print(json.dumps(summary))
    return 0


# --- evaluate / predict --------------------------------------------------------------------

EVAL_FLAGS = {
    "mode": "--mode",
    "max_new_tokens": "--max-new-tokens",
    "batch_size": "--batch-size",
    "seq_len": "--seq-len",
    "limit": "--limit",
    "precision": "--precision",
    "entity_parsing": "--entity-parsing",
}


def _count_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _eval_config(args: argparse.Namespace) -> Any:
    """The flags as an EvalConfig, validated by the config's own ranges; errors name the flag."""
    from .config import ConfigError, build_config

    values = {f"eval.{key}": getattr(args, key) for key in EVAL_FLAGS}
    values["train.threads"] = args.threads  # the same range as the config key
    try:
        return build_config(values).eval
    except ConfigError as exc:
        message = str(exc).removeprefix("invalid config: ").replace("train.threads:", "--threads:")
        for key, flag in EVAL_FLAGS.items():
            message = message.replace(f"eval.{key}:", f"{flag}:")
        raise ConfigError(f"invalid option: {message}") from None


def _is_predictions_file(path: Path) -> bool:
    """Whether ``path`` looks like the predictions JSONL of an earlier evaluate / predict."""
    from .files import json_object

    first = json_object(path, first_line=True)
    return first is not None and "prediction" in first  # an invalid answer's prediction is null


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before anything slow, output files that t2tune did not write: the predictions
    file, and the plots."""
    from .files import check_new_file, check_writable_parent
    from .report import METRIC_PLOTS, is_t2tune_plot

    if args.out:
        out = Path(args.out).expanduser()
        check_writable_parent(out, "--out")
        check_new_file(out, "--out", _is_predictions_file)
    if getattr(args, "plots", None):
        plots = Path(args.plots).expanduser()
        if plots.exists() and not plots.is_dir():
            raise UserError(f"--plots: {plots} exists and is not a folder; name a folder for the PNGs")
        check_writable_parent(plots / METRIC_PLOTS[0], "--plots")
        for name in METRIC_PLOTS:
            check_new_file(plots / name, "--plots", is_t2tune_plot)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from .files import atomic_file

    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _print_table(summary: dict[str, Any], metrics: dict[str, Any]) -> None:
    print(f"{'metric':<16}value")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        print(f"{key:<16}{value}")
    for name, scores in metrics.get("per_class", {}).items():
        print(f"  {name:<22} precision {scores['precision']:.3f}  recall {scores['recall']:.3f}")


def cmd_evaluate(args: argparse.Namespace, predict: bool = False) -> int:
    from .checkpoint import read_average, use_average
    from .config import ModelConfig
    from .data import load_examples, with_hub_defaults
    from .engines import process_state
    from .evaluation import evaluate
    from .models import load_model
    from .runfolder import StepFolder
    from .tasks import get_task

    config = _eval_config(args)  # checked before anything slow
    _check_outputs(args)
    processes = process_state()  # under accelerate launch, every process takes a share of the rows
    task = get_task(args.task)
    loaded = load_model(
        ModelConfig(
            name=args.model,
            dtype=args.dtype,
            compute_dtype=args.compute_dtype,
            attn_implementation=args.attn,
            trust_remote_code=args.trust_remote_code,
        )
    )
    step = StepFolder(Path(args.model).expanduser())
    saved = step.state.is_file() and step.optimizer.is_file()
    averaged = saved and use_average(loaded.model, read_average(step), step)  # as the run validated that step
    if averaged and processes.is_main_process:
        say(f"{step.path}: evaluating the step's moving average of the weights (train.ema); model/ holds the raw ones")
    source = args.input if predict else args.data
    split, hub_config = with_hub_defaults(task, source, args.split, args.hub_config)
    rows = load_examples(task, source, split, hub_config, limit=args.limit, need_target=not predict)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # a process setting: the CLI's to make
    result = evaluate(loaded.model, loaded.tokenizer, task, rows, config, with_metrics=not predict, processes=processes)
    try:
        if processes.is_main_process:
            _report(args, task, result, predict)
    finally:  # every process leaves together: one that exits while another still works aborts in gloo's teardown
        processes.wait_for_everyone()
    return 0


def _report(args: argparse.Namespace, task: Any, result: Any, predict: bool) -> None:
    """The main process's output of evaluate / predict: predictions file, table, plots, summary."""
    if args.out:
        _write_jsonl(Path(args.out).expanduser(), result.records)
    summary = result.summary(task, args.mode)
    if not predict:
        _print_table(summary, result.metrics)
        if args.plots:
            from .report import plot_metrics

            Path(args.plots).expanduser().mkdir(parents=True, exist_ok=True)
            plot_metrics(result.metrics, Path(args.plots).expanduser())
    print(json.dumps(summary))


# --- export / tasks ------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import read_checkpoint, use_average
    from .config import ModelConfig, load_config
    from .export import MERGE_LOSS_HINT, MergeLoss, export, export_run
    from .models import load_model
    from .runfolder import StepFolder
    from .training import TrainState
    from .validation import members_of

    src = StepFolder(Path(args.checkpoint))
    if not src.model.is_dir() and not (src.path / "config.json").is_file():
        raise UserError(f"{src.path}: not a t2tune checkpoint (expected {src.model}/) or Hugging Face folder")
    run = src.run
    cfg = load_config(run.config) if run is not None and run.config.is_file() else None
    # the run's weights dtype: a bf16 run of GPT-J 6B must not be loaded back in fp32 (24 GB)
    model = ModelConfig(name=str(src.path)) if cfg is None else dataclasses.replace(cfg.model, name=str(src.path))
    state = average = None
    if cfg is not None and src.state.is_file():
        saved, opt, _ = read_checkpoint(src)  # checks state.json's shape and ranges, as a resume does
        state, average = TrainState.from_dict(saved), opt.get("ema")
        del opt  # the optimizer's moments are not exported
    loaded = load_model(model)
    # model/ holds the raw weights; under train.ema the run validates and exports their average
    averaged = use_average(loaded.model, average, src)
    out = Path(args.out).expanduser()
    loss = MergeLoss()
    merge = not args.adapter_only
    if cfg is None:  # a plain Hugging Face folder: no run to describe
        export(loaded.model, loaded.tokenizer, out, merge=merge, what="--out", loss=loss)
    else:  # the run's own export path: every task of the run, the step's validation when it had one
        state = state or TrainState()
        step = state.optimizer_step
        shown = state.last_eval if state.last_eval.get("step") == step else {}
        export_run(
            loaded.model,
            loaded.tokenizer,
            out,
            cfg,
            [m.task for m in members_of(cfg, cfg.eval)],
            state,
            shown,
            f"Exported weights: step {step}{', the moving average (train.ema)' if averaged else ''}, "
            f"from the checkpoint {src.path.name} (`t2tune export`).",
            merge=merge,
            loss=loss,
            what="--out",
        )
    if loss.share >= MERGE_LOSS_HINT:
        say(
            f"warning: the LoRA merge's rounding to {str(loaded.model.dtype).removeprefix('torch.')} lost "
            f"{loss.share:.0%} of the update (entries below that dtype's resolution at their base weights); "
            "--adapter-only exports it exactly"
        )
    print(
        json.dumps(
            {"export": str(out), "adapter_only": bool(args.adapter_only), "merge_rounding_lost": round(loss.share, 4)}
        )
    )
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import BUILTIN

    for name, task in BUILTIN.items():
        kind = f"labels: {', '.join(task.labels)}" if task.labels else f"free text, metric {task.metric}"
        print(f"{name:<10} {task.description}\n{'':<10} prompt: {task.prompt}  ({kind})")
    print("\nCustom tasks: task=path/to/task.yaml (keys: name, prompt, target, labels, metric)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .config import key_table

    print(key_table(), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import ALIASES

    for name, what in ALIASES.items():
        print(f"{name:<14} {what}")
    print("\nAlso: a hub id, a local Hugging Face folder, a .gguf file, or a t2tune out_dir / checkpoint")
    return 0


# --- parser --------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser, predict: bool) -> None:
    from .config import CHOICES, EvalConfig

    defaults = EvalConfig()
    p.add_argument("model", help="exported folder, step checkpoint, out_dir, hub id, .gguf or alias")
    p.add_argument("--task", required=True, help="built-in task name or task .yaml")
    if predict:
        p.add_argument("--input", required=True, help="file or folder of rows to label")
        p.add_argument("--out", required=True, help="predictions JSONL")
    else:
        p.add_argument("--data", required=True, help="file, folder or hub dataset id")
        p.add_argument("--out", help="predictions JSONL (one line per example)")
        p.add_argument("--plots", help="folder for the confusion-matrix and (score mode) reliability PNGs")
    p.add_argument("--split", default="validation", help="split name for folders and hub datasets")
    p.add_argument("--hub-config", default=None, help="hub dataset configuration (e.g. mnli)")
    p.add_argument("--mode", choices=sorted(CHOICES["eval.mode"]), default=defaults.mode)
    p.add_argument(
        "--max-new-tokens",
        type=_count_or_auto,
        default=defaults.max_new_tokens,
        help="auto (default): from the labels, or from the rows' answers for free-text tasks",
    )
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--limit", type=int, default=defaults.limit)
    p.add_argument(
        "--precision",
        choices=sorted(CHOICES["eval.precision"]),
        default=defaults.precision,
        help="eval.precision; bf16-checked: bf16, with close calls redone in fp32 (fp32 predictions, "
        "most of bf16 speed)",
    )
    p.add_argument(
        "--entity-parsing",
        choices=sorted(CHOICES["eval.entity_parsing"]),
        default=defaults.entity_parsing,
        help="cut-off entity lists: keep the well-formed entities or none",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attn", default="sdpa", help="attention implementation (eager, sdpa)")
    p.add_argument(
        "--dtype",
        choices=sorted(CHOICES["model.dtype"]),
        default="float32",
        help="model.dtype: the weights' dtype in memory",
    )
    p.add_argument(
        "--compute-dtype",
        choices=sorted(CHOICES["model.compute_dtype"]),
        default=None,
        help="model.compute_dtype: compute in fp32 over bf16 weights (CPUs without bf16 units)",
    )
    p.add_argument("--trust-remote-code", action="store_true")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        say(f"error: {self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="t2tune", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune per a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
    p.add_argument("--overwrite", action="store_true", help="move an incompatible previous run aside")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="validate a model by generation or label scoring")
    _eval_args(p, predict=False)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("predict", help="predict answers for unlabeled rows")
    _eval_args(p, predict=True)
    p.set_defaults(func=lambda a: cmd_evaluate(a, predict=True))
    p = sub.add_parser("export", help="write a Hugging Face folder from a step checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--adapter-only", action="store_true", help="save a LoRA adapter alone, unmerged")
    p.set_defaults(func=cmd_export)
    sub.add_parser("tasks", help="list built-in tasks").set_defaults(func=cmd_tasks)
    sub.add_parser("models", help="list model aliases").set_defaults(func=cmd_models)
    sub.add_parser(
        "keys", help="list every config key: default, allowed values, resume-safe, what it does"
    ).set_defaults(func=cmd_keys)
    return parser


MODEL_COMMANDS = ("train", "evaluate", "predict", "export")  # the commands that load a model


def main(argv: list[str] | None = None) -> int:
    # `t2tune train --debug cfg` and `t2tune --debug train cfg` both work
    # SIGTERM ends a command as Ctrl-C does, from its first moment: temporary files are removed
    # on the way out, and exit 130. (The training loop takes both signals over to checkpoint first.)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        keep_freed_memory()
        if args.command in MODEL_COMMANDS:
            from .models import quiet_transformers

            quiet_transformers()  # the libraries' chatter would break the one-line promise
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
    except OSError as exc:  # the environment: a full disk, a folder that cannot be written, ...
        if debug:
            raise
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        advice = "free some space and run the same command again" if full else "check that path and try again"
        say(f"error: {exc.filename or 'a file'}: {exc.strerror or exc}; {advice}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        say(str(exc) or "interrupted")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
