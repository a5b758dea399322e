"""The training loss and the numeric precision it runs in.

:class:`LossModule` wraps the language model so that DDP / FSDP / DeepSpeed see one forward
that returns the summed token loss of a batch; :func:`t2tune.precision` holds the autocast that
training and evaluation share. The fused output layer + cross-entropy kernel it uses for plain
``nn.Linear`` output layers is :mod:`t2tune.linear_ce`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .linear_ce import linear_cross_entropy
from .models import decoder_and_head
from .packing import IGNORE_INDEX
from .precision import layer_compute_dtype


def check_compiler(device: torch.device) -> None:
    """``train.compile`` on the CPU: inductor builds its kernels with a C++ compiler (``CXX``, else
    ``g++``). Without one, the first step would fail deep inside torch; refuse before loading."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # another torch's layout: its own error comes at the first step
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ConfigError(
            "train.compile: torch.compile on the CPU builds C++ kernels, and no C++ compiler was found "
            "(inductor looks for $CXX, else g++); install g++ (or point CXX at one), or set train.compile=false"
        ) from None


class LossModule(torch.nn.Module):
    """Wraps the language model so DDP/FSDP see one forward that returns the summed token loss.

    It runs the decoder, keeps the hidden states of positions that carry a label, and applies
    the output layer to those alone: (B, T, H) → (N, H) → loss, never (B, T, V). With a plain
    ``nn.Linear`` output layer, the layer and the cross-entropy run fused and chunked
    (``linear_ce``), so not even the (N, V) logits exist.
    """

    def __init__(self, model: Any, compile: bool = False):
        super().__init__()
        self.model = model
        self.compile = compile
        # ``train.compile``: the decoder (or the whole model) compiled by torch.compile, kept in a
        # plain dict so it adds no state-dict keys; validation's generate runs the eager model
        self._compiled: dict[int, Any] = {}

    def _maybe_compiled(self, module: Any) -> Any:
        if not self.compile:
            return module
        if id(module) not in self._compiled:  # looked up per call: FSDP replaces modules in place
            # fallback_random: dropout draws eager's masks from the global RNG, so a compiled run
            # resumes exactly and matches an eager one (inductor's own RNG would not)
            self._compiled = {id(module): torch.compile(module, options={"fallback_random": True})}
        return self._compiled[id(module)]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels != IGNORE_INDEX  # (B, T)
        # position_ids without an attention mask: transformers derives the block-diagonal
        # causal mask of isolated packing from restarts in position_ids (always, when compiled)
        split = decoder_and_head(self.model)
        if split is not None:
            decoder, head = split
            decoder = self._maybe_compiled(decoder)
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]  # (B, T, H)
            # ZeRO-3 gathers a module's weight only when the module itself is called
            if type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id"):
                return linear_cross_entropy(
                    hidden[keep], head.weight, head.bias, labels[keep], dtype=layer_compute_dtype(head)
                )
            logits = head(hidden[keep])  # (N, V)
        else:
            model = self._maybe_compiled(self.model)
            logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[keep]
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")
