"""Perplexity of the embedded default model from Python: the same numbers `hf-compress-prompt eval` prints.

    .venv/bin/python examples/perplexity.py
"""

import torch

from hf_compress_prompt import eval_tokens, load_model_and_tokenizer, perplexity

torch.set_num_threads(2)
model, tokenizer = load_model_and_tokenizer()  # SmolLM2-135M-Instruct, converted from its GGUF once, then cached
for dataset in ("wikitext2", "wiki_sample"):  # wikitext2 needs ../shared/data or the Hub; wiki_sample ships with gensim
    try:
        ids = eval_tokens(dataset, tokenizer, "test")
    except FileNotFoundError as exc:
        print(f"{dataset}: skipped ({exc})")
        continue
    print(dataset, perplexity(model, ids, seqlen=2048, max_windows=2, autocast_bf16=True))
