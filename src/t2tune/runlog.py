"""What a run tells its user while it runs and when it ends: the progress bar, ``metrics.jsonl``
(start, train, eval and end events) and its copies to the trackers, the plots, the wall clock,
MFU, and the end-of-run summary lines. Nothing here decides anything about training."""

from __future__ import annotations

import time
from typing import Any

import torch

from . import __version__
from .errors import say
from .memory import RSS
from .report import MetricsLog, Trackers, read_events, refresh_plots, tracker_settings
from .runfolder import RunFolder
from .speed import Peak, mfu, model_flops, packing_efficiency, peak_tflops
from .training import StepResult, TrainState


class RunLog:
    """The reporting of one run. Every process holds one; only the main process writes."""

    def __init__(self, cfg: Any, folder: RunFolder, accelerator: Any, model: Any) -> None:
        self.cfg, self.folder, self.accelerator = cfg, folder, accelerator
        self.main = accelerator.is_main_process
        self.trackers = Trackers(accelerator) if cfg.log.to else None
        self.file = MetricsLog(folder.metrics, self.main, self.trackers)
        self.flops = model_flops(model, cfg.train.seq_len)
        # the MFU peak, its dtype and where it came from, and the rows' packing efficiency: set
        # when training starts
        self.peak, self.peak_dtype, self.packing_efficiency = Peak(0.0, ""), torch.float32, 0.0
        self.bar: Any = None
        self._since = time.perf_counter()  # wall_seconds counts from here

    def start(self, state: TrainState, resumed: bool, rows: list, event: dict[str, Any]) -> None:
        """Measure the MFU peak, then write the start event (``event``: what the run adds) and
        open the progress bar."""
        t = self.cfg.train
        if self.trackers is not None:
            self.trackers.start(
                self.folder.root.name, self.cfg.to_dict(), tracker_settings(self.cfg.log.to, self.folder.trackers)
            )
        self.peak = peak_tflops(self.accelerator.device, self.peak_dtype, t.peak_tflops)
        self.packing_efficiency = round(packing_efficiency(rows, t.seq_len), 4)
        self._since = time.perf_counter()
        self.file.write(
            {
                "event": "start",
                "step": state.optimizer_step,
                "resumed": resumed,
                "rows": len(rows),
                **event,
                "packing_efficiency": self.packing_efficiency,
                "flops_per_token": self.flops.per_token,
                "flops_per_label": self.flops.per_label,
                "peak_tflops": round(self.peak.tflops, 4),
                "peak_source": self.peak.source,
                "peak_probes": self.peak.spread,
                "peak_measured_at": self.peak.measured_at or None,
                "processes": self.accelerator.num_processes,
                "t2tune": __version__,
            }
        )
        from tqdm.auto import tqdm

        total = None if t.steps == "auto" else t.steps
        self.bar = tqdm(
            total=total, initial=state.optimizer_step, disable=not self.main, unit="step", dynamic_ncols=True
        )

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    def finish(self) -> None:
        if self.trackers is not None:
            self.trackers.finish()

    def tick(self, state: TrainState) -> float:
        """Add the time since the last tick to ``state.wall_seconds``; returns it."""
        now = time.perf_counter()
        state.wall_seconds += now - self._since
        self._since = now
        return state.wall_seconds

    def mfu(self, flops: float, seconds: float) -> float:
        return mfu(flops, seconds, self.peak.tflops, self.accelerator.num_processes)

    def step_mfu(self, result: StepResult, seconds: float) -> float:
        return self.mfu(self.flops.of(result.tokens, result.label_tokens), seconds)

    def progress(self, result: StepResult, seconds: float, lr: float) -> None:
        tps = result.tokens / seconds if seconds else 0.0
        self.bar.set_postfix(
            loss=f"{result.loss:.4f}",
            lr=f"{lr:.2e}",
            tok_s=f"{tps:,.0f}",
            mfu=f"{self.step_mfu(result, seconds):.1%}",
            refresh=False,
        )
        self.bar.update(1)

    def train(self, state: TrainState, result: StepResult, seconds: float, lr: float) -> None:
        self.file.write(
            {
                "event": "train",
                "step": state.optimizer_step,
                "loss": result.loss,
                "lr": lr,
                "tokens_per_s": result.tokens / seconds if seconds else 0.0,
                "mfu": round(self.step_mfu(result, seconds), 5),
                "grad_norm": result.grad_norm,
                "epoch": state.epoch,
                "tokens_seen": state.tokens_seen,
                "train_seconds": round(state.train_seconds, 3),
                "wall_seconds": round(self.tick(state), 3),
            }
        )

    def validation(
        self, state: TrainState, summary: dict[str, Any], metrics: dict[str, Any], line: str, tasks: list[str] | None
    ) -> None:
        """The main process's record of a validation: the eval event, the progress line, plots
        and tracker images (``tasks``: a mixture's task names, each with its own plots)."""
        share = state.eval_seconds / max(self.tick(state), 1e-9)
        self.file.write(
            {
                "event": "eval",
                "step": state.optimizer_step,
                **summary,
                "best_step": state.best["step"],
                "train_seconds": round(state.train_seconds, 3),
                "eval_seconds": round(state.eval_seconds, 3),
                "validation_share": round(share, 4),
                "metrics": metrics,
            }
        )
        if self.bar is not None:
            self.bar.write(line)
        by_task = {"": metrics} if tasks is None else {f"{name}-": metrics[name] for name in tasks}
        refresh_plots(self.folder.plots, read_events(self.folder.metrics), by_task)
        if self.trackers is not None:
            for prefix in by_task:
                for name in ("confusion", "reliability"):
                    self.trackers.image(
                        f"eval/{prefix.replace('-', '/')}{name}",
                        self.folder.plots / f"{prefix}{name}.png",
                        state.optimizer_step,
                    )


