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
precision measures it at each run's start (best of several probes, their spread reported), since
machines that look alike differ between days. A cached figure (``T2TUNE_CACHE``) is only the
fallback where the probe cannot run, labelled with when it was measured.
"""

from __future__ import annotations

import json
import platform
import statistics
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
    return ModelFlops(
        6.0 * trained + 4.0 * frozen + 12.0 * layers * width * seq_len, (6.0 if head_trained else 4.0) * head
    )


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


@dataclass(frozen=True)
class Peak:
    """The peak MFU is measured against: ``tflops``, where it came from (``source``), and, when
    measured, each probe's TFLOP/s and the UTC time of the measurement."""

    tflops: float
    source: str
    probes: tuple[float, ...] = ()
    measured_at: str = ""

    @property
    def spread(self) -> dict[str, float]:
        """The probes' min, median and best (the peak), for a machine that was busy at times."""
        if not self.probes:
            return {}
        ordered = sorted(self.probes)
        return {
            "min": round(ordered[0], 4),
            "median": round(statistics.median(ordered), 4),
            "best": round(ordered[-1], 4),
            "probes": len(ordered),
        }

    def describe(self) -> str:
        """``"measured at start 17:45 UTC; probes min 0.25, median 0.3"``, or the setting or the cache."""
        if self.source != "measured at start":
            return self.source
        spread = self.spread
        return (
            f"measured at start {self.measured_at[11:16]} UTC; probes min {spread['min']:.3g}, "
            f"median {spread['median']:.3g}"
        )


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None = None) -> Peak:
    """The peak MFU is measured against: ``given`` (``train.peak_tflops``); else measured now, at
    the run's start, since this project's VMs share a CPU model string and differ ~2x between
    days. The cache, keyed by :func:`machine`, is a fallback for a device that cannot run the
    probe, and says when its figure was measured."""
    if given is not None:
        return Peak(given, "train.peak_tflops")
    from .files import cache_dir

    path, key = cache_dir() / "peak_tflops.json", machine(device, dtype)
    try:
        known = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    try:
        probes = measure_peak_probes(device, dtype)
    except RuntimeError:  # a dtype the device cannot multiply in
        entry = known.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("tflops"), (int, float)):
            when = entry.get("measured_at") if isinstance(entry.get("measured_at"), str) else "at an unknown time"
            return Peak(float(entry["tflops"]), f"cached, measured {when}")
        return Peak(0.0, "not measured (the probe failed here, and no cached figure)")
    peak = Peak(max(probes), "measured at start", tuple(probes), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    known[key] = {"tflops": round(peak.tflops, 4), "measured_at": peak.measured_at}
    try:
        with atomic_file(path) as handle:
            handle.write(json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache: it is only a fallback
    return peak


def measure_peak_probes(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, probes: int = 5) -> list[float]:
    """Dense matmul throughput of ``device`` in ``dtype``: timed runs of four matmuls each
    (TFLOP/s of each run) while ``seconds`` last, at least ``probes`` of them unless that takes
    four times as long (an emulated dtype: one run can take a minute), and at least one."""
    n = 4096 if device.type == "cuda" else 1024
    # a private generator: drawing from the global one would move dropout's masks (and a resumed
    # run's restored RNG state), so a run's result would depend on whether the peak was measured
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)  # warm-up: the first call pays for allocation and kernel choice
    found: list[float] = []
    began = time.perf_counter()

    def more() -> bool:
        spent = time.perf_counter() - began
        return not found or (len(found) < 50 and (spent < seconds or (len(found) < probes and spent < 4 * seconds)))

    while more():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        found.append(2 * n**3 * 4 / max(time.perf_counter() - start, 1e-9) / 1e12)
    return found


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The best of :func:`measure_peak_probes` (TFLOP/s)."""
    return max(measure_peak_probes(device, dtype, seconds))
