"""Packed checkpoints through transformers: registration, round trips for every format, generate, pipeline,
device_map, dequantize, and the failure modes of a damaged checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import (
    GPTQConfig,
    LayerDropConfig,
    MagnitudeConfig,
    Recipe,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
    compress_,
)
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.integrations import QUANT_METHOD, CompressedConfig, CompressedHfQuantizer, register
from hf_compress_prompt.kernels import reference_only
from hf_compress_prompt.nn import BitmaskSparseLinear, GrowingCache, NMSparseLinear, PackedLinear, QuantLinear

CASES = {  # name -> (steps, runtime class of the block linears)
    "gptq-w4-g32-actorder": ([GPTQConfig(bits=4, group_size=32, act_order=True)], QuantLinear),
    "rtn-w3-perchannel": ([RTNConfig(bits=3)], QuantLinear),
    "rtn-w8-g64-sym": ([RTNConfig(bits=8, group_size=64, symmetric=True)], QuantLinear),
    "rtn-w2-g32": ([RTNConfig(bits=2, group_size=32)], QuantLinear),
    "rtn-w4-g64 (C kernel on CPU)": ([RTNConfig(bits=4, group_size=64)], QuantLinear),
    "sparsegpt-2:4": ([SparseGPTConfig(sparsity="2:4")], NMSparseLinear),
    "wanda-4:8": ([WandaConfig(sparsity="4:8")], NMSparseLinear),
    "magnitude-50%": ([MagnitudeConfig(sparsity=0.5)], BitmaskSparseLinear),
    "sparsegpt-50%+w4 joint": ([SparseGPTConfig(sparsity=0.5, bits=4, group_size=32)], BitmaskSparseLinear),
    "sparsegpt-2:4+w4 joint": ([SparseGPTConfig(sparsity="2:4", bits=4, group_size=32)], NMSparseLinear),
    "wanda-50% then gptq-w4": ([WandaConfig(sparsity=0.5), GPTQConfig(bits=4, group_size=64)], BitmaskSparseLinear),
}


def _block_linears(model):
    return {n: m for n, m in model.named_modules() if ".layers." in n and n.endswith(("proj", "fc1", "fc2"))}


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    register()
    register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is CompressedConfig
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is CompressedHfQuantizer
    assert CompressedHfQuantizer.requires_calibration
    quantizer = CompressedHfQuantizer(CompressedConfig())
    assert quantizer.is_serializable() and quantizer.is_trainable


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_gives_the_same_logits(tiny_llama, calib, ids, tmp_path, case):
    from builders import build_tiny_llama
    from transformers import AutoModelForCausalLM

    steps, cls = CASES[case]
    dense_copy = build_tiny_llama()
    compress_(dense_copy, Recipe(steps), calibration_ids=calib, pack=False, progress=False)
    compress_(tiny_llama, Recipe(steps), calibration_ids=calib, progress=False)
    assert all(isinstance(m, cls) for m in _block_linears(tiny_llama).values())
    with torch.no_grad():
        packed_logits = tiny_llama(ids).logits
        # packing is lossless: with the reference ops the packed model computes what the fake-quantized dense
        # model computes (the int4 kernel also quantizes activations; tests/kernels bound that difference)
        with reference_only():
            torch.testing.assert_close(tiny_llama(ids).logits, dense_copy(ids).logits, rtol=0, atol=1e-4)
        hcp.save_pretrained(tiny_llama, tmp_path / "m")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert all(isinstance(m, cls) for m in _block_linears(loaded).values())
        assert (loaded(ids).logits - packed_logits).abs().max() <= 1e-4
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == QUANT_METHOD and saved["format_version"] == 1
    assert len(saved["layers"]) == 14 and saved["recipe"]["steps"] == [s.to_dict() for s in steps]
    assert not list((tmp_path / "m").glob("*.bin"))  # safetensors only
    out = loaded.generate(ids[:1, :5], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, tiny_llama.generate(ids[:1, :5], max_new_tokens=5, do_sample=False))
    assert isinstance(out.past_key_values, GrowingCache)  # loading installs use_growing_cache


def test_packed_checkpoint_is_smaller(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "dense")
    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    hcp.save_pretrained(tiny_llama, tmp_path / "packed")
    dense, packed = load_file(tmp_path / "dense" / "model.safetensors"), load_file(tmp_path / "packed" / "model.safetensors")

    def linear_bytes(tensors):
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if ".layers." in k and "proj" in k)

    # int4 codes (0.5 B) + fp32 scale and uint8 zero per 32 weights (5/32 B) vs 4 B: 0.164x
    assert linear_bytes(packed) < 0.17 * linear_bytes(dense)


def test_opt_with_biases_and_gpt2_conv1d_round_trip(calib, ids, tmp_path):
    from builders import build_tiny_gpt2, build_tiny_opt
    from transformers import AutoModelForCausalLM

    gpt2 = build_tiny_gpt2()
    for name, model in (("opt", build_tiny_opt()), ("gpt2", gpt2)):
        reference = model(ids).logits
        compress_(model, SparseGPTConfig(sparsity=0.5, bits=4, group_size=32), calibration_ids=calib, progress=False)
        with torch.no_grad():
            packed_logits = model(ids).logits
        assert not torch.equal(packed_logits, reference)
        hcp.save_pretrained(model, tmp_path / name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            assert (loaded(ids).logits - packed_logits).abs().max() <= 1e-4
        assert any(isinstance(m, PackedLinear) and m.bias is not None for m in loaded.modules())


def test_layer_drop_and_quantization_round_trip(tiny_llama, calib, ids, tmp_path):
    from builders import build_tiny_llama
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(num_layers=4)
    compress_(model, Recipe([LayerDropConfig(layers=[1]), GPTQConfig(bits=4, group_size=32)]), calibration_ids=calib,
              progress=False)
    hcp.save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.num_hidden_layers == 3 and loaded.config.quantization_config.dropped_layers == [1]
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_pipeline_device_map_and_dequantize(tiny_llama, byte_tokenizer, calib, tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    compress_(tiny_llama, GPTQConfig(bits=4, group_size=32), calibration_ids=calib, progress=False)
    hcp.save_pretrained(tiny_llama, tmp_path / "m", tokenizer=byte_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="auto")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    generator = pipeline("text-generation", model=loaded, tokenizer=byte_tokenizer)
    text = generator("abc", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("abc") and len(text) > 3
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = loaded(ids).logits
        loaded.dequantize()
        assert not any(isinstance(m, PackedLinear) for m in loaded.modules())
        torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=1e-5)


def test_hf_compress_prompt_from_pretrained_matches_auto_class(tiny_llama, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    hcp.save_pretrained(tiny_llama, tmp_path / "m")
    model = hcp.from_pretrained(tmp_path / "m")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in auto.named_modules()}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, auto(ids).logits, rtol=0, atol=0)  # the same model, loaded either way
        torch.testing.assert_close(logits, tiny_llama(ids).logits)  # and the one that was saved


def test_quantizing_a_dense_model_on_the_fly_fails_loudly(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(UserInputError, match="compress it with hf_compress_prompt"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=CompressedConfig())


def test_compressing_a_packed_model_again_is_an_error(tiny_llama):
    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(UserInputError, match="already holds packed"):
        compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)


def test_loading_without_the_import_fails_loudly(tiny_llama, tmp_path):
    compress_(tiny_llama, RTNConfig(bits=8, group_size=32), progress=False)  # 8-bit: codes could fit a dense shape
    hcp.save_pretrained(tiny_llama, tmp_path / "m")
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0  # never a silently random dense model
    assert "Unknown quantization type, got hf_compress_prompt" in proc.stderr and "MISMATCH" in proc.stderr


# ----- a damaged checkpoint fails with an error naming the tensor or file --------------------------------------------
@pytest.fixture
def saved(tiny_llama, tmp_path):
    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    return hcp.save_pretrained(tiny_llama, tmp_path / "m")


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    from transformers import AutoModelForCausalLM

    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(UserInputError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight_scale'"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_mis_shaped_tensor_is_named(saved):
    from transformers import AutoModelForCausalLM

    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:, :-1].contiguous()

    _rewrite(saved, cut)
    with pytest.raises(UserInputError, match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' .* has shape"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_unknown_format_version_is_an_error(saved):
    from transformers import AutoModelForCausalLM

    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="format_version=99 is not supported"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_truncated_file_is_named(saved):
    from transformers import AutoModelForCausalLM

    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserInputError, match=r"model\.safetensors: truncated safetensors file"):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("case", ["gptq-w4-g32-actorder", "sparsegpt-2:4+w4 joint", "magnitude-50%"])
def test_gradients_reach_the_input_through_packed_layers(calib, ids, case):
    # what prompt tuning needs: d loss / d inputs_embeds through frozen compressed layers, as in the dense model
    from builders import build_tiny_llama

    steps, _ = CASES[case]
    packed, dense = build_tiny_llama(), build_tiny_llama()
    compress_(packed, Recipe(steps), calibration_ids=calib, progress=False)
    compress_(dense, Recipe(steps), calibration_ids=calib, pack=False, progress=False)
    grads = []
    for model in (packed, dense):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        grads.append(embeds.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad and p.grad is not None for m in packed.modules() if isinstance(m, PackedLinear)
                   for p in m.parameters())
