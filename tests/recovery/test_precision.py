"""Frozen linear weights held in bf16 while training: the same logits under autocast, the model given back as it was
(fp32 weights, the same parameter objects, the head's tie to the embedding), trainable weights untouched."""

import torch

from hf_compress_prompt.recovery.precision import frozen_linear_weights_as


def test_frozen_weights_cast_inside_and_given_back():
    from builders import build_tiny_llama

    model = build_tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # one linear trains: it stays
    before = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids).logits
    with frozen_linear_weights_as(model, torch.bfloat16) as cast:
        q = model.model.layers[1].self_attn.q_proj.weight
        assert q.dtype == torch.bfloat16 and not q.requires_grad
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert model.model.embed_tokens.weight.dtype == torch.float32  # the residual stream keeps fp32
        assert model.model.layers[0].mlp.down_proj.weight is trainable and trainable.dtype == torch.float32
        assert cast == 2 * 7 - 1 + 1  # 7 linears per block, one trainable; the head
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = model(input_ids=ids).logits
    assert torch.equal(inside, reference)  # the casts autocast makes, made once: the same numbers
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[k] is p for k, p in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with frozen_linear_weights_as(model, None) as cast:
        assert cast == 0 and model.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32
