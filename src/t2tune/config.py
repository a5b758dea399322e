"""Run configuration: flat dataclasses, YAML + ``key=value`` overrides, one validation pass.

Every setting has one home and a docstring-style comment. ``load_config`` gathers *all*
problems (unknown keys, wrong types, bad values) and raises one :class:`ConfigError` naming
each key, so a user fixes a config in one go rather than one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import keyword
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UserError, short
from .files import plain_name
from .yamlfile import read_yaml

# A key's one declaration: default, documentation, allowed values (``choices``), numeric range
# (``range``, one of the range names below), whether ``auto`` is allowed in place of a number,
# and whether it may change when a run resumes (``resume_safe``: it does not alter what was
# already trained). CHOICES, RANGES, RESUME_SAFE and the README's key table are derived from it.
POS, NONNEG, FRACTION, PROB = "> 0", ">= 0", "in [0, 1]", "in [0, 1)"
SEED = "in [0, 2**32)"  # what numpy's seed takes (accelerate's set_seed seeds numpy too)
RANGE_TESTS = {
    POS: lambda v: v > 0,
    NONNEG: lambda v: v >= 0,
    FRACTION: lambda v: 0 <= v <= 1,
    PROB: lambda v: 0 <= v < 1,
    SEED: lambda v: 0 <= v < 2**32,
}


def key(
    default: Any = None,
    doc: str = "",
    *,
    choices: tuple[str, ...] = (),
    range: str | None = None,
    auto: bool = False,
    resume_safe: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field with its declaration in the field's metadata."""
    meta = {"doc": doc, "choices": frozenset(choices), "range": range, "auto": auto, "resume_safe": resume_safe}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = key("smollm2-135m", "hub id, local HF folder, .gguf file or alias (see `t2tune models`)")
    revision: str | None = key(None, 'hub revision, e.g. "float16" for GPT-J')
    dtype: str = key("float32", "weights dtype", choices=("float32", "bfloat16", "float16"))
    compute_dtype: str | None = key(
        None,
        "the dtype layers compute in, when wider than the weights: float32 over bfloat16 weights keeps 2 bytes "
        "a weight and fp32 speed on CPUs without bf16 matrix units (precision.py, docs/scaling.md)",
        choices=("float32",),
    )
    attn_implementation: str = key("sdpa", "eager | sdpa (others if installed)")
    trust_remote_code: bool = key(False, "run a model's own code from the hub; never on unless asked")


@dataclass
class DataConfig:
    train: str | None = key(None, "file, folder with {split}.{jsonl,csv,tsv,parquet}, or hub dataset id")
    validation: str | None = key(None, "same forms; null: the training source", resume_safe=True)
    hub_config: str | None = key(None, 'hub dataset configuration, e.g. "mnli" for nyu-mll/glue')
    train_split: str = key("train", "the training split's name")
    validation_split: str = key("validation", "the validation split's name", resume_safe=True)


@dataclass
class TrainConfig:
    steps: int | str = key(
        100,
        "optimizer steps; auto (with max_minutes): as many as the time budget buys, warmup "
        "and decay following the fraction of the budget spent",
        range=POS,
        auto=True,
        resume_safe=True,
    )
    seq_len: int = key(256, "tokens per row fed to the model (rows hold seq_len + 1 tokens)", range=POS)
    micro_batch_size: int = key(8, "rows per forward pass (per process)", range=POS)
    global_batch_size: int = key(8, "rows per optimizer step, all processes together", range=POS)
    lr: float = key(2e-4, "peak learning rate (AdamW)", range=POS)
    betas: list[float] = key(doc="AdamW's betas, each in [0, 1)", factory=lambda: [0.9, 0.999])
    eps: float = key(1e-8, "AdamW's epsilon", range=POS)
    weight_decay: float = key(0.0, "AdamW's weight decay, never applied to norms and biases", range=NONNEG)
    warmup_steps: int = key(0, "linear warmup in optimizer steps (or warmup_fraction; set one)", range=NONNEG)
    warmup_fraction: float = key(
        0.0,
        "warmup as a fraction of the run: of the time budget (steps: auto) or of the "
        "steps; the one way to warm up a budgeted run",
        range=PROB,
    )
    schedule: str = key("constant", "the lr after warmup", choices=("constant", "linear", "cosine"))
    min_lr_ratio: float = key(0.0, "floor of linear/cosine decay, as a fraction of lr", range=FRACTION)
    dropout: float | None = key(None, "overrides every dropout probability of the model when set", range=PROB)
    grad_clip: float | None = key(1.0, "max global gradient norm; null disables", range=POS)
    precision: str = key(
        "fp32", "training autocast: fp32 (none: the weights' dtype, model.dtype) | bf16", choices=("fp32", "bf16")
    )
    seed: int = key(42, "seeds the model's new weights, dropout and the data order", range=SEED)
    loss_on: str = key("all", "all tokens (the reference) | target (answer tokens only)", choices=("all", "target"))
    packing: str = key("concat", "how rows are filled (README: What it does)", choices=("concat", "isolated", "none"))
    truncate: bool = key(False, "cut over-long examples instead of stopping")
    method: str = key(
        "full", "full fine-tune | lora | qlora (LoRA over 4-bit weights)", choices=("full", "lora", "qlora")
    )
    gradient_checkpointing: bool = key(False, "recompute activations in backward: less memory, ~1/3 more compute")
    compile: bool = key(
        False,
        "torch.compile the decoder for training (the output layer and loss stay eager); "
        "validation stays eager; not under DeepSpeed/FSDP",
        resume_safe=True,
    )
    log_every: int = key(1, "optimizer steps between metrics.jsonl lines", range=POS, resume_safe=True)
    threads: int | None = key(
        None, "torch intra-op threads, set by the CLI; null keeps torch's choice", range=POS, resume_safe=True
    )
    max_minutes: float | None = key(
        None,
        "stop (validate, checkpoint, export) after this much training time: the "
        "optimizer steps alone, not validation or checkpoints",
        range=POS,
        resume_safe=True,
    )
    peak_tflops: float | None = key(
        None,
        "the machine's peak for MFU, in the training precision; null: measured at the run's start (speed.py)",
        range=POS,
        resume_safe=True,
    )
    packing_check: bool = key(
        True,
        "isolated packing: check at the start that packed rows give each example the loss it has alone (guards.py)",
        resume_safe=True,
    )
    ema: float | None = key(
        None,
        "weight averaging: the decay of an exponential moving average of the trained "
        "weights, which validation measures and the export writes instead of the raw weights; "
        "null: off; not under DeepSpeed/FSDP (averaging.py)",
        range=PROB,
    )


