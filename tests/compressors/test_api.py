import pytest
import torch

from hf_compress_prompt.compressors import RECIPE_CONFIG_KEY, GPTQQuantizer, SparseGPTPruner, WandaPruner


def test_optimum_style_quantizer_calibrates_saves_and_reloads(tiny_llama, byte_tokenizer, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    quantizer = GPTQQuantizer(bits=4, group_size=32, dataset="c4", nsamples=4, seqlen=16)
    model = quantizer.quantize_model(tiny_llama, byte_tokenizer, progress=False)
    assert quantizer.result is not None and len(quantizer.result.quantized) == 14
    quantizer.save(model, tmp_path / "model", tokenizer=byte_tokenizer)  # tmp_path holds the data folder too
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.to_dict()[RECIPE_CONFIG_KEY]["steps"][0] == {
        "method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "act_order": True, "damp": 0.01,
        "block_size": 128, "true_sequential": True, "lm_head": False, "lm_head_bits": None,
    }
    assert reloaded.config.to_dict()[RECIPE_CONFIG_KEY]["calibration"]["dataset"] == "c4"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("cls, kwargs", [(SparseGPTPruner, {"sparsity": "2:4", "bits": 4}), (WandaPruner, {"sparsity": 0.5})])
def test_pruners(tiny_llama, byte_tokenizer, data_dir, cls, kwargs):
    blocks = [name for name, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    pruner = cls(dataset="c4", nsamples=2, seqlen=16, **kwargs)
    pruner.prune_model(tiny_llama, byte_tokenizer, progress=False)
    assert sorted(pruner.result.masks) == sorted(blocks) and len(blocks) == 14  # every linear layer of both blocks
    assert all(abs(float(m.float().mean()) - 0.5) < 1e-6 for m in pruner.result.masks.values())
    assert "dataset='c4'" in repr(pruner)


def test_unknown_arguments_fail_at_construction():
    with pytest.raises(TypeError):
        GPTQQuantizer(bitz=4)


def test_optimum_quantizer_interface_loads_compresses_and_saves(tiny_llama_dir, tmp_path):
    from optimum.quantization_base import OptimumQuantizer
    from transformers import AutoModelForCausalLM

    from hf_compress_prompt.compressors import MagnitudePruner
    from hf_compress_prompt.errors import UserInputError

    pruner = MagnitudePruner.from_pretrained(tiny_llama_dir, sparsity="2:4")
    assert isinstance(pruner, OptimumQuantizer)
    out = pruner.quantize(tmp_path / "out", progress=False)
    saved = AutoModelForCausalLM.from_pretrained(out)
    down = saved.model.layers[1].mlp.down_proj
    assert type(down).__name__ == "NMSparseLinear"  # saved packed, loaded packed
    assert float((down.dequantize_weight() == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(UserInputError, match="holds no model"):
        MagnitudePruner().quantize(tmp_path / "x")
