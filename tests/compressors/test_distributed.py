"""Streaming compression over two processes (torchrun, gloo on the CPU): the calibration batches split between
them, the layers' statistics summed, the solves dealt out, and the folder byte for byte the one-process one."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from builders import build_tiny_llama

from hf_compress_prompt.compressors import (
    GPTQConfig,
    LayerDropConfig,
    MagnitudeConfig,
    Recipe,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
)
from hf_compress_prompt.compressors.configs import CalibrationConfig
from hf_compress_prompt.compressors.distributed import ProcessGroup
from hf_compress_prompt.compressors.streaming import compress_pretrained
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.methods.hessian import HessianAccumulator

# 3 batches of 2 windows: process 0 takes two, process 1 one (an uneven split)
IDS = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
CALIBRATION = CalibrationConfig(batch_size=2)

RECIPES = {
    "rtn-head": [RTNConfig(bits=4, group_size=32, lm_head=True, lm_head_bits=8)],
    "magnitude-2:4": [MagnitudeConfig(sparsity="2:4")],
    "gptq-act-order": [GPTQConfig(bits=4, group_size=32, act_order=True)],
    "sparsegpt-50%+w4": [SparseGPTConfig(sparsity=0.5, bits=4, group_size=32)],
    "wanda-50%+gptq-w4": [WandaConfig(sparsity=0.5), GPTQConfig(bits=4, group_size=32)],
    "drop-1+gptq-w3": [LayerDropConfig(num_layers=1), GPTQConfig(bits=3, group_size=-1)],
}

_RUN = """
import sys, torch
sys.path[:0] = [{tests!r}, {here!r}]
from test_distributed import CALIBRATION, IDS, RECIPES
from hf_compress_prompt.compressors import Recipe
from hf_compress_prompt.compressors.distributed import init_from_environment
from hf_compress_prompt.compressors.streaming import compress_pretrained

group = init_from_environment()
assert group is not None and group.world_size == 2
for name in sys.argv[3:]:
    compress_pretrained(sys.argv[1], f"{{sys.argv[2]}}-{{name}}", Recipe(RECIPES[name], calibration=CALIBRATION),
                        calibration_ids=IDS, progress=False)
"""


def _torchrun(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp_path)


@contextmanager
def _one_thread():
    """The processes torchrun starts compute with one thread each; a float32 matmul's bits depend on the thread
    count (how the sums are split), so the one-process reference uses one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _folders_equal(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)] == []