def summary(
    log: RunLog,
    state: TrainState,
    best_key: str,
    exported: dict[str, Any],
    gate: Any,
    merge_loss: Any,
    packing_report: dict[str, Any],
) -> dict[str, Any]:
    """The end-of-run numbers; printed as a few lines on stderr, returned for metrics.jsonl."""
    s, t = state, log.cfg.train
    wall = max(s.wall_seconds, 1e-9)
    tps = s.tokens_seen / s.train_seconds if s.train_seconds else 0.0
    numbers = {
        "tokens_seen": s.tokens_seen,
        "train_seconds": round(s.train_seconds, 3),
        "eval_seconds": round(s.eval_seconds, 3),
        "wall_seconds": round(s.wall_seconds, 3),
        "tokens_per_s": round(tps, 1),
        "mfu": round(log.mfu(s.model_flops, s.train_seconds), 5),
        "packing_efficiency": log.packing_efficiency,
        "validation_share": round(s.eval_seconds / wall, 4),
        "best": s.best,
        "exported_step": exported.get("step"),
        "export": str(log.folder.export),
        "gate_drift": gate.drift if gate else None,
        "merge_rounding_lost": round(merge_loss.share, 4),
        "peak_tflops": round(log.peak.tflops, 4),
        "peak_source": log.peak.source,
        "peak_rss_gib": RSS.gib(),
    }
    precision = "bf16" if t.precision == "bf16" else str(log.peak_dtype).removeprefix("torch.")
    say(
        f"{s.optimizer_step} steps, {s.tokens_seen:,} tokens in {s.wall_seconds / 60:.1f} min: training "
        f"{s.train_seconds / 60:.1f} min at {tps:,.0f} tokens/s (MFU {numbers['mfu']:.1%} of "
        f"{log.peak.tflops:.3g} TFLOP/s {precision}, {log.peak.describe()}), "
        f"validation {s.eval_seconds / 60:.1f} min "
        f"({numbers['validation_share']:.1%} of the wall time)"
    )
    test = packing_report
    test_text = (
        f"; packing self-test passed (drift {test['drift']:.2g} nats/token, {test['seconds']:.1f} s)" if test else ""
    )
    say(
        f"packing efficiency {numbers['packing_efficiency']:.1%} (real tokens ÷ row slots, "
        f"train.packing: {t.packing}){test_text}"
    )
    best = (
        f"best {best_key} {s.best[best_key]:.4f} at step {s.best['step']}; " if s.best.get(best_key) is not None else ""
    )
    gate_text = (
        f"; export gate passed (drift {gate.drift:.2g}, {gate.dtype})"
        if gate
        else ("; export gate off" if not log.cfg.export.gate else "; export gate skipped (no validation rows)")
    )
    if gate and not gate.prompts:
        gate_text = "; export gate passed (the adapter, bit for bit)"
    if merge_loss.update_sq:
        gate_text += f"; the LoRA merge's rounding lost {merge_loss.share:.1%} of the update"
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in numbers["peak_rss_gib"].items())
    say(f"peak RSS (GiB) by stage: {peaks}")
    say(
        f"{best}exported step {exported.get('step')} (export.from: {log.cfg.export.from_}) to "
        f"{log.folder.export}{gate_text}"
    )
    return numbers
