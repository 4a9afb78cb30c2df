"""The one Trainer set-up: the recipe's settings and the shared defaults, the user's extra arguments on top (a
repeated key is a TypeError, as before), the caller's callbacks attached and the PrinterCallback removed."""

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from hf_compress_prompt.recovery.trainer_setup import build_trainer, training_arguments


def test_arguments_merge_the_recipe_the_defaults_and_the_user(tmp_path):
    args = training_arguments(tmp_path, seed=3, overrides={"gradient_accumulation_steps": 2}, max_steps=5,
                              learning_rate=0.1, bf16=False)
    assert (args.max_steps, args.learning_rate, args.gradient_accumulation_steps) == (5, 0.1, 2)
    assert (args.seed, args.data_seed, args.report_to, args.disable_tqdm) == (3, 3, [], True)
    assert args.output_dir == str(tmp_path) and not args.remove_unused_columns and args.dataloader_num_workers == 0
    assert args.use_cpu == (not torch.cuda.is_available())
    for key in ("max_steps", "seed", "report_to"):  # a recipe setting or a shared default: not replaced behind it
        with pytest.raises(TypeError, match=f"multiple values for keyword argument '{key}'"):
            training_arguments(tmp_path, seed=0, overrides={key: 1}, max_steps=5)


class _Marker(TrainerCallback):
    pass


def test_trainer_gets_the_callbacks_and_no_printer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    marker = _Marker()
    trainer = build_trainer(Trainer, training_arguments(tmp_path, seed=0, max_steps=1, bf16=False), model=model,
                            callbacks=[marker])
    callbacks = trainer.callback_handler.callbacks
    assert marker in callbacks
    assert not any(isinstance(cb, PrinterCallback) for cb in callbacks)
