"""Quantizing the output head (``lm_head=True``): untied from the embedding, packed, saved and loaded back."""

import pytest
import torch

import hf_compress_prompt as hcp
from builders import build_tiny_llama
from hf_compress_prompt.compressors import GPTQConfig, RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.nn import QuantLinear


def _tied_llama():
    model = build_tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_rtn_head_is_untied_quantized_and_packed():
    model = _tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    result = compress_(model, RTNConfig(bits=4, group_size=64, lm_head=True), pack=False, progress=False)
    assert "lm_head" in result.quantized
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding keeps its float weights
    assert not torch.equal(model.lm_head.weight, embedding)  # the head now sits on the 4-bit grid
    assert torch.equal(model.lm_head.weight, result.quantized["lm_head"].dequantize(model.lm_head.weight.dtype))
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        fake = model(ids).logits

    packed = _tied_llama()
    compress_(packed, RTNConfig(bits=4, group_size=64, lm_head=True), progress=False)
    assert isinstance(packed.lm_head, QuantLinear)
    with torch.no_grad(), hcp.kernels.reference_only():
        torch.testing.assert_close(packed(ids).logits, fake, rtol=1e-4, atol=1e-4)


def test_head_is_left_alone_by_default():
    model = _tied_llama()
    compress_(model, RTNConfig(bits=4, group_size=64), progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_packed_head_survives_save_and_load(tmp_path):
    model = _tied_llama()
    compress_(model, RTNConfig(bits=4, group_size=64, lm_head=True), progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    hcp.save_pretrained(model, tmp_path / "m")
    loaded = hcp.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_gptq_quantizes_the_head_with_round_to_nearest(tiny_llama):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    result = compress_(tiny_llama, GPTQConfig(bits=4, group_size=64, lm_head=True), calibration_ids=ids, progress=False)
    assert isinstance(tiny_llama.lm_head, QuantLinear)
    assert result.reports[0].layers["lm_head"]["bits"] == 4


def test_bad_head_group_size_is_refused_before_any_work():
    model = _tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserInputError, match="group"):
        compress_(model, RTNConfig(bits=4, group_size=96, lm_head=True), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_head_can_take_other_bits_than_the_blocks():
    model = _tied_llama()
    result = compress_(model, RTNConfig(bits=4, group_size=64, lm_head=True, lm_head_bits=8), progress=False)
    assert result.quantized["lm_head"].bits == 8
    assert result.quantized["model.layers.0.self_attn.q_proj"].bits == 4
    assert model.lm_head.fmt.bits == 8
