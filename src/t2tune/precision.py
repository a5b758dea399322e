"""The numeric precision a model computes in, apart from the dtype its weights are stored in.

Two independent settings meet here:

- :func:`precision_context` is the autocast that training and evaluation share
  (``train.precision`` / ``eval.precision``: ``bf16`` autocasts the matmuls, anything else
  leaves them in the dtype of their inputs).
- :func:`compute_in` (``model.compute_dtype: float32``) keeps low-precision weights in memory as
  they are (2 bytes each in bf16) and makes every layer that holds them compute in fp32: the
  weight is widened one layer at a time, inside that layer's call, and never kept widened. A
  CPU without bf16 matrix instructions (AVX512-BF16 or AMX) emulates bf16 matmuls: measured on
  this project's AVX2 VM, 0.00015 TFLOP/s in bf16 against 0.070 in fp32 and 0.055 for bf16
  weights widened per call (``docs/scaling.md``). That is what lets GPT-J 6B (12.1 GB in bf16,
  24.2 GB in fp32) train with LoRA on a 24 GiB machine at fp32 speed.

Widening is exact, so a bf16 model computing in fp32 gives the logits of an fp32 model holding
the same (bf16-rounded) weights, within fp32 rounding. The layers it covers are
``nn.Linear`` (a custom autograd function that keeps the narrow weight for backward, not its
fp32 copy), ``nn.Embedding`` (rows looked up, then widened) and ``nn.LayerNorm``; the fused
output layer + cross-entropy (:mod:`t2tune.linear_ce`) reads :func:`layer_compute_dtype`.
Other layers (RMSNorm, rotary tables) already compute in the dtype of their fp32 input.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
import torch.nn.functional as F

NARROW = (torch.bfloat16, torch.float16)
_ATTR = "t2tune_compute_dtype"  # set on each layer that computes wider than it stores


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16`` (and bf16-checked's first pass); the inputs' own dtype otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def layer_compute_dtype(module: Any) -> torch.dtype | None:
    """The dtype ``module`` computes in when :func:`compute_in` widened it; else None."""
    return getattr(module, _ATTR, None)


def compute_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in outside autocast: the one :func:`compute_in` widened its
    layers to, else its weights' own (attention masks and MFU peaks must follow it)."""
    for module in model.modules():
        wide = layer_compute_dtype(module)
        if wide is not None:
            return wide
    return next(model.parameters()).dtype


class _WideLinear(torch.autograd.Function):
    """``F.linear`` in a wider dtype over a narrow weight, saving the narrow weight (not a wide
    copy) for backward; gradients come back in each input's own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.dtype = dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad = grad.to(ctx.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        gx = (grad @ weight.to(ctx.dtype)).to(x.dtype) if want_x else None
        gw = (flat.t() @ x.reshape(-1, x.shape[-1]).to(ctx.dtype)).to(weight.dtype) if want_w else None
        gb = flat.sum(0).to(ctx.bias_dtype) if want_b else None
        return gx, gw, gb, None


def _linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _WideLinear.apply(x, self.weight, self.bias, getattr(self, _ATTR))


def _embedding(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    rows = F.embedding(
        ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
    )
    return rows.to(getattr(self, _ATTR))  # look up narrow rows, widen only those


def _layer_norm(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dtype = getattr(self, _ATTR)
    weight = None if self.weight is None else self.weight.to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


_WIDENED = {torch.nn.Linear: _linear, torch.nn.Embedding: _embedding, torch.nn.LayerNorm: _layer_norm}


def compute_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Make every Linear, Embedding and LayerNorm of ``model`` whose weights are narrower than
    ``dtype`` compute in ``dtype`` (weights stay as stored); returns how many layers changed.

    >>> lin = torch.nn.Linear(4, 3).to(torch.bfloat16)
    >>> compute_in(lin, torch.float32), lin(torch.ones(2, 4)).dtype, lin.weight.dtype
    (1, torch.float32, torch.bfloat16)
    """
    changed = 0
    for module in model.modules():
        forward = _WIDENED.get(type(module))
        params = list(module.parameters(recurse=False))
        if forward is None or not params or not any(p.dtype.itemsize < dtype.itemsize for p in params):
            continue
        setattr(module, _ATTR, dtype)
        module.forward = types.MethodType(forward, module)
        changed += 1
    return changed


def bf16_matmul_is_native() -> bool:
    """Whether this CPU has bf16 matrix instructions (oneDNN's test: AVX512-BF16 or AMX);
    without them PyTorch emulates bf16 matmuls, hundreds of times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
