"""Compress SmolLM2 (GPTQ 3-bit g64), train a recovery prompt with transformers' Trainer, compare perplexity,
save the packed model with its prompt and load it back with AutoModelForCausalLM.from_pretrained.

    .venv/bin/python examples/recover_prompt.py            # about 10 minutes on 2 cores
"""

import torch
from transformers import AutoModelForCausalLM

import hf_compress_prompt as hcp  # registers the compressed-model loader with transformers
from hf_compress_prompt.compressors import CalibrationConfig, GPTQConfig, Recipe, compress_
from hf_compress_prompt.compressors.pack import pack_model
from hf_compress_prompt.recovery.train import RecoveryConfig, recover
from hf_compress_prompt.demo import demo_datasets

torch.set_num_threads(2)
model, tokenizer = hcp.load_model_and_tokenizer()
dataset = demo_datasets()[0]  # wikitext2 with ../shared/data or the Hub, else the Wikipedia sample inside gensim
wikitext = hcp.eval_tokens(dataset, tokenizer, "test")


def ppl(m) -> float:
    return hcp.perplexity(m, wikitext, seqlen=2048, max_windows=4, autocast_bf16=True, progress=False).perplexity


dense = ppl(model)
# pack=False keeps fake-quantized dense weights: fast to train through; pack_model packs them afterwards
result = compress_(model, Recipe([GPTQConfig(bits=3, group_size=64)], CalibrationConfig(nsamples=32)),
                   tokenizer=tokenizer, pack=False)
compressed = ppl(model)
trained = recover(model, tokenizer, RecoveryConfig(num_virtual_tokens=100, seqlen=256, max_steps=40, eval_steps=20))
recovered = ppl(model)  # the prompt is attached to the model now
print(f"{dataset} perplexity: dense {dense:.2f}, GPTQ 3-bit {compressed:.2f}, + prompt {recovered:.2f} "
      f"(validation before training {trained.baseline_perplexity:.2f}, best {trained.best_perplexity:.2f} "
      f"at step {trained.best_step})")

pack_model(model, result)
hcp.save_pretrained(model, "out/smollm2-gptq3-recovered", tokenizer, overwrite=True)  # + recovery_prompt/
reloaded = AutoModelForCausalLM.from_pretrained("out/smollm2-gptq3-recovered")  # the prompt is attached again
ids = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(reloaded.generate(**ids, max_new_tokens=20, do_sample=False)[0]))
