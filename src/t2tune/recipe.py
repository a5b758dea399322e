"""What happens when you run ``t2tune train``, top to bottom, in one module.

    train(cfg)                            the one entry point: the CLI, the Trainer facade, the
    │                                     tests and the benchmarks all come through here
    ├─ prepare(cfg)                       the stages, wired
    │   ├─ task, cheap preflight checks   (before anything slow: model name, QLoRA's needs)
    │   ├─ RunFolder.claim                out_dir: t2tune's own, locked, holding the same run
    │   ├─ data                           load_examples, a task's hub defaults filled in
    │   ├─ model                          load_model; seed; dropout / checkpointing / LoRA
    │   ├─ tokenize + pack                rows of train.seq_len + 1 tokens
    │   └─ accelerate                     LossModule, AdamW and the schedule on every process;
    │                                     the trackers of log.to
    └─ Run.train()
        ├─ resume                         newest complete checkpoint: model, optimizer, RNG, data position
        ├─ packing self-test              isolated packing: packed losses = losses alone (guards.py)
        ├─ fit                            the loop: step, log, validate, checkpoint; stops on
        │                                 train.steps, train.max_minutes, a signal, a loss that
        │                                 is not finite, or eval.patience
        ├─ validate, checkpoint           once after the loop (a signal stop only checkpoints;
        │                                 a diverged run writes nothing more)
        └─ export                         the best (or last) step's weights to hf/, reloaded and
                                          compared first (the export gate), then the summary

Every process runs all of this; the main process alone writes the run folder's shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import __version__
from .checkpoint import RunFolder, load_weights, read_average, read_checkpoint, set_rng_state, write_checkpoint
from .averaging import WeightAverage
from .config import DataConfig, EvalConfig, RunConfig, batch_size_problem, dump_config
from .data import load_examples, with_hub_defaults
from .engines import cpu_only, fill_deepspeed_config, is_sharded, process_state
from .errors import ConfigError, UserError, say
from .evaluation import EvalResult, check_fits, evaluate
from .export import MERGE_LOSS_HINT, MergeLoss, export
from .files import atomic_file
from .guards import GateReport, check_packing, gate_adapter, gate_export, last_token_logits
from .loss import LossModule
from .memory import GIB, RSS, check_memory, staged
from .metrics import greater_is_better, headline, metric_names
from .mixture import EpochRows, epoch_counts, epoch_size, mixing_rates
from .models import DTYPES, check_model_name, check_qlora_available, load_model, model_config, prepare_for_training
from .packing import PackedRow, pack
from .precision import compute_dtype_of
from .report import MetricsLog, Trackers, check_trackers, model_card, read_events, refresh_plots, tracker_settings
from .runtime import return_freed_memory
from .speed import Peak, mfu, model_flops, packing_efficiency, peak_tflops
from .tasks import Task, get_task
from .tokenize import encode_for_training, encode_prompts
from .training import (
    Engine,
    Interrupted,
    Schedule,
    StepResult,
    StopRequest,
    TrainState,
    make_optimizer,
    make_scheduler,
    next_positions,
    train_step,
)

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


def prepare(cfg: RunConfig, *, overwrite: bool = False, task: Task | None = None, model: Any = None,
            tokenizer: Any = None, train_rows: Sequence[Row] | None = None, eval_rows: Sequence[Row] | None = None,
            eval_config: EvalConfig | None = None, metric: Callable | None = None,
            postprocess: Callable[[str], str] | None = None, base_name: str | None = None,
            accelerator: Any = None) -> Run:
    """Wire every stage of a run. Anything not given (task, data, model) comes from ``cfg``;
    ``metric(predictions, references) -> dict`` and ``postprocess(text) -> answer`` replace the
    task's own; ``overwrite`` moves an incompatible previous run in ``out_dir`` aside."""
    eval_config = eval_config or cfg.eval
    if cfg.tasks and (task is not None or train_rows is not None):
        raise UserError("tasks: a multi-task run reads its tasks and data from the config; pass neither task= "
                        "nor train_rows=")
    if cfg.tasks:
        members = _members(cfg, eval_config)
    else:
        task = task or get_task(cfg.task)
        members = [Member(task.name, task, eval_config)]
    if postprocess is not None:
        for member in members:
            member.task = dataclasses.replace(member.task, custom_postprocess=postprocess)
    if model is None:
        check_model_name(cfg.model.name)
    if cfg.train.method == "qlora":
        check_qlora_available()
    check_trackers(cfg.log.to)
    if metric is None and cfg.eval.metric is not None:
        known = _metric_names(members)
        if cfg.eval.metric not in known:
            raise ConfigError(f"eval.metric: {cfg.eval.metric!r} is not reported by this run's validation "
                              f"({', '.join(m.name + ' in ' + m.eval_config.mode + ' mode' for m in members)}); "
                              f"choose from {', '.join(known)}")
    if accelerator is not None and cfg.log.to:
        raise ConfigError("log.to: an accelerator passed in brings its own trackers (Accelerator(log_with=...)); "
                          "leave log.to empty")
    process = process_state()
    if cfg.train.compile and _sharded_launch(process):
        raise ConfigError("train.compile: not under DeepSpeed or FSDP (their parameter hooks are untested with "
                          "torch.compile here); launch without them, or set train.compile=false")
    if cfg.train.ema is not None and _sharded_launch(process):
        raise ConfigError("train.ema: not under DeepSpeed or FSDP (each process holds a shard of the weights, and the "
                          "average would have to follow the engine's partitioning); launch without them, or set "
                          "train.ema=null")
    if cfg.train.method == "qlora" and (process.num_processes > 1 or _sharded_launch(process)):
        raise ConfigError("train.method=qlora runs in one process (4-bit weights are untested under DDP and are not "
                          "sharded by DeepSpeed or FSDP); launch one process, or use train.method=lora")
    if model is None and not _sharded_launch(process):  # before anything is loaded: refuse what cannot fit
        config = model_config(cfg.model)
        if config is not None:
            need = check_memory(config, cfg)
            if need.tight and return_freed_memory() and process.is_main_process:
                say(f"the run needs about {need.total / GIB:.1f} of {need.room / GIB:.1f} GiB; freed memory "
                    "goes back to the system (less resident memory; GPT-J 6B on 2 cores: steps ~1.45x slower)")
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
        raise ConfigError(f"the accelerator given accumulates {accelerator.gradient_accumulation_steps} micro-batches "
                          f"per step; train.global_batch_size / (train.micro_batch_size × processes) = {accumulation}")
    for member in members:  # before training: a validation that cannot run is refused now
        check_fits(model, tokenizer, member.task, member.eval_config)
    set_seed(t.seed)  # before LoRA's adapters are initialised
    model = prepare_for_training(model, t, cfg.lora, base_name or cfg.model.name)
    encoded, dropped = [], 0
    for member in members:
        examples, lost = encode_for_training(member.task, member.train_rows, tokenizer, t.seq_len, t.truncate)
        if lost and accelerator.is_main_process:
            say(f"{member.name}: {lost} training examples dropped: truncating '{member.task.truncate_field}' to "
                "fit train.seq_len would cut their answer")
        encoded.append(examples)
        dropped += lost
        if not member.task.is_label_task:  # what eval.max_new_tokens: auto measures
            member.targets = [member.task.target_text(row) for row in member.train_rows]

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
    engine = Engine(accelerator, loss_module, optimizer, None, tokenizer.pad_token_id)
    run = Run(cfg, folder, members, model, tokenizer, engine, rows_of, dropped, eval_config, metric,
              base_name or cfg.model.name)
    run.average = WeightAverage(model, t.ema) if t.ema is not None else None
    run.mix = mix
    engine.scheduler = make_scheduler(optimizer, t, run.budget_spent if t.steps == "auto" else None)
    run.lock = lock
    return run


