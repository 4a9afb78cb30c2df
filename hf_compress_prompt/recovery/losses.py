"""The language-modelling loss of a training step without the logits: the output projection and the cross-entropy
computed together, a chunk of positions at a time, only at the positions that carry a label.

On SmolLM2 a (1 x 1124)-token step's logits are 1124 x 49,152 values: the largest tensors of the step (221 MB in
fp32, and as many again for their gradient), and the softmax, its backward and the zero-filled gradient of the
gather cost more than the projection's own matmul (docs/results/recovery_step.md). Fused linear-cross-entropy
kernels (Liger-Kernel's ``LigerFusedLinearCrossEntropy``, Apple's Cut Cross-Entropy) avoid them; this is the same
maths in plain PyTorch for any device: per chunk of rows, ``logits = h W^T`` (in the autocast dtype, as the model's
head would give them), ``loss = logsumexp(logits) - logits[y]`` in fp32, and at once, while the chunk is at hand,
the gradient ``dlogits = softmax(logits) - onehot(y)``, from which ``dh = dlogits W`` (and ``dW = dlogits^T h`` when
the head trains). The backward pass only scales the saved ``dh`` (and ``dW``) by the incoming gradient, so the
projection is computed once forward and once backward, as without chunks, and no ``(positions, vocab)`` tensor
outlives its chunk.

:func:`causal_lm_loss` runs a causal LM (a PEFT prompt-tuning, prefix or LoRA model, or the model itself) with its
output head swapped for the identity, so the forward pass returns the final hidden states, and scores them with
:func:`linear_cross_entropy`; models whose logits are not simply ``head(hidden)`` (final soft-capping, logit scales)
are detected once (:func:`head_is_last`) and keep the plain loss.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .._logging import get_logger
from ..errors import UserInputError
from .precision import frozen_linear_weights_as

__all__ = ["LanguageModellingTrainer", "causal_lm_loss", "head_is_last", "linear_cross_entropy", "output_head", "without_output_head"]

logger = get_logger(__name__)

IGNORE_INDEX = -100  # the label of a position that is not scored (PyTorch's and transformers' convention)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i W^T + b, y_i) * scale`` over the rows of ``hidden``, with its gradient computed in the forward
    pass, chunk by chunk (the module docstring has the maths)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size, compute_dtype):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) in [0, V), scale: 0-d fp32 tensor
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(compute_dtype)  # (V, H): the cast autocast would make in the head's linear
        b = None if bias is None else bias.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)  # (c, H)
            y = targets[start:start + chunk_size]  # (c,)
            z = F.linear(h, w, b).float()  # (c, V): the logits as the head gives them, then fp32 as the loss takes them
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()  # sum_i -log softmax(z_i)[y_i]
            if not (need_h or need_w or need_b):
                continue
            z.sub_(lse[:, None]).exp_()  # softmax(z) in place, (c, V)
            z[torch.arange(y.shape[0], device=y.device), y] -= 1  # dCE/dz = softmax(z) - onehot(y)
            g = z.mul_(scale).to(compute_dtype)  # (c, V): the gradient the logits' cast hands the head's matmul
            if need_h:
                grad_h[start:start + chunk_size] = g @ w  # (c, H) = (c, V) @ (V, H)
            if need_w:
                grad_w += (g.t() @ h).float()  # (V, H) = (V, c) @ (c, H)
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_output.float()
        return (None if grad_h is None else (grad_h.float() * scale).to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype),
                None if grad_b is None else (grad_b * scale).to(ctx.bias_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, num_items: int | torch.Tensor | None = None,
                         chunk_size: int = 256, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits: the loss and its
    gradients wrt ``hidden`` (and ``weight`` / ``bias`` where they require it) computed ``chunk_size`` scored rows at a
    time. Under autocast the projection runs in the autocast dtype (the logits rounded to it, as the model's own
    head gives them) and the softmax in fp32; the gradient wrt ``hidden`` has ``hidden``'s dtype.

    Args:
        hidden (`torch.Tensor` of shape `(..., hidden)`): the final hidden states.
        weight (`torch.Tensor` of shape `(vocab, hidden)`): the output projection (tied or not).
        labels (`torch.Tensor` of shape `(...)`): the target of each position (already aligned: no shift here);
            ``ignore_index`` marks positions that are not scored and cost no work.
        bias (`torch.Tensor` of shape `(vocab,)`, *optional*).
        num_items (`int` or `torch.Tensor`, *optional*): divide the summed loss by this (transformers'
            ``num_items_in_batch``, the scored positions of the whole accumulated batch); default: the mean over the
            scored positions here.
        chunk_size (`int`, defaults to 256): scored positions per chunk; the chunk's fp32 logits, ``chunk_size x
            vocab`` values, are the largest tensor held.
        ignore_index (`int`, defaults to -100).

    Returns:
        `torch.Tensor`: the 0-d fp32 loss (NaN when nothing is scored and ``num_items`` is not given, as
        ``F.cross_entropy`` gives).
    """
    if chunk_size < 1:
        raise UserInputError(f"chunk_size={chunk_size} must be >= 1")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise UserInputError(f"hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and weight "
                             f"{tuple(weight.shape)} do not fit: need hidden (..., H), labels (...), weight (V, H)")
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    compute_dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index  # (N,) the scored positions: the only ones that reach the projection
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]  # (M, H)
    targets = flat_labels[keep]  # (M,)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise UserInputError(f"labels must lie in [0, {weight.shape[0]}) or be {ignore_index}; got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
    denominator = torch.as_tensor(targets.numel() if num_items is None else num_items, device=hidden.device)
    scale = 1.0 / denominator.to(torch.float32)  # 0-d: inf when nothing is scored (the loss is then 0 * inf = NaN)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(rows, weight, bias, targets, scale, chunk_size, compute_dtype)


