"""Run configuration: flat dataclasses, YAML + ``key=value`` overrides, one validation pass.

Every setting has one home and a docstring-style comment. ``load_config`` gathers *all*
problems (unknown keys, wrong types, bad values) and raises one :class:`ConfigError` naming
each key, so a user fixes a config in one go rather than one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UserError, short
from .yamlfile import read_yaml
from .files import plain_name


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # hub id, local HF folder, .gguf file or alias (see `t2tune models`)
    revision: str | None = None  # hub revision, e.g. "float16" for GPT-J
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16
    # the dtype layers compute in, when wider than the weights: float32 over bfloat16 weights
    # keeps 2 bytes a weight and fp32 speed on CPUs without bf16 matrix units (precision.py)
    compute_dtype: str | None = None
    attn_implementation: str = "sdpa"  # eager | sdpa (others if installed)
    trust_remote_code: bool = False  # never on unless the user asks


@dataclass
class DataConfig:
    train: str | None = None  # file, folder with {split}.{jsonl,csv,tsv,parquet}, or hub dataset id
    validation: str | None = None  # same forms; defaults to the training source
    hub_config: str | None = None  # hub dataset configuration, e.g. "mnli" for nyu-mll/glue
    train_split: str = "train"
    validation_split: str = "validation"


@dataclass
class TrainConfig:
    # optimizer steps; auto (with max_minutes): as many as the time budget buys, warmup and
    # decay following the fraction of the budget spent (training.budget_factor)
    steps: int | str = 100
    seq_len: int = 256  # tokens per row fed to the model (rows hold seq_len + 1 tokens)
    micro_batch_size: int = 8  # rows per forward pass (per process)
    global_batch_size: int = 8  # rows per optimizer step, all processes together
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to norms and biases
    warmup_steps: int = 0
    # warmup as a fraction of the run: of the time budget (steps: auto) or of the steps; the
    # one way to warm up a budgeted run, and an alternative to warmup_steps (set one of them)
    warmup_fraction: float = 0.0
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    min_lr_ratio: float = 0.0  # floor of linear/cosine decay, as a fraction of lr
    dropout: float | None = None  # overrides every dropout probability of the model when set
    grad_clip: float | None = 1.0  # max global gradient norm; null disables
    precision: str = "fp32"  # training autocast: fp32 (none: the weights' dtype, model.dtype) | bf16
    seed: int = 42
    loss_on: str = "all"  # all (the reference) | target (answer tokens only)
    packing: str = "concat"  # concat (the reference) | isolated | none
    truncate: bool = False  # cut over-long examples instead of stopping
    method: str = "full"  # full | lora | qlora
    gradient_checkpointing: bool = False
    # torch.compile the decoder for training (the output layer + loss stay eager: their shapes
    # follow the labels); validation stays eager, as generation's shapes change every token
    compile: bool = False
    log_every: int = 1  # optimizer steps between metrics.jsonl lines
    threads: int | None = None  # torch intra-op threads, set by the CLI; null keeps torch's choice
    max_minutes: float | None = None  # stop (validate, checkpoint, export) after this much training time
    # (the optimizer steps alone: validation and checkpoints do not count against it)
    # the machine's peak for MFU, in the training precision; null: measured once by a short
    # matmul and cached (see speed.py)
    peak_tflops: float | None = None
    # isolated packing: check at the start that packed rows give each example the loss it has
    # alone (the attention implementation honours position-id restarts); see guards.py
    packing_check: bool = True
    # weight averaging: the decay of an exponential moving average of the trained weights, which
    # validation measures and the export writes instead of the raw weights; null: off (averaging.py)
    ema: float | None = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # null picks per architecture


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep: int = 2  # newest complete checkpoints kept
    # weights + optimizer state: `hf` = one full copy written by the main process;
    # `accelerate` = the engine's own (sharded) save_state; `auto` = accelerate under FSDP /
    # DeepSpeed, hf otherwise. Every checkpoint also holds the full HF weights in model/.
    format: str = "auto"


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between validations during training; 0 = only at the end
    # auto: from the data (label tasks: the longest label + EOS; free text: the longest training
    # target + EOS, plus a margin; see tokenize.generation_length), or a number of tokens
    max_new_tokens: int | str = "auto"
    batch_size: int = 32
    seq_len: int = 512  # prompts longer than this are cut from the left
    limit: int | None = None  # validation rows used; null = all
    mode: str = "generate"  # generate (the reference) | score
    precision: str = "fp32"  # fp32 | bf16 (autocast) | bf16-checked (bf16, close calls redone in fp32)
    # entity lists cut off or garbled: lenient keeps a row's well-formed entities, strict drops
    # them all; either way the row is counted as malformed
    entity_parsing: str = "lenient"
    metric: str | None = None  # what "best" means: a validation metric's name; null: the task's headline
    greater_is_better: bool | None = None  # null: inferred from eval.metric (see metrics.greater_is_better)
    patience: int = 0  # stop after this many validations without a new best; 0: never stop early


@dataclass
class TaskEntry:
    """One task of a mixture (``tasks.<name>``); its data keys are those of ``data``."""

    task: str | None = None  # built-in task name or task YAML; null: the entry's own name
    train: str | None = None  # file, folder or hub dataset id; null: the task's hub dataset
    validation: str | None = None  # null: the training source
    hub_config: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    weight: float | None = None  # its mixing weight under mix.rule: weights (null: 1)
    mode: str | None = None  # its validation mode; null: eval.mode (generate for free-text tasks)


@dataclass
class MixConfig:
    # how a multi-task run mixes its tasks (see mixture.py): proportional (rate ∝ min(n, cap)),
    # temperature (rate ∝ min(n, cap) ^ (1 / temperature)), weights (rate ∝ tasks.<name>.weight)
    rule: str = "proportional"
    cap: int | None = None  # K: examples counted per task at most; also bounds its share of an epoch
    temperature: float = 1.0


@dataclass
class ExportConfig:
    # the weights exported to hf/: best (the best validated step; the last when no validation
    # ran) | last; `from` in YAML and overrides (export.from=last)
    from_: str = "best"
    gate: bool = True  # reload the export and compare its logits with the trained model's
    # LoRA: merge the adapter into the base weights (a full model); false: hf/ holds the adapter
    # alone, exact (a merge into bf16 weights rounds away updates below bf16's resolution)
    merge: bool = True


@dataclass
class LogConfig:
    to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, trackio, wandb, mlflow


@dataclass
class RunConfig:
    task: str = "mnli"  # built-in task name or path to a task YAML
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # a multi-task run: task name → its data (then `task` and `data.*` are not used); empty: one task
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    mix: MixConfig = field(default_factory=MixConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML spells it (``from_`` is ``from``)."""
        return {name: {_spelled(k): v for k, v in value.items()} if isinstance(value, dict) else value
                for name, value in dataclasses.asdict(self).items()}


