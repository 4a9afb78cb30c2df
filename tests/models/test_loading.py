import pytest
import torch

from hf_compress_prompt.errors import MissingResourceError, UserInputError
from hf_compress_prompt.models import load_model_and_tokenizer, resolve_model_source


def test_loads_a_checkpoint_folder_in_eval_mode(tiny_llama_dir, tiny_llama):
    model, tokenizer = load_model_and_tokenizer(tiny_llama_dir)
    assert not model.training and tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits)


def test_bfloat16_weights(tiny_llama_dir):
    model, _ = load_model_and_tokenizer(tiny_llama_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match=r"is a 'vit' model, which AutoModelForCausalLM cannot load") as info:
        load_model_and_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_a_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(MissingResourceError, match=r"neither a checkpoint folder") as info:
        load_model_and_tokenizer(tmp_path / "nowhere")
    assert "\n" not in str(info.value)


def test_a_folder_without_tokenizer_is_refused(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(MissingResourceError, match=r"has no usable tokenizer"):
        load_model_and_tokenizer(tmp_path)


def test_names_other_than_the_default_pass_through():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