@dataclass
class LoraConfig:
    r: int = key(8, "adapter rank", range=POS)
    alpha: int = key(16, "adapter scale numerator (scale = alpha / r)", range=POS)
    dropout: float = key(0.05, "dropout on the adapter's input", range=PROB)
    target_modules: list[str] | None = key(
        None, "module names to adapt; null: GPT-J attention + MLP projections, Llama q/k/v/o/gate/up/down"
    )


@dataclass
class CheckpointConfig:
    every: int = key(0, "optimizer steps between checkpoints; 0: only at the end", range=NONNEG, resume_safe=True)
    keep: int = key(2, "newest complete checkpoints kept (and the best)", range=POS, resume_safe=True)
    format: str = key(
        "auto",
        "weights + optimizer state: hf (one full copy by the main process) | accelerate (the "
        "engine's own sharded save_state) | auto (accelerate under FSDP / DeepSpeed); every "
        "checkpoint also holds full HF weights",
        choices=("auto", "hf", "accelerate"),
    )


@dataclass
class EvalConfig:
    every: int = key(0, "optimizer steps between validations; 0: only at the end", range=NONNEG, resume_safe=True)
    max_new_tokens: int | str = key(
        "auto",
        "tokens generated per answer; auto: the longest label + EOS, or the "
        "longest training target + EOS plus a margin",
        range=POS,
        auto=True,
        resume_safe=True,
    )
    batch_size: int = key(32, "prompts per forward pass", range=POS, resume_safe=True)
    seq_len: int = key(512, "prompts longer than this are cut from the left (and counted)", range=POS, resume_safe=True)
    limit: int | None = key(None, "validation rows used; null: all", range=POS, resume_safe=True)
    mode: str = key(
        "generate",
        "generate the answer (the reference) | score the labels",
        choices=("generate", "score"),
        resume_safe=True,
    )
    precision: str = key(
        "fp32",
        "fp32 | bf16 (autocast) | bf16-checked (bf16, close calls redone in fp32)",
        choices=("fp32", "bf16", "bf16-checked"),
        resume_safe=True,
    )
    entity_parsing: str = key(
        "lenient",
        "entity lists cut off or garbled: lenient keeps a row's well-formed entities, strict drops them all",
        choices=("lenient", "strict"),
        resume_safe=True,
    )
    metric: str | None = key(None, "what \"best\" means: a validation metric's name; null: the task's headline")
    greater_is_better: bool | None = key(None, "null: inferred from eval.metric")
    patience: int = key(
        0, "stop after this many validations without a new best; 0: never stop early", range=NONNEG, resume_safe=True
    )


@dataclass
class TaskEntry(DataConfig):
    """One task of a mixture (``tasks.<name>``): ``data``'s keys, and its own."""

    task: str | None = key(None, "built-in task name or task YAML; null: the entry's own name")
    weight: float | None = key(None, "its mixing weight under mix.rule: weights (null: 1)", range=POS)
    mode: str | None = key(
        None, "its validation mode; null: eval.mode (generate for free-text tasks)", choices=("generate", "score")
    )


