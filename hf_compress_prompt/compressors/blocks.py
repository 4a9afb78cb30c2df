"""Finding a causal LM's decoder blocks and their linear layers, and running calibration data through one block
at a time (the layer-by-layer loop keeps about one block plus its activations in play)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserInputError
from ..nn import has_packed_layers

__all__ = [
    "BlockInputs",
    "block_device",
    "block_dtype",
    "find_decoder_layers",
    "find_linear_layers",
    "linear_weight",
    "set_linear_weight",
    "capture_block_inputs",
    "run_block",
    "sequential_groups",
]


def _num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks and its dotted path (``model.layers`` for Llama, Qwen2 and Mistral,
    ``model.decoder.layers`` for OPT, ``transformer.h`` for GPT-2): the module list whose length is the config's
    layer count, holding blocks that contain linear layers.

    Raises:
        UserInputError: the model has no such list (an unsupported architecture).
    """
    expected = _num_layers(getattr(model, "config", None))
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
        and all(_has_linear(block) for block in module)
    ]
    if not candidates:
        kind = type(model).__name__
        raise UserInputError(
            f"cannot find the decoder blocks of {kind} (no ModuleList of {expected} blocks with linear layers); "
            "supported: Llama-family (incl. SmolLM2, Qwen2, Mistral), OPT and GPT-2 style causal LMs"
        )
    return min(candidates, key=lambda item: item[0].count("."))  # the outermost list


def _has_linear(block: nn.Module) -> bool:
    return bool(find_linear_layers(block)) or has_packed_layers(block)


def find_linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The compressible linear layers of a block by relative name: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as `(out_features, in_features)` (GPT-2's Conv1D stores it transposed)."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.T


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Writes a `(out_features, in_features)` weight back in the module's own layout and dtype."""
    target = module.weight.data
    target.copy_(weight.to(target.dtype) if isinstance(module, nn.Linear) else weight.T.to(target.dtype))


@dataclass
class BlockInputs:
    """What the first decoder block received for each calibration batch: hidden states and the keyword arguments
    the model passed (attention mask, rotary position embeddings, position ids), reused for every block."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # each (B, T, hidden)
    kwargs: list[dict] = field(default_factory=list)


_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, store: BlockInputs):
        super().__init__()
        self.block, self.store = block, store

    def forward(self, hidden_states, *args, **kwargs):
        # Name every argument (GPT-2 passes the mask positionally) so blocks can be replayed with keywords only.
        signature = inspect.signature(self.block.forward)
        bound = signature.bind_partial(hidden_states, *args, **kwargs).arguments
        named = {}
        for i, (name, value) in enumerate(bound.items()):
            if i == 0:
                continue  # hidden_states
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        self.store.hidden.append(hidden_states.detach())
        self.store.kwargs.append({k: v for k, v in named.items() if k not in _CACHE_ARGS and v is not None})
        raise _Captured


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[torch.Tensor]) -> BlockInputs:
    """Runs each batch of token ids (shape `(B, T)`) through the model up to its first decoder block and records what
    that block receives; nothing after it is computed."""
    store = BlockInputs()
    first = layers[0]
    layers[0] = _Catcher(first, store)
    device = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        layers[0] = first
    if not store.hidden:
        raise UserInputError("the calibration data is empty; pass at least one sample (nsamples >= 1)")
    return store


def _as_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, hidden: list[torch.Tensor] | None = None, *,
              storage_dtype: torch.dtype | None = None,
              keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The block's outputs for every recorded batch (``hidden`` replaces the recorded hidden states). With
    ``storage_dtype`` (activations kept in, e.g., bf16 between blocks), each batch runs in the block's own dtype
    and its output is stored in ``storage_dtype``. ``keep`` stores each batch's output as it is made and returns
    what replaces it (e.g. a view of a memory-mapped file: the outputs then never all sit in memory)."""
    hidden = hidden if hidden is not None else inputs.hidden
    compute = block_dtype(block) if storage_dtype is not None else None
    device = block_device(block)
    outputs = []
    for h, kw in zip(hidden, inputs.kwargs):
        out = _as_tensor(block(h.to(device=device, dtype=compute), **kw))
        out = out.to(device=h.device, dtype=storage_dtype)  # stored where its input was (no-ops on one device)
        outputs.append(out if keep is None else keep(out))
    return outputs


def block_device(block: nn.Module) -> torch.device:
    """The device a block computes on: its first parameter's (or buffer's). Its stored inputs may live elsewhere
    (the streaming path keeps them in host memory while a GPU computes): each batch is moved as it runs."""
    for t in (*block.parameters(), *block.buffers()):
        return t.device
    return torch.device("cpu")


def block_dtype(block: nn.Module) -> torch.dtype:
    """The dtype a block computes in: its first floating-point parameter's (or buffer's)."""
    for t in (*block.parameters(), *block.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


@torch.no_grad()
def sequential_groups(block: nn.Module, inputs: BlockInputs) -> list[list[str]]:
    """The block's linear layers in the order the forward pass reaches them, grouped by shared input: Llama gives
    ``[[q, k, v], [o], [gate, up], [down]]``. Compressing group by group, each from inputs that already went through
    the compressed earlier groups, is GPTQ's "true sequential" order."""
    linears = find_linear_layers(block)
    calls: list[tuple[str, torch.Tensor]] = []  # keep the input tensors alive so identity comparisons hold
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        block(inputs.hidden[0][:1, :8].to(block_device(block)), **_slice_kwargs(inputs.kwargs[0], 8))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    missing = [n for n in linears if n not in seen]
    return groups + ([missing] if missing else [])


def _slice_kwargs(kwargs: dict, length: int) -> dict:
    """The recorded keyword arguments cut to the first sample and ``length`` positions (for a cheap probe pass)."""

    def cut(value):
        if isinstance(value, torch.Tensor):
            if value.dim() == 4:  # attention mask (B, 1, T, T)
                return value[:1, :, :length, :length]
            if value.dim() == 3:  # rotary cos/sin (B, T, d)
                return value[:1, :length]
            if value.dim() == 2:  # position ids (B, T)
                return value[:1, :length]
            return value
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return {k: cut(v) for k, v in kwargs.items()}