def _sharded_launch(process: Any) -> bool:
    from accelerate.utils import DistributedType

    return process.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


@dataclass
class Member:
    """One task of the run (a single-task run has one): its data and how it is validated."""

    name: str
    task: Task
    eval_config: EvalConfig
    train_rows: list[Row] = dataclasses.field(default_factory=list)
    eval_rows: list[Row] = dataclasses.field(default_factory=list)
    targets: list[str] | None = None  # a free-text task's training targets (eval.max_new_tokens: auto)


def _members(cfg: RunConfig, eval_config: EvalConfig) -> list[Member]:
    """The tasks of a multi-task run; a task that cannot be found is one line naming its entry.
    Each validates in its own mode: ``tasks.<name>.mode``, else eval.mode (generate for free text)."""
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


def _metric_names(members: list[Member]) -> list[str]:
    """What ``eval.metric`` may name: a task's own metrics, or in a mixture ``<task>/<metric>``
    and ``mean`` (the unweighted mean of the tasks' headlines)."""
    if len(members) == 1:
        return metric_names(members[0].task, members[0].eval_config.mode)
    return [f"{m.name}/{key}" for m in members for key in metric_names(m.task, m.eval_config.mode)] + ["mean"]


def _mix(cfg: RunConfig, members: list[Member], encoded: list[list]) -> dict[str, dict[str, Any]]:
    """Per task: training examples, mixing rate and examples per epoch (``mixture.py``)."""
    sizes = {m.name: len(examples) for m, examples in zip(members, encoded)}
    empty = [name for name, n in sizes.items() if not n]
    if empty:
        raise UserError(f"tasks.{empty[0]}: no training examples")
    weights = {name: entry.weight or 1.0 for name, entry in cfg.tasks.items()}
    rates = mixing_rates(sizes, cfg.mix.rule, cfg.mix.cap, cfg.mix.temperature, weights)
    counts = epoch_counts(rates, epoch_size(sizes, cfg.mix.cap))
    return {name: {"examples": sizes[name], "rate": round(rates[name], 6), "per_epoch": counts[name]}
            for name in sizes}


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
    (refusal,) = _from_main(process, [refusal])
    if refusal is not None:
        raise UserError(refusal)
    return lock


