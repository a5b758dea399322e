"""What happens when you run ``t2tune train``, top to bottom, in one module.

    train(cfg)                            the one entry point: the CLI, the Trainer facade, the
    │                                     tests and the benchmarks all come through here
    ├─ prepare(cfg)                       the stages, wired
    │   ├─ task, cheap preflight checks   (before anything slow: model name, QLoRA's needs)
    │   ├─ RunFolder.claim                out_dir: t2tune's own, locked, holding the same run
    │   ├─ data                           load_examples, a task's hub defaults filled in
    │   ├─ model                          load_model; seed; dropout / checkpointing / LoRA
    │   ├─ tokenize + pack                rows of train.seq_len + 1 tokens
    │   └─ accelerate                     LossModule, AdamW, the schedule and train.ema's average
    │                                     on every process; the trackers of log.to
    └─ Run.train()
        ├─ resume                         newest complete checkpoint: model, optimizer, RNG, data position
        ├─ packing self-test              isolated packing: packed losses = losses alone (guards.py)
        ├─ fit                            the loop: step, log, validate, checkpoint; stops on
        │                                 train.steps, train.max_minutes, a signal, a loss that
        │                                 is not finite, or eval.patience
        └─ finish                         validate and checkpoint the last step (a signal stop only
                                          checkpoints; a diverged run writes nothing more), the
                                          best (or last) step's weights to hf/, reloaded and
                                          compared first (the export gate), then the summary

Run holds the loop's verbs; it hands reporting to runlog.RunLog, saving and resuming to
checkpoint.Checkpointer, and what "best" means to validation.Best. Every process runs all of
this; the main process alone writes the run folder's shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .averaging import WeightAverage
from .checkpoint import Checkpointer
from .config import DataConfig, EvalConfig, RunConfig, batch_size_problem, dump_config
from .data import load_examples, with_hub_defaults
from .engines import cpu_only, fill_deepspeed_config, from_main, is_sharded, process_state
from .errors import ConfigError, UserError, say
from .evaluation import EvalResult, check_fits
from .export import MergeLoss, export_run, exported_line
from .files import atomic_file
from .guards import GateReport, check_packing, export_gate
from .loss import LossModule, check_compiler
from .memory import GIB, RSS, check_memory, staged
from .mixture import EpochRows, epoch_counts, epoch_size, mixing_rates
from .models import DTYPES, check_model_name, check_qlora_available, load_model, model_config, prepare_for_training
from .packing import PackedRow, pack
from .precision import compute_dtype_of
from .report import check_trackers
from .runfolder import RunFolder
from .runlog import RunLog, summary
from .runtime import return_freed_memory, trim_freed_memory
from .tasks import Task
from .tokenize import encode_for_training
from .training import (
    Interrupted,
    Schedule,
    StepResult,
    StopRequest,
    TrainParts,
    TrainState,
    make_optimizer,
    make_scheduler,
    next_positions,
    train_step,
)
from .validation import Best, Member, combined, members_of, metric_choices, validate_member

Row = dict[str, Any]
GATE_PROMPTS = 4  # validation prompts the export gate compares


@dataclass
class RunResult:
    state: TrainState
    stopped: str  # "steps" | "max_minutes" | "patience" | "signal" | "diverged"
    signal: int | None  # the signal number when stopped by one
    last_eval: dict[str, Any]  # the last validation's summary ({} when none ran)
    export: Path | None  # the Hugging Face export; None after a signal stop or divergence
    main_process: bool


def train(cfg: RunConfig, **given: Any) -> RunResult:
    """Run the whole recipe for ``cfg``; ``given`` as for :func:`prepare`."""
    return prepare(cfg, **given).train()


def prepare(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    task: Task | None = None,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Sequence[Row] | None = None,
    eval_rows: Sequence[Row] | None = None,
    eval_config: EvalConfig | None = None,
    metric: Callable | None = None,
    postprocess: Callable[[str], str] | None = None,
    base_name: str | None = None,
    accelerator: Any = None,
) -> Run:
    """Wire every stage of a run. Anything not given (task, data, model) comes from ``cfg``;
    ``metric(predictions, references) -> dict`` and ``postprocess(text) -> answer`` replace the
    task's own; ``overwrite`` moves an incompatible previous run in ``out_dir`` aside."""
    eval_config = eval_config or cfg.eval
    if cfg.tasks and (task is not None or train_rows is not None):
        raise UserError(
            "tasks: a multi-task run reads its tasks and data from the config; pass neither task= nor train_rows="
        )
    members = members_of(cfg, eval_config) if task is None else [Member(task.name, task, eval_config)]
    if postprocess is not None:
        for member in members:
            member.task = dataclasses.replace(member.task, custom_postprocess=postprocess)
    if model is None:
        check_model_name(cfg.model.name)
    if cfg.train.method == "qlora":
        check_qlora_available()
    check_trackers(cfg.log.to)
    if metric is None and cfg.eval.metric is not None:
        known = metric_choices(members)
        if cfg.eval.metric not in known:
            raise ConfigError(
                f"eval.metric: {cfg.eval.metric!r} is not reported by this run's validation "
                f"({', '.join(m.name + ' in ' + m.eval_config.mode + ' mode' for m in members)}); "
                f"choose from {', '.join(known)}"
            )
    if accelerator is not None and cfg.log.to:
        raise ConfigError(
            "log.to: an accelerator passed in brings its own trackers (Accelerator(log_with=...)); leave log.to empty"
        )
    process = process_state()
    if cfg.train.compile and is_sharded(process):
        raise ConfigError(
            "train.compile: not under DeepSpeed or FSDP (their parameter hooks are untested with "
            "torch.compile here); launch without them, or set train.compile=false"
        )
    if cfg.train.compile:
        check_compiler(process.device)
    if cfg.train.ema is not None and is_sharded(process):
        raise ConfigError(
            "train.ema: not under DeepSpeed or FSDP (each process holds a shard of the weights, and the "
            "average would have to follow the engine's partitioning); launch without them, or set "
            "train.ema=null"
        )
    if cfg.train.method == "qlora" and (process.num_processes > 1 or is_sharded(process)):
        raise ConfigError(
            "train.method=qlora runs in one process (4-bit weights are untested under DDP and are not "
            "sharded by DeepSpeed or FSDP); launch one process, or use train.method=lora"
        )
    if model is None and not is_sharded(process):  # before anything is loaded: refuse what cannot fit
        config = model_config(cfg.model)
        if config is not None:
            need = check_memory(config, cfg)
            if need.tight and return_freed_memory() and process.is_main_process:
                say(
                    f"the run needs about {need.total / GIB:.1f} of {need.room / GIB:.1f} GiB; freed memory "
                    "goes back to the system (less resident memory; GPT-J 6B on 2 cores: steps ~1.45x slower)"
                )
    folder = RunFolder(Path(cfg.out_dir))
    lock = _claim(folder, cfg, overwrite, process)
    RSS.restart()
    RSS.enter("load")
    if train_rows is None:
        for member, entry in zip(members, cfg.tasks.values() if cfg.tasks else [cfg.data]):
            member.train_rows, loaded_eval = _load_data(entry, member, cfg.eval.limit)
            member.eval_rows = loaded_eval if eval_rows is None else list(eval_rows)
    else:
        members[0].train_rows, members[0].eval_rows = list(train_rows), list(eval_rows or [])
    if model is None:
        loaded = load_model(cfg.model, nf4=cfg.train.method == "qlora")
        model, tokenizer = loaded.model, loaded.tokenizer
    RSS.leave("load")
    if tokenizer is None:
        raise UserError("a model given without its tokenizer; pass tokenizer=")

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    problem = batch_size_problem(t, process.num_processes)
    if problem:
        raise ConfigError(problem)
    # accumulate() marks the last micro-batch of each step, which DDP (sync) and DeepSpeed (its
    # engine step) both need; the count is the micro-batches per process per optimizer step
    accumulation = t.global_batch_size // (t.micro_batch_size * process.num_processes)
    if accelerator is None:
        trackers = {"log_with": cfg.log.to, "project_dir": str(folder.trackers)} if cfg.log.to else {}
        accelerator = Accelerator(cpu=cpu_only(), gradient_accumulation_steps=accumulation, **trackers)
        fill_deepspeed_config(accelerator, cfg.train, accumulation)
    elif accelerator.gradient_accumulation_steps != accumulation:
        raise ConfigError(
            f"the accelerator given accumulates {accelerator.gradient_accumulation_steps} micro-batches "
            f"per step; train.global_batch_size / (train.micro_batch_size × processes) = {accumulation}"
        )
    for member in members:  # before training: a validation that cannot run is refused now
        check_fits(model, tokenizer, member.task, member.eval_config)
    set_seed(t.seed)  # before LoRA's adapters are initialised
    model = prepare_for_training(model, t, cfg.lora, base_name or cfg.model.name)
    encoded, dropped = [], 0
    for member in members:
        examples, lost = encode_for_training(member.task, member.train_rows, tokenizer, t.seq_len, t.truncate)
        if lost and accelerator.is_main_process:
            say(
                f"{member.name}: {lost} training examples dropped: truncating '{member.task.truncate_field}' to "
                "fit train.seq_len would cut their answer"
            )
        encoded.append(examples)
        dropped += lost
        if not member.task.is_label_task:  # what eval.max_new_tokens: auto measures
            member.targets = [member.task.target_text(row) for row in member.train_rows]
        member.train_rows = []  # tokenized: their text is not read again (MNLI's 393k rows: ~0.5 GB)

    def packed(examples: list) -> list[PackedRow]:
        return pack(examples, t.packing, t.seq_len, t.loss_on, tokenizer.pad_token_id)

    mix: dict[str, Any] = {}
    if len(members) == 1:
        rows = packed(encoded[0])
        rows_of: Callable[[int], list[PackedRow]] = lambda epoch: rows  # noqa: E731
    else:
        mix = _mix(cfg, members, encoded)
        rows_of = EpochRows(encoded, [mix[m.name]["per_epoch"] for m in members], t.seed, packed).rows
    loss_module = LossModule(model, compile=t.compile)
    # together: DeepSpeed builds its engine around the model and the optimizer at once
    loss_module, optimizer = accelerator.prepare(loss_module, make_optimizer(loss_module, t))
    state = TrainState()  # one object for the whole run: a resume restores it in place
    spent = (lambda: state.train_seconds / (t.max_minutes * 60)) if t.steps == "auto" else None
    parts = TrainParts(accelerator, loss_module, optimizer, make_scheduler(optimizer, t, spent), tokenizer.pad_token_id)
    average = WeightAverage(model, t.ema) if t.ema is not None else None
    return Run(
        cfg,
        folder,
        members,
        model,
        tokenizer,
        parts,
        TrainData(rows_of, dropped, mix),
        state,
        eval_config=eval_config,
        metric=metric,
        base_name=base_name or cfg.model.name,
        lock=lock,
        average=average,
    )


