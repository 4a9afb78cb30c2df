"""Builders shared by the tests: tiny random models and small text samples, all made in memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

VOCAB = 260  # 256 byte tokens + a few specials


# hidden 128 (4 heads of 32, 2 key/value heads), MLP 256, the byte vocabulary: the shape every tiny decoder shares
_DECODER = {"vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}


def build_llama(**overrides):
    """A tiny random Llama (seed 0) of the shared shape, ``overrides`` on its config (transformers' defaults
    otherwise: special tokens 1 / 2, no pad token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**_DECODER, **overrides})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def build_tiny_llama(num_layers: int = 2, max_positions: int = 512):
    """The tests' usual tiny Llama: byte tokens, token 256 for bos / eos / pad."""
    return build_llama(num_hidden_layers=num_layers, max_position_embeddings=max_positions, eos_token_id=256,
                       pad_token_id=256, bos_token_id=256)


def build_steerable_llama():
    """A tiny Llama whose random weights (std 0.1 instead of 0.02) let a 4-token prompt steer it."""
    return build_llama(initializer_range=0.1)


def build_other_llama():
    """A Llama of another shape and vocabulary (hidden 32, vocab 300): a model a prompt or teacher does not fit."""
    return build_llama(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)


def build_tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=128, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config).eval()


def build_tiny_gpt2():
    """A tiny GPT-2 (Conv1D layers, blocks under ``transformer.h``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def build_tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_DECODER, max_position_embeddings=128)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def build_tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**_DECODER, max_position_embeddings=128)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


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
