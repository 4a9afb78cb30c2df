"""The one ``transformers.Trainer`` set-up behind every training loop of the package: :func:`~.train.recover`
(prompt, LoRA, full; language modelling, distillation or one prompt shared by several models) and
:func:`~hf_compress_prompt.compressors.compresso.compresso_prune`.

Each caller states the settings its recipe fixes (steps, batch, learning rate, schedule, evaluation); this module adds
what all of them share (seeds, CPU when no GPU is present, no reporting, no progress bar, no worker processes,
the collator sees every column), adds the user's extra ``TrainingArguments``, builds the trainer with the
caller's callbacks, and keeps stdout clean. The user's arguments add to these, they do not replace them: a key
set here or by the recipe is a ``TypeError`` ("got multiple values for keyword argument ..."); the recipe's own
settings change through its config.
"""

from __future__ import annotations

import os

import torch

__all__ = ["build_trainer", "training_arguments"]


def training_arguments(output_dir: str | os.PathLike, *, seed: int, overrides: dict | None = None, **settings):
    """``TrainingArguments`` for one of the package's training loops.

    Args:
        output_dir (`str` or `os.PathLike`): the Trainer's folder (checkpoints, if the settings save any).
        seed (`int`): the seed of initialisation and of the data order (``seed`` and ``data_seed``).
        overrides (`dict`, *optional*): the user's extra ``TrainingArguments`` (e.g. DeepSpeed / FSDP settings);
            a key that is also set here or in ``settings`` is a ``TypeError``.
        **settings: what the caller's recipe fixes (``max_steps``, ``learning_rate``, ``bf16``, ...).
    """
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), use_cpu=not torch.cuda.is_available(), seed=seed,
                             data_seed=seed, remove_unused_columns=False, report_to=[], disable_tqdm=True,
                             dataloader_num_workers=0, **settings, **(overrides or {}))


def build_trainer(trainer_class: type, args, *, callbacks: list | None = None, **trainer_kwargs):
    """``trainer_class(args=args, callbacks=callbacks, **trainer_kwargs)`` without the ``PrinterCallback`` (the Trainer
    adds it when the progress bar is off): the callers return their history, so stdout stays clean.

    Args:
        trainer_class (`type`): ``transformers.Trainer`` or a subclass (distillation, shared prompt, Compresso).
        args (`TrainingArguments`): usually from :func:`training_arguments`.
        callbacks (`list[TrainerCallback]`, *optional*): the caller's callbacks, then the user's.
        **trainer_kwargs: ``model``, datasets, ``data_collator`` and the subclass's own arguments.
    """
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_class(args=args, callbacks=list(callbacks or []), **trainer_kwargs)
    trainer.remove_callback(PrinterCallback)  # a no-op when a progress bar was asked for instead
    return trainer