def _mix(cfg: RunConfig, members: list[Member], encoded: list[list]) -> dict[str, dict[str, Any]]:
    """Per task: training examples, mixing rate and examples per epoch (``mixture.py``)."""
    sizes = {m.name: len(examples) for m, examples in zip(members, encoded)}
    empty = [name for name, n in sizes.items() if not n]
    if empty:
        raise UserError(f"tasks.{empty[0]}: no training examples")
    weights = {name: entry.weight or 1.0 for name, entry in cfg.tasks.items()}
    rates = mixing_rates(sizes, cfg.mix.rule, cfg.mix.cap, cfg.mix.temperature, weights)
    counts = epoch_counts(rates, epoch_size(sizes, cfg.mix.cap))
    return {name: {"examples": sizes[name], "rate": round(rates[name], 6), "per_epoch": counts[name]} for name in sizes}


def _claim(folder: RunFolder, cfg: RunConfig, overwrite: bool, process: Any) -> Any:
    """The main process claims ``out_dir`` (ownership, lock, config check); every process learns
    the outcome, so a refusal stops all of them with the same one line instead of a hang."""
    lock, refusal = None, None
    if process.is_main_process:
        try:
            lock, moved = folder.claim(cfg, overwrite)
            if moved is not None:
                say(f"moved the previous contents of out_dir to {moved}")
        except UserError as exc:
            refusal = str(exc)
    (refusal,) = from_main(process, [refusal])
    if refusal is not None:
        raise UserError(refusal)
    return lock


