"""Atomic saving, and GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout) loaded into our modules on CPU."""

import json

import pytest
import torch
from safetensors.torch import save_file

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.formats import write_gptq_layer
from hf_compress_prompt.methods.rtn import rtn_quantize
from hf_compress_prompt.nn import QuantLinear


def test_save_is_atomic(tiny_llama, tmp_path, monkeypatch):
    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    target = tmp_path / "m"

    class Interrupted(Exception):
        pass

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise Interrupted  # the weights are written, the save is not finished

    with pytest.raises(Interrupted):
        hcp.save_pretrained(tiny_llama, target, tokenizer=BrokenTokenizer())
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing half-written is left behind
    hcp.save_pretrained(tiny_llama, target)
    first = (target / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(Interrupted):
        hcp.save_pretrained(tiny_llama, target, tokenizer=BrokenTokenizer())
    assert (target / "model.safetensors").stat().st_mtime_ns == first  # the previous good save is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _write_gptq_checkpoint(model, folder, bits, group_size, desc_act, checkpoint_format):
    """A GPTQ checkpoint in the AutoGPTQ/optimum layout, and the dense model it stands for (fp16 scales)."""
    torch.manual_seed(0)
    tensors, reference = {}, {}
    for name, module in model.named_modules():
        if ".layers." not in name or not isinstance(module, torch.nn.Linear):
            continue
        W = module.weight.detach()
        out_f, in_f = W.shape
        size = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f) // size
        if desc_act:  # act-order without static groups: columns visited in a permuted order, groups follow it
            perm = torch.randperm(in_f)
            g_idx = torch.empty(in_f, dtype=torch.long)
            g_idx[perm] = torch.arange(in_f) // size
        qw = rtn_quantize(W, bits, -1, False)  # any codes will do; scales per group below
        groups = in_f // size
        scale = (torch.rand(out_f, groups) * 0.02 + 0.005).half().float()
        zero = torch.randint(1, 2**bits, (out_f, groups)).float()
        codes = qw.codes
        for k, v in write_gptq_layer(codes, scale, zero, g_idx, bits, checkpoint_format).items():
            tensors[f"{name}.{k}"] = v
        reference[name] = scale[:, g_idx] * (codes.float() - zero[:, g_idx])
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in reference:
            tensors[key] = value.contiguous()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False,
        "checkpoint_format": checkpoint_format, "true_sequential": True, "damp_percent": 0.01,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return reference


@pytest.mark.parametrize("bits,group_size,desc_act,checkpoint_format", [
    (4, 32, False, "gptq"), (4, 32, True, "gptq"), (3, 64, True, "gptq"), (8, -1, False, "gptq_v2"), (2, 32, False, "gptq"),
])
def test_gptq_checkpoint_loads_on_cpu_without_gptqmodel(tmp_path, bits, group_size, desc_act, checkpoint_format):
    from builders import build_tiny_llama

    model = build_tiny_llama()
    reference = _write_gptq_checkpoint(model, tmp_path / "gptq", bits, group_size, desc_act, checkpoint_format)
    with torch.no_grad():
        for name, weight in reference.items():
            model.get_submodule(name).weight.copy_(weight)
    loaded = hcp.from_pretrained(tmp_path / "gptq")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(reference)
    assert all(m.fmt.g_idx == desc_act for m in layers.values())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), hcp.kernels.reference_only():  # exact maths; the kernels' int8 activations are tested apart
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-4
    # and it re-saves in our own format, which loads with the auto class
    hcp.save_pretrained(loaded, tmp_path / "native")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert again.config.quantization_config.checkpoint_format == "native"
    assert again.config.quantization_config.recipe["imported_from"]["quant_method"] == "gptq"
    with torch.no_grad(), hcp.kernels.reference_only():
        assert (again(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_gptq_checkpoint_with_a_wrong_shape_is_named(tmp_path):
    from builders import build_tiny_llama
    from safetensors.torch import load_file

    from hf_compress_prompt.errors import UserInputError

    _write_gptq_checkpoint(build_tiny_llama(), tmp_path / "gptq", 4, 32, False, "gptq")
    path = tmp_path / "gptq" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"][:-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserInputError, match=r"'model\.layers\.0\.mlp\.up_proj\.scales' .* has shape"):
        hcp.from_pretrained(tmp_path / "gptq")


def test_sharded_save_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    folder = hcp.save_pretrained(tiny_llama, tmp_path / "m", max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (loaded(ids).logits - tiny_llama(ids).logits).abs().max() <= 1e-4
    # a missing shard names the tensor it held
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    victim = next(name for name in index if name.endswith("weight_scale"))
    shard = folder / index[victim]
    from safetensors.torch import load_file

    tensors = load_file(shard)
    tensors.pop(victim)
    save_file(tensors, shard, metadata={"format": "pt"})
    from hf_compress_prompt.errors import UserInputError

    with pytest.raises(UserInputError, match=f"missing tensor '{victim}'"):
        AutoModelForCausalLM.from_pretrained(folder)