def _attribute(key: str) -> str:
    """The dataclass field of a config key: Python keywords carry a trailing underscore."""
    return key + "_" if keyword.iskeyword(key) else key


def _spelled(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "model.compute_dtype": {"float32"},
    "train.schedule": {"constant", "linear", "cosine"},
    "train.precision": {"fp32", "bf16"},
    "eval.precision": {"fp32", "bf16", "bf16-checked"},
    "eval.entity_parsing": {"lenient", "strict"},
    "train.loss_on": {"all", "target"},
    "train.packing": {"concat", "isolated", "none"},
    "train.method": {"full", "lora", "qlora"},
    "eval.mode": {"generate", "score"},
    "checkpoint.format": {"auto", "hf", "accelerate"},
    "export.from": {"best", "last"},
    "mix.rule": {"proportional", "temperature", "weights"},
}
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")
# The allowed range of every numeric key (null, where a key allows it, is always allowed).
# Every float must also be finite: NaN and inf are refused wherever a number is read.
_POS, _NONNEG, _FRACTION, _PROB = "> 0", ">= 0", "in [0, 1]", "in [0, 1)"
_SEED = "in [0, 2**32)"  # what numpy's seed takes (accelerate's set_seed seeds numpy too)
_RANGE_TESTS = {_POS: lambda v: v > 0, _NONNEG: lambda v: v >= 0, _FRACTION: lambda v: 0 <= v <= 1,
                _PROB: lambda v: 0 <= v < 1, _SEED: lambda v: 0 <= v < 2**32}
