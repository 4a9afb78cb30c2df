"""Atomic saving (never deleting what a user owns), and GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout)
loaded into our modules on CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.formats import write_gptq_layer
from hf_compress_prompt.formats import saved_folder
from hf_compress_prompt.integrations import checkpoints
from hf_compress_prompt.methods.rtn import rtn_quantize
from hf_compress_prompt.nn import QuantLinear
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, recovery_prompt_of


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
        hcp.save_pretrained(tiny_llama, target, tokenizer=BrokenTokenizer(), overwrite=True)
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


# --- what a save may replace, interruptions, leftovers and permissions (issue 21) ---


def _prompt(seed=0, n=4, hidden=128):
    return RecoveryPrompt(torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)), {"base_model": "tiny"})


def _tree(folder):
    """Every path under ``folder`` with its bytes (files) or None (folders): a folder's full state."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_save_to_a_file_path_is_refused(tiny_llama, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(UserInputError, match=r"notes\.txt' is a file, not a folder"):
        hcp.save_pretrained(tiny_llama, target, overwrite=True)
    assert target.read_text() == "mine"
    with pytest.raises(UserInputError, match=r"notes\.txt' is a file, not a folder"):
        hcp.save_pretrained(tiny_llama, target / "model")  # nor can a folder be made inside a file


@pytest.mark.parametrize("user_file,named", [("notes.txt", "notes.txt"), ("data/train.jsonl", "data/"),
                                             ("recovery_prompt/mine.txt", "recovery_prompt/mine.txt"), (".env", ".env")])
@pytest.mark.parametrize("model_folder", [False, True], ids=["plain-folder", "model-folder"])
def test_save_never_deletes_a_users_file(tiny_llama, tmp_path, user_file, named, model_folder):
    target = tmp_path / "out"
    if model_folder:
        attach_recovery_prompt(tiny_llama, _prompt())
        hcp.save_pretrained(tiny_llama, target)
    (target / user_file).parent.mkdir(parents=True, exist_ok=True)
    (target / user_file).write_text("mine")
    before = _tree(target)
    with pytest.raises(UserInputError, match=f"holds '{named}', which no save_pretrained writes"):
        hcp.save_pretrained(tiny_llama, target, overwrite=True)
    assert _tree(target) == before and _hidden(tmp_path) == []


