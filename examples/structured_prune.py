"""Structured pruning of SmolLM2 to 20% fewer parameters: Compresso (learned L0 gates + LoRA, collaborative prompt)
against the one-shot L2 baseline, then a 4-bit quantization of the pruned model, saved and loaded back in one call.

    .venv/bin/python examples/structured_prune.py          # about 15 minutes on 2 cores
"""

import torch
from transformers import AutoModelForCausalLM

import hf_compress_prompt as hcp  # registers pruned_llama and the compressed-model loader with transformers
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.compressors.compresso import CompressoConfig, compresso_prune
from hf_compress_prompt.compressors.structured import count_parameters, prune_structured
from hf_compress_prompt.demo import demo_datasets

torch.set_num_threads(2)
model, tokenizer = hcp.load_model_and_tokenizer()
dataset = demo_datasets()[0]  # wikitext2 with ../shared/data or the Hub, else the Wikipedia sample inside gensim
wikitext = hcp.eval_tokens(dataset, tokenizer, "test")


def ppl(m) -> float:
    return hcp.perplexity(m, wikitext, seqlen=2048, max_windows=4, autocast_bf16=True, progress=False).perplexity


print(f"dense: {count_parameters(model):,} parameters, {dataset} {ppl(model):.2f}")
baseline, _ = prune_structured(model, 0.2, criterion="l2")
print(f"one-shot L2: {count_parameters(baseline):,} parameters, {dataset} {ppl(baseline):.2f}")

result = compresso_prune(model, tokenizer, CompressoConfig(target=0.2, max_steps=100, multiple_of=32))
# (compresso_prune changes `model`; use the result)
pruned = result.model
print(f"Compresso: {result.parameters_after:,} parameters ({result.removed_fraction:.1%} removed) in "
      f"{result.seconds:.0f} s; heads per layer {pruned.config.layer_num_attention_heads}, hidden "
      f"{pruned.config.hidden_size}; {dataset} with its collaborative prompt {ppl(pruned):.2f}")

compress_(pruned, RTNConfig(bits=4, group_size=32), progress=False)  # kept widths are multiples of 32
print(f"+ RTN 4-bit g32: {dataset} {ppl(pruned):.2f}")
hcp.save_pretrained(pruned, "out/compresso20-w4", tokenizer, overwrite=True)  # replaces an earlier run's
loaded = AutoModelForCausalLM.from_pretrained("out/compresso20-w4")  # per-layer sizes, packed layers and prompt
ids = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(loaded.generate(**ids, max_new_tokens=12, do_sample=False)[0]))
