"""Streaming compression of a checkpoint folder (issue 25, first part): byte-identical to the in-memory path for
every block-wise method, one block materialised at a time, and the refusals."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from builders import build_llama, build_tiny_llama

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
    streaming,
)
from hf_compress_prompt.compressors.streaming import CheckpointSource, compress_pretrained
from hf_compress_prompt.errors import MissingResourceError, UserInputError

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))

RECIPES = {
    "rtn": RTNConfig(bits=4, group_size=32),
    "rtn-head": RTNConfig(bits=4, group_size=32, lm_head=True, lm_head_bits=8),
    "gptq-act-order": GPTQConfig(bits=4, group_size=32, act_order=True),
    "gptq-3bit-per-channel": GPTQConfig(bits=3, group_size=-1),
    "sparsegpt-50%+w4": SparseGPTConfig(sparsity=0.5, bits=4, group_size=32),
    "wanda-2:4": WandaConfig(sparsity="2:4"),
    "magnitude-50%": MagnitudeConfig(sparsity=0.5),
    "wanda-50%+gptq-w4": Recipe([WandaConfig(sparsity=0.5), GPTQConfig(bits=4, group_size=32)]),
    "sparsegpt-2:4+rtn-w4": Recipe([SparseGPTConfig(sparsity="2:4"), RTNConfig(bits=4, group_size=32)]),
    "drop-1-angular": LayerDropConfig(num_layers=1),
    "drop-2-influence+gptq-w4": Recipe([LayerDropConfig(num_layers=2, score="block_influence"),
                                         GPTQConfig(bits=4, group_size=32)]),
    "drop-layer-1+rtn-w4": Recipe([LayerDropConfig(layers=[1]), RTNConfig(bits=4, group_size=32)]),
}


def _folders_equal(a, b) -> None:
    names_a, names_b = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    assert names_a == names_b
    different = [n for n in names_a if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert not different, f"differ: {different}"


def _in_memory(src, dst, recipe, **save_kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    compress_(model, recipe, calibration_ids=IDS, progress=False)
    hcp.save_pretrained(model, dst, **save_kwargs)
    return model


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_folder_is_byte_identical_to_the_in_memory_one(name, tmp_path):
    src = tmp_path / "src"
    build_tiny_llama(num_layers=3).save_pretrained(src)
    memory = _in_memory(src, tmp_path / "memory", RECIPES[name])
    compress_pretrained(src, tmp_path / "stream", RECIPES[name], calibration_ids=IDS, progress=False)
    _folders_equal(tmp_path / "memory", tmp_path / "stream")
    loaded = hcp.from_pretrained(tmp_path / "stream")
    ids = IDS[:1, :12]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, memory(ids).logits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the work folder is gone


def test_sharded_source_and_output_with_tokenizer_and_tied_head(tmp_path, byte_tokenizer):
    src = tmp_path / "src"
    build_llama(num_hidden_layers=3, tie_word_embeddings=True, eos_token_id=256, pad_token_id=256,
                bos_token_id=256).save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    recipe = GPTQConfig(bits=4, group_size=32)
    _in_memory(src, tmp_path / "memory", recipe, tokenizer=byte_tokenizer, max_shard_size="40KB")
    compress_pretrained(src, tmp_path / "stream", recipe, calibration_ids=IDS, tokenizer=byte_tokenizer,
                        max_shard_size="40KB", progress=False)
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    _folders_equal(tmp_path / "memory", tmp_path / "stream")


def test_one_block_is_materialised_at_a_time(tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_tiny_llama(num_layers=4).save_pretrained(src)
    reads, sliced, real_get, real_chunks, real_load = [], [], CheckpointSource.get, CheckpointSource.chunks, \
        streaming._load
    blocks_loaded = [0]  # the first block is read for the calibration capture, with the embeddings in memory

    def get(self, name):
        reads.append(name)
        return real_get(self, name)

    def chunks(self, name, convert, itemsize, max_bytes=64 << 20):
        sliced.append(name)
        for part in real_chunks(self, name, convert, itemsize, max_bytes=1024):  # several slices even at this size
            assert part.numel() * part.element_size() <= max(1024, part[:1].numel() * part.element_size()), name
            yield part

    def load(model, source, names, dtype, **kwargs):
        in_memory = {n.split(".")[2] for n, t in model.state_dict(keep_vars=True).items()
                     if n.startswith("model.layers.") and t.device.type != "meta"}
        assert not in_memory, f"blocks {in_memory} still in memory when the next one is read"
        if any(n.startswith("model.layers.") for n in names):  # embeddings, norm and head wait on meta meanwhile
            outside = [n for n, t in model.state_dict(keep_vars=True).items()
                       if not n.startswith("model.layers.") and t.device.type != "meta"]
            assert blocks_loaded[0] == 0 or not outside, f"{outside} in memory while the blocks stream"
            blocks_loaded[0] += 1
        real_load(model, source, names, dtype, **kwargs)

    monkeypatch.setattr(CheckpointSource, "get", get)
    monkeypatch.setattr(CheckpointSource, "chunks", chunks)
    monkeypatch.setattr(streaming, "_load", load)
    compress_pretrained(src, tmp_path / "out", GPTQConfig(bits=4, group_size=32), calibration_ids=IDS,
                        progress=False)
    compress_pretrained(src, tmp_path / "reference", GPTQConfig(bits=4, group_size=32), calibration_ids=IDS,
                        progress=False)
    reads, sliced = reads[:len(reads) // 2], sliced[:len(sliced) // 2]  # the first run's
    blocks = [int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1, 2, 3}  # each block read once, in order
    block_reads = [n for n in reads if n.startswith("model.layers.")]
    assert len(block_reads) == len(set(block_reads))
    outside = [n for n in reads if not n.startswith("model.layers.")]
    # read whole only for the capture (never the head); the output writes them from the source in slices
    assert sorted(outside) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert all(reads.index(n) < reads.index("model.layers.0.mlp.up_proj.weight") for n in set(outside))
    assert sorted(sliced) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    _folders_equal(tmp_path / "out", tmp_path / "reference")  # tiny slices, the same bytes


def test_data_free_steps_hold_one_linear_at_a_time(tmp_path, monkeypatch):
    """RTN (and magnitude, N:M) see one linear each: the streaming path reads a block's linears one by one, packing
    each before the next is read, and reads nothing outside the blocks but in slices for the output."""
    src = tmp_path / "src"
    build_tiny_llama(num_layers=3).save_pretrained(src)
    real_load, loaded = streaming._load, []

    def load(model, source, names, dtype, **kwargs):
        dense = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.device.type != "meta"
                 and n.startswith("model.layers.")]
        assert not dense, f"{dense} still dense in memory when {names} is read"
        loaded.append(names)
        real_load(model, source, names, dtype, **kwargs)

    monkeypatch.setattr(streaming, "_load", load)
    recipe = Recipe([MagnitudeConfig(sparsity="2:4"), RTNConfig(bits=4, group_size=32)])
    compress_pretrained(src, tmp_path / "stream", recipe, progress=False)
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm")) for names in loaded for n in names)
    assert max(sum(n.endswith(".weight") and "proj" in n for n in names) for names in loaded) == 1
    monkeypatch.setattr(streaming, "_load", real_load)
    _in_memory(src, tmp_path / "memory", recipe)
    _folders_equal(tmp_path / "memory", tmp_path / "stream")


def test_refusals_name_the_problem_and_write_nothing(tmp_path):
    src = tmp_path / "src"
    build_tiny_llama().save_pretrained(src)
    with pytest.raises(UserInputError, match="drops layers only as a recipe's first step.*compress_ instead"):
        compress_pretrained(src, tmp_path / "out", Recipe([RTNConfig(bits=4, group_size=32),
                                                           LayerDropConfig(num_layers=1)]), calibration_ids=IDS)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(MissingResourceError, match="pickle weights"):
        compress_pretrained(pickled, tmp_path / "out", RTNConfig(bits=4, group_size=32))
    with pytest.raises(MissingResourceError, match="no config.json"):
        compress_pretrained(tmp_path / "nowhere", tmp_path / "out", RTNConfig(bits=4, group_size=32))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="notes.txt"):
        compress_pretrained(src, theirs, RTNConfig(bits=4, group_size=32))
    assert (theirs / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled", "src", "theirs"]


def test_the_recipe_is_recorded_and_the_result_holds_no_tensors(tmp_path):
    src = tmp_path / "src"
    build_tiny_llama().save_pretrained(src)
    result = compress_pretrained(src, tmp_path / "out", RTNConfig(bits=4, group_size=32), progress=False)
    assert result.masks == {} and result.quantized == {} and [r.method for r in result.reports] == ["rtn"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["compression_recipe"]["steps"][0]["method"] == "rtn"
    assert config["quantization_config"]["quant_method"]


def test_the_cli_streams_a_safetensors_folder_and_says_so(tiny_llama_dir, tmp_path, capsys):
    from hf_compress_prompt.cli import EXIT_OK, EXIT_USAGE, main

    common = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "16",
              "--no-progress"]
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "s"), *common]) == EXIT_OK
    assert "streaming" in capsys.readouterr().out
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "m"), "--in-memory",
                 *common]) == EXIT_OK
    assert "streaming" not in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert filecmp.cmp(tmp_path / "s" / name, tmp_path / "m" / name, shallow=False), name
    recipe = tmp_path / "late-drop.json"
    recipe.write_text(json.dumps({"steps": [{"method": "rtn", "bits": 4, "group_size": 32},
                                            {"method": "layer_drop", "layers": [0]}]}))
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "d"), "--recipe",
                 str(recipe), "--no-progress"]) == EXIT_OK
    assert "compressing in memory: the streaming path drops layers only as a recipe's first step" in \
        capsys.readouterr().out
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "x"),
                 "--max-activation-memory", "1KB", *common]) == EXIT_OK  # spilled: the same bytes
    assert filecmp.cmp(tmp_path / "s" / "model.safetensors", tmp_path / "x" / "model.safetensors", shallow=False)
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "b"), "--bf16-activations",
                 *common]) == EXIT_OK  # bf16 between blocks: a loadable folder, not the fp32 bytes
    assert not filecmp.cmp(tmp_path / "s" / "model.safetensors", tmp_path / "b" / "model.safetensors", shallow=False)
    capsys.readouterr()
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "z"), "--bf16-activations",
                 "--in-memory", *common]) == EXIT_USAGE
    assert "--bf16-activations applies to the streaming path only" in capsys.readouterr().err
    assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "y"),
                 "--max-activation-memory", "lots", *common]) == EXIT_USAGE
    assert "--max-activation-memory 'lots' is not a size" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_an_already_compressed_source_is_refused(tmp_path):
    src = tmp_path / "src"
    build_tiny_llama().save_pretrained(src)
    compress_pretrained(src, tmp_path / "once", RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(UserInputError, match="already compressed"):
        compress_pretrained(tmp_path / "once", tmp_path / "twice", RTNConfig(bits=4, group_size=32))
    assert not (tmp_path / "twice").exists()


_KILLED_RUN = """
import os, signal, sys
import torch
from hf_compress_prompt.compressors import GPTQConfig, streaming

