"""One streaming compression spread over processes with ``torch.distributed`` (``torchrun``).

Every process reads the same block from the source. The calibration batches are split into contiguous runs, one
per process, and each process pushes only its own through the block; each layer's statistics (GPTQ's and
SparseGPT's Hessian, Wanda's input norms) are then summed over the processes, so every process holds what one
process would have gathered from all the batches. The linears of a block are dealt out to the processes for the
solve (linear ``k`` of a round to process ``k mod N``), and each result (the new weight, its grid and mask, its
report) is broadcast from the process that made it, so every process ends the block with the same compressed
block and runs its own batches through it for the next one. Process 0 alone writes the work folder and the output.

Equal to the one-process run, byte for byte: every process sees the one-process per-batch activations, and
``HessianAccumulator`` sums float32 per-batch products in float64, so the statistics do not depend on how the
batches were split (tests/compressors/test_distributed.py). A float32 matmul's bits do depend on the thread count,
so compare against a one-process run with as many threads as each process had (torchrun sets one).

On GPUs (``device="cuda"``) each process computes on its own GPU and the statistics and results travel over NCCL;
the summation order is the same, so the processes still agree with one process on one GPU of the same kind (not
tested here: no GPU in this project's CI; the gloo tests cover the logic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserInputError
from ..methods.hessian import HessianAccumulator
from .blocks import linear_weight, set_linear_weight
from .state import CompressionState, StepReport

__all__ = ["ProcessGroup", "compute_device", "init_from_environment", "process_group"]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a multi-process run."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The process that solves the ``index``-th linear of a round."""
        return index % self.world_size

    def my_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """This process's contiguous run of the calibration batches (the first ones get one more when uneven)."""
        if len(batches) < self.world_size:
            raise UserInputError(f"{len(batches)} calibration batch(es) for {self.world_size} processes: each needs at "
                                 "least one; use more samples (nsamples), a smaller batch_size or fewer processes")
        base, extra = divmod(len(batches), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return batches[start:start + base + (self.rank < extra)]

    def my_names(self, names: list[str]) -> list[str]:
        """This process's share of a round's ``names`` (see :meth:`owner`), in order."""
        return [name for k, name in enumerate(names) if self.owner(k) == self.rank]

    def deal(self, names: list[str], solve, share) -> None:
        """Runs ``solve(name)`` for this process's share of ``names`` (:meth:`my_names`), then
        ``share(name, owner)`` for every name, in order, on every process."""
        for name in self.my_names(names):
            solve(name)
        for k, name in enumerate(names):
            share(name, self.owner(k))

    def barrier(self) -> None:
        torch.distributed.barrier()

    def sum_statistics(self, accumulators: list[HessianAccumulator]) -> None:
        """Makes each accumulator hold the statistics of every process's batches (their float64 sums added)."""
        import torch.distributed as dist

        for acc in accumulators:
            sums = acc.sum_tensors()
            tokens = torch.tensor([acc.tokens], dtype=torch.int64, device=sums[0].device)
            for tensor in sums:  # float64 sums of float32 products: the one-process bytes (HessianAccumulator)
                dist.all_reduce(tensor)
            dist.all_reduce(tokens)
            acc.tokens = int(tokens.item())

    def share(self, name: str, module: nn.Module, owner: int, state: CompressionState, report: StepReport) -> None:
        """Broadcasts what process ``owner`` made of linear ``name``: its weight, its mask and grid in ``state`` and
        its entry in ``report``."""
        import torch.distributed as dist

        payload = [None]
        if self.rank == owner:
            payload = [(linear_weight(module).clone(), state.masks.get(module), state.quantized.get(module),
                        report.layers.get(name))]
        dist.broadcast_object_list(payload, src=owner)
        if self.rank == owner:
            return
        weight, mask, quantized, entry = payload[0]
        set_linear_weight(module, weight)
        if mask is not None:
            state.masks[module] = mask
        if quantized is not None:
            state.quantized[module] = quantized
        if entry is not None:
            report.layers[name] = entry


def process_group() -> ProcessGroup | None:
    """This process's :class:`ProcessGroup` when ``torch.distributed`` runs with more than one process, else `None`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def compute_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` checked: the CPU (`None`) or a CUDA GPU torch sees; a bare ``"cuda"`` is this process's own GPU
    under ``torchrun`` (``LOCAL_RANK``; GPU 0 in one process).

    Raises:
        UserInputError: a device torch does not know, another kind than CPU or CUDA, or a GPU that is not there.
    """
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as err:
        raise UserInputError(f"device={device!r} is not a device torch knows; use 'cpu' or 'cuda'") from err
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"device={str(device)!r}: compression computes on 'cpu' or 'cuda'")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserInputError(f"device={str(device)!r}, but torch sees no CUDA GPU here; use device='cpu'")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index >= torch.cuda.device_count():
        raise UserInputError(f"device={str(device)!r}, but torch sees {torch.cuda.device_count()} GPU(s); "
                             "use one of them (or fewer torchrun processes per node)")
    return device


def init_from_environment(device: str | torch.device | None = None) -> ProcessGroup | None:
    """Joins the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), or `None` when this
    is a single process. On the CPU (``device`` `None` or ``"cpu"``) the processes talk over gloo; with ``"cuda"``
    each process takes its own GPU (``LOCAL_RANK``) and they talk over NCCL:
    ``torchrun --nproc_per_node <GPUs> -m hf_compress_prompt compress --device cuda ...``."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    device = compute_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return process_group()