def output_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """``(parent, attribute, head)``: where a causal LM (or a PEFT model around one) holds its output projection, an
    ``nn.Linear`` (``lm_head`` for Llama and most others). ``UserInputError`` if it has none or another kind."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UserInputError(f"{type(base).__name__} has no nn.Linear output projection (got {type(head).__name__}); "
                             "the chunked loss needs one: set loss_chunk_size=0 for the plain loss")
    for parent in base.modules():
        for name, child in parent.named_children():
            if child is head:
                return parent, name, head
    raise UserInputError(f"the output projection of {type(base).__name__} is not one of its modules")


class _Hidden(nn.Module):
    """Stands in for the output head: its input, the final hidden states, becomes the "logits" of the forward pass."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def without_output_head(model: nn.Module):
    """``model`` whose forward pass returns the final hidden states as ``logits`` (its output head replaced by the
    identity); the head is put back on exit, whatever happens. Yields the head."""
    parent, name, head = output_head(model)
    setattr(parent, name, _Hidden())
    try:
        yield head
    finally:
        setattr(parent, name, head)


_HEAD_IS_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def head_is_last(model: nn.Module) -> bool:
    """Whether ``model``'s logits are its output head applied to what :func:`without_output_head` returns, nothing
    after (no final soft-capping or logit scaling): checked once per model on four tokens, in eval mode without
    gradients, fp32."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base in _HEAD_IS_LAST:
        return _HEAD_IS_LAST[base]
    try:
        _, _, head = output_head(base)
    except UserInputError:
        _HEAD_IS_LAST[base] = False
        return False
    was_training = base.training
    ids = torch.arange(1, 5, device=head.weight.device)[None] % base.config.vocab_size  # (1, 4)
    try:
        base.eval()
        with torch.no_grad(), torch.autocast(head.weight.device.type, enabled=False):
            logits = base(input_ids=ids, use_cache=False).logits.float()
            with without_output_head(base):
                hidden = base(input_ids=ids, use_cache=False).logits
            from_hidden = head(hidden.to(head.weight.dtype)).float()
        same = logits.shape == from_hidden.shape and torch.allclose(logits, from_hidden, rtol=1e-4, atol=1e-4)
    finally:
        base.train(was_training)
    if not same:
        logger.info("%s does more after its output head (e.g. soft-capping): the loss keeps the full logits",
                    type(base).__name__)
    _HEAD_IS_LAST[base] = same
    return same


def causal_lm_loss(model: nn.Module, inputs: dict, *, num_items: int | torch.Tensor | None = None,
                   chunk_size: int = 256):
    """The causal-LM loss of ``model(**inputs)`` (labels shifted by one, -100 not scored, a prompt-tuning model's
    virtual positions not scored) computed by :func:`linear_cross_entropy` on the final hidden states, never holding
    the logits. Returns ``(loss, outputs)``: the model's outputs with the loss and without logits.

    Args:
        model (`nn.Module`): a causal LM or a PEFT model around one (prompt tuning, prefix tuning, LoRA).
        inputs (`dict`): the model's inputs with ``labels`` of shape `(batch, length)`; the forward pass may return
            more positions than that (a prompt's virtual tokens in front): the labels align with the last ones.
        num_items (*optional*): as in :func:`linear_cross_entropy` (transformers' ``num_items_in_batch``).
        chunk_size (`int`, defaults to 256): scored positions per chunk.
    """
    labels = inputs["labels"]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    with without_output_head(model) as head:
        outputs = model(**rest)
    hidden = outputs.logits  # (B, P + L, H): the head was the identity
    prefix = hidden.shape[1] - labels.shape[1]  # P: positions in front of the labelled ones (virtual tokens)
    if prefix < 0:
        raise UserInputError(f"labels {tuple(labels.shape)} are longer than the model's output "
                             f"{tuple(hidden.shape[:2])}")
    # position t predicts label t + 1 of [-100] * P + labels, as transformers' ForCausalLMLoss shifts them
    targets = F.pad(labels, (prefix - 1, 0), value=IGNORE_INDEX) if prefix else labels[:, 1:]  # (B, P + L - 1)
    loss = linear_cross_entropy(hidden[:, :-1], head.weight, targets.to(hidden.device), head.bias,
                                num_items=num_items, chunk_size=chunk_size)
    kept = {k: v for k, v in outputs.items() if k not in ("logits", "loss")}  # the hidden states are no logits
    return loss, type(outputs)(loss=loss, **kept)


class LanguageModellingTrainer(Trainer):
    """A ``transformers.Trainer`` for the language-modelling loss with two savings that keep its numbers: the loss
    (training and evaluation) is :func:`causal_lm_loss`, the model's own loss (labels shifted, -100 not scored,
    ``num_items_in_batch`` honoured as the model honours it) computed without the logits; and while it trains under
    bf16 / fp16 autocast, the frozen linear weights are held in that dtype (:func:`~.precision.frozen_linear_weights_as`;
    put back in fp32 when ``train`` returns). Models whose logits are more than ``head(hidden)`` (:func:`head_is_last`),
    label smoothing and a ``compute_loss_func`` keep ``Trainer``'s own loss; DeepSpeed and FSDP keep their weights.

    Args:
        loss_chunk_size (`int`, defaults to 256): scored positions per chunk; 0 keeps ``Trainer``'s own loss.
        cast_frozen_weights (`bool`, defaults to `True`): hold frozen linear weights in the autocast dtype.
        *args, **kwargs: passed to ``Trainer``.
    """

    def __init__(self, *args, loss_chunk_size: int = 256, cast_frozen_weights: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_chunk_size < 0:
            raise UserInputError(f"loss_chunk_size={loss_chunk_size} must be >= 0 (0: the model's own loss)")
        self.loss_chunk_size = loss_chunk_size
        self.chunked_loss = loss_chunk_size > 0 and head_is_last(self.accelerator.unwrap_model(self.model))
        self.cast_frozen_weights = cast_frozen_weights

    def _frozen_weights_dtype(self) -> torch.dtype | None:
        if not self.cast_frozen_weights or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """The Trainer's mixed precision around every ``compute_loss`` (training and evaluation). ``Trainer`` leaves
        it to accelerate's wrapper of the model's ``forward``, which is lost when something else re-binds
        ``forward`` after ``prepare``: PEFT's ``disable_adapter()`` on a prompt-learning model (recover()'s baseline
        validation) puts back the unwrapped ``forward`` on exit, and every later step then ran in fp32 despite
        ``bf16=True``. Entering the autocast here as well holds whatever happens to the wrapper."""
        return self.accelerator.autocast()

    def frozen_models(self) -> list[nn.Module]:
        """The models whose frozen linear weights :meth:`train` holds in the autocast dtype (subclasses add theirs)."""
        return [self.model]

    def train(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for model in self.frozen_models():
                if self.loss_chunk_size > 0:
                    head_is_last(self.accelerator.unwrap_model(model))  # its fp32 check, before the weights change
                stack.enter_context(frozen_linear_weights_as(model, self._frozen_weights_dtype()))
            return super().train(*args, **kwargs)

    def language_modelling_loss(self, model, inputs, num_items=None):
        """``(loss, outputs)`` of ``model`` on ``inputs`` (with labels): :func:`causal_lm_loss` under the Trainer's
        autocast where the model allows it, else the model's own ``model(**inputs)`` loss."""
        if self.loss_chunk_size > 0 and head_is_last(self.accelerator.unwrap_model(model)):
            with self.accelerator.autocast():  # the model's mixed precision (accelerate wraps only its forward)
                return causal_lm_loss(model, inputs, num_items=num_items, chunk_size=self.loss_chunk_size)
        outputs = model(**inputs, **({} if num_items is None else {"num_items_in_batch": num_items}))
        return outputs.loss, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (not self.chunked_loss or inputs.get("labels") is None or self.label_smoother is not None
                or self.compute_loss_func is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None  # as Trainer hands it the model
        loss, outputs = self.language_modelling_loss(model, inputs, num_items)
        return (loss, outputs) if return_outputs else loss
