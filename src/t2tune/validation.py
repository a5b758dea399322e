"""A run's validation: its tasks (a :class:`Member` each; a single-task run has one), what
``eval.metric`` may name, one validation's summary over every task, and which step is best.

``evaluation.evaluate`` validates one model on one task's rows and knows nothing of runs; this
module is what a run adds: a mixture's combined summary (``<task>/<metric>`` and ``mean``), the
user's own ``metric``, and the best step and patience count (:class:`Best`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import EvalConfig, RunConfig
from .errors import ConfigError, UserError
from .evaluation import EvalResult, evaluate
from .metrics import greater_is_better, headline, metric_names
from .tasks import Task, get_task
from .training import TrainState

Row = dict[str, Any]


@dataclass
class Member:
    """One task of the run (a single-task run has one): its data and how it is validated."""

    name: str
    task: Task
    eval_config: EvalConfig
    train_rows: list[Row] = dataclasses.field(default_factory=list)
    eval_rows: list[Row] = dataclasses.field(default_factory=list)
    targets: list[str] | None = None  # a free-text task's training targets (eval.max_new_tokens: auto)


def members_of(cfg: RunConfig, eval_config: EvalConfig) -> list[Member]:
    """The tasks of a run: ``task``, or a multi-task run's ``tasks``, where a task that cannot be
    found is one line naming its entry, and each validates in its own mode:
    ``tasks.<name>.mode``, else eval.mode (generate for free text)."""
    if not cfg.tasks:
        task = get_task(cfg.task)
        return [Member(task.name, task, eval_config)]
    members = []
    for name, entry in cfg.tasks.items():
        try:
            task = get_task(entry.task or name)
        except UserError as exc:
            raise UserError(f"tasks.{name}{'.task' if entry.task else ''}: {exc}") from None
        mode = entry.mode or (eval_config.mode if task.is_label_task else "generate")
        if mode == "score" and not task.is_label_task:
            raise ConfigError(f"tasks.{name}.mode: score mode needs a label task; {task.name} has free-text answers")
        members.append(Member(name, task, dataclasses.replace(eval_config, mode=mode)))
    return members


def metric_choices(members: list[Member]) -> list[str]:
    """What ``eval.metric`` may name: a task's own metrics, or in a mixture ``<task>/<metric>``
    and ``mean`` (the unweighted mean of the tasks' headlines)."""
    if len(members) == 1:
        return metric_names(members[0].task, members[0].eval_config.mode)
    return [f"{m.name}/{key}" for m in members for key in metric_names(m.task, m.eval_config.mode)] + ["mean"]


def validate_member(
    model: Any, tokenizer: Any, member: Member, processes: Any, metric: Callable | None = None, limit: int | None = None
) -> EvalResult:
    """Validate one task on its eval rows with its eval config (every process takes a share of
    the rows); metrics via the user's ``metric`` when given, on the main process."""
    ec = member.eval_config
    rows = member.eval_rows[: (limit or ec.limit or len(member.eval_rows))]
    result = evaluate(
        model,
        tokenizer,
        member.task,
        rows,
        ec,
        with_metrics=metric is None,
        processes=processes,
        targets=member.targets,
    )
    if metric is not None and processes.is_main_process:
        result.metrics = dict(
            metric([r["prediction"] for r in result.records], [member.task.references(r) for r in rows])
        )
    return result


def combined(results: list[tuple[Member, EvalResult]], mixture: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One validation's summary line and metrics: one task's own, or for a mixture every task's
    numbers as ``<task>/<metric>``, their headlines' unweighted ``mean``, and each task's summary
    and metrics under its name."""
    if not mixture:
        ((member, result),) = results
        return result.summary(member.task, member.eval_config.mode), result.metrics
    per = {m.name: r.summary(m.task, m.eval_config.mode) for m, r in results}
    flat = {
        f"{m.name}/{key}": per[m.name][key]
        for m, _ in results
        for key in metric_names(m.task, m.eval_config.mode)
        if key in per[m.name]
    }
    heads = [per[m.name][headline(m.task)] for m, _ in results]
    seconds = sum(r.seconds for _, r in results)
    n = sum(len(r.records) for _, r in results)
    summary = {
        **flat,
        "mean": sum(heads) / len(heads),
        "n": n,
        "examples_per_s": round(n / seconds, 3) if seconds else None,
        "headlines": [f"{m.name}/{headline(m.task)}" for m, _ in results],
        "tasks": per,
    }
    return summary, {m.name: r.metrics for m, r in results}


class Best:
    """What "best" means for a run: ``eval.metric`` (default: the task's headline, a mixture's
    ``mean``), higher or lower better (``eval.greater_is_better``, else inferred)."""

    def __init__(self, eval_config: EvalConfig, members: list[Member]) -> None:
        self.key = eval_config.metric or (headline(members[0].task) if len(members) == 1 else "mean")
        given = eval_config.greater_is_better
        self.higher = greater_is_better(self.key) if given is None else given

    def record(self, state: TrainState, summary: dict[str, Any]) -> bool:
        """Record a validation of ``state.optimizer_step`` in the state (last, best, patience
        count); returns whether it is a new best."""
        if self.key not in summary:
            raise ConfigError(
                f"eval.metric: the validation reports no {self.key!r}; it reports "
                f"{', '.join(k for k, v in summary.items() if isinstance(v, (int, float)))}"
            )
        step, value = state.optimizer_step, summary[self.key]
        improved = not state.best or (value > state.best[self.key] if self.higher else value < state.best[self.key])
        state.best = {**summary, "step": step} if improved else state.best
        state.stale = 0 if improved else state.stale + 1
        state.last_eval = {**summary, "step": step}
        return improved

    def line(self, summary: dict[str, Any], state: TrainState) -> str:
        """The progress line of a validation (a mixture's leads with every task's headline)."""
        heads = "".join(f"{name} {summary[name]:.4f}, " for name in summary.get("headlines", []))
        return (
            f"step {state.optimizer_step}: {heads}{self.key} {summary[self.key]:.4f} (best "
            f"{state.best[self.key]:.4f} at step {state.best['step']}), {summary['examples_per_s']} examples/s"
        )