def _load_data(data: Any, member: Member, limit: int | None) -> tuple[list[Row], list[Row]]:
    """Training and validation rows per ``data`` (``data.*``, or a mixture's ``tasks.<name>``);
    a task's hub dataset is the default source."""
    task = member.task
    key = "data" if isinstance(data, DataConfig) else f"tasks.{member.name}"
    train_src = data.train or (task.hub[0] if task.hub else None)
    if train_src is None:
        raise UserError(f"{key}.train: no training data given and task {task.name} has no hub default")
    val_src = data.validation or train_src
    split, hub_config = with_hub_defaults(task, train_src, data.train_split, data.hub_config)
    rows = load_examples(task, train_src, split, hub_config)
    split, hub_config = with_hub_defaults(task, val_src, data.validation_split, data.hub_config)
    val_rows = load_examples(task, val_src, split, hub_config, limit=limit)
    train_file = rows[0].get("_where", "").rsplit(":", 1)[0] if rows else None
    if val_rows and val_rows[0].get("_where", "").rsplit(":", 1)[0] == train_file:
        say(
            f"warning: {key}.validation: validating on the training file {train_file}, so validation numbers "
            f"will be optimistic; give {key}.validation a file or folder of held-out rows"
        )
    return rows, val_rows


class Session(Protocol):
    """What :func:`fit` drives; :class:`Run` is the real one, tests use a fake."""

    def out_of_time(self) -> bool: ...
    def agree(self, seconds: float) -> float: ...
    def step(self) -> StepResult: ...
    def progress(self, result: StepResult, seconds: float) -> None: ...
    def log(self, result: StepResult, seconds: float) -> None: ...
    def validate(self) -> bool | None: ...
    def checkpoint(self) -> Any: ...