@dataclass
class MixConfig:
    rule: str = key(
        "proportional",
        "how tasks mix: proportional (rate ∝ min(n, cap)), temperature (rate ∝ "
        "min(n, cap) ^ (1 / temperature)), weights (rate ∝ tasks.<name>.weight)",
        choices=("proportional", "temperature", "weights"),
    )
    cap: int | None = key(None, "examples counted per task at most; also bounds its share of an epoch", range=POS)
    temperature: float = key(1.0, "mix.rule: temperature's exponent", range=POS)


@dataclass
class ExportConfig:
    from_: str = key(
        "best",
        "the weights exported to hf/: best (the best validated step; the last when no validation ran) | last",
        choices=("best", "last"),
        resume_safe=True,
    )
    gate: bool = key(True, "reload the export and compare its logits with the trained model's", resume_safe=True)
    merge: bool = key(
        True,
        "LoRA: merge the adapter into the base weights; false: hf/ holds the adapter alone, exact",
        resume_safe=True,
    )


@dataclass
class LogConfig:
    to: list[str] = key(doc="experiment trackers: tensorboard, trackio, wandb, mlflow", factory=list, resume_safe=True)


@dataclass
class RunConfig:
    task: str = key("mnli", "built-in task name or path to a task YAML")
    out_dir: str = key(
        "runs/default", "the run folder (may start with ~); a run may move and still resume", resume_safe=True
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tasks: dict[str, TaskEntry] = key(
        doc="a multi-task run: task name → its keys (then task and data.* are not used); empty: one task", factory=dict
    )
    mix: MixConfig = field(default_factory=MixConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML spells it (``from_`` is ``from``)."""
        return {
            name: {_spelled(k): v for k, v in value.items()} if isinstance(value, dict) else value
            for name, value in dataclasses.asdict(self).items()
        }


def _attribute(key: str) -> str:
    """The dataclass field of a config key: Python keywords carry a trailing underscore."""
    return key + "_" if keyword.iskeyword(key) else key


def _spelled(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def declared(section: type = RunConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every config key, dotted as users write it, and its field: a section's keys under its name.

    >>> sorted(declared())[:3]
    ['checkpoint.every', 'checkpoint.format', 'checkpoint.keep']
    """
    hints = typing.get_type_hints(section)
    keys: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(section):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(declared(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{_spelled(f.name)}"] = f
    return keys


KEYS = declared()
ENTRY_KEYS = declared(TaskEntry, "tasks.<name>.")
CHOICES = {k: set(f.metadata["choices"]) for k, f in KEYS.items() if f.metadata.get("choices")}
RANGES = {k: f.metadata["range"] for k, f in KEYS.items() if f.metadata.get("range")}
RESUME_SAFE = {k for k, f in KEYS.items() if f.metadata.get("resume_safe")}
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")


def key_table() -> str:
    """The README's table of config keys, made from their declarations (``t2tune keys``)."""
    lines = ["| key | default | allowed | resume-safe | what it does |", "|---|---|---|---|---|"]
    for name, f in {**KEYS, **ENTRY_KEYS}.items():
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        allowed = " / ".join(sorted(meta["choices"])) if meta.get("choices") else meta.get("range") or ""
        if meta.get("auto"):
            allowed += " or auto"
        shown = "null" if default is None else json.dumps(default)
        lines.append(
            f"| `{name}` | `{shown}` | {allowed} | {'yes' if meta.get('resume_safe') else ''} "
            f"| {meta.get('doc', '').replace('|', chr(92) + '|')} |"
        )
    return "\n".join(lines) + "\n"


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


def wrong_types(cls: type, values: dict[str, Any]) -> list[str]:
    """The keys of ``values`` that name a field of the dataclass ``cls`` but do not fit its type,
    by the rule config keys are read with (a run's ``state.json`` is checked so, too).

    >>> wrong_types(ModelConfig, {"name": 7, "dtype": "bfloat16", "unknown": 1})
    ['name']
    """
    hints = typing.get_type_hints(cls)
    return [k for k, v in values.items() if k in hints and not _type_ok(v, hints[k])]


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string and users write ``steps: 1e3``; accept both spellings."""
    wants_float = _type_ok(0.5, tp)
    if (
        isinstance(value, str)
        and wants_float
        and (_FLOAT.fullmatch(value) or value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"))
    ):
        return float(value)  # NaN and inf become floats here, to be refused as not finite
    if isinstance(value, float) and not wants_float and _type_ok(1, tp) and value.is_integer():
        return int(value)
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def flatten(tree: dict[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Dotted keys of a (section → key → value) tree; deeper mappings stay values (and are then
    reported as the wrong type), so a nested alias bomb is never expanded."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            flat.update(flatten(value, dotted + ".", depth - 1))
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
            for name, entry in value.items() if isinstance(value, dict) else ():
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
MOVED = {
    ("train.precision", "bf16-weights"): "bf16 weights are model.dtype=bfloat16 now "
    "(with train.precision=fp32, or bf16 for autocast)"
}


def batch_size_problem(t: TrainConfig, processes: int = 1) -> str | None:
    """Why ``train.global_batch_size`` cannot be split into micro-batches over ``processes``."""
    if t.micro_batch_size <= 0 or t.global_batch_size % (t.micro_batch_size * processes) == 0:
        return None
    split = (
        f"train.micro_batch_size ({t.micro_batch_size})"
        if processes == 1
        else f"train.micro_batch_size × processes ({t.micro_batch_size} × {processes})"
    )
    return f"train.global_batch_size: {t.global_batch_size} is not a multiple of {split}"


def _declared_problems(section: Any, keys: dict[str, dataclasses.Field], prefix: str = "") -> list[str]:
    """Each value of ``section`` (or of the whole config) against its key's declaration: its
    choices, its range, and ``auto`` only where the key allows it."""
    errors = []
    for name, f in keys.items():
        value, meta = getattr(section, f.name) if prefix else get_key(section, name), f.metadata
        where = f"{prefix}{name.rsplit('.', 1)[-1]}" if prefix else name
        if meta.get("choices") and (where, value) in MOVED:
            errors.append(f"{where}: {short(value)} was split: {MOVED[where, value]}")
        elif meta.get("choices") and value is not None and value not in meta["choices"]:  # null: typed Optional
            errors.append(f"{where}: must be one of {', '.join(sorted(meta['choices']))}, got {short(value)}")
        elif meta.get("range") and isinstance(value, str):  # the only string a numeric key takes is auto
            if value != "auto" or not meta.get("auto"):
                errors.append(
                    f"{where}: must be a number {meta['range']}{' or auto' * meta['auto']}, got {short(value)}"
                )
        elif meta.get("range") and value is not None and not RANGE_TESTS[meta["range"]](value):
            errors.append(f"{where}: must be {meta['range']}, got {value}")
    return errors


def _check_values(cfg: RunConfig) -> list[str]:
    errors = _declared_problems(cfg, KEYS)
    t = cfg.train
    problem = batch_size_problem(t)
    if problem:
        errors.append(problem)
    if t.steps == "auto" and t.max_minutes is None:
        errors.append("train.steps: auto trains for a time budget; set train.max_minutes too")
    if t.warmup_steps and t.steps == "auto":
        errors.append(
            f"train.warmup_steps: {t.warmup_steps} with train.steps: auto, whose warmup is "
            "train.warmup_fraction of the budget; set one of them (the other 0)"
        )
    elif t.warmup_steps and t.warmup_fraction:
        errors.append(
            f"train.warmup_steps: {t.warmup_steps} with train.warmup_fraction: {t.warmup_fraction}; "
            "set one of them (the other 0)"
        )
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        errors.append(f"train.betas: must be two numbers in [0, 1), got {short(t.betas)}")
    if not cfg.out_dir:
        errors.append("out_dir: must not be empty")
    for name, entry in cfg.tasks.items():
        try:
            plain_name(name, f"tasks.{name}")  # it names plot files and metrics
        except UserError as exc:
            errors.append(str(exc))
        errors.extend(_declared_problems(entry, ENTRY_KEYS, f"tasks.{name}."))
    if cfg.tasks:
        for key in ("data.train", "data.validation"):
            if get_key(cfg, key) is not None:
                errors.append(f"{key}: a multi-task run takes its data from tasks.<name>.{key.split('.')[1]}")
        weighted = [name for name, entry in cfg.tasks.items() if entry.weight is not None]
        if weighted and cfg.mix.rule != "weights":
            errors.append(f"tasks.{weighted[0]}.weight: weights apply under mix.rule: weights (it is {cfg.mix.rule})")
    unknown = [name for name in cfg.log.to if name not in TRACKERS]
    if unknown:
        errors.append(f"log.to: {short(unknown[0])} is not a tracker t2tune knows; choose from {', '.join(TRACKERS)}")
    if cfg.model.compute_dtype is not None:  # autocast would take the widened matmuls back to bf16
        for key in ("train.precision", "eval.precision"):
            if get_key(cfg, key) != "fp32":
                errors.append(
                    f"{key}: {get_key(cfg, key)} autocasts to bf16, but model.compute_dtype: "
                    f"{cfg.model.compute_dtype} asks for fp32 compute; set {key}=fp32, or drop model.compute_dtype"
                )
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
        values = flatten(tree)
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
    a, b = flatten(old), flatten(new)
    defaults = flatten(RunConfig().to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k, defaults.get(k)) != b.get(k))
