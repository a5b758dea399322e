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
from .files import atomic_file
from .tasks import Task


class MetricsLog:
    """``out_dir/metrics.jsonl``: one JSON object per event, appended and flushed; only the
    main process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def trim_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint (they will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= step]
        with atomic_file(self.path) as handle:
            handle.write("".join(line + "\n" for line in kept))

    def write(self, event: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


# --- plots -----------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(events: list[dict[str, Any]], folder: Path) -> None:
    plt = _pyplot()
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    if train:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        ax1.plot([e["step"] for e in train], [e["loss"] for e in train])
        ax1.set(xlabel="optimizer step", ylabel="training loss", title="loss")
        ax2.plot([e["step"] for e in train], [e["lr"] for e in train], color="tab:orange")
        ax2.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
        fig.tight_layout()
        fig.savefig(folder / "loss_lr.png", dpi=100)
        plt.close(fig)
    if evals:
        key = "accuracy" if "accuracy" in evals[0] else "f1"
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([e["step"] for e in evals], [e.get(key, 0) for e in evals], marker="o")
        ax.set(xlabel="optimizer step", ylabel=f"validation {key}", title=f"validation {key}")
        fig.tight_layout()
        fig.savefig(folder / "validation.png", dpi=100)
        plt.close(fig)


def plot_confusion(metrics: dict[str, Any], path: Path) -> bool:
    confusion = metrics.get("confusion")
    if not confusion:
        return False
    plt = _pyplot()
    columns, matrix = confusion["labels"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2, 1.2 * len(matrix) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), columns[:len(matrix)])
    ax.set(xlabel="predicted", ylabel="gold", title="confusion matrix")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def refresh_plots(folder: Path, events: list[dict[str, Any]], metrics: dict[str, Any] | None = None) -> None:
    """Redraw the run's plots; a failure (no matplotlib, a full disk) is reported on stderr and
    does not stop training: the numbers stay in ``metrics.jsonl``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plot_training(events, folder)
        if metrics:
            plot_confusion(metrics, folder / "confusion.png")
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        say(f"warning: plots in {folder} not updated ({type(exc).__name__}: {exc})")


# --- model card ------------------------------------------------------------------------------

def model_card(cfg: Any, task: Task, base_name: str, state: Any, last_eval: dict[str, Any]) -> str:
    """The README.md of an export: prompt format, training config, validation numbers, with a
    metadata block the Hub reads (``huggingface_hub.ModelCardData``)."""
    fields = {name: f"<{name}>" for name in task.input_fields + task.target_fields}
    prompt = task.prompt_text(fields)
    if last_eval:
        shown = {k: v for k, v in last_eval.items() if isinstance(v, (int, float, str)) and v is not None}
        source = f"{cfg.data.validation or cfg.data.train} (split {cfg.data.validation_split})"
        metrics = (f"Measured at optimizer step {last_eval.get('step')} on {shown.get('n')} rows of {source}, "
                   f"{shown.get('mode')} mode:\n\n"
                   + "\n".join(f"| {k} | {v} |" for k, v in shown.items() if k not in ("task", "mode", "step"))
                   + "\n")
        metrics = "| metric | value |\n|---|---|\n" + metrics
    else:
        metrics = "No validation was run for this export.\n"
    data = ModelCardData(library_name="transformers", base_model=base_name,
                         tags=["t2tune", "text2text", task.name], pipeline_tag="text-generation")
    return str(ModelCard(f"""---
{data.to_yaml()}
---

# {task.name} fine-tune of {base_name}

Fine-tuned with t2tune {__version__} as a text-to-text task: the model reads the prompt and
generates the answer followed by its end-of-text token.

## Prompt format

Training example (`<EOS>` is the tokenizer's end-of-text token):

```
{task.train_text(fields, eos="<EOS>")}
```

At inference, give the prompt up to and including `target:` and decode greedily:

```
{prompt}
```
{f"Answers are one of: {', '.join(task.labels)}." if task.labels else "Answers are free text."}

## Training

Trained for {state.optimizer_step} optimizer steps ({state.tokens_seen:,} tokens) on
`{cfg.data.train}`. Configuration:

```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()}
```

## Validation

{metrics}
## Upload

No upload was attempted. To publish this folder:

```
huggingface-cli upload YOUR_NAME/{task.name}-{base_name.split('/')[-1]} . .
```
"""))
