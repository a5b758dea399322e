"""Will the run fit? An estimate of training memory, made from the model's config before any
weight is loaded, so that a run which cannot fit stops at once with one line instead of being
killed by the kernel twenty minutes in.

The estimate adds, for the process that trains:

- weights: every parameter in ``model.dtype``;
- gradients and AdamW's two moments: the trainable parameters only (LoRA's adapters are fp32;
  a full fine-tune keeps them in ``model.dtype``), and their float32 average under ``train.ema``;
- activations kept for backward: with gradient checkpointing one hidden state per layer and
  token plus one layer recomputed in full, otherwise every layer in full (per layer and token
  ~34 hidden-sized values plus the attention scores, after Korthikanti et al. 2022, in the
  dtype the layers compute in);
- a fixed allowance for the runtime (Python, torch, tokenizer, data), and the widest weight
  widened once when ``model.compute_dtype`` is set.

It is compared with the memory the process can have: the GPU's memory when one is used, else
what the kernel reports available (``MemAvailable``, capped by a cgroup limit). Sharded engines
(FSDP, DeepSpeed) divide these numbers in ways this estimate does not follow, so they are not
checked.
"""

from __future__ import annotations

import contextlib
import functools
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

RUNTIME_BYTES = 1.5 * 1024**3  # torch + transformers + the tokenised data, measured ~1.2 GB on SmolLM2 runs
GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    trainable: int
    parameters: int
    room: float = float("inf")  # what the run can have, where it was measured

    @property
    def tight(self) -> bool:
        """The run needs more than half the memory it can have: leave no freed memory idle."""
        return self.total > self.room / 2

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def line(self) -> str:
        parts = (
            f"weights {self.weights / GIB:.1f} + gradients {self.gradients / GIB:.1f} + "
            f"optimizer states {self.optimizer / GIB:.1f} + activations {self.activations / GIB:.1f} + "
            f"runtime {self.runtime / GIB:.1f}"
        )
        return f"{self.total / GIB:.1f} GiB ({parts})"


def _inner_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    """Every Linear but the output layer (what LoRA's "all-linear" and bitsandbytes' 4 bits take)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            yield name, module


def _lora_parameters(model: torch.nn.Module, targets: Any, r: int) -> int:
    """Adapter parameters LoRA adds: r × (in + out) for every targeted Linear (as peft matches
    names: the last name component; "all-linear" is every Linear but the output layer)."""
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in _inner_linears(model)
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets
    )


_NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits, and the QLoRA paper's 0.127 bits of double-quantized scales


def estimate(config: Any, cfg: Any) -> Estimate:
    """Training memory for a model of ``config`` (a transformers config) under the run config
    ``cfg``, counted on a skeleton whose parameters take no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .models import LORA_TARGETS

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in skeleton.parameters())
    t = cfg.train
    weight_bytes = _BYTES[cfg.model.dtype]
    if t.method in ("lora", "qlora"):
        targets = cfg.lora.target_modules or LORA_TARGETS.get(config.model_type, "all-linear")
        trainable, trainable_bytes = _lora_parameters(skeleton, targets, cfg.lora.r), 4
    else:
        trainable, trainable_bytes = params, weight_bytes
    weights = params * weight_bytes
    if t.method == "qlora":
        packed = sum(module.weight.numel() for _, module in _inner_linears(skeleton))  # stored in 4 bits
        weights = packed * _NF4_BYTES + (params - packed) * weight_bytes
    compute = _BYTES[cfg.model.compute_dtype or ("bfloat16" if t.precision == "bf16" else cfg.model.dtype)]
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    tokens = t.micro_batch_size * t.seq_len
    full_layer = tokens * (34 * hidden + 5 * heads * t.seq_len) * compute / 2  # the paper counts 2-byte values
    kept = layers * tokens * hidden * compute + full_layer if t.gradient_checkpointing else layers * full_layer
    widened = 0.0
    if cfg.model.compute_dtype:
        widened = max(p.numel() for p in skeleton.parameters()) * _BYTES[cfg.model.compute_dtype]
    return Estimate(
        weights=weights,
        gradients=trainable * trainable_bytes,
        optimizer=2 * trainable * trainable_bytes + (4 * trainable if t.ema is not None else 0),
        activations=kept + widened,
        runtime=RUNTIME_BYTES,
        trainable=trainable,
        parameters=params,
    )


def available_bytes() -> tuple[float, str]:
    """(bytes, where): the GPU's memory when CUDA is used, else the host memory available now."""
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), f"on {torch.cuda.get_device_name(0)}"
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = float(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, used_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            used = float(Path(used_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and float(limit) < 2**60:
            room = float(limit) - used
            avail = room if avail is None else min(avail, room)
        break
    if avail is None:
        return float("inf"), "on this machine"
    return avail, "available on this machine"


def check_memory(config: Any, cfg: Any) -> Estimate:
    """Raise UserError when the estimate exceeds the memory the run can have; else return it."""
    est = estimate(config, cfg)
    room, where = available_bytes()
    est.room = room
    if est.total > room:
        fixes = []
        if cfg.train.method == "full":
            fixes.append("train.method=lora (trains adapters only: no full gradients or optimizer states)")
        if cfg.model.dtype == "float32":
            fixes.append("model.dtype=bfloat16 (half the weights; with model.compute_dtype=float32 on a CPU)")
        if not cfg.train.gradient_checkpointing:
            fixes.append("train.gradient_checkpointing=true")
        fixes.append("DeepSpeed ZeRO-3 with CPU offload, or a GPU with more memory")
        raise UserError(
            f"model.name: training {cfg.model.name} ({est.parameters / 1e9:.2f} B parameters, "
            f"{est.trainable / 1e6:.1f} M trained) needs about {est.line()}, but {room / GIB:.1f} GiB "
            f"is {where}; try {'; or '.join(fixes)}"
        )
    return est


class StagePeaks:
    """Peak resident memory of each stage of a run (``load``, ``train``, ``validate``,
    ``checkpoint``, ``export``), for the summary: "why did my run get OOM-killed at the end?".

    Linux keeps a process's high-water mark (``VmHWM``) and resets it to the current RSS when
    ``5`` is written to ``/proc/self/clear_refs``; each stage boundary reads the mark into every
    stage open at that moment and resets it, so nested stages (a checkpoint inside a
    validation) count in both. Elsewhere only the whole run's peak (``getrusage``) is known.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget what was measured: a new run in this process starts here."""
        self.peaks: dict[str, float] = {}
        self.open: list[str] = []
        self.overall = 0.0  # resetting the mark resets getrusage's maximum too: the run's peak is kept here
        self.exact = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _high_water() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def _mark(self) -> None:
        high = self._high_water()
        self.overall = max(self.overall, high)
        for name in self.open:
            self.peaks[name] = max(self.peaks.get(name, 0.0), high)
        if self.exact:
            self._reset()

    def enter(self, name: str) -> None:
        self._mark()
        self.open.append(name)

    def leave(self, name: str) -> None:
        self._mark()
        self.open.remove(name)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave(name)

    def gib(self) -> dict[str, float]:
        """Each stage's peak in GiB (2 decimals); the whole process's too, as ``run``."""
        self._mark()
        out = {k: round(v / GIB, 2) for k, v in self.peaks.items()} if self.exact else {}
        out["run"] = round(self.overall / GIB, 2)
        return out


RSS = StagePeaks()  # resident memory is the process's: one record for it


def staged(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Count a function's calls as stage ``name`` of :data:`RSS`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with RSS.stage(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