src, dst, block, where = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "after-block":
    streaming._after_block = lambda index: die() if index == block else None
else:  # inside the block's save: its packed tensors and activations written, its progress not yet
    real = streaming._write_json
    def write_json(path, data):
        if path.name == "progress.json" and data["done"] == block:
            die()
        real(path, data)
    streaming._write_json = write_json
ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
streaming.compress_pretrained(src, dst, GPTQConfig(bits=4, group_size=32), calibration_ids=ids, progress=False)
"""


@pytest.mark.parametrize(("block", "where"), [(0, "after-block"), (2, "after-block"), (3, "after-block"),
                                               (1, "inside-save")])
def test_a_killed_run_resumes_to_the_same_bytes(block, where, tmp_path):
    import subprocess
    import sys

    src = tmp_path / "src"
    build_tiny_llama(num_layers=4).save_pretrained(src)
    recipe = GPTQConfig(bits=4, group_size=32)
    compress_pretrained(src, tmp_path / "whole", recipe, calibration_ids=IDS, progress=False)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(src), str(out), str(block), where],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    work = tmp_path / ".out.hcp-stream"
    assert work.is_dir() and not out.exists()  # the partial state is beside the output, never at it
    compress_pretrained(src, out, recipe, calibration_ids=IDS, resume=True, progress=False)
    _folders_equal(tmp_path / "whole", out)
    assert not work.exists()


def test_resume_refuses_another_run_s_work_or_none(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "src"
    build_tiny_llama(num_layers=4).save_pretrained(src)
    with pytest.raises(UserInputError, match="no interrupted run to resume"):
        compress_pretrained(src, tmp_path / "out", GPTQConfig(bits=4, group_size=32), calibration_ids=IDS,
                            resume=True)
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(src), str(tmp_path / "out"), "1", "after-block"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9
    with pytest.raises(UserInputError, match="belongs to another run.*recipe"):
        compress_pretrained(src, tmp_path / "out", GPTQConfig(bits=3, group_size=32), calibration_ids=IDS,
                            resume=True)
    with pytest.raises(UserInputError, match="calibration_sha256"):
        compress_pretrained(src, tmp_path / "out", GPTQConfig(bits=4, group_size=32), calibration_ids=IDS + 1,
                            resume=True)
    assert (tmp_path / ".out.hcp-stream" / "progress.json").is_file()  # refusals leave the work as it was
    # without resume, the run starts over (the work folder is ours) and still gives the uninterrupted bytes
    compress_pretrained(src, tmp_path / "out", GPTQConfig(bits=4, group_size=32), calibration_ids=IDS,
                        progress=False)
    compress_pretrained(src, tmp_path / "whole", GPTQConfig(bits=4, group_size=32), calibration_ids=IDS,
                        progress=False)
    _folders_equal(tmp_path / "whole", tmp_path / "out")
    assert not (tmp_path / ".out.hcp-stream").exists()


def test_a_folder_in_the_work_folder_s_place_that_is_not_ours_is_refused(tmp_path):
    src = tmp_path / "src"
    build_tiny_llama().save_pretrained(src)
    theirs = tmp_path / ".out.hcp-stream"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not a work folder of this package"):
        compress_pretrained(src, tmp_path / "out", RTNConfig(bits=4, group_size=32))
    assert (theirs / "keep.txt").read_text() == "mine"


def test_dropped_blocks_are_never_read_again(tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_tiny_llama(num_layers=4).save_pretrained(src)
    reads, real_get = [], CheckpointSource.get

    def get(self, name):
        reads.append(name)
        return real_get(self, name)

    monkeypatch.setattr(CheckpointSource, "get", get)
    compress_pretrained(src, tmp_path / "a", Recipe([LayerDropConfig(layers=[1, 2]), RTNConfig(bits=4, group_size=32)]),
                        progress=False)
    assert {int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")} == {0, 3}
    reads.clear()
    compress_pretrained(src, tmp_path / "b", LayerDropConfig(num_layers=2), calibration_ids=IDS, progress=False)
    per_block = [reads.count(f"model.layers.{b}.input_layernorm.weight") for b in range(4)]
    kept = json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"]
    assert kept == 2 and sorted(per_block) == [1, 1, 2, 2]  # each scored once; only the kept two read again


def test_bf16_activations_halve_the_stream_and_stay_close(tmp_path, monkeypatch):
    from safetensors import safe_open

    src = tmp_path / "src"
    build_tiny_llama(num_layers=3).save_pretrained(src)
    recipe = GPTQConfig(bits=4, group_size=32)
    compress_pretrained(src, tmp_path / "fp32", recipe, calibration_ids=IDS, progress=False)
    dtypes = []

    def look(index):
        state = next((tmp_path / ".bf16.hcp-stream").glob("state-*.safetensors"))
        with safe_open(state, framework="pt") as handle:
            dtypes.extend(handle.get_tensor(k).dtype for k in handle.keys())  # noqa: SIM118

    monkeypatch.setattr(streaming, "_after_block", look)
    compress_pretrained(src, tmp_path / "bf16", recipe, calibration_ids=IDS, activation_dtype=torch.bfloat16,
                        progress=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # what is kept between blocks
    a, b = hcp.from_pretrained(tmp_path / "fp32"), hcp.from_pretrained(tmp_path / "bf16")
    with torch.no_grad():
        la, lb = a(IDS[:1, :12]).logits, b(IDS[:1, :12]).logits
    assert not torch.equal(la, lb)  # bf16 statistics move a few grid points ...
    assert float((la - lb).abs().max() / la.abs().max()) < 0.1  # ... not the model


@pytest.mark.parametrize("recipe", ["gptq-act-order", "wanda-50%+gptq-w4"])
@pytest.mark.parametrize("activation_dtype", [None, torch.bfloat16])
def test_activations_over_the_limit_live_in_memory_mapped_files_and_give_the_same_bytes(
        recipe, activation_dtype, tmp_path, monkeypatch):
    from hf_compress_prompt.compressors import activations

    src = tmp_path / "src"
    build_tiny_llama(num_layers=3).save_pretrained(src)
    kw = {"calibration_ids": IDS, "activation_dtype": activation_dtype, "progress": False}
    compress_pretrained(src, tmp_path / "memory", RECIPES[recipe], **kw)
    files, real_init = [], activations.ActivationFile.__init__

    def init(self, path, numel, dtype):
        real_init(self, path, numel, dtype)
        files.append((path.name, numel, dtype))

    monkeypatch.setattr(activations.ActivationFile, "__init__", init)
    streamed = []  # the type of what each block receives: views of a mapped file, not tensors of their own
    real_compress = streaming.compress_block

    def compress_block(block, prefix, inputs, hidden, *args, **kwargs):
        streamed.append({Path(h.untyped_storage().filename or "-").name for h in hidden})
        return real_compress(block, prefix, inputs, hidden, *args, **kwargs)

    monkeypatch.setattr(streaming, "compress_block", compress_block)
    compress_pretrained(src, tmp_path / "spilled", RECIPES[recipe], max_activation_memory=1024, **kw)
    _folders_equal(tmp_path / "memory", tmp_path / "spilled")
    steps = 2 if recipe.startswith("wanda") else 1
    hidden = 128 * (2 if activation_dtype else 4)  # bytes per token of the tiny model's activations
    assert files[0] == ("activations-capture.bin", IDS.numel() * 128, activation_dtype or torch.float32)
    assert len(files) == 1 + 3 * steps and {n for n, *_ in files[1:]} == {
        f"activations-{s}-{p}.bin" for s in range(steps) for p in (0, 1)}
    assert streamed[:steps] == [{"activations-capture.bin"}] * steps  # block 0: what the capture wrote
    assert all(names <= {f"activations-{s}-{p}.bin" for s in range(steps) for p in (0, 1)} for names in
               streamed[steps:]) and len(streamed) == 3 * steps  # then what the step's previous block wrote
    assert IDS.numel() * hidden * steps > 1024
    assert not (tmp_path / ".spilled.hcp-stream").exists()  # the files went with the work folder


def test_activations_under_the_limit_stay_in_memory(tmp_path, monkeypatch):
    from hf_compress_prompt.compressors import activations

    src = tmp_path / "src"
    build_tiny_llama(num_layers=2).save_pretrained(src)
    made = []
    monkeypatch.setattr(activations.ActivationFile, "__init__", lambda self, *a: made.append(a))
    compress_pretrained(src, tmp_path / "out", RECIPES["gptq-act-order"], calibration_ids=IDS, progress=False)
    assert made == []  # 4 x 32 tokens x 128 x fp32 = 64 KB, far under the default 4GB


def test_a_device_that_is_not_there_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_tiny_llama().save_pretrained(src)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in [("cuda", "sees no CUDA GPU"), ("gpu", "not a device torch knows"),
                            ("meta", "computes on 'cpu' or 'cuda'")]:
        with pytest.raises(UserInputError, match=message):
            compress_pretrained(src, tmp_path / "out", RTNConfig(bits=4, group_size=32), device=device)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    compress_pretrained(src, tmp_path / "cpu", RECIPES["gptq-act-order"], calibration_ids=IDS, progress=False,
                        device="cpu")
    compress_pretrained(src, tmp_path / "default", RECIPES["gptq-act-order"], calibration_ids=IDS, progress=False)
    _folders_equal(tmp_path / "cpu", tmp_path / "default")


def test_the_cli_refuses_a_missing_gpu_in_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from hf_compress_prompt.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "out"), "--method", "rtn",
                 "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "sees no CUDA GPU" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("name", ["gptq-act-order", "sparsegpt-50%+w4", "rtn-head"])
def test_on_a_gpu_the_folder_equals_the_in_memory_one_there(name, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    build_tiny_llama(num_layers=3).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda")
    compress_(model, RECIPES[name], calibration_ids=IDS, progress=False)
    hcp.save_pretrained(model, tmp_path / "memory")
    compress_pretrained(src, tmp_path / "stream", RECIPES[name], calibration_ids=IDS, progress=False, device="cuda")
    _folders_equal(tmp_path / "memory", tmp_path / "stream")