def _from_main(process: Any, values: list[Any]) -> list[Any]:
    """The main process's ``values`` on every process (one broadcast; as they are with one process)."""
    if process.num_processes == 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values)


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
        say(f"warning: {key}.validation: validating on the training file {train_file}, so validation numbers "
            f"will be optimistic; give {key}.validation a file or folder of held-out rows")
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


class Run:
    """One wired training run: its parts, and the verbs the loop calls."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, members: list[Member], model: Any, tokenizer: Any,
                 engine: Engine, rows_of: Callable[[int], list[PackedRow]], dropped: int, eval_config: EvalConfig,
                 metric: Callable | None, base_name: str):
        self.cfg, self.folder, self.members, self.model, self.tokenizer = cfg, folder, members, model, tokenizer
        self.task, self.eval_rows = members[0].task, members[0].eval_rows  # the first task: card, gate prompts
        self.engine, self.rows_of, self.rows, self.dropped = engine, rows_of, rows_of(0), dropped
        self.eval_config, self.metric, self.base_name = eval_config, metric, base_name
        self.mix: dict[str, Any] = {}  # a mixture's examples, rate and examples per epoch, per task
        self.accelerator = engine.accelerator
        self.main = self.accelerator.is_main_process
        self.state = TrainState()
        self.trackers = Trackers(self.accelerator) if cfg.log.to else None
        self.log_file = MetricsLog(folder.metrics, self.main, self.trackers)
        self.bar: Any = None
        self.lock: Any = None  # the out_dir lock (main process), released when train() ends
        self.diverged: dict[str, Any] = {}
        every = eval_config.every if any(m.eval_rows for m in members) else 0
        steps = sys.maxsize if cfg.train.steps == "auto" else cfg.train.steps  # auto: the budget stops it
        self.schedule = Schedule(steps, cfg.train.log_every, every, cfg.checkpoint.every, eval_config.patience)
        # what "best" means: eval.metric (default: the task's headline), higher or lower better
        self.best_key = eval_config.metric or (headline(self.task) if len(members) == 1 else "mean")
        given = eval_config.greater_is_better
        self.higher = greater_is_better(self.best_key) if given is None else given
        self.flops = model_flops(model, cfg.train.seq_len)
        # the MFU peak, its dtype and where it came from, and the rows' packing efficiency: set
        # when training starts
        self.peak, self.peak_dtype, self.packing_efficiency = Peak(0.0, ""), torch.float32, 0.0
        self._since = time.perf_counter()  # wall_seconds counts from here
        self.packing_report: dict[str, Any] = {}  # the packing self-test's drift and seconds
        self.merge_loss = MergeLoss()  # what the export's LoRA merge lost to rounding
        self.average: WeightAverage | None = None  # train.ema: validated and exported instead of the weights

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.state.last_eval

    def train(self) -> RunResult:
        try:
            return self._train()
        finally:
            if self.trackers is not None:
                self.trackers.finish()
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> RunResult:
        resumed = self.resume()  # first: a checkpoint that cannot be read leaves the folder untouched
        if self.main:
            with atomic_file(self.folder.config) as handle:
                handle.write(dump_config(self.cfg))
        if self.trackers is not None:
            self.trackers.start(self.folder.root.name, self.cfg.to_dict(),
                                tracker_settings(self.cfg.log.to, self.folder.trackers))
        checked = self.check_packing()
        t = self.cfg.train
        self.peak_dtype = torch.bfloat16 if t.precision == "bf16" else compute_dtype_of(self.model)
        self.peak = peak_tflops(self.accelerator.device, self.peak_dtype, t.peak_tflops)
        self.packing_efficiency = round(packing_efficiency(self.rows, t.seq_len), 4)
        self._since = time.perf_counter()
        self.log_file.write({"event": "start", "step": self.state.optimizer_step, "resumed": resumed,
                             "rows": len(self.rows), "dropped_examples": self.dropped,
                             "packing_efficiency": self.packing_efficiency, "flops_per_token": self.flops.per_token,
                             "flops_per_label": self.flops.per_label, "peak_tflops": round(self.peak.tflops, 4),
                             "peak_source": self.peak.source, "peak_probes": self.peak.spread,
                             "peak_measured_at": self.peak.measured_at or None, **checked,
                             **({"mix": self.mix} if self.mix else {}), "processes": self.accelerator.num_processes,
                             "t2tune": __version__})
        # from_pretrained hands the model over in eval mode, where dropout (train.dropout, LoRA's)
        # is off and bitsandbytes swaps 4-bit weights to an inference-only kernel; validation
        # and the self-tests put back the mode they found
        self.model.train()
        from tqdm.auto import tqdm

        total = None if self.cfg.train.steps == "auto" else self.cfg.train.steps
        self.bar = tqdm(total=total, initial=self.state.optimizer_step, disable=not self.main,
                        unit="step", dynamic_ncols=True)
        with StopRequest(immediate=self.accelerator.num_processes == 1) as stop:
            stopped = fit(self, self.state, self.schedule, stop)
            self.bar.close()
            self.bar = None
            if stopped == "signal":
                self.checkpoint()
                self.log_file.write({"event": "stopped", "step": self.state.optimizer_step, "signal": stop.signal})
                return RunResult(self.state, stopped, stop.signal, self.last_eval, None, self.main)
        if stopped == "diverged":  # the weights hold the bad update: save nothing, export nothing
            self.log_file.write({"event": "diverged", "step": self.state.optimizer_step + 1, **self.diverged})
            return RunResult(self.state, stopped, None, self.last_eval, None, self.main)
        step = self.state.optimizer_step
        if any(m.eval_rows for m in self.members) and self.last_eval.get("step") != step:
            self.validate()
        if step in [n for n, _ in self.folder.checkpoints()]:
            weights = self._full_weights()
        else:
            weights = self.checkpoint()  # gathers the full weights once, for both
        chosen, weights = self._exported_step(weights)
        gate = self._gate(weights) if self.cfg.export.gate else None
        failed = None
        if self.main:
            try:
                report = self.export(self.folder.export, merge=self.cfg.export.merge, weights=weights, check=gate,
                                     exported=chosen)
                self._tick()
                end = self.summary(chosen, report)
                self.log_file.write({"event": "end", "step": step, "stopped": stopped, **end})
            except UserError as exc:  # every process reaches the barrier below before it is raised
                failed = exc
        self.accelerator.wait_for_everyone()
        if failed is not None:
            raise failed
        return RunResult(self.state, stopped, None, self.last_eval, self.folder.export, self.main)

    # --- what is exported, and the end-of-run summary ------------------------------------------
    def _exported_step(self, weights: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The validation summary of the step to export (``export.from``), its weights restored
        into the model when it is not the last step; and the weights to export (gathered ones
        under sharded engines, else None)."""
        best, last = self.state.best, self.state.optimizer_step
        if self.cfg.export.from_ == "last" or not best or best.get("step") == last:
            if self.average is not None:
                self.average.apply()
            return {**(self.last_eval if self.last_eval.get("step") == last else {}), "step": last}, weights
        step = self.folder.step(best["step"])
        if step.engine.is_dir():  # sharded: every process loads its part, then the weights are gathered
            self.accelerator.load_state(str(step.engine))
            return best, self._full_weights()
        if is_sharded(self.accelerator):
            say(f"warning: the best step ({best['step']}) has no engine state to restore under a sharded engine "
                f"(checkpoint.format: hf); exporting the last step ({last}) instead")
            return {**self.last_eval, "step": last}, weights
        load_weights(self.model, step.model)
        if self.average is not None:  # that step's average, as its validation measured it
            self.average.load_state_dict(read_average(step), step.optimizer)
            self.average.apply()
        return best, None

    def _gate(self, weights: dict[str, Any] | None) -> Callable[[Path], GateReport] | None:
        """The export gate's check: the trained model's last-token logits on a few validation
        prompts now (every process, as sharded weights need), the reload compared with them later;
        for an unmerged adapter (``export.merge: false``), its written tensors against the trained
        ones. A failed merge says how much of the LoRA update its rounding lost."""
        adapter = hasattr(self.model, "peft_config") and not self.cfg.export.merge
        if adapter:
            if not self.main:
                return None
            from peft import get_peft_model_state_dict

            expected = get_peft_model_state_dict(self.model, state_dict=weights)
            return lambda folder: gate_adapter(folder, expected)
        rows = self.eval_rows[:GATE_PROMPTS]
        if not rows:
            return None
        ids = encode_prompts(self.tokenizer, [self.task.prompt_text(r) for r in rows], self.eval_config.seq_len)
        if not (self.main or is_sharded(self.accelerator)):
            return None
        reference = last_token_logits(self.model, ids)
        wide = self.cfg.model.compute_dtype

        def check(folder: Path) -> GateReport:
            try:
                return gate_export(folder, reference, ids, DTYPES[wide] if wide else None)
            except UserError as exc:
                if self.merge_loss.share < MERGE_LOSS_HINT:
                    raise
                raise UserError(f"{exc}. The merge rounded away {self.merge_loss.share:.0%} of the LoRA update "
                                f"(entries below {self.cfg.model.dtype}'s resolution at their base weights): "
                                "export.merge=false exports the adapter exactly, or `t2tune export "
                                "<checkpoint> --adapter-only` writes it from a kept checkpoint") from None
        return check

    def _tick(self) -> float:
        """Add the time since the last tick to ``wall_seconds``; returns it."""
        now = time.perf_counter()
        self.state.wall_seconds += now - self._since
        self._since = now
        return self.state.wall_seconds

    def mfu(self, flops: float, seconds: float) -> float:
        return mfu(flops, seconds, self.peak.tflops, self.accelerator.num_processes)

    def summary(self, exported: dict[str, Any], gate: GateReport | None) -> dict[str, Any]:
        """The end-of-run numbers; printed as a few lines on stderr, returned for metrics.jsonl."""
        s, t = self.state, self.cfg.train
        wall = max(s.wall_seconds, 1e-9)
        tps = s.tokens_seen / s.train_seconds if s.train_seconds else 0.0
        numbers = {"tokens_seen": s.tokens_seen, "train_seconds": round(s.train_seconds, 3),
                   "eval_seconds": round(s.eval_seconds, 3), "wall_seconds": round(s.wall_seconds, 3),
                   "tokens_per_s": round(tps, 1), "mfu": round(self.mfu(s.model_flops, s.train_seconds), 5),
                   "packing_efficiency": self.packing_efficiency,
                   "validation_share": round(s.eval_seconds / wall, 4), "best": s.best,
                   "exported_step": exported.get("step"), "export": str(self.folder.export),
                   "gate_drift": gate.drift if gate else None, "merge_rounding_lost": round(self.merge_loss.share, 4),
                   "peak_tflops": round(self.peak.tflops, 4), "peak_source": self.peak.source,
                   "peak_rss_gib": RSS.gib()}
        precision = "bf16" if t.precision == "bf16" else str(self.peak_dtype).removeprefix("torch.")
        say(f"{s.optimizer_step} steps, {s.tokens_seen:,} tokens in {s.wall_seconds / 60:.1f} min: training "
            f"{s.train_seconds / 60:.1f} min at {tps:,.0f} tokens/s (MFU {numbers['mfu']:.1%} of "
            f"{self.peak.tflops:.3g} TFLOP/s {precision}, {self.peak.describe()}), "
            f"validation {s.eval_seconds / 60:.1f} min "
            f"({numbers['validation_share']:.1%} of the wall time)")
        test = self.packing_report
        test_text = f"; packing self-test passed (drift {test['drift']:.2g} nats/token, {test['seconds']:.1f} s)" \
            if test else ""
        say(f"packing efficiency {numbers['packing_efficiency']:.1%} (real tokens ÷ row slots, "
            f"train.packing: {t.packing}){test_text}")
        key = self.best_key
        best = f"best {key} {s.best[key]:.4f} at step {s.best['step']}; " if s.best.get(key) is not None else ""
        gate_text = f"; export gate passed (drift {gate.drift:.2g}, {gate.dtype})" if gate else \
            ("; export gate off" if not self.cfg.export.gate else "; export gate skipped (no validation rows)")
        if gate and not gate.prompts:
            gate_text = "; export gate passed (the adapter, bit for bit)"
        if self.merge_loss.update_sq:
            gate_text += f"; the LoRA merge's rounding lost {self.merge_loss.share:.1%} of the update"
        peaks = ", ".join(f"{k} {v:.2f}" for k, v in numbers["peak_rss_gib"].items())
        say(f"peak RSS (GiB) by stage: {peaks}")
        say(f"{best}exported step {exported.get('step')} (export.from: {self.cfg.export.from_}) to "
            f"{self.folder.export}{gate_text}")
        return numbers

    # --- the loop's verbs ------------------------------------------------------------------
    def agree(self, seconds: float) -> float:
        """One step's duration as every process counts it: the slowest one's, so that the time
        budget, and with it a budgeted learning rate, is the same everywhere."""
        if self.accelerator.num_processes == 1:
            return seconds
        took = torch.tensor([seconds], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.gather(took).max())  # (accelerate's reduce has no max)

    def budget_spent(self) -> float:
        """The fraction of ``train.max_minutes`` spent training (validation time excluded)."""
        return self.state.train_seconds / (self.cfg.train.max_minutes * 60)

    def out_of_time(self) -> bool:
        """``train.max_minutes`` reached. Every process counts the same ``train_seconds``
        (:meth:`agree`), so all of them stop at the same step without another collective."""
        limit = self.cfg.train.max_minutes
        return limit is not None and self.state.train_seconds >= limit * 60

    @staged("train")
    def step(self) -> StepResult:
        t = self.cfg.train
        positions = next_positions(lambda epoch: len(self.rows_of(epoch)), self.state, t.global_batch_size, t.seed)
        result = train_step(self.engine, [self.rows_of(epoch)[i] for epoch, i in positions], t)
        if self.average is not None:
            self.average.update(self.state.optimizer_step + 1)  # fit counts the step once this returns
        self.state.model_flops += self.flops.of(result.tokens, result.label_tokens)
        self.diverged = {"loss": result.loss, "grad_norm": result.grad_norm}  # reported if not finite
        return result

    def progress(self, result: StepResult, seconds: float) -> None:
        lr = self.engine.scheduler.get_last_lr()[0]
        tps = result.tokens / seconds if seconds else 0.0
        self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                             mfu=f"{self.mfu(self.flops.of(result.tokens, result.label_tokens), seconds):.1%}",
                             refresh=False)
        self.bar.update(1)

    def log(self, result: StepResult, seconds: float) -> None:
        s = self.state
        self.log_file.write({"event": "train", "step": s.optimizer_step, "loss": result.loss,
                             "lr": self.engine.scheduler.get_last_lr()[0],
                             "tokens_per_s": result.tokens / seconds if seconds else 0.0,
                             "mfu": round(self.mfu(self.flops.of(result.tokens, result.label_tokens), seconds), 5),
                             "grad_norm": result.grad_norm, "epoch": s.epoch, "tokens_seen": s.tokens_seen,
                             "train_seconds": round(s.train_seconds, 3), "wall_seconds": round(self._tick(), 3)})

    @staged("validate")
    def validate(self) -> bool:
        """Validate on every process (each runs its share); the main process records the best
        step, logs and plots. Returns whether this step is a new best (on every process)."""
        start = time.perf_counter()
        with self.average.applied() if self.average is not None else contextlib.nullcontext():
            results = [(m, self.evaluate(member=m)) for m in self.members if m.eval_rows]
        improved, failed = False, None
        if self.main:
            try:
                improved = self._record(results, start)
            except UserError as exc:  # raised below on every process: the others would wait forever
                failed = exc
        s = self.state
        improved, s.best, s.stale, failed = _from_main(self.accelerator, [improved, s.best, s.stale, failed])
        if failed is not None:
            raise failed
        return improved

    def _record(self, results: list[tuple[Member, EvalResult]], start: float) -> bool:
        """The main process's part of a validation: the best step and patience count, the
        metrics.jsonl line, the progress line, plots and tracker images. Returns whether the
        step is a new best."""
        summary, metrics = self._combined(results)
        s, key = self.state, self.best_key
        if key not in summary:
            raise ConfigError(f"eval.metric: the validation reports no {key!r}; it reports "
                              f"{', '.join(k for k, v in summary.items() if isinstance(v, (int, float)))}")
        step, value = s.optimizer_step, summary[key]
        improved = not s.best or (value > s.best[key] if self.higher else value < s.best[key])
        s.best = {**summary, "step": step} if improved else s.best
        s.stale = 0 if improved else s.stale + 1
        s.last_eval = {**summary, "step": step}
        s.eval_seconds += time.perf_counter() - start
        share = s.eval_seconds / max(self._tick(), 1e-9)
        self.log_file.write({"event": "eval", "step": step, **summary, "best_step": s.best["step"],
                             "train_seconds": round(s.train_seconds, 3), "eval_seconds": round(s.eval_seconds, 3),
                             "validation_share": round(share, 4), "metrics": metrics})
        if self.bar is not None:  # a mixture's line leads with every task's headline
            heads = "".join(f"{name} {summary[name]:.4f}, " for name in summary.get("headlines", []))
            self.bar.write(f"step {step}: {heads}{key} {value:.4f} (best {s.best[key]:.4f} at step "
                           f"{s.best['step']}), {summary['examples_per_s']} examples/s")
        by_task = {"": metrics} if len(self.members) == 1 else {f"{name}-": m for name, m in metrics.items()}
        refresh_plots(self.folder.plots, read_events(self.folder.metrics), by_task)
        if self.trackers is not None:
            for prefix in by_task:
                for name in ("confusion", "reliability"):
                    self.trackers.image(f"eval/{prefix.replace('-', '/')}{name}",
                                        self.folder.plots / f"{prefix}{name}.png", step)
        return improved

    def _combined(self, results: list[tuple[Member, EvalResult]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The validation's summary line and metrics: one task's own, or for a mixture every
        task's numbers as ``<task>/<metric>``, their headlines' unweighted ``mean``, and each
        task's summary and metrics under its name."""
        if len(self.members) == 1:
            (member, result), = results
            return result.summary(member.task, member.eval_config.mode), result.metrics
        per = {m.name: r.summary(m.task, m.eval_config.mode) for m, r in results}
        flat = {f"{m.name}/{key}": per[m.name][key] for m, _ in results
                for key in metric_names(m.task, m.eval_config.mode) if key in per[m.name]}
        heads = [per[m.name][headline(m.task)] for m, _ in results]
        seconds = sum(r.seconds for _, r in results)
        n = sum(len(r.records) for _, r in results)
        summary = {**flat, "mean": sum(heads) / len(heads), "n": n,
                   "examples_per_s": round(n / seconds, 3) if seconds else None,
                   "headlines": [f"{m.name}/{headline(m.task)}" for m, _ in results], "tasks": per}
        return summary, {m.name: r.metrics for m, r in results}

    def _full_weights(self) -> dict[str, Any] | None:
        """Under FSDP / DeepSpeed, the full weights gathered to the main process (a collective:
        every process calls it); None elsewhere, and where the model object holds them itself."""
        if not is_sharded(self.accelerator):
            return None
        state = self.accelerator.get_state_dict(self.engine.loss_module)
        if not self.main or state is None:
            return None
        return {k.removeprefix("model."): v for k, v in state.items()}

    @staged("checkpoint")
    def checkpoint(self) -> dict[str, Any] | None:
        """Write ``step-N/`` (collective under sharded engines); rotation keeps the best step.
        Returns the gathered full weights on the main process of a sharded engine, None
        elsewhere, for the export to reuse."""
        acc, step = self.accelerator, self.state.optimizer_step
        self._tick()
        model_state = self._full_weights()
        engine = None
        fmt = self.cfg.checkpoint.format
        if fmt == "accelerate" or (fmt == "auto" and is_sharded(self.accelerator)):
            engine = self.folder.engine_staging(step)
            if self.main:
                shutil.rmtree(engine, ignore_errors=True)  # left by a run killed mid-save
            acc.wait_for_everyone()
            acc.save_state(str(engine))  # collective: each process writes its shards
            acc.wait_for_everyone()
        if self.main:
            e = self.engine
            try:
                write_checkpoint(self.folder, step, self.model, self.tokenizer, e.optimizer, e.scheduler,
                                 self.state.to_dict(), model_state, engine,
                                 average=self.average.state_dict() if self.average is not None else None)
            except OSError as exc:  # a full disk: the temporary folder is gone, older checkpoints stay
                kept = [f"step-{n}" for n, _ in self.folder.checkpoints()]
                raise UserError(f"{self.folder.step(step).path}: could not write the checkpoint ({exc.strerror}); "
                                f"kept: {', '.join(kept) or 'no older checkpoint'}") from None
            self.folder.rotate(self.cfg.checkpoint.keep, protect=self.state.best.get("step"))
        acc.wait_for_everyone()
        return model_state

    # --- resume, self-test, evaluate, export ----------------------------------------------------
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

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint; False when there is none."""
        found = self.folder.checkpoints()
        if not found:
            self.log_file.trim_after(0)  # events of a run killed before its first checkpoint are redone
            return False
        step, path = found[-1]
        state, opt, rng = read_checkpoint(path)
        self._check_resumable(TrainState.from_dict(state), path, [n for n, _ in found])
        if path.engine.is_dir():  # sharded model + optimizer, every process reads its part
            self.accelerator.load_state(str(path.engine))
        elif "optimizer" in opt:
            load_weights(self.model, path.model)
            self.engine.optimizer.load_state_dict(opt["optimizer"])
        else:
            raise UserError(f"{path.path}: optimizer state missing (no optimizer.pt entry, no engine/ folder); "
                            "delete this checkpoint to resume from an older one")
        self.engine.scheduler.load_state_dict(opt["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(opt.get("ema"), path.optimizer)
        set_rng_state(rng)
        self.state = TrainState.from_dict(state)
        self.log_file.trim_after(step)
        return True

    def _check_resumable(self, state: TrainState, path: Any, steps: list[int]) -> None:
        """What ``read_checkpoint`` cannot know: the data position lies inside its epoch's rows
        of this run, and the best step's checkpoint is there to export."""
        rows = len(self.rows_of(state.epoch))
        if not state.row_in_epoch < rows:
            raise UserError(f"{path.state}: corrupt checkpoint (data position {state.row_in_epoch} of epoch "
                            f"{state.epoch}, which has {rows} rows); delete it to resume from an older one")
        best = state.best.get("step") if state.best else None
        if best is not None and best not in steps and self.cfg.export.from_ == "best":
            raise UserError(f"{path.state}: the best step {best} has no checkpoint in {self.folder.checkpoints_root} "
                            "to export; restore it, or set export.from=last")

    def _why(self, shown: dict[str, Any]) -> str:
        """The model card's line on which step was exported and why."""
        step, key = shown.get("step", self.state.optimizer_step), self.best_key
        if not self.state.best:
            return f"Exported weights: step {step}, the last (no validation ran)."
        if self.cfg.export.from_ == "last":
            return f"Exported weights: step {step}, the last (export.from: last)."
        return (f"Exported weights: step {step} of {self.state.optimizer_step}, the best validation {key} "
                f"({self.state.best[key]:.4f}; export.from: best).")

    def evaluate(self, limit: int | None = None, member: Member | None = None) -> EvalResult:
        """Validate a task (default: the first) on its eval rows with its eval config; metrics via
        ``metric`` when given."""
        m = member or self.members[0]
        ec = m.eval_config
        rows = m.eval_rows[: (limit or ec.limit or len(m.eval_rows))]
        result = evaluate(self.model, self.tokenizer, m.task, rows, ec, with_metrics=self.metric is None,
                          processes=self.accelerator, targets=m.targets)
        if self.metric is not None and self.main:
            result.metrics = dict(self.metric([r["prediction"] for r in result.records],
                                              [m.task.references(r) for r in rows]))
        return result

    @staged("export")
    def export(self, path: Path, merge: bool = True, weights: dict[str, Any] | None = None,
               check: Callable[[Path], GateReport] | None = None,
               exported: dict[str, Any] | None = None) -> GateReport | None:
        """Write the Hugging Face export (main process); ``weights``: gathered full weights;
        ``check``: the export gate; ``exported``: the validation summary of the exported step
        (default: the last validation). Returns the gate's report."""
        shown = self.last_eval if exported is None else exported

        def card(report: GateReport | None) -> str:
            return model_card(self.cfg, [m.task for m in self.members], self.base_name, self.state, shown,
                              self._why(shown), report)
        try:
            return export(self.model, self.tokenizer, path, merge=merge, card=card, weights=weights, check=check,
                          loss=self.merge_loss)
        except OSError as exc:
            raise UserError(f"{path}: could not write the export ({exc.strerror}); the checkpoints are kept, "
                            "run `t2tune export` on the newest one") from None
