"""Builders shared by the tests: tiny random models and small text samples, all made in memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

VOCAB = 260  # 256 byte tokens + a few specials


def build_tiny_llama(num_layers: int = 2, max_positions: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def build_tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=128, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config).eval()


TINY_MODELS = {"llama": build_tiny_llama, "opt": build_tiny_opt}

WIKITEXT_RAW = " \n = Title One = \n \n Some text about the first thing . \n \n = = Part = = \n \n More words here . \n"
PTB_LINES = " no it was n't black monday \n but while the new york stock exchange did n't fall apart \n"
C4_DOCS = [
    "A short first document.",
    "The second document is a little longer than the first one, with more words in it than before.",
    "Third.",
]


def shared_data_root() -> Path | None:
    """The real ../shared/data (or $HF_COMPRESS_PROMPT_DATA as set outside the tests), when present."""
    from hf_compress_prompt.data.corpora import _default_roots

    override = os.environ.get("HF_COMPRESS_PROMPT_DATA")
    for root in ([Path(override)] if override else []) + _default_roots():
        if (root / "wikitext-2-raw" / "wiki.test.raw").is_file():
            return root
    return None


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    """``||W X^T - Q X^T||_F^2``: the layer-wise reconstruction loss GPTQ and SparseGPT minimise."""
    return ((X @ (W - Q).T) ** 2).sum().item()


# ----- task data (knowledge-intensive evaluation) -----
TRIVIA = [("What type of animal is a dik-dik?", "Antelope", ["Antelope", "Antelopes"]),
          ("Which planet is known as the red planet?", "Mars", ["Mars", "Planet Mars"]),
          ("What is the capital of France?", "Paris", ["Paris"]),
          ("Who wrote Hamlet?", "William Shakespeare", ["Shakespeare", "William Shakespeare"])]
STORY = ("(CNN) -- Maria Lopez opened a bakery in Springfield on Monday.\n\nThe bakery sells bread made by Maria "
         "Lopez herself, and the mayor of Springfield attended.\n\n@highlight\n\nMaria Lopez opens a bakery in "
         "Springfield\n\n@highlight\n\nThe mayor came to the opening\n")


def greedy_with_prompt_recomputed(model, prompt, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by the definition of prompt tuning (batch without padding): the prompt's embeddings before the
    tokens, everything recomputed every step, no cache. Returns the whole sequence `(batch, len + steps)`."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            embeds = torch.cat([prompt.embedding.unsqueeze(0).expand(len(seq), -1, -1),
                                model.get_input_embeddings()(seq)], dim=1)
            seq = torch.cat([seq, model(inputs_embeds=embeds, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq
