"""What a run reports: ``metrics.jsonl`` (the source of truth), PNG plots drawn from it, and the
Hugging Face model card written into every export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .errors import say
from .files import atomic_bytes, atomic_file, has_png_text, open_inside, parse_json
from .tasks import Task


class MetricsLog:
    """``out_dir/metrics.jsonl``: one JSON object per event, appended and flushed; only the
    main process writes. ``trackers`` receive every event too (:class:`Trackers`)."""

    def __init__(self, path: Path, enabled: bool, trackers: Trackers | None = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers

    def trim_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint (they will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) <= step
        ]
        with atomic_file(self.path) as handle:
            handle.write("".join(line + "\n" for line in kept))

    def write(self, event: dict[str, Any]) -> None:
        if self.enabled:
            with open_inside(self.path, "a") as handle:
                handle.write(json.dumps(event) + "\n")
            if self.trackers is not None:
                self.trackers.log(event)


# --- experiment trackers ---------------------------------------------------------------------

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    """Refuse ``log.to`` trackers whose package is missing (accelerate would drop them with a warning)."""
    import importlib.util

    from .errors import UserError

    for name in names:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise UserError(f"log.to: {name} needs the {TRACKER_PACKAGES[name]} package: pip install 't2tune[{name}]'")


def tracker_settings(names: list[str], folder: Path) -> dict[str, dict[str, Any]]:
    """accelerate ``init_kwargs`` that keep every tracker on this machine, under ``folder``,
    unless the user's environment says otherwise (``WANDB_MODE``, ``MLFLOW_TRACKING_URI``,
    ``TRACKIO_DIR``, which these packages read themselves)."""
    import os

    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(folder)}
        if "WANDB_MODE" not in os.environ:
            kwargs["wandb"]["mode"] = "offline"
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (folder / "mlruns").resolve().as_uri())
        kwargs["mlflow"] = {"logging_dir": str(folder / "mlflow-artifacts")}
    if "trackio" in names:
        os.environ.setdefault("TRACKIO_DIR", str(folder / "trackio"))
    return kwargs


def _hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The config as flat ``section.key`` values that every tracker accepts (lists as text)."""
    from .config import flatten

    return {
        name: value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
        for name, value in flatten(config).items()
    }


class Trackers:
    """The run's experiment trackers, through accelerate's tracker API (``Accelerator(log_with=...)``):
    the config as hyperparameters, train and eval events as scalars, plots as images where the
    tracker takes images. ``metrics.jsonl`` stays the record; trackers are copies of it."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def start(self, project: str, config: dict[str, Any], settings: dict[str, dict[str, Any]]) -> None:
        self.accelerator.init_trackers(project, config=_hyperparameters(config), init_kwargs=settings)

    def log(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind not in ("train", "eval"):
            return
        values = {
            f"{kind}/{k}": v
            for k, v in event.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        self.accelerator.log(values, step=event["step"])

    def image(self, name: str, png: Path, step: int) -> None:
        if not png.is_file():
            return
        import numpy as np
        from matplotlib.image import imread

        picture = (imread(png)[..., :3] * 255).astype(np.uint8)  # (H, W, 3)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: picture[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: [picture]}, step=step)

    def finish(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _step_of(line: str) -> int:
    try:
        return int(parse_json(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = parse_json(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


# --- plots -----------------------------------------------------------------------------------


def _figure(**kwargs: Any) -> Any:
    """A matplotlib figure of its own (no pyplot, no backend switched for the process): PNGs
    are drawn by Agg when saved."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


PNG_SOFTWARE = "t2tune"  # the PNG text chunk by which t2tune knows its own plots


def _save(fig: Any, path: Path) -> None:
    """Save ``fig`` as a PNG tagged as t2tune's, by rename (a link at ``path`` is replaced, not followed)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    atomic_bytes(path, buffer.getvalue())


def is_t2tune_plot(path: Path) -> bool:
    return has_png_text(path, "Software", PNG_SOFTWARE + " ")


def plot_training(events: list[dict[str, Any]], folder: Path) -> None:
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    if train:
        fig = _figure(figsize=(10, 3.5))
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot([e["step"] for e in train], [e["loss"] for e in train])
        ax1.set(xlabel="optimizer step", ylabel="training loss", title="loss")
        ax2.plot([e["step"] for e in train], [e["lr"] for e in train], color="tab:orange")
        ax2.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
        fig.tight_layout()
        _save(fig, folder / "loss_lr.png")
    if evals:
        # one task: its headline; a mixture: every task's headline and their mean
        keys = (
            evals[0].get("headlines", []) + ["mean"]
            if "mean" in evals[0]
            else ["accuracy" if "accuracy" in evals[0] else "f1"]
        )
        fig = _figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for key in keys:
            ax.plot([e["step"] for e in evals], [e.get(key, 0) for e in evals], marker="o", label=key)
        if len(keys) > 1:
            ax.legend()
        label = keys[0] if len(keys) == 1 else "headline metrics"
        ax.set(xlabel="optimizer step", ylabel=f"validation {label}", title=f"validation {label}")
        fig.tight_layout()
        _save(fig, folder / "validation.png")


def plot_confusion(metrics: dict[str, Any], path: Path) -> bool:
    confusion = metrics.get("confusion")
    if not confusion:
        return False
    columns = [name if name is not None else "(invalid)" for name in confusion["labels"]]
    matrix = confusion["matrix"]
    fig = _figure(figsize=(1.4 * len(columns) + 2, 1.2 * len(matrix) + 1.5))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), columns[: len(matrix)])
    ax.set(xlabel="predicted", ylabel="gold", title="confusion matrix")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_reliability(metrics: dict[str, Any], path: Path) -> bool:
    """The reliability diagram of score mode: accuracy against confidence per bin, with the
    diagonal of perfect calibration and each bin's share of the rows."""
    curve = metrics.get("calibration")
    if not curve:
        return False
    fig = _figure(figsize=(4.5, 5))
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(curve["confidence"], curve["accuracy"], marker="o", label="model")
    ax.set(
        ylabel="accuracy",
        title=f"reliability (ECE {metrics.get('ece', 0):.3f}, {curve['bins']} bins)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    counts.bar(curve["confidence"], curve["count"], width=1 / curve["bins"], color="tab:blue", alpha=0.6)
    counts.set(xlabel="confidence (top label's probability)", ylabel="rows")
    fig.tight_layout()
    _save(fig, path)
    return True


METRIC_PLOTS = ("confusion.png", "reliability.png")  # the files of plot_metrics, after its prefix


def plot_metrics(metrics: dict[str, Any], folder: Path, prefix: str = "") -> None:
    """The plots of one validation: confusion matrix, and the reliability diagram (score mode)."""
    confusion, reliability = METRIC_PLOTS
    plot_confusion(metrics, folder / f"{prefix}{confusion}")
    plot_reliability(metrics, folder / f"{prefix}{reliability}")


def refresh_plots(folder: Path, events: list[dict[str, Any]], by_task: dict[str, dict[str, Any]] | None = None) -> None:
    """Redraw the run's plots, and each task's validation plots (``by_task``: file prefix →
    metrics; "" for a single task). A failure (no matplotlib, a full disk) is reported on stderr
    and does not stop training: the numbers stay in ``metrics.jsonl``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plot_training(events, folder)
        for prefix, metrics in (by_task or {}).items():
            plot_metrics(metrics, folder, prefix)
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        say(f"warning: plots in {folder} not updated ({type(exc).__name__}: {exc})")


# --- model card ------------------------------------------------------------------------------


def _prompt_section(task: Task) -> str:
    """How to prompt a task: a training example and the inference prompt."""
    fields = {name: f"<{name}>" for name in task.input_fields + task.target_fields}
    answers = f"Answers are one of: {', '.join(task.labels)}." if task.labels else "Answers are free text."
    return f"""Training example (`<EOS>` is the tokenizer's end-of-text token):

```
{task.train_text(fields, eos="<EOS>")}
```

At inference, give the prompt up to and including `target:` and decode greedily:

```
{task.prompt_text(fields)}
```
{answers}
"""


def model_card(
    cfg: Any,
    task: Task | list[Task],
    base_name: str,
    state: Any,
    last_eval: dict[str, Any],
    exported: str | None = None,
    gate: Any = None,
) -> str:
    """The README.md of an export: prompt format (of each task of a mixture), training config,
    validation numbers (of the exported step), which step was exported and why (``exported``),
    and the export gate's verdict (``gate``, a :class:`t2tune.guards.GateReport`), with a
    metadata block the Hub reads (``huggingface_hub.ModelCardData``)."""
    tasks = task if isinstance(task, list) else [task]
    names = " + ".join(t.name for t in tasks)
    if len(tasks) == 1:
        prompts = _prompt_section(tasks[0])
    else:
        prompts = "\n".join(f"### {t.name}\n\n{_prompt_section(t)}" for t in tasks)
    checks = "".join(f"{line}\n\n" for line in (exported, gate.line() if gate is not None else None) if line)
    if last_eval:
        shown = {k: v for k, v in last_eval.items() if isinstance(v, (int, float, str)) and v is not None}
        source = (
            f"{cfg.data.validation or cfg.data.train} (split {cfg.data.validation_split})"
            if not cfg.tasks
            else "each task's validation data"
        )
        mode = f", {shown['mode']} mode" if "mode" in shown else ""
        metrics = (
            f"Measured at optimizer step {last_eval.get('step')} on {shown.get('n')} rows of {source}{mode}:\n\n"
            + "\n".join(f"| {k} | {v} |" for k, v in shown.items() if k not in ("task", "mode", "step"))
            + "\n"
        )
        metrics = "| metric | value |\n|---|---|\n" + metrics
    else:
        metrics = "No validation was run for this export.\n"
    trained_on = ", ".join(f"`{e.train}`" for e in cfg.tasks.values()) if cfg.tasks else f"`{cfg.data.train}`"
    data = ModelCardData(
        library_name="transformers",
        base_model=base_name,
        tags=["t2tune", "text2text", *(t.name for t in tasks)],
        pipeline_tag="text-generation",
    )
    return str(
        ModelCard(f"""---
{data.to_yaml()}
---

# {names} fine-tune of {base_name}

Fine-tuned with t2tune {__version__} as a text-to-text task: the model reads the prompt and
generates the answer followed by its end-of-text token.

## Prompt format

{prompts}
## Training

Trained for {state.optimizer_step} optimizer steps ({state.tokens_seen:,} tokens) on
{trained_on}. Configuration:

```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()}
```

## Validation

{checks}{metrics}
## Upload

No upload was attempted. To publish this folder:

```
huggingface-cli upload YOUR_NAME/{names.replace(" + ", "-")}-{base_name.split("/")[-1]} . .
```
""")
    )
