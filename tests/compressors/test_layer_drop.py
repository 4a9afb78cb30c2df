import pytest
import torch

from builders import build_tiny_llama
from hf_compress_prompt.compressors import LayerDropConfig, LayerDropper, choose_layers_to_drop, compress_, drop_layers


def _deep_llama(layers=6):
    return build_tiny_llama(num_layers=layers, max_positions=256)


def test_dropped_model_saves_reloads_and_generates_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _deep_llama()
    compress_(model, LayerDropConfig(layers=[1, 4]), progress=False)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    prompt = torch.tensor([[5, 6, 7, 8]])
    cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    uncached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # the KV cache indexes the renumbered layers correctly
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, do_sample=False))


def test_dropping_keeps_the_other_layers_outputs():
    model, reference = _deep_llama(), _deep_llama()
    drop_layers(model, [0, 1, 2, 3, 4])
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        # The only kept layer is the reference's last: feed it the embeddings directly in both models.
        expected = reference.model.layers[5](
            reference.model.embed_tokens(ids), position_embeddings=reference.model.rotary_emb(
                reference.model.embed_tokens(ids), torch.arange(5)[None]), position_ids=torch.arange(5)[None])
        got = model.model.layers[0](
            model.model.embed_tokens(ids), position_embeddings=model.model.rotary_emb(
                model.model.embed_tokens(ids), torch.arange(5)[None]), position_ids=torch.arange(5)[None])
    torch.testing.assert_close(got, expected)


def test_scored_choice_is_deterministic_and_prefers_layers_that_change_little():
    model = _deep_llama()
    with torch.no_grad():  # make layer 3 nearly an identity: its outputs add almost nothing to the residual
        model.model.layers[3].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[3].mlp.down_proj.weight.mul_(1e-4)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for score in ("block_influence", "angular_distance"):
        chosen, scores = choose_layers_to_drop(model, calib, 1, score=score, progress=False)
        assert chosen == [3] and scores.index(min(scores)) == 3
        assert choose_layers_to_drop(model, calib, 1, score=score, progress=False)[0] == chosen
    run, _ = choose_layers_to_drop(model, calib, 2, score="angular_distance", progress=False)
    assert len(run) == 2 and run[1] == run[0] + 1 and 3 in run  # a contiguous run through the near-identity


def test_fraction_rounds_to_a_layer_count(byte_tokenizer, data_dir):
    model = _deep_llama(layers=10)
    dropper = LayerDropper(fraction=0.2, dataset="c4", nsamples=2, seqlen=16)
    dropper.prune_model(model, byte_tokenizer, progress=False)
    assert model.config.num_hidden_layers == 8 and len(dropper.result.reports[0].dropped_layers) == 2


def test_bad_indices():
    from hf_compress_prompt.errors import UserInputError

    with pytest.raises(UserInputError, match=r"out of range for a model with 6 layers"):
        drop_layers(_deep_llama(), [6])
