"""The layer-by-layer loop shared by the calibrated methods (GPTQ, SparseGPT, Wanda).

Capture what the first decoder block receives for the calibration batches, then for each block: collect the
input statistics of its linear layers (group by group in forward order when ``true_sequential``), compress them,
and run the compressed block to produce the next block's inputs. Peak memory is about one block's activations for
the calibration set plus the model.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._logging import get_logger
from ..methods.hessian import HessianAccumulator
from ..methods.quant_grid import QuantizedWeight
from .blocks import (
    BlockInputs,
    block_device,
    block_dtype,
    capture_block_inputs,
    find_decoder_layers,
    find_linear_layers,
    linear_weight,
    run_block,
    sequential_groups,
)
from .distributed import ProcessGroup

__all__ = ["CLIP_TOKEN_NORM", "LinearCompressor", "compress_block", "compress_layerwise"]

logger = get_logger(__name__)

# (qualified name, module, weight (out, in) fp32, accumulator) -> None; the callback writes the new weight.
LinearCompressor = Callable[[str, nn.Module, torch.Tensor, HessianAccumulator], None]


# Off by default (the reference GPTQ / SparseGPT Hessian). 4.0 (token norms above 4x the batch median scaled down to
# it) lowers one SmolLM2 down_proj's error on ordinary tokens below RTN's, but its end-to-end effect is not measured
# yet (docs/results/compression_quality_gptq_fix.md), so it stays opt-in: compress_layerwise(..., clip_token_norm=4.0).
CLIP_TOKEN_NORM: float | None = None


class _StopForward(Exception):
    pass


def _stop_forward(module, args):
    raise _StopForward


@torch.no_grad()
def compress_layerwise(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    compress_linear: LinearCompressor,
    *,
    batch_size: int = 8,
    true_sequential: bool = True,
    diagonal_only: bool = False,
    desc: str = "compress",
    progress: bool = True,
    clip_token_norm: float | None = CLIP_TOKEN_NORM,
) -> None:
    """Runs ``compress_linear`` on every linear layer of every decoder block, with input statistics gathered from
    ``calibration_ids`` (shape `(nsamples, seqlen)`) flowing through the already-compressed earlier blocks.

    Args:
        diagonal_only (`bool`): collect only ``||X_j||^2`` (Wanda) instead of the full Hessian.
        clip_token_norm (`float`, *optional*, defaults to `CLIP_TOKEN_NORM`): cap each token's input norm at this many
            times its batch's median before it enters a full Hessian, so a few massive-activation tokens do not
            dominate it (see `HessianAccumulator`); `None` for the reference's unweighted ``H``. Wanda's diagonal
            statistics are never clipped.
    """
    path, layers = find_decoder_layers(model)
    batches = list(torch.split(calibration_ids, batch_size))
    inputs = capture_block_inputs(model, layers, batches)
    hidden = inputs.hidden
    for index, block in enumerate(tqdm(layers, desc=desc, unit="block", disable=not progress)):
        hidden = compress_block(block, f"{path}.{index}", inputs, hidden, compress_linear,
                                true_sequential=true_sequential, diagonal_only=diagonal_only,
                                clip_token_norm=clip_token_norm)
    logger.info("compressed %d blocks of %s", len(layers), path)


@torch.no_grad()
def compress_block(
    block: nn.Module,
    prefix: str,
    inputs: BlockInputs,
    hidden: list[torch.Tensor],
    compress_linear: LinearCompressor,
    *,
    true_sequential: bool = True,
    diagonal_only: bool = False,
    clip_token_norm: float | None = CLIP_TOKEN_NORM,
    storage_dtype: torch.dtype | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    group: ProcessGroup | None = None,
    share: Callable[[str, nn.Module, int], None] | None = None,
    spill_dir: str | os.PathLike | None = None,
    grids: Callable[[nn.Module], QuantizedWeight | None] | None = None,
) -> list[torch.Tensor]:
    """One block of :func:`compress_layerwise`: gathers its linears' input statistics from ``hidden`` (this block's
    inputs, one tensor per calibration batch; ``inputs.kwargs`` the matching keyword arguments), runs
    ``compress_linear`` on each (qualified name ``<prefix>.<name>``), and returns the compressed block's outputs for
    ``hidden``: the next block's inputs. ``storage_dtype``: ``hidden`` is stored in it (e.g. bf16 to halve the
    activations' memory); each batch is cast to the block's dtype as it runs, and the outputs are stored in it.
    ``keep`` (as :func:`~.blocks.run_block`'s) stores each output batch as it is made, e.g. in a memory-mapped file.
    ``hidden`` may live on another device than the block (host memory while a GPU computes): each batch moves to
    the block's device as it runs, its output back to where the batch was.

    With ``group`` (a multi-process run, :mod:`.distributed`), ``hidden`` holds this process's batches only: the
    statistics are summed over the processes, each process solves its share of each round's linears, and
    ``share(name, module, owner)`` brings every result to every process."""
    device = block_device(block)  # the statistics live where the block computes; ``hidden`` may be elsewhere
    compute = block_dtype(block) if storage_dtype is not None else None
    linears = find_linear_layers(block)
    groups = sequential_groups(block, inputs)  # linears sharing one input, in forward order
    rounds = [[g] for g in groups] if true_sequential else [groups]
    with held_as_grids() as held:
        for round_groups in rounds:
            # One accumulator per shared input: q, k and v see the same tensor, so they share one Hessian.
            accumulators, handles = {}, []
            for shared in round_groups:
                in_features = linear_weight(linears[shared[0]]).shape[1]
                acc = HessianAccumulator(in_features, device=device, diagonal_only=diagonal_only,
                                         clip_token_norm=None if diagonal_only else clip_token_norm)
                for name in shared:
                    accumulators[name] = acc
                handles.append(
                    linears[shared[0]].register_forward_pre_hook(lambda mod, args, acc=acc: acc.add_batch(args[0]))
                )
            # Nothing from the round's last input on matters for its statistics: each forward pass stops as the
            # first linear of its last group receives it (that linear and the rest of its group never run)
            handles.append(linears[round_groups[-1][0]].register_forward_pre_hook(_stop_forward))
            try:
                for h_in, kwargs in zip(hidden, inputs.kwargs):
                    try:
                        block(h_in.to(device=device, dtype=compute), **kwargs)
                    except _StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
            names = [name for g in round_groups for name in g]
            distinct = list({id(a): a for a in accumulators.values()}.values())  # shared inputs share one
            if group is not None:
                group.sum_statistics(distinct)
            for acc in distinct:
                acc.finish()  # every batch is in: keep H, drop its float64 sum (twice H's memory)
            release_memory()  # the forward passes' temporaries

            # the names this process solves, and how many of them read each H: the last may overwrite it
            mine = names if group is None else group.my_names(names)
            readers = collections.Counter(id(accumulators[n]) for n in mine)

            def solve(name: str) -> None:
                module, acc = linears[name], accumulators[name]
                readers[id(acc)] -= 1
                acc.spill_dir = spill_dir if readers[id(acc)] == 0 else None
                compress_linear(f"{prefix}.{name}", module, linear_weight(module).float(), acc)
                release_memory()  # the solve's temporaries, before the next solve's

            if group is None:
                for name in names:
                    solve(name)
            else:
                group.deal(names, solve, lambda name, owner: share(f"{prefix}.{name}", linears[name], owner))
            # this round's H are used: none is held through the next round's or the outputs' pass (268 MB for an
            # 8192-wide down_proj, the last round's)
            del accumulators, distinct, acc
            if grids is not None:
                for name in names:
                    held.hold(linears[name], grids(linears[name]))
                release_memory()
        return run_block(block, inputs, hidden, storage_dtype=storage_dtype, keep=keep)  # the next block's inputs


class held_as_grids(contextlib.AbstractContextManager):
    """Linears held as their quantization grids inside the context: :meth:`hold` frees a linear's weight when it is
    exactly ``grid.dequantize()`` in its dtype, makes it again (those bytes) just before each forward pass through
    it and frees it after, and the context's end gives every held linear its weight back. A held weight is a
    placeholder of its shape that stores one value: anything but the module's own forward must not read it."""

    def __init__(self):
        self._held: dict[nn.Linear, tuple[QuantizedWeight, list]] = {}

    def hold(self, module: nn.Module, grid: QuantizedWeight | None) -> bool:
        """Holds ``module`` as ``grid``; `False` (nothing changed) when its weight is not exactly the grid's values
        (pruned and not quantized, changed after rounding, not laid out row-major, or not an ``nn.Linear``)."""
        if grid is None or type(module) is not nn.Linear or module in self._held:
            return False
        weight = module.weight.data
        if not weight.is_contiguous() or not torch.equal(grid.dequantize(weight.dtype).to(weight.device), weight):
            return False  # (a weight made again contiguous must be laid out as the one it replaces)
        placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)

        def make(mod, args):
            mod.weight.data = grid.dequantize(placeholder.dtype).to(placeholder.device)

        def free(mod, args, output):
            mod.weight.data = placeholder

        module.weight.data = placeholder
        self._held[module] = (grid, [module.register_forward_pre_hook(make), module.register_forward_hook(free)])
        return True

    def __exit__(self, *exc) -> None:
        for module, (grid, handles) in self._held.items():
            for handle in handles:
                handle.remove()
            weight = module.weight.data
            module.weight.data = grid.dequantize(weight.dtype).to(weight.device)
        self._held.clear()


