"""Every damaged compressed checkpoint fails before loading with one line that names the file (and the tensor) and
the fix, as a UserInputError (the CLI's exit 2): one row per kind of damage."""

import json
import struct

import pytest
import torch

import hf_compress_prompt as hcp
from hf_compress_prompt.cli import EXIT_USAGE, main
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.integrations.safetensors_check import CheckpointError, read_header


def _edit_header(path, change):
    """Rewrites a safetensors file's JSON header (``change(header) -> header``), keeping its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8:8 + length]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _header(change):
    return lambda folder: _edit_header(folder / "model.safetensors", change)


def _rename_lm_head(header):
    header["lm_head.weightX"] = header.pop("lm_head.weight")
    return header


def _drop_offsets(header):
    del header["model.norm.weight"]["data_offsets"]
    return header


def _overlap(header):
    start = header["lm_head.weight"]["data_offsets"][0]
    header["model.norm.weight"]["data_offsets"] = [start, start + 4 * 128]  # on top of lm_head's first bytes
    return header


def _past_the_end(header):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + 4096, end + 4096]
    return header


def _wrong_embedding_shape(header):
    header["model.embed_tokens.weight"]["shape"] = [130, 256]  # same bytes, another shape
    return header


def _quant_config(change):
    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))

    return damage


def _remove(name):
    return lambda folder: (folder / name).unlink()


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


CASES = {  # name -> (sharded folder?, damage(folder), what the one line must say)
    "dense tensor missing (lm_head renamed)": (
        False, _header(_rename_lm_head), r"model\.safetensors is missing tensor 'lm_head\.weight'.*save the model again"),
    "dense tensor mis-shaped": (
        False, _header(_wrong_embedding_shape),
        (r"tensor 'model\.embed_tokens\.weight' in .*model\.safetensors has shape \[130, 256\], the model expects "
         r"\[260, 128\]")),
    "shard missing": (
        True, _remove("model-00002-of-00004.safetensors"),
        r"model\.safetensors\.index\.json lists shard 'model-00002-of-00004\.safetensors', which is missing"),
    "weights file missing": (
        False, _remove("model.safetensors"), r"has no model\.safetensors \(nor model\.safetensors\.index\.json\)"),
    "index missing": (
        True, _remove("model.safetensors.index.json"),
        r"holds shards \(model-00001-of-00004\.safetensors.*but no model\.safetensors\.index\.json.*copy the index"),
    "index not JSON": (
        True, _write("model.safetensors.index.json", "{not json"),
        r"model\.safetensors\.index\.json is not valid JSON"),
    "header is a list": (
        False, _header(lambda h: [h]), r"model\.safetensors: the safetensors header is a JSON list, not an object"),
    "entry without data_offsets": (
        False, _header(_drop_offsets),
        r"model\.safetensors: tensor 'model\.norm\.weight' in the safetensors header has no data_offsets"),
    "overlapping offsets": (
        False, _header(_overlap), r"model\.safetensors: tensor '.*' has data_offsets \[\d+, \d+\], which overlaps tensor"),
    "offsets past the file end": (
        False, _header(_past_the_end), r"model\.safetensors: truncated safetensors file .* is cut off"),
    "recovery_prompt.json not JSON": (
        False, _write("recovery_prompt/recovery_prompt.json", "{oops"),
        r"recovery_prompt/recovery_prompt\.json is not valid JSON .*save the recovery prompt again"),
    "adapter_config.json a list": (
        False, _write("recovery_prompt/adapter_config.json", "[1]"),
        r"recovery_prompt/adapter_config\.json holds a JSON list, not an object; save the recovery prompt again"),
    "format_version missing": (
        False, _quant_config(lambda q: q.pop("format_version")),
        r"config\.json: quantization_config .* has no format_version.*save the model again"),
    "format_version a string": (
        False, _quant_config(lambda q: q.update(format_version="1")),
        r"config\.json: quantization_config format_version='1' is a str, not an integer"),
    "bits a string": (
        False, _quant_config(lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(bits="4")),
        (r"config\.json: quantization_config layer 'model\.layers\.0\.mlp\.up_proj': .*bits='4' is a str, not an "
         r"integer.*write it as a number \(4, not \"4\"\)")),
}


def _saved(tmp_path, sharded: bool, tokenizer=None):
    from builders import build_tiny_llama

    from hf_compress_prompt.recovery.runtime import RecoveryPrompt, attach_recovery_prompt

    model = build_tiny_llama()
    compress_(model, RTNConfig(bits=4, group_size=32), progress=False)
    attach_recovery_prompt(model, RecoveryPrompt(torch.randn(4, 128, generator=torch.Generator().manual_seed(0)), {}))
    return hcp.save_pretrained(model, tmp_path / "m", tokenizer=tokenizer,
                               **({"max_shard_size": "100KB"} if sharded else {}))


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_one_line_naming_the_file(case, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded, damage, message = CASES[case]
    folder = _saved(tmp_path, sharded)
    if sharded:
        assert len(list(folder.glob("model-*-of-*.safetensors"))) == 4  # the row damages a real sharded folder
    AutoModelForCausalLM.from_pretrained(folder)  # the undamaged folder loads
    damage(folder)
    with pytest.raises(UserInputError, match=message) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert len(str(info.value).splitlines()) == 1


def test_cli_eval_of_a_damaged_folder_exits_2_with_one_line(tmp_path, byte_tokenizer, data_dir, capsys):
    folder = _saved(tmp_path, sharded=False, tokenizer=byte_tokenizer)
    _header(_rename_lm_head)(folder)
    capsys.readouterr()  # the save's progress bars
    code = main(["eval", "--model", str(folder), "--datasets", "wikitext2", "--seqlen", "16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("hf-compress-prompt eval: error: compressed checkpoint ")
    assert "is missing tensor 'lm_head.weight'" in err[0] and str(folder) in err[0]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tied_embeddings_still_load(family, tmp_path):
    """lm_head tied to embed_tokens is not saved; the check must accept that (and the head is the embedding)."""
    from builders import build_tiny_llama, build_tiny_opt
    from transformers import AutoModelForCausalLM

    model = build_tiny_opt() if family == "opt" else build_tiny_llama()
    if family == "llama":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    compress_(model, RTNConfig(bits=4, group_size=32), progress=False)
    folder = hcp.save_pretrained(model, tmp_path / "m")
    assert "lm_head.weight" not in read_header(folder / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_header_with_trailing_bytes_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4)}, str(path))
    assert read_header(path) == {"a": {"dtype": "float32", "shape": (4,)}}
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"t\.safetensors: 8 bytes after the last tensor"):
        read_header(path)