RANGES = {
    "train.steps": _POS, "train.seq_len": _POS, "train.micro_batch_size": _POS, "train.global_batch_size": _POS,
    "train.lr": _POS, "train.eps": _POS, "train.weight_decay": _NONNEG, "train.warmup_steps": _NONNEG,
    "train.min_lr_ratio": _FRACTION, "train.warmup_fraction": _PROB, "train.dropout": _PROB,
    "train.grad_clip": _POS, "train.seed": _SEED, "train.ema": _PROB,
    "train.log_every": _POS, "train.threads": _POS, "train.max_minutes": _POS,
    "lora.r": _POS, "lora.alpha": _POS, "lora.dropout": _PROB,
    "checkpoint.every": _NONNEG, "checkpoint.keep": _POS,
    "eval.every": _NONNEG, "eval.max_new_tokens": _POS, "eval.batch_size": _POS, "eval.seq_len": _POS,
    "eval.limit": _POS, "eval.patience": _NONNEG, "train.peak_tflops": _POS,
    "mix.cap": _POS, "mix.temperature": _POS,
}
# Keys that may change when a run resumes: they do not alter what was already trained (out_dir:
# a run folder may be moved or renamed and still resume).
RESUME_SAFE = {"out_dir", "train.steps", "checkpoint.every", "checkpoint.keep", "eval.every", "eval.limit",
               "eval.batch_size", "eval.max_new_tokens", "eval.seq_len", "eval.mode", "eval.precision",
               "eval.entity_parsing", "train.log_every", "train.threads", "train.max_minutes", "data.validation",
               "data.validation_split", "eval.patience", "export.from", "export.gate", "export.merge", "log.to",
               "train.peak_tflops", "train.packing_check", "train.compile"}


