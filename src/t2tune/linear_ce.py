"""Output layer and cross-entropy in one step, chunked over tokens, gradients computed on the way.

The plain path materialises the logits of every labelled token, (N, V), several times: the
bf16 matmul output, its fp32 copy, log-softmax, and the gradient of each in backward. For
SmolLM2 with N = 8 × 256 tokens and V = 49,152 that is ~2 GB of memory traffic per copy and,
measured on the 2-core CPU, about 1.4 s of an 8 s step spent outside the matmuls.

Here the loss is a sum over tokens, so its gradient with respect to chunk c's logits is known
as soon as the chunk's logits are: softmax(logits) − onehot(target). Each chunk of rows is
pushed through the output layer, reduced to its loss, turned into its gradient and multiplied
back into grad(hidden) and grad(weight) before the next chunk; only those gradients (the
size of the inputs) are kept for backward, which merely scales them by the incoming gradient.
No (N, V) tensor is ever alive, and no logits are recomputed.

Precision follows the caller: under bf16 autocast the three matmuls run in bf16 exactly as
autograd would run them; under ``model.compute_dtype`` in that (wider) dtype; the softmax and
the loss are always fp32; grad(weight) accumulates in fp32 across chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32); smaller chunks make the matmuls slower


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk, wide):  # type: ignore[override]
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) → summed loss ()
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        want_any = want_hidden or want_weight or want_bias
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and want_bias else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # cast once, not per chunk (autocast would re-cast the (V, H) weight at every matmul)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else (wide or weight.dtype)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], rows_per_chunk):
                h = hidden[start : start + rows_per_chunk].to(dtype)  # (n, H)
                t = targets[start : start + rows_per_chunk]  # (n,)
                logits = F.linear(h, w, b).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not want_any:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + rows_per_chunk] = grad @ w
                if grad_weight is not None:
                    grad_weight += grad.t() @ h
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_elements: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets``, without
    materialising the logits; same value and gradients as the plain expression. ``dtype``: the
    matmuls' dtype outside autocast when wider than the weight's (``model.compute_dtype``).

    >>> torch.manual_seed(0) and None
    >>> h, w = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    >>> t = torch.tensor([0, 6, 2, 2, 1])
    >>> fused = linear_cross_entropy(h, w, None, t, chunk_elements=14)  # two rows per chunk
    >>> plain = F.cross_entropy(h @ w.t(), t, reduction="sum")
    >>> torch.allclose(fused, plain)
    True
    >>> gh, gw = torch.autograd.grad(fused, (h, w))
    >>> ph, pw = torch.autograd.grad(plain, (h, w))
    >>> torch.allclose(gh, ph, atol=1e-6) and torch.allclose(gw, pw, atol=1e-6)
    True
    """
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, dtype)
