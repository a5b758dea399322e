"""The reference's Trainer facade: ``Trainer(config, pretrained, dataset, eval_dataset,
eval_config, tokenizer, metric, postprocess)`` with ``train()``, ``evaluate()`` and
``save_hf_checkpoint(path)``. It wires the stages together; each stage lives in its module."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (
    TrainState,
    engine_dir,
    export,
    list_checkpoints,
    load_weights,
    read_checkpoint,
    rotate,
    set_rng_state,
    unwrap,
    write_checkpoint,
)
from .config import EvalConfig, RunConfig, dump_config
from .encoding import encode_for_training
from .errors import ConfigError, UserError
from .evaluation import EvalResult, evaluate
from .metrics import headline
from .models import set_dropout
from .packing import pack
from .runtime import keep_freed_memory
from .tasks import Task, get_task
from .training import LossModule, StopRequest, fit, lr_factor, make_optimizer

LORA_TARGETS = {
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def wrap_lora(model: Any, cfg: RunConfig, base_name: str) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules or LORA_TARGETS.get(model.config.model_type, "all-linear")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = base_name  # how t2tune reloads the base
    return model


def check_qlora_available() -> None:
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("train.method=qlora needs a CUDA GPU and the bitsandbytes package; "
                        "use train.method=lora on this machine")


class MetricsLog:
    """``out_dir/metrics.jsonl``: one JSON object per event, appended and flushed."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def trim_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint (they will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, event: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


