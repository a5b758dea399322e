"""PNG plots in ``out_dir/plots/``: loss and learning-rate curves, validation curve, confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def refresh_plots(out_dir: Path, metrics: dict[str, Any] | None = None) -> None:
    folder = out_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plot_training(read_events(out_dir / "metrics.jsonl"), folder)
    if metrics:
        plot_confusion(metrics, folder / "confusion.png")
