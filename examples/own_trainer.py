"""Bring your own Trainer: the public pieces recover() is made of (a PEFT prompt-tuning model, the collator, the
best-validation callback), here with TrainingArguments you control (accelerate / DeepSpeed / FSDP configs plug in
the usual way). Runs a few steps on the embedded SmolLM2.

    .venv/bin/python examples/own_trainer.py
"""

import torch
from transformers import Trainer, TrainingArguments

import hf_compress_prompt as hcp
from hf_compress_prompt.integrations.trainer_callbacks import BestValidationCallback
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, save_recovery_prompt
from hf_compress_prompt.recovery.data import PromptTuningCollator, TokenWindows, token_windows
from hf_compress_prompt.recovery.train import RecoveryConfig, prompt_tuning_model

torch.set_num_threads(2)
model, tokenizer = hcp.load_model_and_tokenizer()
peft_model = prompt_tuning_model(model, RecoveryConfig(num_virtual_tokens=20))  # first-20-vocabulary initialisation
train = TokenWindows(token_windows("c4", tokenizer, 128, part="train"))
valid = TokenWindows(token_windows("c4", tokenizer, 128, part="valid", max_windows=4))
best = BestValidationCallback()
args = TrainingArguments("out/own-trainer", max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3,
                         eval_strategy="steps", eval_steps=3, save_strategy="no", bf16=True, use_cpu=True,
                         remove_unused_columns=False, report_to=[])
Trainer(model=peft_model, args=args, train_dataset=train, eval_dataset=valid,
        data_collator=PromptTuningCollator(tokenizer.pad_token_id or 0), callbacks=[best]).train()
print("validation perplexity by step:", [(h["step"], round(h["perplexity"], 2)) for h in best.history])

peft_model.save_pretrained("out/own-trainer/prompt")  # PEFT's own format works too
prompt = RecoveryPrompt(peft_model.get_prompt_embedding_to_save("default").detach().float())
save_recovery_prompt(prompt, "out/own-trainer/recovery_prompt", model, overwrite=True)
attach_recovery_prompt(model, prompt)  # KV-cached prompt for generate / pipeline