# optimizer steps between hand-backs of kept freed memory (runtime.trim_freed_memory): the step
# after one re-faults its pages (~half a step on the 2-core CPU), about 1% of the time at 50
TRIM_EVERY = 50


def fit(run: Session, state: TrainState, schedule: Schedule, stop: StopRequest) -> str:
    """The training loop. Returns why it stopped: ``steps``, ``signal``, ``max_minutes``,
    ``patience`` (``eval.patience`` validations without a new best) or ``diverged`` (a loss or
    gradient norm that is not finite). A validation that finds a new best checkpoints its step,
    so that the best weights exist to export."""
    while True:
        if state.optimizer_step >= schedule.steps:
            return "steps"
        if stop.signal is not None:
            return "signal"
        if run.out_of_time():  # the same on every process: step times are agreed below
            return "max_minutes"
        start = time.perf_counter()
        result = run.step()
        seconds = run.agree(time.perf_counter() - start)
        if not all(math.isfinite(x) for x in (result.loss, result.grad_norm or 0.0)):
            return "diverged"  # the same on every process: loss and norm are global
        state.optimizer_step += 1
        state.tokens_seen += result.tokens
        state.train_seconds += seconds
        step = state.optimizer_step
        run.progress(result, seconds)
        if step % TRIM_EVERY == 0:
            trim_freed_memory()  # kept freed memory would otherwise creep up over a long run
        if schedule.logs(step):
            run.log(result, seconds)
        try:
            with stop.interruptible():  # a signal here stops at once; the stop then checkpoints
                improved = run.validate() if schedule.validates(step) else False
                if improved or schedule.checkpoints(step):
                    run.checkpoint()
        except Interrupted:
            return "signal"
        if schedule.out_of_patience(state.stale):
            return "patience"


