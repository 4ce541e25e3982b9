"""torch.distributed for sweeps and training when launched by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_from_env` then starts a
process group (NCCL on CUDA, gloo on CPU) and gives each process its own GPU. Without those
variables everything here is a no-op for a single process, so there is no second code path.

Sweeps shard *batches* over ranks (batch ``b`` runs on rank ``b % world``): every batch is
attacked exactly as in a single-process run (same examples, same random-start stream), so the
gathered per-example results are identical; rank 0 alone writes the store and the report.
Training wraps the model in DistributedDataParallel and splits every global batch over the ranks.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from robustse.core.errors import DeviceError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints results."""
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` runs on this rank."""
        return batch % self.world == self.rank

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        return float(sum(self.gather(float(value)))) if self.active else float(value)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()


def from_env() -> Dist:
    """The rank layout ``torchrun`` put in the environment (a single process if none).

    Raises:
        DeviceError: inconsistent variables.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise DeviceError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise DeviceError(f"bad torchrun layout: RANK={rank} WORLD_SIZE={world}")
    return Dist(rank, world, local)


def init_from_env(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device.

    Args:
        device: the requested device (``cuda`` → this rank's ``cuda:LOCAL_RANK``).

    Returns:
        (layout, device for this process).
    """
    layout = from_env()
    if not layout.active:
        return layout, device
    if device.type == "cuda":
        if torch.cuda.device_count() <= layout.local_rank:
            raise DeviceError(
                f"LOCAL_RANK {layout.local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", layout.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return layout, device


def shutdown() -> None:
    """Leave the process group (safe to call when none was started), and free it while the
    interpreter is fully alive: a gloo group freed during interpreter shutdown can abort the
    process (pytorch/pytorch#179291)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
