"""Honest speed figures: model FLOPs utilisation (MFU) and packing efficiency.

MFU = achieved model FLOP/s ÷ the hardware's peak FLOP/s, where the model FLOPs of one trained
token are (the PaLM paper's accounting, appendix B)::

    6 · N_trained + 4 · N_frozen + 12 · L · d · T      (+ 6 · V · d for each counted label)

- ``N``: the decoder's parameters that multiply activations (not the input embedding, a
  lookup). A trained parameter costs 2 FLOPs forward and 4 backward (activation and weight
  gradients); a frozen one (LoRA's base weights) 2 forward and 2 backward (activation
  gradients only).
- The output layer (``V · d``, tied or not) runs only at positions whose label counts
  (``LossModule``), so it is counted per label token: with ``loss_on: target`` that is a few
  tokens per example, and counting it for every token would overstate MFU by about a fifth on
  SmolLM2-135M.
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
from dataclasses import dataclass
from typing import Any

import torch

from .files import atomic_file, parse_json
from .packing import PackedRow


@dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of training: per real token (the decoder's matmuls and attention) and per
    token whose label counts (the output layer, which t2tune applies to those alone)."""

    per_token: float
    per_label: float

    def of(self, tokens: int, labels: int) -> float:
        return tokens * self.per_token + labels * self.per_label


def matmul_parameters(model: Any) -> tuple[int, int, int]:
    """(trained, frozen) parameters of the decoder that multiply activations, and the output
    layer's weight (its ``V · d`` even when tied to the embedding, whose lookup is no matmul)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    trained = frozen = 0
    for param in model.parameters():
        if param is embedding or param is head_weight:
            continue
        quant = getattr(param, "quant_state", None)  # a 4-bit weight is stored packed, two to a byte
        count = quant.shape.numel() if quant is not None else param.numel()
        if param.requires_grad:
            trained += count
        else:
            frozen += count
    return trained, frozen, head_weight.numel() if head_weight is not None else 0


def model_flops(model: Any, seq_len: int) -> ModelFlops:
    """The model FLOPs of one trained token and of one counted label (forward and backward)."""
    trained, frozen, head = matmul_parameters(model)
    config = model.config
    layers, width = config.num_hidden_layers, config.hidden_size
    head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters()) if head else False
    return ModelFlops(6.0 * trained + 4.0 * frozen + 12.0 * layers * width * seq_len,
                      (6.0 if head_trained else 4.0) * head)


def packing_efficiency(rows: Sequence[PackedRow], seq_len: int) -> float:
    """Real tokens ÷ row slots (``seq_len`` input positions per row)."""
    return sum(row.real for row in rows) / (len(rows) * seq_len) if rows else 0.0


def mfu(flops: float, seconds: float, peak_tflops: float, processes: int = 1) -> float:
    """The fraction of ``processes`` devices' peak that ``flops`` model FLOPs in ``seconds`` achieve."""
    return flops / seconds / (peak_tflops * 1e12 * processes) if seconds and peak_tflops else 0.0


def machine(device: torch.device, dtype: torch.dtype) -> str:
    """The device, its model and (on CPU) torch's thread count, and ``dtype``: what a measured peak is a peak of."""
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
    from .files import cache_dir

    path = cache_dir() / "peak_tflops.json"
    key = machine(device, dtype)
    try:
        known = parse_json(path.read_text(encoding="utf-8"))
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