@dataclass
class TrainData:
    """The training rows as the loop reads them."""

    rows_of: Callable[[int], list[PackedRow]]  # an epoch's rows (fixed for one task, packed anew for a mixture)
    dropped: int  # training examples dropped because truncating would cut their answer
    mix: dict[str, Any]  # a mixture's examples, rate and examples per epoch, per task ({} for one task)


class Run:
    """One wired training run: its parts, and the verbs the loop calls. Reporting is
    :class:`RunLog`'s, saving and resuming the :class:`Checkpointer`'s, what "best" means
    :class:`Best`'s."""

    def __init__(
        self,
        cfg: RunConfig,
        folder: RunFolder,
        members: list[Member],
        model: Any,
        tokenizer: Any,
        parts: TrainParts,
        data: TrainData,
        state: TrainState,
        *,
        eval_config: EvalConfig,
        metric: Callable | None,
        base_name: str,
        lock: Any = None,
        average: WeightAverage | None = None,
    ):
        self.cfg, self.folder, self.members, self.model, self.tokenizer = cfg, folder, members, model, tokenizer
        self.parts, self.data, self.state, self.eval_config = parts, data, state, eval_config
        self.metric, self.base_name = metric, base_name
        self.lock = lock  # the out_dir lock (main process), released when train() ends
        self.average = average  # train.ema: validated and exported instead of the raw weights
        self.accelerator = parts.accelerator
        self.main = self.accelerator.is_main_process
        self.rows = data.rows_of(0)
        self.runlog = RunLog(cfg, folder, self.accelerator, model)
        self.checkpointer = Checkpointer(cfg, folder, parts, model, tokenizer, average)
        self.best = Best(eval_config, members)
        every = eval_config.every if any(m.eval_rows for m in members) else 0
        steps = sys.maxsize if cfg.train.steps == "auto" else cfg.train.steps  # auto: the budget stops it
        self.schedule = Schedule(steps, cfg.train.log_every, every, cfg.checkpoint.every, eval_config.patience)
        self.diverged: dict[str, Any] = {}  # the last step's loss and norm, reported if not finite
        self.packing_report: dict[str, Any] = {}  # the packing self-test's drift and seconds
        self.merge_loss = MergeLoss()  # what the export's LoRA merge lost to rounding

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.state.last_eval

    def train(self) -> RunResult:
        try:
            return self._train()
        finally:
            self.runlog.finish()
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> RunResult:
        resumed = self.resume()  # first: a checkpoint that cannot be read leaves the folder untouched
        if self.main:
            with atomic_file(self.folder.config) as handle:
                handle.write(dump_config(self.cfg))
        checked = self.check_packing()
        t = self.cfg.train
        self.runlog.peak_dtype = torch.bfloat16 if t.precision == "bf16" else compute_dtype_of(self.model)
        self.runlog.start(
            self.state,
            resumed,
            self.rows,
            {"dropped_examples": self.data.dropped, **checked, **({"mix": self.data.mix} if self.data.mix else {})},
        )
        # from_pretrained hands the model over in eval mode, where dropout (train.dropout, LoRA's)
        # is off and bitsandbytes swaps 4-bit weights to an inference-only kernel; validation
        # and the self-tests put back the mode they found
        self.model.train()
        with StopRequest(immediate=self.accelerator.num_processes == 1) as stop:
            stopped = fit(self, self.state, self.schedule, stop)
            self.runlog.close_bar()
            if stopped == "signal":
                self.checkpoint()
                self.runlog.file.write({"event": "stopped", "step": self.state.optimizer_step, "signal": stop.signal})
                return RunResult(self.state, stopped, stop.signal, self.last_eval, None, self.main)
        if stopped == "diverged":  # the weights hold the bad update: save nothing, export nothing
            self.runlog.file.write({"event": "diverged", "step": self.state.optimizer_step + 1, **self.diverged})
            return RunResult(self.state, stopped, None, self.last_eval, None, self.main)
        return finish(self, stopped)

    # --- the loop's verbs ------------------------------------------------------------------
    def agree(self, seconds: float) -> float:
        """One step's duration as every process counts it: the slowest one's, so that the time
        budget, and with it a budgeted learning rate, is the same everywhere."""
        if self.accelerator.num_processes == 1:
            return seconds
        took = torch.tensor([seconds], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.gather(took).max())  # (accelerate's reduce has no max)

    def out_of_time(self) -> bool:
        """``train.max_minutes`` reached. Every process counts the same ``train_seconds``
        (:meth:`agree`), so all of them stop at the same step without another collective."""
        limit = self.cfg.train.max_minutes
        return limit is not None and self.state.train_seconds >= limit * 60

    @staged("train")
    def step(self) -> StepResult:
        t, rows_of = self.cfg.train, self.data.rows_of
        positions = next_positions(lambda epoch: len(rows_of(epoch)), self.state, t.global_batch_size, t.seed)
        result = train_step(self.parts, [rows_of(epoch)[i] for epoch, i in positions], t)
        if self.average is not None:
            self.average.update(self.state.optimizer_step + 1)  # fit counts the step once this returns
        self.state.model_flops += self.runlog.flops.of(result.tokens, result.label_tokens)
        self.diverged = {"loss": result.loss, "grad_norm": result.grad_norm}
        return result

    def progress(self, result: StepResult, seconds: float) -> None:
        self.runlog.progress(result, seconds, self.parts.scheduler.get_last_lr()[0])

    def log(self, result: StepResult, seconds: float) -> None:
        self.runlog.train(self.state, result, seconds, self.parts.scheduler.get_last_lr()[0])

    @staged("validate")
    def validate(self) -> bool:
        """Validate on every process (each runs its share; under ``train.ema`` the averaged
        weights); the main process records the best step, logs and plots. Returns whether this
        step is a new best (on every process)."""
        start = time.perf_counter()
        with self.average.applied() if self.average is not None else contextlib.nullcontext():
            results = [(m, self.evaluate(member=m)) for m in self.members if m.eval_rows]
        improved, failed, s = False, None, self.state
        if self.main:
            try:
                summary, metrics = combined(results, len(self.members) > 1)
                improved = self.best.record(s, summary)
                s.eval_seconds += time.perf_counter() - start
                self.runlog.validation(
                    s,
                    summary,
                    metrics,
                    self.best.line(summary, s),
                    [m.name for m in self.members] if len(self.members) > 1 else None,
                )
            except UserError as exc:  # raised below on every process: the others would wait forever
                failed = exc
        improved, s.best, s.stale, failed = from_main(self.accelerator, [improved, s.best, s.stale, failed])
        if failed is not None:
            raise failed
        return improved

    @staged("checkpoint")
    def checkpoint(self) -> dict[str, Any] | None:
        """Write ``step-N/`` (collective under sharded engines); see :meth:`Checkpointer.save`."""
        self.runlog.tick(self.state)
        return self.checkpointer.save(self.state)

    # --- resume, self-test, evaluate, export ----------------------------------------------------
    def resume(self) -> bool:
        """Continue from the newest complete checkpoint; False when there is none."""
        saved = self.checkpointer.resume(lambda epoch: len(self.data.rows_of(epoch)))
        if saved is not None:
            self.state.restore(saved)
        # events after the checkpoint (or, with none, of a run killed before it) are redone
        self.runlog.file.trim_after(self.state.optimizer_step)
        return saved is not None

    def check_packing(self) -> dict[str, Any]:
        """The packing self-test (isolated packing unless ``train.packing_check: false``; every
        process runs it, as sharded weights need); its drift and cost for the start event."""
        t = self.cfg.train
        if t.packing != "isolated" or not t.packing_check:
            return {}
        start = time.perf_counter()
        drift = check_packing(self.model, self.rows, t.precision)
        self.packing_report = {"drift": drift, "seconds": round(time.perf_counter() - start, 3)}
        return {"packing_check": self.packing_report}

    def evaluate(self, limit: int | None = None, member: Member | None = None) -> EvalResult:
        """Validate a task (default: the first) on its eval rows; metrics via ``metric`` when given."""
        return validate_member(
            self.model, self.tokenizer, member or self.members[0], self.accelerator, self.metric, limit
        )