@functools.cache
def _libc():
    """glibc, or `None` where it is not the C library (looked up once: ``find_library`` runs ldconfig)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
WIDE_BLOCK = 2048  # hidden size from which a block's compute hides its tensors' page faults


def mmap_threshold(hidden_size: int | None) -> int:
    """The allocation size from which glibc maps each tensor by itself, for blocks ``hidden_size`` wide: 4 MB for
    wide blocks (2048 and more), 16 MB for narrower ones or an unknown width. The threshold trades memory for page
    faults, every mapped tensor being faulted in afresh, and a block's work per byte of its temporaries grows with its
    width. A 3B model's streamed GPTQ (3072 wide), one run each on one machine: 4 MB 1350 MiB in 786 s, 16 MB 1542
    MiB in 792 s (docs/results/streaming_mmap_wide.md, streaming_mmap16.md). On SmolLM2 (576 wide) 4 MB also maps
    the hidden states and made streaming GPTQ 1.34x the in-memory path's time (streaming_smollm2_mmap.md), 16 MB
    1.12x (streaming_smollm2_mmap16.md); one run each of its streaming GPTQ, s / peak MiB: glibc's own 200 / 1095,
    4 MB 275 / 1013, 16 MB 183 / 1001, 32 MB 192 / 1277; of a 0.5B's (1280 wide): glibc's 114 / 1049, 4 MB
    133 / 912, 16 MB 118 / 986."""
    return 4 << 20 if hidden_size is not None and hidden_size >= WIDE_BLOCK else 16 << 20


def fix_mmap_threshold(hidden_size: int | None = None) -> bool:
    """Has glibc give every allocation of :func:`mmap_threshold` bytes or more its own mapping, for the rest of the
    process, so a freed tensor's memory goes back to the system at once. glibc's default threshold starts at 128 KB
    and grows to the largest chunk freed (up to 32 MB), after which tensors below it come from the heap and a block's
    temporaries of many sizes leave it fragmented: on a streamed 3B model's GPTQ the peak then climbed with depth (8
    blocks 1446 MiB, 26 blocks 1551 MiB). Leaves a threshold the user set with ``MALLOC_MMAP_THRESHOLD_`` alone (a
    way to trade differently: 4194304 holds a narrow model's peak lower at the cost of time); `True` when the
    threshold was set."""
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold(hidden_size)))


def release_memory() -> None:
    """Gives freed memory back to the system: glibc keeps freed chunks of up to its (grown) mmap threshold, 32 MB,
    in its heap, so without a trim the resident size climbs by about a block's worth per streamed block, and a
    solve's temporaries stay resident through the next round (about 120 MB at a 3B model's GPTQ peak)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
