"""How the processes of a run come together, and which engine runs them (one process, DDP,
DeepSpeed ZeRO, FSDP2): accelerate's process state, the checks that a launch got the engine
it asked for, and what a DeepSpeed config leaves to t2tune. Nothing here trains."""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import UserError

SHARDED = ("FSDP", "DEEPSPEED")  # engines whose processes each hold only part of the weights


def is_sharded(processes: Any) -> bool:
    """Whether the engine splits the weights over processes: forward passes are then
    collective, and the model object alone cannot be saved (even with one process, ZeRO-3
    replaces its parameters by partitions)."""
    return processes.distributed_type.name in SHARDED


ENGINE_DEVICES = {
    "FSDP": "FSDP needs GPUs; use DeepSpeed ZeRO-3 or DDP (accelerate launch --multi_gpu) on CPU",
    "DEEPSPEED": "DeepSpeed did not set up its processes; is the deepspeed package installed?",
    "NO": "the processes did not join one group; use accelerate launch --multi_gpu for DDP",
}


def process_state() -> Any:
    """Create accelerate's process state, the first thing a run does. Without an accelerator,
    processes join through gloo (DeepSpeed would otherwise leave each believing it is alone).
    A launcher that started more processes than joined the group is refused: each would run
    alone and write the same out_dir."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    gloo = launched > 1 and not torch.cuda.is_available()
    process = PartialState(cpu=cpu_only(), **({"backend": "gloo"} if gloo else {}))
    requested, running = _requested_engine(), process.distributed_type.name
    if launched > process.num_processes:
        raise UserError(
            f"the launcher started {launched} processes but {process.num_processes} joined: {ENGINE_DEVICES[requested]}"
        )
    if requested != "NO" and requested != running:  # never a quiet fallback to another engine
        raise UserError(f"accelerate launch asked for {requested} but {running} started: {ENGINE_DEVICES[requested]}")
    return process


def cpu_only() -> bool:
    """accelerate's ``cpu`` flag: on a machine without an accelerator it makes a multi-process
    launch DDP over gloo, but it would also quietly turn DeepSpeed into DDP, so not for that."""
    return not torch.cuda.is_available() and _requested_engine() != "DEEPSPEED"


def _requested_engine() -> str:
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true":
            return engine
    return "NO"


def fill_deepspeed_config(accelerator: Any, train: Any, accumulation: int) -> None:
    """What a DeepSpeed config leaves to the training code ('auto' or absent) comes from
    ``train.*``: micro batch, gradient clipping (DeepSpeed clips inside its step), and leave to
    run torch's AdamW. The accumulation count is t2tune's, whatever the launcher's file says:
    ``train.global_batch_size`` defines the step."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = plugin.gradient_accumulation_steps = accumulation
    for key, value in (
        ("train_micro_batch_size_per_gpu", train.micro_batch_size),
        ("gradient_clipping", train.grad_clip or 0.0),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.setdefault("zero_allow_untested_optimizer", True)


def from_main(processes: Any, values: list[Any]) -> list[Any]:
    """The main process's ``values`` on every process (one broadcast; as they are with one process)."""
    if processes.num_processes == 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values)
