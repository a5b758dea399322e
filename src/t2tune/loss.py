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

from .linear_ce import linear_cross_entropy
from .models import decoder_and_head
from .packing import IGNORE_INDEX
from .precision import layer_compute_dtype


class LossModule(torch.nn.Module):
    """Wraps the language model so DDP/FSDP see one forward that returns the summed token loss.

    It runs the decoder, keeps the hidden states of positions that carry a label, and applies
    the output layer to those alone: (B, T, H) → (N, H) → loss, never (B, T, V). With a plain
    ``nn.Linear`` output layer, the layer and the cross-entropy run fused and chunked
    (``linear_ce``), so not even the (N, V) logits exist.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels != IGNORE_INDEX  # (B, T)
        # position_ids without an attention mask: transformers derives the block-diagonal
        # causal mask of isolated packing from restarts in position_ids
        split = decoder_and_head(self.model)
        if split is not None:
            decoder, head = split
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]  # (B, T, H)
            # ZeRO-3 gathers a module's weight only when the module itself is called
            if type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id"):
                return linear_cross_entropy(hidden[keep], head.weight, head.bias, labels[keep],
                                            dtype=layer_compute_dtype(head))
            logits = head(hidden[keep])  # (N, V)
        else:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[keep]
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")

