"""Compresso: structured pruning whose shape is learned (Guo et al. 2023, on CoFi's L0 masks).

Hard-concrete gates (:mod:`~hf_compress_prompt.methods.hard_concrete`) sit on every attention head, every FFN
channel and (optionally) every hidden dimension of a Llama-family model. They are trained jointly with LoRA (PEFT)
on text with ``transformers.Trainer``: the loss is the language-model loss plus a Lagrangian term that pulls the
expected parameter sparsity to a target (the target rises linearly from 0 during a warm-up, the multipliers are
trained by gradient ascent). Optionally every training sample starts with Compresso's "collaborative prompt", a fixed
instruction telling the model it is being pruned; it is then attached to the pruned model as its (text) recovery
prompt so inference sees it too.

At the end LoRA is merged, each head's and channel's test-time gate value is folded into the weights, and the
structures with closed gates are removed (:func:`~hf_compress_prompt.compressors.structured.apply_structure`), giving a
:class:`~hf_compress_prompt.models.pruned_llama.PrunedLlamaForCausalLM` with its own sizes per layer. Hidden gates end
binary (1 kept, 0 removed). Which structures go: every gate whose probability of being open is below one threshold,
the lowest threshold that removes the target share of parameters (the learned gates decide the shape, the budget the
size; the Lagrangian alone overshoots or undershoots at short budgets; that maths is in
:mod:`~hf_compress_prompt.methods.gate_thresholds`). The pruned model equals the gated model in eval mode (tested).
This module holds the gates' hooks and the training loop; JSONL instruction sets become windows in
:mod:`~hf_compress_prompt.data.instructions`, and batches are built by the recovery prompt's collator (with the
collaborative prompt's ids in front).

Where masks go (the model's own outputs stay the same otherwise):
- head ``h`` of layer ``l``: the head's slice of the output projection's input is multiplied by ``z``;
- FFN channel ``c``: the down projection's input channel is multiplied by ``z``;
- hidden dimension ``i``: the embedding output and every output projection's and down projection's output,
  so the residual stream is ``z_i`` times what it would be.

Grouped-query attention: gates are per query head; when structures are removed, each layer keeps
``round(open heads / key-value heads)`` heads in every key/value group (the highest gates), as the attention needs
the same count per group. Differences from the paper, for CPU budgets: hundreds of steps, not epochs; gates start
nearly open (``init_keep``) and learn at a higher rate; the default text is the C4 sample (no instruction set is
reachable offline; any Alpaca-style JSONL can be given).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..autocast import resolve_bf16
from ..data import training_corpus
from ..data.instructions import instruction_windows
from ..errors import UserInputError
from ..methods.gate_thresholds import expected_parameters, lowest_threshold, open_at, open_heads_at, zero_except
from ..methods.hard_concrete import HardConcreteGate, lagrangian_penalty
from ..models.pruned_llama import PrunedLlamaForCausalLM
from ..recovery.data import PromptTuningCollator, TokenWindows, token_windows
from ..recovery.runtime import RecoveryPrompt, attach_recovery_prompt
from ..recovery.train import RecoveryConfig, RecoveryMethod, lora_model
from ..recovery.trainer_setup import build_trainer, training_arguments
from .structured import (
    StructurePlan,
    _layer_sizes,
    _parameter_counts,
    apply_structure,
    check_prunable,
    count_parameters,
)

__all__ = ["COLLABORATIVE_PROMPT", "CompressoConfig", "CompressoResult", "StructureGates", "compresso_prune"]

COLLABORATIVE_PROMPT = ("Attention! This language model is being pruned: parts of it are being removed to make it "
                        "smaller. Keep answering as accurately as you can with what remains.\n\n")


@dataclass
class CompressoConfig:
    """Settings of :func:`compresso_prune`."""

    target: float = field(default=0.2, metadata={"help": "fraction of all parameters to remove, in (0, 1)"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    seqlen: int = field(default=256, metadata={"help": "tokens per training window"})
    dataset: str = field(default="c4", metadata={"help": "a corpus name (c4, wikitext2...) or an Alpaca-style JSONL "
                                                         "file (instruction, input, output)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "LoRA learning rate"})
    gate_learning_rate: float = field(default=0.1, metadata={"help": "learning rate of the gates' log_alpha"})
    lambda_learning_rate: float = field(default=0.1, metadata={"help": "learning rate of the Lagrange multipliers"})
    target_warmup_ratio: float = field(default=0.5, metadata={"help": "share of steps over which the target "
                                                                      "sparsity rises from 0"})
    init_keep: float = field(default=0.99, metadata={"help": "initial probability that a gate is open"})
    prune_hidden: bool = field(default=True, metadata={"help": "also learn which hidden dimensions to remove"})
    multiple_of: int = field(default=32, metadata={"help": "kept FFN channels and hidden dimensions are multiples of "
                                                          "this (e.g. 64, so group quantization and kernels fit)"})
    collaborative_prompt: str | None = field(default=COLLABORATIVE_PROMPT, metadata={
        "help": "text prepended to every training sample and attached to the pruned model (None: off)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast; none: where bf16 matmuls are fast (a GPU with bf16, a CPU with AVX-512 or AMX), else fp32"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, gates and data order"})

    def __post_init__(self):
        if not isinstance(self.target, (int, float)) or not 0 < self.target < 1:
            raise UserInputError(f"target={self.target!r} must lie in (0, 1): the fraction of parameters to remove")
        for name in ("max_steps", "batch_size", "seqlen"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("learning_rate", "gate_learning_rate", "lambda_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UserInputError(f"{name}={value!r} must be a finite number > 0")
        if not 0 <= self.target_warmup_ratio <= 1:
            raise UserInputError(f"target_warmup_ratio={self.target_warmup_ratio} must lie in [0, 1]")
        if not 0 < self.init_keep < 1:
            raise UserInputError(f"init_keep={self.init_keep} must lie in (0, 1)")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise UserInputError(f"multiple_of={self.multiple_of!r} must be a positive integer")

    def to_dict(self) -> dict:
        return asdict(self)


class StructureGates(nn.Module):
    """The gates of one model: per layer a head gate and a channel gate, and one hidden gate. ``install`` hooks them
    into the model (sampled once per forward pass in training mode, test-time values in eval mode)."""

    def __init__(self, model: nn.Module, *, target: float | None = None, prune_hidden: bool = True,
                 init_keep: float = 0.99, multiple_of: int = 1):
        super().__init__()
        check_prunable(model)
        config = model.config
        self._config, self.target, self.multiple_of = config, target, multiple_of
        self.sizes = _layer_sizes(config)
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.tied = bool(config.tie_word_embeddings)
        self.heads = nn.ModuleList(HardConcreteGate(max(h, 1), init_keep) for h, _, _ in self.sizes)
        self.channels = nn.ModuleList(HardConcreteGate(max(c, 1), init_keep) for _, _, c in self.sizes)
        self.hidden = HardConcreteGate(config.hidden_size, init_keep) if prune_hidden else None
        self._values: dict | None = None
        self._handles: list = []

    # ----- values ------------------------------------------------------------------------------------------------
    def _keep_at(self, tau: float) -> tuple[list[list[int]], list[list[int]], list[int] | None]:
        """Kept heads, channels and hidden dimensions when every gate with ``P(open) >= tau`` stays
        (:mod:`~hf_compress_prompt.methods.gate_thresholds`); at least one hidden dimension stays."""
        heads = [open_heads_at(hg.expected_open().detach(), kv, tau) if h else []
                 for (h, kv, _), hg in zip(self.sizes, self.heads)]
        channels = [open_at(cg.expected_open().detach(), tau, self.multiple_of) if c else []
                    for (_, _, c), cg in zip(self.sizes, self.channels)]
        hidden = None
        if self.hidden is not None:
            p = self.hidden.expected_open().detach()
            hidden = open_at(p, tau, self.multiple_of) or [int(p.argmax())]
        return heads, channels, hidden

    def _count(self, heads, channels, hidden) -> int:
        sizes = [(len(hk), kv if hk else 0, len(ck))  # every kept group keeps its key/value head
                 for (_, kv, _), hk, ck in zip(self.sizes, heads, channels)]
        d = self.hidden_size if hidden is None else len(hidden)
        outside, attn, ffn = _parameter_counts(self._config, sizes, d)
        return outside + sum(attn) + sum(ffn)

    def decide(self) -> tuple[list[list[int]], list[list[int]], list[int] | None]:
        """Which structures stay: all gates above one threshold on ``P(open)``, the lowest threshold whose model
        removes at least ``target`` of the parameters (the L0 ranking decides the shape, the budget the size); with
        no target, the gates more likely open than closed."""
        if self.target is None:
            return self._keep_at(0.5)
        budget = (1 - self.target) * self._count(*self._keep_at(0.0))
        return self._keep_at(lowest_threshold(lambda tau: self._count(*self._keep_at(tau)), budget))

    def final_values(self) -> dict:
        """Deterministic gates: ``E[z]`` for kept heads and channels, 0 for removed ones; 0/1 for hidden dimensions
        (the embedding may be tied to the output head, so a hidden scale cannot be folded)."""
        heads, channels, hidden = self.decide()
        hidden_values = None
        if self.hidden is not None:
            hidden_values = zero_except(torch.ones(self.hidden_size), hidden)
        return {"heads": [zero_except(g.mean_values(), k) for g, k in zip(self.heads, heads)],
                "channels": [zero_except(g.mean_values(), k) for g, k in zip(self.channels, channels)],
                "hidden": hidden_values, "kept": (heads, channels, hidden)}

    def _sample(self) -> dict:
        if not self.training:
            return self.final_values()
        return {"heads": [g() for g in self.heads], "channels": [g() for g in self.channels],
                "hidden": None if self.hidden is None else self.hidden()}

    def expected_sparsity(self) -> torch.Tensor:
        """1 - expected parameters / parameters, from ``P(gate open)`` (differentiable). A query head is charged its
        query and output rows plus its share of the key/value rows; norms are left out."""
        d_full = float(self.hidden_size)
        d = self.hidden.expected_open().sum() if self.hidden is not None else torch.tensor(d_full)
        shape = {"sizes": self.sizes, "head_dim": self.head_dim, "vocab_size": self.vocab_size, "tied": self.tied}
        full = expected_parameters(d_full, [h for h, _, _ in self.sizes], [c for _, _, c in self.sizes], **shape)
        expected = expected_parameters(
            d, [g.expected_open().sum() if h else 0.0 for g, (h, _, _) in zip(self.heads, self.sizes)],
            [g.expected_open().sum() if c else 0.0 for g, (_, _, c) in zip(self.channels, self.sizes)], **shape)
        return 1 - expected / full

    # ----- hooks -------------------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> StructureGates:
        """Hooks the gates into ``model`` (the PEFT-wrapped one when LoRA trains, so LoRA's paths are gated too)."""
        self.remove()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._handles.append(base.register_forward_pre_hook(lambda module, args: self._start()))
        inner = base.model
        if self.hidden is not None:
            self._handles.append(inner.embed_tokens.register_forward_hook(
                lambda module, args, out: out * self._values["hidden"].to(out.dtype)))
        for i, layer in enumerate(inner.layers):
            h, _, c = self.sizes[i]
            if h:
                o_proj = layer.self_attn.o_proj
                self._handles.append(o_proj.register_forward_pre_hook(self._head_hook(i)))
                if self.hidden is not None:
                    self._handles.append(o_proj.register_forward_hook(self._hidden_hook))
            if c:
                down = layer.mlp.down_proj
                self._handles.append(down.register_forward_pre_hook(self._channel_hook(i)))
                if self.hidden is not None:
                    self._handles.append(down.register_forward_hook(self._hidden_hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start(self) -> None:
        self._values = self._sample()  # one sample per forward pass: every hook of this pass uses the same gates

    def _head_hook(self, i: int):
        def hook(module, args):
            x = args[0]  # (B, T, heads * hd)
            z = self._values["heads"][i].to(x.dtype)
            return (x.unflatten(-1, (z.numel(), self.head_dim)).mul(z[:, None]).flatten(-2),) + tuple(args[1:])
        return hook

    def _channel_hook(self, i: int):
        def hook(module, args):
            return (args[0] * self._values["channels"][i].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _hidden_hook(self, module, args, out):
        return out * self._values["hidden"].to(out.dtype)

    # ----- the end: fold and cut ---------------------------------------------------------------------------------
    @torch.no_grad()
    def plan_and_fold(self, model: nn.Module) -> StructurePlan:
        """Multiplies ``model``'s weights by the final gate values (heads, channels, hidden) and returns the plan that
        removes the closed structures. ``model`` must be the plain (merged) model the gates were built for."""
        values = self.final_values()
        heads, channels, hidden = values["kept"]
        for i, layer in enumerate(model.model.layers):
            h, _, c = self.sizes[i]
            if h:
                o = layer.self_attn.o_proj.weight  # (hidden, heads * hd)
                o.mul_(values["heads"][i].repeat_interleave(self.head_dim).to(o.dtype))
            if c:
                down = layer.mlp.down_proj.weight  # (hidden, channels)
                down.mul_(values["channels"][i].to(down.dtype))
        return StructurePlan(heads, channels, hidden)


def _compresso_trainer_class():
    from transformers import Trainer

    class CompressoTrainer(Trainer):
        """``Trainer`` whose loss adds the sparsity constraint and whose optimizer also trains the gates (and the
        multipliers, by ascent)."""

        def __init__(self, *args, gates: StructureGates, config: CompressoConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.gates, self.compresso = gates, config
            self.lambdas = nn.Parameter(torch.zeros(2))
            self.lambdas.register_hook(lambda grad: -grad)  # gradient ascent on the multipliers
            self.history: list[dict] = []

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                lora = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = torch.optim.AdamW([
                    {"params": lora, "lr": self.args.learning_rate, "weight_decay": 0.0},
                    {"params": list(self.gates.parameters()), "lr": self.compresso.gate_learning_rate,
                     "weight_decay": 0.0},
                    {"params": [self.lambdas], "lr": self.compresso.lambda_learning_rate, "weight_decay": 0.0},
                ])
            return self.optimizer

        def target_now(self) -> float:
            warm = self.compresso.target_warmup_ratio * self.args.max_steps
            step = self.state.global_step
            return self.compresso.target * (min(1.0, step / warm) if warm > 0 else 1.0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            lm_loss = outputs.loss
            expected = self.gates.expected_sparsity()
            target = self.target_now()
            penalty = lagrangian_penalty(expected, target, self.lambdas[0], self.lambdas[1])
            loss = lm_loss + penalty
            if model.training and (not self.history or self.history[-1]["step"] != self.state.global_step):
                self.history.append({"step": self.state.global_step, "lm_loss": float(lm_loss.detach()),
                                     "expected_sparsity": float(expected.detach()), "target": target,
                                     "lambda_1": float(self.lambdas[0].detach()), "lambda_2": float(self.lambdas[1].detach())})
            return (loss, outputs) if return_outputs else loss

    return CompressoTrainer


@dataclass
class CompressoResult:
    """What :func:`compresso_prune` returns: the pruned model (LoRA merged, collaborative prompt attached when
    used), its plan, the training history and cost."""

    model: PrunedLlamaForCausalLM
    plan: StructurePlan
    history: list[dict]
    seconds: float
    seconds_per_step: float
    parameters_before: int
    parameters_after: int
    trainable_parameters: int

    @property
    def removed_fraction(self) -> float:
        return 1 - self.parameters_after / self.parameters_before

    def summary(self) -> dict:
        return {"parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "removed_fraction": self.removed_fraction, "seconds": self.seconds,
                "seconds_per_step": self.seconds_per_step, "trainable_parameters": self.trainable_parameters,
                "layer_num_attention_heads": self.model.config.layer_num_attention_heads,
                "layer_intermediate_size": self.model.config.layer_intermediate_size,
                "hidden_size": self.model.config.hidden_size}


def compresso_prune(model: nn.Module, tokenizer, config: CompressoConfig | None = None, *, train_dataset=None,
                    training_args: dict | None = None, **overrides) -> CompressoResult:
    """Learns which heads, channels and hidden dimensions to remove (L0 gates with LoRA, Trainer), then removes them.

    Args:
        model (`LlamaForCausalLM`): the model to prune; its weights are changed (LoRA merged, gates folded); use the
            returned model.
        tokenizer: its tokenizer (training windows, the collaborative prompt).
        config (`CompressoConfig`, *optional*): settings; keyword ``overrides`` replace single fields.
        train_dataset (*optional*): a dataset of ``{"input_ids"}`` windows (default: ``config.dataset``).
        training_args (`dict`, *optional*): extra ``TrainingArguments``.

    Returns:
        `CompressoResult` with a :class:`~hf_compress_prompt.models.pruned_llama.PrunedLlamaForCausalLM`.
    """

    config = config or CompressoConfig()
    if overrides:
        unknown = set(overrides) - set(CompressoConfig.__dataclass_fields__)
        if unknown:
            raise UserInputError(f"unknown Compresso settings {sorted(unknown)}; see CompressoConfig")
        config = CompressoConfig(**{**config.to_dict(), **overrides})
    check_prunable(model)  # before any data is read
    if train_dataset is None:
        if Path(config.dataset).suffix == ".jsonl":
            windows = instruction_windows(config.dataset, tokenizer, config.seqlen)
        else:

            dataset, split = training_corpus(config.dataset)  # C4 unreachable: the offline sample, said in one line
            windows = token_windows(dataset, tokenizer, config.seqlen, part="train", split=split)
        train_dataset = TokenWindows(windows)
    if len(train_dataset) == 0:
        raise UserInputError("the training dataset must not be empty")
    prefix = []
    if config.collaborative_prompt:
        prefix = tokenizer(config.collaborative_prompt, add_special_tokens=False)["input_ids"]

    parameters_before = count_parameters(model)
    torch.manual_seed(config.seed)
    gates = StructureGates(model, target=config.target, prune_hidden=config.prune_hidden, init_keep=config.init_keep,
                           multiple_of=config.multiple_of)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = lora_model(model, RecoveryConfig(method=RecoveryMethod.LORA, lora_r=config.lora_r,
                                                  lora_alpha=config.lora_alpha, seed=config.seed))
    gates.install(peft_model).train()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad) + sum(
        p.numel() for p in gates.parameters())
    with tempfile.TemporaryDirectory(prefix="hcp-compresso-") as scratch:
        args = training_arguments(
            scratch, seed=config.seed, overrides=training_args, max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
            lr_scheduler_type="constant_with_warmup", warmup_steps=round(0.05 * config.max_steps),
            max_grad_norm=1.0, save_strategy="no", eval_strategy="no", logging_steps=max(1, config.max_steps // 20),
            bf16=resolve_bf16(config.bf16, next(model.parameters()).device),
        )
        trainer = build_trainer(_compresso_trainer_class(), args, model=peft_model, train_dataset=train_dataset,
                                data_collator=PromptTuningCollator(prefix_ids=tuple(prefix)), gates=gates,
                                config=config)
        start = time.perf_counter()
        try:
            output = trainer.train()
        finally:
            gates.remove()
        seconds = time.perf_counter() - start
    merged = peft_model.merge_and_unload()
    merged.eval()
    gates.eval()
    plan = gates.plan_and_fold(merged)
    pruned = apply_structure(merged, plan).eval()
    if prefix:
        with torch.no_grad():
            embedding = pruned.get_input_embeddings()(torch.tensor(prefix)).float()  # (P, hidden')
        attach_recovery_prompt(pruned, RecoveryPrompt(embedding, {
            "kind": "collaborative prompt (text)", "text": config.collaborative_prompt,
            "compresso": json.dumps(config.to_dict())}))
    steps = max(1, output.global_step)
    return CompressoResult(pruned, plan, trainer.history, seconds, seconds / steps, parameters_before,
                           count_parameters(pruned), trainable)
