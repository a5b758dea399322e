"""Honest speed figures: model FLOPs utilisation (MFU) and packing efficiency.

MFU = achieved model FLOP/s ÷ the hardware's peak FLOP/s, where the model FLOPs of one trained
token are (the PaLM paper's accounting, appendix B)::

    6 · N_trained + 4 · N_frozen + 12 · L · d · T

- ``N``: parameters that multiply activations: every parameter except the input embedding
  (a lookup, not a matmul), plus the output layer's ``V · d`` even when it is tied to the
  embedding. A trained parameter costs 2 FLOPs forward and 4 backward (activation and weight
  gradients); a frozen one (LoRA's base weights) 2 forward and 2 backward (activation
  gradients only).
- ``12 · L · d · T``: attention scores and the weighted sum, forward and backward, for ``L``
  layers of width ``d`` over a context of ``T = train.seq_len`` tokens, without a discount
  for the causal mask (as PaLM counts, so figures compare across tools).
- Only real tokens count (padding is work that buys nothing, so it lowers MFU), and gradient
  checkpointing's recomputation is not model FLOPs.

The peak is ``train.peak_tflops`` when given; otherwise a short matmul in the training
precision measures it once per machine and the figure is cached (``T2TUNE_CACHE``).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from .files import atomic_file
from .packing import PackedRow


def matmul_parameters(model: Any) -> tuple[int, int]:
    """(trained, frozen) parameters that multiply activations (see the module docstring)."""
    trained = frozen = 0
    embedding = model.get_input_embeddings().weight
    for param in model.parameters():
        if param is embedding:
            continue
        if param.requires_grad:
            trained += param.numel()
        else:
            frozen += param.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the output matmul still runs
        if embedding.requires_grad:
            trained += embedding.numel()
        else:
            frozen += embedding.numel()
    return trained, frozen


def flops_per_token(model: Any, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward and backward)."""
    trained, frozen = matmul_parameters(model)
    config = model.config
    layers, width = config.num_hidden_layers, config.hidden_size
    return 6.0 * trained + 4.0 * frozen + 12.0 * layers * width * seq_len


def packing_efficiency(rows: Sequence[PackedRow], seq_len: int) -> float:
    """Real tokens ÷ row slots (``seq_len`` input positions per row)."""
    return sum(row.real for row in rows) / (len(rows) * seq_len) if rows else 0.0


def mfu(tokens_per_s: float, per_token: float, peak_tflops: float, processes: int = 1) -> float:
    """The fraction of ``processes`` devices' peak that ``tokens_per_s`` trained tokens achieve."""
    return tokens_per_s * per_token / (peak_tflops * 1e12 * processes)


def _machine(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} {_cpu_model()} threads={torch.get_num_threads()}"
    return f"{device.type} {name} {str(dtype).removeprefix('torch.')}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul throughput of ``device`` in ``dtype``, best of a few timed runs (TFLOP/s)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for attempt in range(50):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
        if attempt >= 2 and time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None = None) -> tuple[float, str]:
    """The peak MFU is measured against, and where it came from (``given``, ``cached``, ``measured``)."""
    if given is not None:
        return given, "train.peak_tflops"
    from .models import cache_dir

    path = cache_dir() / "peak_tflops.json"
    key = _machine(device, dtype)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
        return float(known[key]), "cached"
    value = measure_peak_tflops(device, dtype)
    known = known if isinstance(known, dict) else {}
    known[key] = value
    try:
        with atomic_file(path) as handle:
            handle.write(json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache: measured again next time
    return value, "measured"