def test_the_batches_are_dealt_out_in_contiguous_runs():
    batches = list(range(7))
    runs = [ProcessGroup(rank, 3).my_batches(batches) for rank in range(3)]
    assert runs == [[0, 1, 2], [3, 4], [5, 6]]
    assert [ProcessGroup(r, 3).owner(k) for r in range(1) for k in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(UserInputError, match="2 calibration batch.*for 3 processes"):
        ProcessGroup(0, 3).my_batches([0, 1])


@pytest.mark.parametrize("diagonal_only", [False, True])
def test_statistics_over_parts_merge_to_the_same_bytes(diagonal_only):
    x = torch.randn(6, 40, 24, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 24)
    whole = HessianAccumulator(24, diagonal_only=diagonal_only)
    for batch in x:
        whole.add_batch(batch)
    first, second = HessianAccumulator(24, diagonal_only=diagonal_only), HessianAccumulator(24, diagonal_only=diagonal_only)
    for batch in x[:4]:
        first.add_batch(batch)
    for batch in x[4:]:
        second.add_batch(batch)
    second.merge(first)  # the other order, too
    assert torch.equal(second.channel_sq_norm, whole.channel_sq_norm)
    if not diagonal_only:
        assert torch.equal(second.H, whole.H)
        reference = 2 * x.reshape(-1, 24).double().T @ x.reshape(-1, 24).double() / 240
        torch.testing.assert_close(whole.H.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


def test_two_processes_write_the_one_process_folder(tmp_path):
    src = tmp_path / "src"
    build_tiny_llama(num_layers=3).save_pretrained(src)
    script = tmp_path / "run.py"
    here = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_RUN.format(tests=os.path.dirname(here), here=here))
    proc = _torchrun(str(script), str(src), str(tmp_path / "two"), *RECIPES, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with _one_thread():
        for name, steps in RECIPES.items():
            compress_pretrained(src, tmp_path / f"one-{name}", Recipe(steps, calibration=CALIBRATION),
                                calibration_ids=IDS, progress=False)
            _folders_equal(tmp_path / f"one-{name}", tmp_path / f"two-{name}")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left behind


_KILLED_RUN = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {here!r}]
from test_distributed import CALIBRATION, IDS, RECIPES
from hf_compress_prompt.compressors import Recipe, streaming
from hf_compress_prompt.compressors.distributed import init_from_environment

src, dst, name, block, where = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
group = init_from_environment()

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "after-block":  # every process, once the block's save is done everywhere
    streaming._after_block = lambda index: die() if index == block else None
elif where == "inside-save" and group.is_main:  # every process's activations written, the progress not yet
    real = streaming._write_json
    def write_json(path, data):
        if path.name == "progress.json" and data["done"] == block:
            die()
        real(path, data)
    streaming._write_json = write_json
streaming.compress_pretrained(src, dst, Recipe(RECIPES[name], calibration=CALIBRATION), calibration_ids=IDS,
                              resume=where == "resume", progress=False)
"""


@pytest.mark.parametrize(("name", "block", "where"), [("gptq-act-order", 1, "after-block"),
                                                       ("sparsegpt-50%+w4", 2, "inside-save")])
def test_a_killed_torchrun_job_resumes_with_as_many_processes_to_the_same_bytes(name, block, where, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    build_tiny_llama(num_layers=4).save_pretrained(src)
    script = tmp_path / "run.py"
    here = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_KILLED_RUN.format(tests=os.path.dirname(here), here=here))
    proc = _torchrun(str(script), str(src), str(out), name, str(block), where, tmp_path=tmp_path)
    assert proc.returncode != 0
    work = tmp_path / ".out.hcp-stream"
    assert (work / "progress.json").is_file() and not out.exists()
    done = json.loads((work / "progress.json").read_text())["done"]
    assert done == (block if where == "after-block" else block - 1)
    assert all((work / f"state-{done:05d}-rank{r}.safetensors").is_file() for r in (0, 1))  # each process's own
    recipe = Recipe(RECIPES[name], calibration=CALIBRATION)
    with pytest.raises(UserInputError, match=r"a run of 2 process\(es\).*torchrun --nproc_per_node 2"):
        compress_pretrained(src, out, recipe, calibration_ids=IDS, resume=True)  # one process: refused
    assert (work / "progress.json").is_file() and not out.exists()  # ... leaving the work as it was
    proc = _torchrun(str(script), str(src), str(out), name, "0", "resume", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with _one_thread():
        compress_pretrained(src, tmp_path / "whole", recipe, calibration_ids=IDS, progress=False)
    _folders_equal(tmp_path / "whole", out)
    assert not work.exists()


def test_torchrun_runs_the_cli_and_refuses_what_it_cannot_split(tiny_llama_dir, tmp_path):
    from hf_compress_prompt.cli import EXIT_OK, main

    common = ["--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4", "--group-size", "32", "--nsamples", "4",
              "--seqlen", "16", "--batch-size", "1", "--no-progress"]
    proc = _torchrun("-m", "hf_compress_prompt", "compress", "--model", str(tiny_llama_dir), "--output",
                     str(tmp_path / "two"), *common, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("streaming") == 1 and "2 processes" in proc.stdout  # said once, by process 0
    with _one_thread():
        assert main(["compress", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "one"), *common]) == EXIT_OK
    for name in ("model.safetensors", "config.json", "tokenizer.json"):  # (the report holds the steps' seconds)
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "two" / name, shallow=False), name
    for extra, needle in ((["--in-memory"], "torchrun runs the streaming path only"),
                          (["--resume"], "no interrupted run to resume")):
        proc = _torchrun("-m", "hf_compress_prompt", "compress", "--model", str(tiny_llama_dir), "--output",
                         str(tmp_path / "refused"), *common, *extra, tmp_path=tmp_path)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "refused").exists()