class Trainer:
    """Fine-tune ``pretrained`` on ``dataset`` (rows), validate on ``eval_dataset``.

    ``metric(predictions, references) -> dict`` and ``postprocess(text) -> answer`` replace the
    task's own when given; ``config`` is a :class:`RunConfig` (its ``eval`` section is replaced
    by ``eval_config`` when given).
    """

    def __init__(self, config: RunConfig, pretrained: Any, dataset: Sequence[dict[str, Any]],
                 eval_dataset: Sequence[dict[str, Any]] | None = None, eval_config: EvalConfig | None = None,
                 tokenizer: Any = None, metric: Callable | None = None, postprocess: Callable | None = None,
                 task: Task | None = None, base_name: str | None = None, accelerator: Any = None):
        from accelerate import Accelerator

        keep_freed_memory()
        self.config = config
        self.eval_config = eval_config or config.eval
        self.task = task or get_task(config.task)
        if postprocess is not None:
            self.task = dataclasses.replace(self.task, custom_postprocess=postprocess)
        self.metric = metric
        self.tokenizer = tokenizer
        self.eval_dataset = list(eval_dataset or [])
        self.base_name = base_name or config.model.name
        self.out_dir = Path(config.out_dir)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        t = config.train
        world = self.accelerator.num_processes
        if t.global_batch_size % (t.micro_batch_size * world):
            raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size × processes ({t.micro_batch_size} × {world})")
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        model = pretrained
        if t.dropout is not None:
            set_dropout(model, t.dropout)
        if t.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; the old name goes in v6
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.method == "qlora":
            check_qlora_available()
        if t.method in ("lora", "qlora"):
            model = wrap_lora(model, config, self.base_name)
        self.model = model
        self.rows, self.dropped = self._pack(dataset)
        if self.dropped and self.accelerator.is_main_process:
            print(f"t2tune: {self.dropped} training examples dropped: truncating "
                  f"'{self.task.truncate_field}' to fit train.seq_len would cut their answer", file=sys.stderr)
        self.loss_module = self.accelerator.prepare(LossModule(model))
        self.optimizer = self.accelerator.prepare(make_optimizer(self.loss_module, t))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, t))
        self.state = TrainState()
        self.log = MetricsLog(self.out_dir / "metrics.jsonl", self.accelerator.is_main_process)
        self.last_eval: dict[str, Any] = {}

    # --- data ---------------------------------------------------------------------------
    def _pack(self, dataset: Sequence[dict[str, Any]]) -> tuple[list, int]:
        t = self.config.train
        encoded, dropped = encode_for_training(self.task, dataset, self.tokenizer, self.tokenizer.eos_token_id,
                                               t.seq_len, t.truncate)
        return pack(encoded, t.packing, t.seq_len, t.loss_on, self.tokenizer.pad_token_id), dropped

    # --- resume / checkpoint ------------------------------------------------------------
    def resume(self) -> bool:
        found = list_checkpoints(self.out_dir)
        if not found:
            self.log.trim_after(0)  # events of a run killed before its first checkpoint are redone
            return False
        step, path = found[-1]
        state, opt, rng = read_checkpoint(path)
        if (path / "engine").is_dir():  # sharded model + optimizer, every process reads its part
            self.accelerator.load_state(str(path / "engine"))
        elif "optimizer" in opt:
            load_weights(self.model, path / "model")
            self.optimizer.load_state_dict(opt["optimizer"])
        else:
            raise UserError(f"{path}: optimizer state missing (no optimizer.pt entry, no engine/ folder); "
                            "delete this checkpoint to resume from an older one")
        self.scheduler.load_state_dict(opt["scheduler"])
        set_rng_state(rng)
        self.state = state
        self.log.trim_after(step)
        return True

    def _sharded(self) -> bool:
        return self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")

    def checkpoint(self) -> None:
        acc, main = self.accelerator, self.accelerator.is_main_process
        model_state = None
        if self._sharded():  # the full weights, gathered to the main process (collective)
            model_state = acc.get_state_dict(self.loss_module)
            model_state = {k.removeprefix("model."): v for k, v in model_state.items()}
        engine = None
        fmt = self.config.checkpoint.format
        if fmt == "accelerate" or (fmt == "auto" and self._sharded()):
            engine = engine_dir(self.out_dir, self.state.optimizer_step)
            if main:
                shutil.rmtree(engine, ignore_errors=True)  # left by a run killed mid-save
            acc.wait_for_everyone()
            acc.save_state(str(engine))  # collective: each process writes its shards
            acc.wait_for_everyone()
        if main:
            write_checkpoint(self.out_dir, self.model, self.tokenizer, self.optimizer, self.scheduler, self.state,
                             model_state, engine)
            rotate(self.out_dir, self.config.checkpoint.keep)
        self.accelerator.wait_for_everyone()

    # --- the three verbs of the reference API ---------------------------------------------
    def train(self) -> TrainState:
        cfg, t = self.config, self.config.train
        main = self.accelerator.is_main_process
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out_dir / "config.yaml")
        resumed = self.resume()
        self.log.write({"event": "start", "step": self.state.optimizer_step, "resumed": resumed,
                        "rows": len(self.rows), "dropped_examples": self.dropped,
                        "processes": self.accelerator.num_processes, "t2tune": __version__})
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=self.state.optimizer_step, disable=not main, unit="step",
                   dynamic_ncols=True)
        last_eval_step = -1

        def on_step(result: Any, seconds: float) -> None:
            nonlocal last_eval_step
            step = self.state.optimizer_step
            lr = self.scheduler.get_last_lr()[0]
            tps = result.tokens / seconds if seconds else 0.0
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                self.log.write({"event": "train", "step": step, "loss": result.loss, "lr": lr,
                                "tokens_per_s": tps, "grad_norm": result.grad_norm, "epoch": self.state.epoch,
                                "tokens_seen": self.state.tokens_seen,
                                "train_seconds": round(self.state.train_seconds, 3)})
            if self.eval_dataset and self.eval_config.every and step % self.eval_config.every == 0 and step < t.steps:
                self._validate(bar)
                last_eval_step = step
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
                self.checkpoint()

        with StopRequest() as stop:
            fit(self.loss_module, self.accelerator, self.optimizer, self.scheduler, self.rows, self.state, t,
                self.tokenizer.pad_token_id, on_step,
                should_stop=lambda: stop.signal is not None or self._out_of_time())
            if stop.signal is not None:
                self.checkpoint()
                self.log.write({"event": "stopped", "step": self.state.optimizer_step, "signal": stop.signal})
                bar.close()
                raise KeyboardInterrupt(f"stopped by signal {stop.signal} at step {self.state.optimizer_step}; "
                                        "checkpoint written, run the same command to resume")
        bar.close()
        if self.eval_dataset and last_eval_step != self.state.optimizer_step:
            self._validate(None)
        if self.state.optimizer_step not in [s for s, _ in list_checkpoints(self.out_dir)]:
            self.checkpoint()
        if main:
            self.save_hf_checkpoint(self.out_dir / "hf")
            self.log.write({"event": "end", "step": self.state.optimizer_step, "best": self.state.best,
                            "tokens_seen": self.state.tokens_seen, "train_seconds": self.state.train_seconds})
        self.accelerator.wait_for_everyone()
        return self.state

    def evaluate(self, limit: int | None = None) -> EvalResult:
        """Validate on ``eval_dataset`` with the eval config; metrics via ``metric`` when given."""
        ec = self.eval_config
        rows = self.eval_dataset[: (limit or ec.limit or len(self.eval_dataset))]
        result = evaluate(unwrap(self.model), self.tokenizer, self.task, rows, mode=ec.mode,
                          max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size, seq_len=ec.seq_len,
                          precision=self.config.train.precision, with_metrics=self.metric is None)
        if self.metric is not None:
            result.metrics = dict(self.metric([r["prediction"] for r in result.records],
                                              [self.task.references(r) for r in rows]))
        return result

    def save_hf_checkpoint(self, path: str | Path, merge: bool = True) -> Path:
        from .card import model_card

        card = model_card(self.config, self.task, self.base_name, self.state, self.last_eval)
        return export(self.model, self.tokenizer, Path(path), merge=merge, card=card)

    def _out_of_time(self) -> bool:
        """``train.max_minutes`` reached; decided together so that all processes stop at one step."""
        limit = self.config.train.max_minutes
        if limit is None:
            return False
        late = torch.tensor(float(self.state.train_seconds >= limit * 60), device=self.accelerator.device)
        return self.accelerator.reduce(late, reduction="sum").item() > 0

    # --- validation during training -------------------------------------------------------
    def _validate(self, bar: Any) -> None:
        if self.accelerator.is_main_process:
            result = self.evaluate()
            summary = result.summary(self.task, self.eval_config.mode)
            key = headline(self.task)
            step = self.state.optimizer_step
            value = summary.get(key, 0.0)
            if not self.state.best or value > self.state.best.get(key, -1):
                self.state.best = {"step": step, key: value}
            self.last_eval = {**summary, "step": step}
            self.log.write({"event": "eval", "step": step, **summary, "best_step": self.state.best["step"],
                            "train_seconds": round(self.state.train_seconds, 3),
                            "metrics": result.metrics})
            if bar is not None:
                bar.write(f"step {step}: {key} {value:.4f} (best {self.state.best[key]:.4f} "
                          f"at step {self.state.best['step']}), {summary['examples_per_s']} examples/s")
            try:
                from .plots import refresh_plots

                refresh_plots(self.out_dir, result.metrics)
            except ImportError:
                pass
        self.accelerator.wait_for_everyone()