def _type_ok(value: Any, tp: Any) -> bool:
    """True when a YAML-parsed value fits a dataclass annotation (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string and users write ``steps: 1e3``; accept both spellings."""
    wants_float = _type_ok(0.5, tp)
    if isinstance(value, str) and wants_float and (_FLOAT.fullmatch(value) or value.strip().lower().lstrip("+-") in
                                                   ("nan", "inf", "infinity")):
        return float(value)  # NaN and inf become floats here, to be refused as not finite
    if isinstance(value, float) and not wants_float and _type_ok(1, tp) and value.is_integer():
        return int(value)
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def _flatten(tree: dict[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Dotted keys of a (section → key → value) tree; deeper mappings stay values (and are then
    reported as the wrong type), so a nested alias bomb is never expanded."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            flat.update(_flatten(value, dotted + ".", depth - 1))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` → ``("train.lr", 0.0001)``; values are parsed as YAML scalars, never code."""
    if "=" not in text:
        raise ConfigError(f"override {short(text)} is not of the form key=value (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {short(text)}: the key before '=' is empty (e.g. train.steps=10)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(values: dict[str, Any]) -> RunConfig:
    """Make a validated RunConfig from flat dotted keys; raise one ConfigError listing every problem."""
    cfg = RunConfig()
    errors: list[str] = []
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head == "tasks" and rest:
            errors.extend(_set_task_entry(cfg, rest, value))
            continue
        if head == "tasks" and value is None:  # `tasks:` with every entry commented out: one task
            continue
        if head == "tasks":
            if not isinstance(value, dict):
                errors.append(f"tasks: expected a mapping of task names to their keys, got {short(value)}")
            for name, entry in (value.items() if isinstance(value, dict) else ()):
                errors.extend(_task_entry(cfg, str(name), entry))
            continue
        if head not in sections:
            errors.append(f"{key}: unknown key")
            continue
        if not rest:
            section = getattr(cfg, head)
            if dataclasses.is_dataclass(section):
                errors.append(f"{key}: is a section; set its keys (e.g. {head}.<key>=...)")
                continue
            tp = typing.get_type_hints(RunConfig)[head]
            if not _type_ok(value, tp):
                errors.append(f"{key}: expected {_type_name(tp)}, got {short(value)}")
                continue
            setattr(cfg, head, value)
            continue
        section = getattr(cfg, head)
        if not dataclasses.is_dataclass(section):
            errors.append(f"{key}: unknown key ('{head}' has no sub-keys)")
            continue
        problem = _assign(section, head, rest, value)
        if problem:
            errors.append(problem)
    # every key that passed the type check is value-checked too (a key that failed keeps its
    # default), so that all problems are reported at once
    errors.extend(_check_values(cfg))
    if errors:
        shown = "; ".join(errors[:12]) + (f"; and {len(errors) - 12} more" if len(errors) > 12 else "")
        raise ConfigError("invalid config: " + shown)
    cfg.out_dir = str(Path(cfg.out_dir).expanduser()) if cfg.out_dir else cfg.out_dir
    return cfg


def _assign(section: Any, prefix: str, key: str, value: Any) -> str | None:
    """Set ``section.<key>`` (the config key ``prefix.key``) to ``value`` read from YAML, or say
    why not: an unknown key, the wrong type, a number that is not finite."""
    hints = {_spelled(name): tp for name, tp in typing.get_type_hints(type(section)).items()}
    where = f"{prefix}.{key}"
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        hint = f" (did you mean {prefix}.{close[0]}?)" if close else f" (known: {', '.join(sorted(hints))})"
        return f"{where}: unknown key{hint}"
    value = _coerce(value, hints[key])
    if not _type_ok(value, hints[key]):
        return f"{where}: expected {_type_name(hints[key])}, got {short(value)}"
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        return f"{where}: must be a finite number, got {short(value)}"
    setattr(section, _attribute(key), value)
    return None


def _set_task_entry(cfg: RunConfig, rest: str, value: Any) -> list[str]:
    """``tasks.<name>`` (a mapping of entry keys, or null) or ``tasks.<name>.<key>``; returns
    the problems, each naming the task and the key."""
    name, _, key = rest.partition(".")
    if not name.strip():
        return [f"tasks.{rest}: a task entry needs a name"]
    return _task_entry(cfg, name, {key: value} if key else value)


def _task_entry(cfg: RunConfig, name: str, value: Any) -> list[str]:
    """``tasks.<name>``, its name taken whole, set from a mapping of entry keys (or null)."""
    if value is None:
        value = {}
    elif not isinstance(value, dict):
        return [f"tasks.{name}: expected a mapping of keys (train, validation, weight, ...), got {short(value)}"]
    entry = cfg.tasks.setdefault(name, TaskEntry())
    problems = (_assign(entry, f"tasks.{name}", field, field_value) for field, field_value in value.items())
    return [problem for problem in problems if problem]


def get_key(cfg: RunConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, _attribute(part))
    return obj


# Values that moved to another key: the error says where they went.
MOVED = {("train.precision", "bf16-weights"): "bf16 weights are model.dtype=bfloat16 now "
                                               "(with train.precision=fp32, or bf16 for autocast)"}


def batch_size_problem(t: TrainConfig, processes: int = 1) -> str | None:
    """Why ``train.global_batch_size`` cannot be split into micro-batches over ``processes``."""
    if t.micro_batch_size <= 0 or t.global_batch_size % (t.micro_batch_size * processes) == 0:
        return None
    split = f"train.micro_batch_size ({t.micro_batch_size})" if processes == 1 else \
        f"train.micro_batch_size × processes ({t.micro_batch_size} × {processes})"
    return f"train.global_batch_size: {t.global_batch_size} is not a multiple of {split}"


def _check_values(cfg: RunConfig) -> list[str]:
    errors = []
    for key, allowed in CHOICES.items():
        if (key, get_key(cfg, key)) in MOVED:
            errors.append(f"{key}: {short(get_key(cfg, key))} was split: {MOVED[key, get_key(cfg, key)]}")
        elif get_key(cfg, key) is not None and get_key(cfg, key) not in allowed:  # null: typed Optional
            errors.append(f"{key}: must be one of {', '.join(sorted(allowed))}, got {short(get_key(cfg, key))}")
    for key, allowed in RANGES.items():
        value = get_key(cfg, key)
        if isinstance(value, str):  # the only string a numeric key takes is auto
            if value != "auto":
                errors.append(f"{key}: must be a number {allowed} or auto, got {short(value)}")
        elif value is not None and not _RANGE_TESTS[allowed](value):
            errors.append(f"{key}: must be {allowed}, got {value}")
    t = cfg.train
    problem = batch_size_problem(t)
    if problem:
        errors.append(problem)
    if t.steps == "auto" and t.max_minutes is None:
        errors.append("train.steps: auto trains for a time budget; set train.max_minutes too")
    if t.warmup_steps and t.steps == "auto":
        errors.append(f"train.warmup_steps: {t.warmup_steps} with train.steps: auto, whose warmup is "
                      "train.warmup_fraction of the budget; set one of them (the other 0)")
    elif t.warmup_steps and t.warmup_fraction:
        errors.append(f"train.warmup_steps: {t.warmup_steps} with train.warmup_fraction: {t.warmup_fraction}; "
                      "set one of them (the other 0)")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        errors.append(f"train.betas: must be two numbers in [0, 1), got {short(t.betas)}")
    if not cfg.out_dir:
        errors.append("out_dir: must not be empty")
    for name, entry in cfg.tasks.items():  # each entry's mode and weight, checked like eval.mode and RANGES
        try:
            plain_name(name, f"tasks.{name}")  # it names plot files and metrics
        except UserError as exc:
            errors.append(str(exc))
        if entry.mode is not None and entry.mode not in CHOICES["eval.mode"]:
            modes = ", ".join(sorted(CHOICES["eval.mode"]))
            errors.append(f"tasks.{name}.mode: must be one of {modes}, got {short(entry.mode)}")
        if entry.weight is not None and not _RANGE_TESTS[_POS](entry.weight):
            errors.append(f"tasks.{name}.weight: must be {_POS}, got {entry.weight}")
    if cfg.tasks:
        for key in ("data.train", "data.validation"):
            if get_key(cfg, key) is not None:
                errors.append(f"{key}: a multi-task run takes its data from tasks.<name>.{key.split('.')[1]}")
        weighted = [name for name, entry in cfg.tasks.items() if entry.weight is not None]
        if weighted and cfg.mix.rule != "weights":
            errors.append(f"tasks.{weighted[0]}.weight: weights apply under mix.rule: weights "
                          f"(it is {cfg.mix.rule})")
    unknown = [name for name in cfg.log.to if name not in TRACKERS]
    if unknown:
        errors.append(f"log.to: {short(unknown[0])} is not a tracker t2tune knows; choose from {', '.join(TRACKERS)}")
    if cfg.model.compute_dtype is not None:  # autocast would take the widened matmuls back to bf16
        for key in ("train.precision", "eval.precision"):
            if get_key(cfg, key) != "fp32":
                errors.append(f"{key}: {get_key(cfg, key)} autocasts to bf16, but model.compute_dtype: "
                              f"{cfg.model.compute_dtype} asks for fp32 compute; set {key}=fp32, or drop model.compute_dtype")
    return errors


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (optional), apply ``key=value`` overrides, validate everything at once."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        values = _flatten(tree)
        if isinstance(tree.get("tasks"), dict):  # task names are taken whole, dots and all
            values = {k: v for k, v in values.items() if not k.startswith("tasks.")}
            values["tasks"] = tree["tasks"]
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return build_config(values)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts. A key the old config lacks
    (written by an older t2tune) is the same when the new one holds its default."""
    a, b = _flatten(old), _flatten(new)
    defaults = _flatten(RunConfig().to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k, defaults.get(k)) != b.get(k))