def finish(run: Run, stopped: str) -> RunResult:
    """After a loop that ran to its end (steps, budget or patience): validate and checkpoint the
    last step where that has not happened yet, restore the step to export (``export.from``),
    export it behind the gate, and sum the run up."""
    state, log = run.state, run.runlog
    step = state.optimizer_step
    if any(m.eval_rows for m in run.members) and run.last_eval.get("step") != step:
        run.validate()
    if step in [n for n, _ in run.folder.checkpoints()]:
        weights = run.checkpointer.full_weights()
    else:
        weights = run.checkpoint()  # gathers the full weights once, for both
    exported, weights = run.checkpointer.restore_exported(state, weights)
    gate = _export_gate(run, weights) if run.cfg.export.gate else None
    failed = None
    if run.main:
        try:
            report = export_weights(run, run.folder.export, run.cfg.export.merge, weights, gate, exported)
            log.tick(state)
            end = summary(log, state, run.best.key, exported, report, run.merge_loss, run.packing_report)
            log.file.write({"event": "end", "step": step, "stopped": stopped, **end})
        except UserError as exc:  # every process reaches the barrier below before it is raised
            failed = exc
    run.accelerator.wait_for_everyone()
    if failed is not None:
        raise failed
    return RunResult(state, stopped, None, run.last_eval, run.folder.export, run.main)