def test_replacing_a_saved_model_needs_overwrite(tiny_llama, tmp_path, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "m"
    target.mkdir()
    hcp.save_pretrained(tiny_llama, target, tokenizer=byte_tokenizer)  # an empty folder is fine without overwrite
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older save")
    with pytest.raises(UserInputError, match=r"/m' already holds a saved model; pass overwrite=True .*--overwrite"):
        hcp.save_pretrained(tiny_llama, target)
    assert (target / "model-00001-of-00002.safetensors").is_file()
    with torch.no_grad():
        tiny_llama.lm_head.weight.add_(1.0)
    hcp.save_pretrained(tiny_llama, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert torch.equal(AutoModelForCausalLM.from_pretrained(target).lm_head.weight, tiny_llama.lm_head.weight)
    assert _hidden(tmp_path) == []


def test_save_into_the_current_folder_is_refused(tiny_llama, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for path in (".", "..", str(tmp_path)):
        with pytest.raises(UserInputError, match="is the current folder or holds it"):
            hcp.save_pretrained(tiny_llama, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_saved_folders_follow_the_umask(tiny_llama, tmp_path):
    attach_recovery_prompt(tiny_llama, _prompt())
    for umask, folder_mode, file_mode in [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664), (0o077, 0o700, 0o600)]:
        old = os.umask(umask)
        try:
            folder = hcp.save_pretrained(tiny_llama, tmp_path / f"m{umask:o}")
        finally:
            os.umask(old)
        modes = {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}
        assert "model.safetensors" in modes and "recovery_prompt/adapter_model.safetensors" in modes
        assert modes == {name: folder_mode if (folder / name).is_dir() else file_mode for name in modes}


def _exchange_available(tmp_path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    try:
        return saved_folder._renameat2(a, b, saved_folder._RENAME_EXCHANGE)
    finally:
        a.rmdir(), b.rmdir()


def test_replace_is_one_exchange(tiny_llama, tmp_path, monkeypatch):
    # renameat2(RENAME_EXCHANGE): the old folder is at the path until the new one takes its place, in one step
    if not _exchange_available(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system / file system")
    from transformers import AutoModelForCausalLM

    target = hcp.save_pretrained(tiny_llama, tmp_path / "m")

    def no_rename(*args):
        raise AssertionError("a plain rename would leave the path empty for a moment")

    monkeypatch.setattr(saved_folder.os, "rename", no_rename)
    monkeypatch.setattr(saved_folder.os, "replace", no_rename)
    with torch.no_grad():
        tiny_llama.lm_head.weight.add_(1.0)
    hcp.save_pretrained(tiny_llama, target, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(target).lm_head.weight, tiny_llama.lm_head.weight)
    assert _hidden(tmp_path) == []


def test_interrupted_between_the_two_renames_keeps_the_old_folder(tiny_llama, tmp_path, monkeypatch):
    # where renameat2 is missing: a failure after the old folder moved aside puts it back
    target = hcp.save_pretrained(tiny_llama, tmp_path / "m")
    before = _tree(target)
    monkeypatch.setattr(saved_folder, "_renameat2", lambda *args: False)
    real_rename, calls = os.rename, []

    def rename(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:  # the new folder into place
            raise KeyboardInterrupt
        real_rename(source, destination)

    monkeypatch.setattr(saved_folder.os, "rename", rename)
    with torch.no_grad():
        tiny_llama.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        hcp.save_pretrained(tiny_llama, target, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3 and _tree(target) == before and _hidden(tmp_path) == []


_KILLED_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from builders import build_tiny_llama
import hf_compress_prompt as hcp
from hf_compress_prompt.formats import saved_folder
from hf_compress_prompt.integrations import checkpoints
model = build_tiny_llama()
with torch.no_grad():
    model.lm_head.weight.add_(1.0)
if {between_renames}:  # no renameat2: killed after the old folder moved aside, before the new one moved in
    saved_folder._renameat2 = lambda *args: False
    real_rename, calls = os.rename, []
    def rename(source, destination):
        calls.append(source)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(source, destination)
    saved_folder.os.rename = rename
    hcp.save_pretrained(model, {target!r}, overwrite=True)
else:  # killed while writing
    with checkpoints.atomic_directory({target!r}, overwrite=True) as folder:
        model.save_pretrained(folder)
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("between_renames", [False, True], ids=["while-writing", "between-renames"])
def test_a_killed_save_is_cleaned_up_by_the_next_one(tiny_llama, tmp_path, between_renames):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    target = hcp.save_pretrained(tiny_llama, tmp_path / "m")
    before = _tree(target)
    tests = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE.format(tests=tests, target=str(target),
                                                                     between_renames=between_renames)],
                          capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr[-2000:]
    leftovers = _hidden(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.tmp-")  # what a killed save leaves
    assert target.is_dir() != between_renames  # (between the renames nothing is at the path)
    # somebody else's hidden folders beside it, one like ours without our marker, and ours of a live process stay
    (tmp_path / ".m.tmp-unmarked").mkdir()
    (tmp_path / ".m.tmp-unmarked" / "x").write_text("not ours")
    live = tmp_path / ".m.tmp-live"
    (live / "model").mkdir(parents=True)
    marker = json.loads((tmp_path / leftovers[0] / saved_folder._STAGING_MARKER).read_text())
    (live / saved_folder._STAGING_MARKER).write_text(json.dumps({**marker, "pid": os.getppid()}))
    checkpoints.check_save_target(target, overwrite=True)  # what every save (and the CLI, first) runs
    assert _hidden(tmp_path) == [".m.tmp-live", ".m.tmp-unmarked"]
    assert _tree(target) == before  # the old folder, put back if the kill left the path empty
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(loaded.lm_head.weight, tiny_llama.lm_head.weight)


def _prompt_of(folder):
    from hf_compress_prompt.recovery import load_recovery_prompt

    return load_recovery_prompt(folder / "recovery_prompt").embedding


@pytest.mark.parametrize("interrupt", ["prompt-writer", "exchange"])
def test_model_save_pretrained_with_a_prompt_is_atomic(tiny_llama, tmp_path, monkeypatch, interrupt):
    # the README's alternative to hcp.save_pretrained: the model's own save_pretrained, wrapped by the prompt
    import hf_compress_prompt.recovery.io as prompt_io

    compress_(tiny_llama, RTNConfig(bits=4, group_size=32), progress=False)
    attach_recovery_prompt(tiny_llama, _prompt(0))
    fresh = tmp_path / "fresh"
    if interrupt == "prompt-writer":
        monkeypatch.setattr(prompt_io, "write_recovery_prompt", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    else:
        monkeypatch.setattr(saved_folder, "_move_into_place", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tiny_llama.save_pretrained(fresh)
    assert not fresh.exists() and _hidden(tmp_path) == []  # never a folder that loads without its prompt
    monkeypatch.undo()
    target = tmp_path / "m"
    tiny_llama.save_pretrained(target)
    tiny_llama.save_pretrained(target)  # as transformers' own, it replaces its earlier save
    before = _tree(target)
    attach_recovery_prompt(tiny_llama, _prompt(1))
    if interrupt == "prompt-writer":
        monkeypatch.setattr(prompt_io, "write_recovery_prompt", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    else:
        monkeypatch.setattr(saved_folder, "_move_into_place", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tiny_llama.save_pretrained(target)
    monkeypatch.undo()
    assert _tree(target) == before and _hidden(tmp_path) == []
    loaded = hcp.from_pretrained(target)  # the old folder loads, with its own prompt
    assert torch.equal(recovery_prompt_of(loaded).embedding, _prompt(0).embedding)
    assert torch.equal(_prompt_of(target), _prompt(0).embedding)


def test_model_save_pretrained_with_a_prompt_keeps_a_users_files(tiny_llama, tmp_path):
    attach_recovery_prompt(tiny_llama, _prompt())
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds 'notes.txt', which no save_pretrained writes"):
        tiny_llama.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    target = tmp_path / "m"
    tiny_llama.save_pretrained(target)
    with pytest.raises(UserInputError, match="already holds a saved model"):
        tiny_llama.save_pretrained(target, overwrite=False)
    with pytest.raises(UserInputError, match="without its recovery prompt"):
        tiny_llama.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_saving_a_prompt_folder_follows_the_same_rules(tmp_path):
    from hf_compress_prompt.recovery import load_recovery_prompt, save_recovery_prompt

    folder = save_recovery_prompt(_prompt(0), tmp_path / "p")
    with pytest.raises(UserInputError, match="already holds a saved model"):
        save_recovery_prompt(_prompt(1), folder)
    save_recovery_prompt(_prompt(1), folder, overwrite=True)
    assert torch.equal(load_recovery_prompt(folder).embedding, _prompt(1).embedding)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds 'notes.txt'"):
        save_recovery_prompt(_prompt(2), folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and _hidden(tmp_path) == []
