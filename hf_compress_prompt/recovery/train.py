"""Training a recovery prompt: PEFT prompt tuning on a frozen (compressed) causal LM with ``transformers.Trainer``.

The recipe of "Soft Prompt Recovers Compressed LLMs, Transferably" where it fits a CPU: AdamW (lr 1e-3, weight decay
1e-5), batch 4, warm-up then linear decay, gradient clipping at 1.0, validation perplexity every ``eval_steps``
and the best-validation prompt kept (:class:`~hf_compress_prompt.integrations.trainer_callbacks.BestValidationCallback`).
Every weight of the model stays frozen; only the ``num_virtual_tokens x hidden`` prompt trains.

Users with their own ``Trainer`` set-up use :func:`prompt_tuning_model`, :class:`~.data.PromptTuningCollator` and
the callback directly; :func:`recover` wires them together. What it trains is looked up in two tables: the method
(``_METHODS``: which module trains, what is checked first, whether a prompt comes out) and the loss (``_LOSSES``:
language modelling, distillation from a teacher, or one prompt shared by several models); the ``Trainer`` itself is
built by :mod:`~.trainer_setup`, as for Compresso.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._logging import get_logger
from ..autocast import bf16_matmul_is_fast
from ..compressors.blocks import find_decoder_layers, find_linear_layers
from ..data import training_corpus
from ..errors import UserInputError
from ..formats.schema import RECIPE_CONFIG_KEY
from ..integrations.peft_compat import get_peft_model, quiet_peft_forward
from ..integrations.peft_lora import lora_config_for
from ..integrations.trainer_callbacks import BestValidationCallback
from ..nn import PackedLinear, has_packed_layers
from .data import PromptTuningCollator, TokenWindows, token_windows
from .distill import DistillationTrainer, check_teacher
from .generated import GENERATION_KINDS, generated_split, settings_for
from .losses import LanguageModellingTrainer
from .prefix import RecoveryPrefix, check_prefix_length, prefix_layout
from .runtime import (
    RecoveryPrompt,
    attach_recovery_prompt,
    detach_recovery_prompt,
    prefix_of_prompt,
    recovery_prompt_of,
)
from .shared import SharedPromptTrainer, check_partners, tie_prompt
from .trainer_setup import build_trainer, training_arguments

__all__ = ["PromptInit", "RecoveryConfig", "RecoveryMethod", "RecoveryResult", "lora_model", "prefix_tuning_model",
           "prompt_tuning_model", "recover"]

logger = get_logger(__name__)

GENERATED = "generated"  # RecoveryConfig.dataset: text the dense model writes (recover(..., generator=dense))


class RecoveryMethod(str, enum.Enum):
    """``PROMPT``: soft prompt (the paper's method, weights frozen); ``LORA``: PEFT LoRA beside every block linear
    (packed layers keep their codes and mask, :mod:`~hf_compress_prompt.integrations.peft_lora`); ``FULL``:
    continued pretraining of all remaining weights (LayerChop's recovery for layer-dropped models; dense weights
    only, and it does not keep a pruning mask); ``PREFIX``: deep prompts, trainable keys and values in every layer
    (PEFT prefix tuning, weights frozen; :class:`~.prefix.RecoveryPrefix`)."""

    PROMPT = "PROMPT"
    LORA = "LORA"
    FULL = "FULL"
    PREFIX = "PREFIX"


class PromptInit(str, enum.Enum):
    """How the virtual tokens start: ``VOCAB`` copies the embeddings of the first ``n`` vocabulary entries (the
    paper's code), ``TEXT`` those of a text's tokens (repeated to length), ``SAMPLE_VOCAB`` those of random
    vocabulary entries, ``RANDOM`` PEFT's random initialisation."""

    VOCAB = "VOCAB"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class RecoveryConfig:
    """Settings of :func:`recover`."""

    method: RecoveryMethod = field(default=RecoveryMethod.PROMPT, metadata={"help": "PROMPT, LORA, FULL or PREFIX"})
    num_virtual_tokens: int = field(default=100, metadata={"help": "virtual tokens in the prompt"})
    init: PromptInit = field(default=PromptInit.VOCAB, metadata={"help": "VOCAB, TEXT, SAMPLE_VOCAB or RANDOM"})
    init_text: str | None = field(default=None, metadata={"help": "the text for init=TEXT"})
    dataset: str = field(default="c4", metadata={
        "help": "registered corpus to train on (hf_compress_prompt.list_corpora()), or 'generated': text the dense "
                "model writes itself (recover(..., generator=dense); no dataset at all)"})
    generate_kind: str = field(default="continuations", metadata={
        "help": "dataset='generated': 'continuations' (samples from BOS) or 'chat' (answers to questions=[...] in the "
                "chat template)"})
    generate_count: int = field(default=256, metadata={"help": "dataset='generated': texts to generate (cached)"})
    generate_tokens: int = field(default=320, metadata={"help": "dataset='generated': tokens sampled per text at most"})
    seqlen: int = field(default=512, metadata={"help": "tokens per training window"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warm-up (then linear decay)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    eval_steps: int = field(default=25, metadata={"help": "validate every this many steps"})
    eval_windows: int = field(default=8, metadata={"help": "validation windows (held-out documents)"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast (fp32 prompt and optimizer state); none: where bf16 matmuls are fast (a GPU with bf16, "
                "a CPU with AVX-512 or AMX), else fp32 (an AVX2-only CPU runs bf16 about 5x slower than fp32)"})
    loss_chunk_size: int = field(default=256, metadata={
        "help": "language-modelling loss: the output projection and cross-entropy computed this many scored positions "
                "at a time, never holding all logits (same loss, faster and smaller; 0: the model's own loss)"})
    cast_frozen_weights: bool = field(default=True, metadata={
        "help": "with bf16: hold the frozen linear weights in bf16 while training (the casts autocast makes on every "
                "step, made once: same numbers; 2 more bytes per weight while training, fp32 put back after)"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (method=LORA)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (method=LORA)"})
    prefix_projection: bool = field(default=False, metadata={
        "help": "method=PREFIX: train the keys and values through PEFT's reparametrising MLP (saved as its output; it "
                "needs a learning rate near 1e-3 and diverged from 3e-3 on SmolLM2, where the plain prefix takes 3e-2)"})
    prefix_hidden_size: int | None = field(default=None, metadata={
        "help": "method=PREFIX with prefix_projection: the MLP's hidden size (none: the key/value width)"})

    def __post_init__(self):
        self.init = PromptInit(self.init)
        self.method = RecoveryMethod(self.method)
        for name in ("num_virtual_tokens", "seqlen", "batch_size", "eval_steps", "eval_windows", "generate_count",
                     "generate_tokens"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 1")
        if self.loss_chunk_size < 0:
            raise UserInputError(f"loss_chunk_size={self.loss_chunk_size} must be >= 0 (0: the model's own loss)")
        if self.max_steps < 1:
            raise UserInputError(f"max_steps={self.max_steps}: training needs at least one step")
        if self.generate_kind not in GENERATION_KINDS:
            raise UserInputError(f"generate_kind={self.generate_kind!r}; use one of {', '.join(GENERATION_KINDS)}")
        if self.init is PromptInit.TEXT and not self.init_text:
            raise UserInputError("init=TEXT needs init_text")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise UserInputError(f"{name}={getattr(self, name)} must be a finite number")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise UserInputError(f"learning_rate={self.learning_rate}, weight_decay={self.weight_decay}, max_grad_norm="
                                 f"{self.max_grad_norm}: need learning_rate > 0, weight_decay >= 0, max_grad_norm > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UserInputError(f"warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        if self.prefix_hidden_size is not None and (self.prefix_hidden_size < 1 or not self.prefix_projection):
            raise UserInputError(f"prefix_hidden_size={self.prefix_hidden_size} sizes the MLP of method=PREFIX with "
                                 "prefix_projection=True; give a positive size with both, or leave it unset")

    def to_dict(self) -> dict:
        return {**asdict(self), "init": self.init.value, "method": self.method.value}


@dataclass
class RecoveryResult:
    """What :func:`recover` returns: the trained prompt (best validation; a :class:`~.prefix.RecoveryPrefix` for
    PREFIX, `None` for LORA / FULL), the trained
    module (the PEFT model for PROMPT / LORA, the model itself for FULL), the validation history and timings."""

    prompt: RecoveryPrompt | RecoveryPrefix | None
    trained: nn.Module
    best_perplexity: float
    best_step: int
    history: list[dict]
    seconds: float
    seconds_per_step: float
    trainable_parameters: int
    peak_rss_mb: float | None = None  # the process's peak resident memory so far (VmHWM), MiB
    train_memory_mb: float | None = None  # how much training raised that peak (0 if it stayed below an earlier one)
    baseline_perplexity: float | None = None  # validation perplexity before training, without the adapter (history[0])


def _initial_prompt(model: nn.Module, config: RecoveryConfig, tokenizer) -> torch.Tensor | None:
    embed = model.get_input_embeddings().weight  # (vocab, hidden)
    n = config.num_virtual_tokens
    if config.init is PromptInit.VOCAB:
        if n > embed.shape[0]:
            raise UserInputError(f"num_virtual_tokens={n} exceeds the vocabulary ({embed.shape[0]})")
        ids = torch.arange(n)
    elif config.init is PromptInit.SAMPLE_VOCAB:
        ids = torch.randint(0, embed.shape[0], (n,), generator=torch.Generator().manual_seed(config.seed))
    elif config.init is PromptInit.TEXT:
        if tokenizer is None:
            raise UserInputError("init=TEXT needs the tokenizer")
        text_ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not text_ids:
            raise UserInputError(f"init_text={config.init_text!r} has no tokens")
        ids = torch.tensor((text_ids * math.ceil(n / len(text_ids)))[:n])
    else:
        return None
    return embed.detach()[ids.to(embed.device)].float().cpu()  # (n, hidden)


def prompt_tuning_model(model: nn.Module, config: RecoveryConfig | None = None, tokenizer=None):
    """``model`` wrapped as a PEFT prompt-tuning model (task CAUSAL_LM) with the prompt initialised per
    ``config.init``; every weight of ``model`` is frozen."""
    from peft import PromptTuningConfig


    config = config or RecoveryConfig()
    torch.manual_seed(config.seed)
    initial = _initial_prompt(model, config, tokenizer)
    peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                                     prompt_tuning_init="RANDOM")
    peft_model = get_peft_model(model, peft_config)
    if initial is not None:
        with torch.no_grad():
            peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.copy_(initial)
    return peft_model


def prefix_tuning_model(model: nn.Module, config: RecoveryConfig | None = None, tokenizer=None):
    """``model`` wrapped as a PEFT prefix-tuning model (task CAUSAL_LM): ``num_virtual_tokens`` trainable keys and
    values in every layer (the key/value heads under grouped-query attention), through PEFT's reparametrising MLP
    when ``config.prefix_projection``; every weight of ``model`` is frozen.

    Unless ``config.init`` is RANDOM (PEFT's initialisation), the prefix starts as the keys and values of the prompt
    ``init`` gives (:func:`~.runtime.prefix_of_prompt`): the prefix model then starts where the prompt-tuned one
    does. Without the projection those are the trained tensor itself; with it, the MLP's last layer is solved by
    least squares so that its output is them (exactly when ``num_virtual_tokens <= prefix_hidden_size + 1``).

    Raises:
        UserInputError: a model whose cache cannot serve a prefix (:func:`~.prefix.prefix_layout` says why).
    """
    from peft import PrefixTuningConfig

    config = config or RecoveryConfig(method=RecoveryMethod.PREFIX)
    layout = prefix_layout(model)
    torch.manual_seed(config.seed)
    initial = _initial_prompt(model, config, tokenizer)
    start = None if initial is None else prefix_of_prompt(model, RecoveryPrompt(initial)).to_peft()  # (n, L*2*kv)
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens, token_dim=layout.token_dim,
        num_attention_heads=layout.num_key_value_heads, num_layers=layout.num_layers,
        prefix_projection=config.prefix_projection, encoder_hidden_size=config.prefix_hidden_size or layout.token_dim)
    peft_model = get_peft_model(model, peft_config)
    if start is not None:
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        with torch.no_grad():
            if not config.prefix_projection:
                encoder.embedding.weight.copy_(start)
            else:  # output = tanh(E W1 + b1) W2 + b2: solve [hidden, 1] [W2; b2] = start, minimum norm
                hidden = encoder.transform[1](encoder.transform[0](encoder.embedding.weight))  # (n, e)
                design = torch.cat([hidden, hidden.new_ones(len(hidden), 1)], dim=1).double()  # (n, e + 1)
                solution = torch.linalg.pinv(design) @ start.double()  # (e + 1, L*2*kv)
                encoder.transform[2].weight.copy_(solution[:-1].T)
                encoder.transform[2].bias.copy_(solution[-1])
    return peft_model


def _check_prefix(model: nn.Module, config: RecoveryConfig) -> None:
    prefix_layout(model)
    check_prefix_length(model, config.num_virtual_tokens, following=config.seqlen)


def lora_model(model: nn.Module, config: RecoveryConfig | None = None):
    """``model`` wrapped as a PEFT LoRA model on every decoder-block linear (packed ones too)."""

    config = config or RecoveryConfig(method=RecoveryMethod.LORA)
    _, layers = find_decoder_layers(model)
    targets = sorted({name.split(".")[-1] for block in layers for name, m in block.named_modules()
                      if isinstance(m, PackedLinear) or name in find_linear_layers(block)})
    torch.manual_seed(config.seed)
    return get_peft_model(model, lora_config_for(model, r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=0.0, target_modules=targets))


def _check_full(model: nn.Module) -> None:
    if has_packed_layers(model):
        raise UserInputError("method=FULL trains the weights themselves and this model holds packed (quantized / "
                             "sparse) layers; use PROMPT or LORA, or a dense model (e.g. layers dropped only)")


def _full_model(model: nn.Module) -> nn.Module:
    _check_full(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _metadata(model: nn.Module, config: RecoveryConfig, callback, steps: int, teacher: nn.Module | None = None,
              partners: list[nn.Module] | None = None) -> dict:
    shared = {} if not partners else {"shared_with_recipes": [getattr(p.config, RECIPE_CONFIG_KEY, None)
                                                               for p in partners]}
    return {
        "base_model": getattr(model.config, "_name_or_path", None) or None,
        "compression_recipe": getattr(model.config, RECIPE_CONFIG_KEY, None),
        "training": config.to_dict(),
        "loss": "language modelling" if teacher is None else "KL to the teacher's next-token distributions",
        "teacher": None if teacher is None else (getattr(getattr(teacher, "config", None), "_name_or_path", None)
                                                 or "given"),
        "steps": steps,
        "best_step": callback.best_step,
        "best_validation_perplexity": callback.best_perplexity,
        "validation": f"{config.eval_windows} x {config.seqlen} tokens of held-out "
                      + ("generated text (its last windows)" if config.dataset == GENERATED
                         else f"{config.dataset} documents"),
        "vocab_size": model.config.vocab_size,
        "hidden_size": model.get_input_embeddings().embedding_dim,
        **shared,
    }


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MiB: Linux's ``VmHWM`` (``ru_maxrss`` starts a process at its
    parent's size when it was forked, and exec keeps that), else ``ru_maxrss``; `None` where unavailable. A per-run
    figure sampled in a thread is the benches' (``bench/memory.py``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


@dataclass(frozen=True)
class _Method:
    """How :func:`recover` trains with one :class:`RecoveryMethod`."""

    wrap: Callable  # (model, config, tokenizer) -> the module that trains (a PEFT model, or the model itself)
    check: Callable = lambda model, config: None  # refuses a model it cannot train, before any data is read
    # (PEFT model, PEFT's saved prompt tensor, metadata) -> the RecoveryPrompt / RecoveryPrefix of the result
    # (shared_with is allowed); None: the result holds no prompt
    prompt_of: Callable | None = None
    freezes_weights: bool = True  # the models' requires_grad flags are given back after training

    @property
    def gives_prompt(self) -> bool:
        return self.prompt_of is not None


_METHODS = {
    RecoveryMethod.PROMPT: _Method(prompt_tuning_model,
                                   prompt_of=lambda trained, saved, meta: RecoveryPrompt(saved, meta)),  # (n, hidden)
    RecoveryMethod.LORA: _Method(lambda model, config, tokenizer: lora_model(model, config)),
    RecoveryMethod.FULL: _Method(lambda model, config, tokenizer: _full_model(model),
                                 check=lambda model, config: _check_full(model), freezes_weights=False),
    RecoveryMethod.PREFIX: _Method(prefix_tuning_model, check=_check_prefix, prompt_of=lambda trained, saved, meta:
                                   RecoveryPrefix.from_peft(saved, prefix_layout(trained.get_base_model()), meta)),
}


def _language_modelling(teacher, tied, config: RecoveryConfig):
    return LanguageModellingTrainer, {"loss_chunk_size": config.loss_chunk_size,
                                      "cast_frozen_weights": config.cast_frozen_weights}


def _distillation(teacher, tied, config: RecoveryConfig):
    return DistillationTrainer, {"teacher": teacher, "loss_chunk_size": config.loss_chunk_size,
                                 "cast_frozen_weights": config.cast_frozen_weights}


def _shared_prompt(teacher, tied, config: RecoveryConfig):
    return SharedPromptTrainer, {"partners": tied, "loss_chunk_size": config.loss_chunk_size,
                                 "cast_frozen_weights": config.cast_frozen_weights}


_LOSSES = {  # the loss -> (teacher, tied partner models, config) -> (its Trainer class, that class's own arguments)
    "language modelling": _language_modelling,
    "distillation": _distillation,
    "shared prompt": _shared_prompt,
}


def _schedule(config: RecoveryConfig, save: bool) -> dict:
    """The paper's recipe as ``TrainingArguments``: AdamW, warm-up then linear decay, clipping, validation (and a
    checkpoint when ``save``) every ``eval_steps``."""
    return dict(  # noqa: C408 - TrainingArguments' own names
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=round(config.warmup_ratio * config.max_steps),
        max_grad_norm=config.max_grad_norm,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps" if save else "no",
        save_steps=config.eval_steps,
        logging_steps=max(1, min(config.eval_steps, 10)),
        bf16=config.bf16,
    )


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _settings(config: RecoveryConfig | None, overrides: dict) -> RecoveryConfig:
    config = config or RecoveryConfig()
    if overrides:
        unknown = set(overrides) - set(RecoveryConfig.__dataclass_fields__)
        if unknown:
            raise UserInputError(f"unknown recovery settings {sorted(unknown)}; see RecoveryConfig")
        config = RecoveryConfig(**{**config.to_dict(), **overrides})
    return config


def _check_models(model: nn.Module, config: RecoveryConfig, teacher: nn.Module | None,
                  partners: list[nn.Module]) -> None:
    """Everything about the models that can fail, before any data is read."""
    _METHODS[config.method].check(model, config)
    if teacher is not None:

        check_teacher(model, teacher)
    if partners:

        if not _METHODS[config.method].gives_prompt or teacher is not None:
            raise UserInputError("shared_with trains one soft prompt for several models: it needs method=PROMPT "
                                 "(or PREFIX) and no teacher")
        check_partners(model, partners, prefix=config.method is RecoveryMethod.PREFIX)


def _check_generator(model: nn.Module, config: RecoveryConfig, generator: nn.Module | None, questions,
                     given: bool) -> None:
    """``dataset="generated"`` needs the dense model that writes the text (and questions for chat answers); a
    generator is read for nothing else."""
    if config.dataset != GENERATED or given:
        if generator is not None or questions is not None:
            raise UserInputError("generator= / questions= write the training text for dataset='generated' (and no "
                                 "train_dataset / eval_dataset given); set dataset='generated' or drop them")
        return
    if generator is None:
        raise UserInputError("dataset='generated' trains on text the dense (uncompressed) model writes: pass it, "
                             "recover(compressed, tokenizer, config, generator=dense_model) (CLI: --generator MODEL), "
                             "or train on a corpus (dataset='c4')")
    if model is not None and generator.get_input_embeddings().weight.shape[0] != \
            model.get_input_embeddings().weight.shape[0]:
        raise UserInputError(f"the generator's vocabulary ({generator.get_input_embeddings().weight.shape[0]}) is not "
                             f"the model's ({model.get_input_embeddings().weight.shape[0]}): generate with the dense "
                             "model this one was compressed from")
    if config.generate_kind == "chat" and not questions:
        raise UserInputError("generate_kind='chat' needs the questions the dense model answers: "
                             "recover(..., generator=dense_model, questions=[...]) (CLI: --questions FILE)")


def _datasets(config: RecoveryConfig, tokenizer, train_dataset, eval_dataset, generator=None, questions=None):
    """The given datasets, or windows of ``config.dataset`` (validation from held-out documents) or of the text
    ``generator`` writes (validation: the last windows); the config then names the corpus that was read (C4
    unreachable: the offline sample)."""
    if (train_dataset is None or eval_dataset is None) and config.dataset == GENERATED:
        settings = settings_for(config.generate_kind, config.generate_count, config.generate_tokens)
        train, valid = generated_split(generator, tokenizer, config.seqlen, config.eval_windows, settings,
                                       questions=questions)
        return (config, train_dataset if train_dataset is not None else TokenWindows(train),
                eval_dataset if eval_dataset is not None else TokenWindows(valid))
    if train_dataset is None or eval_dataset is None:
        dataset, split = training_corpus(config.dataset)  # C4 unreachable: the offline sample, said in one line
        if dataset != config.dataset:
            config = RecoveryConfig(**{**config.to_dict(), "dataset": dataset})  # the metadata records what ran
    if train_dataset is None:
        train_dataset = TokenWindows(token_windows(dataset, tokenizer, config.seqlen, part="train", split=split))
    if eval_dataset is None:
        eval_dataset = TokenWindows(token_windows(dataset, tokenizer, config.seqlen, part="valid", split=split,
                                                  max_windows=config.eval_windows))
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise UserInputError("the training and validation datasets must not be empty")
    return config, train_dataset, eval_dataset


def recover(
    model: nn.Module,
    tokenizer,
    config: RecoveryConfig | None = None,
    *,
    train_dataset=None,
    eval_dataset=None,
    output_dir: str | os.PathLike | None = None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list | None = None,
    training_args: dict | None = None,
    attach: bool = True,
    teacher: nn.Module | None = None,
    shared_with: list[nn.Module] | None = None,
    generator: nn.Module | None = None,
    questions: list[str] | None = None,
    **overrides,
) -> RecoveryResult:
    """Trains a soft prompt that recovers ``model``'s quality (all weights frozen) and returns it.

    Args:
        model (`PreTrainedModel`): the compressed (or any) causal LM; packed layers pass gradients to their input.
        tokenizer: the model's tokenizer (training windows, TEXT initialisation).
        config (`RecoveryConfig`, *optional*): settings; keyword ``overrides`` replace single fields
            (``recover(model, tok, max_steps=50)``).
        train_dataset, eval_dataset (*optional*): datasets of ``{"input_ids": ...}`` examples; default: windows of
            ``config.dataset``, validation from held-out documents.
        output_dir (*optional*): the Trainer's folder (checkpoints every ``eval_steps``); a temporary one if `None`.
        resume_from_checkpoint (*optional*): passed to ``Trainer.train``.
        callbacks (*optional*): more ``TrainerCallback``s.
        training_args (`dict`, *optional*): extra ``TrainingArguments`` (e.g. DeepSpeed / FSDP settings); a key that
            the recipe sets already (``max_steps``, ``seed``, ...) is a ``TypeError``: change it through ``config``.
        attach (`bool`, defaults to `True`): attach the trained prompt to ``model``
            (:func:`~hf_compress_prompt.recovery.attach_recovery_prompt`).
        teacher (`nn.Module`, *optional*): train to match this model's next-token distributions (usually the
            uncompressed model; :class:`~.distill.DistillationTrainer`) instead of the corpus' next tokens.
            Validation stays the corpus perplexity.
        shared_with (`list[nn.Module]`, *optional*): other compressions of the same base model: one prompt is
            trained for all of them at once (:mod:`~.shared`; mean loss, one pass per model and step), and attached
            to each when ``attach``. ``best_perplexity`` is then the geometric mean over the models. PROMPT or
            PREFIX (the prefix's projection, if any, is shared too).
        generator (`nn.Module`, *optional*): with ``config.dataset="generated"``: the dense model whose own text
            (``config.generate_kind``, ``generate_count`` texts of up to ``generate_tokens``) is the training data,
            generated once and cached (:mod:`~.generated`); the last ``eval_windows`` windows validate.
        questions (`list[str]`, *optional*): what the generator answers for ``generate_kind="chat"``; keep them
            apart from any evaluation questions.

    Returns:
        `RecoveryResult` with the best-validation prompt.
    """

    config = _settings(config, overrides)
    if config.bf16 is None:  # the metadata records what ran
        config = RecoveryConfig(**{**config.to_dict(), "bf16": bf16_matmul_is_fast(_device_of(model))})
    method = _METHODS[config.method]
    partners = list(shared_with or [])
    _check_models(model, config, teacher, partners)
    _check_generator(model, config, generator, questions, given=train_dataset is not None and eval_dataset is not None)
    config, train_dataset, eval_dataset = _datasets(config, tokenizer, train_dataset, eval_dataset, generator,
                                                    questions)

    targets = [model, *partners]  # every model the prompt trains on
    previous = [recovery_prompt_of(m) for m in targets]
    for m, old in zip(targets, previous):
        if old is not None:
            detach_recovery_prompt(m)  # train on the bare model; a new prompt replaces the old one
    requires_grad = [{name: p.requires_grad for name, p in m.named_parameters()} for m in targets]
    trained = method.wrap(model, config, tokenizer)
    tied = []
    if partners:

        tied = [tie_prompt(trained, partner, trained.peft_config[trained.active_adapter]).eval()
                for partner in partners]
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    callback = BestValidationCallback()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loss = "shared prompt" if tied else "language modelling" if teacher is None else "distillation"
    trainer_class, trainer_extra = _LOSSES[loss](teacher, tied, config)
    with tempfile.TemporaryDirectory(prefix="hcp-recover-") as scratch, quiet_peft_forward():
        args = training_arguments(output_dir or scratch, seed=config.seed, overrides=training_args,
                                  **_schedule(config, save=output_dir is not None))
        trainer = build_trainer(trainer_class, args, callbacks=[callback, *(callbacks or [])], model=trained,
                                train_dataset=train_dataset, eval_dataset=eval_dataset,
                                data_collator=PromptTuningCollator(pad), **trainer_extra)
        with _without_adapters([trained, *tied]), callback.measuring_baseline():
            trainer.evaluate()  # the validation perplexity before training: history[0], the gain's reference
        logger.info("validation perplexity before training: %.3f", callback.baseline["perplexity"])
        start, peak_before = time.perf_counter(), _peak_rss_mb()
        try:
            output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        finally:
            if method.freezes_weights:
                for m, flags in zip(targets, requires_grad):
                    for name, p in m.named_parameters():
                        if name in flags:
                            p.requires_grad_(flags[name])
        seconds, peak_after = time.perf_counter() - start, _peak_rss_mb()
    steps_run = max(1, output.global_step)
    prompt = None
    if method.gives_prompt:
        base = trained.get_base_model()
        saved = trained.get_prompt_embedding_to_save(trained.active_adapter).detach().float().cpu()  # PEFT's layout
        prompt = method.prompt_of(trained, saved, _metadata(base, config, callback, output.global_step, teacher,
                                                            partners))
        for target, old in zip([base, *partners], previous):
            if attach:
                attach_recovery_prompt(target, prompt)
            elif old is not None:
                attach_recovery_prompt(target, old)
    elif previous[0] is not None:
        attach_recovery_prompt(model, previous[0])
    train_memory = None if peak_before is None or peak_after is None else peak_after - peak_before
    return RecoveryResult(prompt, trained, callback.best_perplexity, callback.best_step, callback.history, seconds,
                          output.metrics.get("train_runtime", seconds) / steps_run, trainable, peak_after,
                          train_memory, callback.baseline["perplexity"])


@contextlib.contextmanager
def _without_adapters(models: list[nn.Module]):
    """The PEFT models among ``models`` with their adapters (prompt, LoRA) disabled: the models as they were before
    training. A model trained in full (FULL) is itself before its first step."""
    from peft import PeftModel

    with contextlib.ExitStack() as stack:
        for m in models:
            if isinstance(m, PeftModel):
                stack.enter_context(m.disable_adapter())
        yield