def _export_gate(run: Run, weights: dict[str, Any] | None) -> Callable[[Path], GateReport] | None:
    """The gate's check, on the first task's first validation prompts (guards.export_gate)."""
    first, wide = run.members[0], run.cfg.model.compute_dtype
    prompts = [first.task.prompt_text(r) for r in first.eval_rows[:GATE_PROMPTS]]
    return export_gate(
        run.model,
        run.tokenizer,
        prompts,
        run.eval_config.seq_len,
        run.accelerator,
        merge=run.cfg.export.merge,
        weights=weights,
        dtype_name=run.cfg.model.dtype,
        compute_dtype=DTYPES[wide] if wide else None,
        merge_loss=run.merge_loss,
    )


@staged("export")
def export_weights(
    run: Run,
    path: Path,
    merge: bool = True,
    weights: dict[str, Any] | None = None,
    check: Callable[[Path], GateReport] | None = None,
    exported: dict[str, Any] | None = None,
) -> GateReport | None:
    """Write ``run``'s Hugging Face export (main process); ``weights``: gathered full weights;
    ``check``: the export gate; ``exported``: the validation summary of the exported step
    (default: the last validation). Returns the gate's report."""
    shown = run.last_eval if exported is None else exported
    return export_run(
        run.model,
        run.tokenizer,
        path,
        run.cfg,
        [m.task for m in run.members],
        run.state,
        shown,
        exported_line(run.state, shown, run.best.key, run.cfg.export.from_),
        base_name=run.base_name,
        merge=merge,
        weights=weights,
        check=check,
        loss=run.merge_loss,
        hint="; the checkpoints are kept, run `t2tune export` on the newest one",
    )
