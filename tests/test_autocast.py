"""bf16 autocast by default only where bf16 matmuls are fast: recovery, learned pruning, the knowledge tasks and the
demo all follow the device check, and an explicit choice always wins."""

import pytest
import torch

from hf_compress_prompt import autocast as bf16_check
from hf_compress_prompt.autocast import bf16_matmul_is_fast, resolve_bf16


@pytest.fixture(params=[True, False], ids=["fast-bf16-cpu", "avx2-only-cpu"])
def cpu_bf16(request, monkeypatch):
    """The CPU check as either kind of machine reports it."""
    monkeypatch.setattr(bf16_check, "_cpu_bf16_is_fast", lambda: request.param)
    return request.param


def test_the_cpu_check_is_onednn_s(monkeypatch):
    bf16_check._cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not bf16_matmul_is_fast("cpu")
    bf16_check._cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert bf16_matmul_is_fast()
    bf16_check._cpu_bf16_is_fast.cache_clear()


def test_explicit_choice_wins(cpu_bf16):
    assert resolve_bf16(None) is cpu_bf16
    assert resolve_bf16(True) is True and resolve_bf16(False) is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a CUDA device")
def test_no_cuda_device_is_not_fast():
    assert not bf16_matmul_is_fast("cuda")


def test_recovery_trains_in_the_precision_the_check_gives(cpu_bf16, byte_tokenizer):
    from builders import build_steerable_llama

    from hf_compress_prompt.recovery.data import TokenWindows
    from hf_compress_prompt.recovery.train import recover

    windows = torch.randint(3, 250, (6, 16), generator=torch.Generator().manual_seed(0))
    settings = {"num_virtual_tokens": 2, "seqlen": 16, "batch_size": 2, "eval_steps": 1, "eval_windows": 2,
                "max_steps": 1}
    result = recover(build_steerable_llama(), byte_tokenizer, train_dataset=TokenWindows(windows),
                     eval_dataset=TokenWindows(windows[:2]), **settings)
    assert result.prompt.metadata["training"]["bf16"] is cpu_bf16  # what ran, not "none"
    forced = recover(build_steerable_llama(), byte_tokenizer, train_dataset=TokenWindows(windows),
                     eval_dataset=TokenWindows(windows[:2]), bf16=not cpu_bf16, **settings)
    assert forced.prompt.metadata["training"]["bf16"] is (not cpu_bf16)


def test_tasks_and_demo_follow_the_check(cpu_bf16, tiny_llama, byte_tokenizer):
    from hf_compress_prompt.demo import default_mode
    from hf_compress_prompt.evaluation.tasks.lm import TaskModel

    assert TaskModel(tiny_llama, byte_tokenizer).autocast_bf16 is cpu_bf16
    assert TaskModel(tiny_llama, byte_tokenizer, autocast_bf16=False).autocast_bf16 is False
    assert default_mode() == ("bf16" if cpu_bf16 else "fp32")


@pytest.mark.parametrize("requested", [None, True, False])
def test_perplexity_follows_the_check_when_asked_to(requested, cpu_bf16, tiny_llama):
    from hf_compress_prompt.evaluation import perplexity

    seen = []
    handle = tiny_llama.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        perplexity(tiny_llama, torch.arange(3, 35), seqlen=16, autocast_bf16=requested, progress=False)
    finally:
        handle.remove()
    assert seen == [cpu_bf16 if requested is None else requested] * 2


def test_benches_score_in_the_precision_they_record(cpu_bf16, monkeypatch):
    """bench/common: --precision auto follows the check, bf16 / fp32 win, and the machine record says which ran."""
    import importlib.util
    from pathlib import Path

    # loaded under another name: a module "common" left in sys.modules would stand in for any package of that name
    spec = importlib.util.spec_from_file_location("bench_common_under_test",
                                                  Path(__file__).resolve().parents[1] / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    monkeypatch.setattr(common, "_BF16", None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the suite's threads stay as they are
    for argv, expected in (([], cpu_bf16), (["--precision", "bf16"], True), (["--precision", "fp32"], False)):
        args, machine = common.start_bench(common.bench_parser("doc", precision=True), argv)
        assert args.bf16 is expected and common.bench_bf16() is expected
        assert machine["precision"].startswith("bf16 autocast" if expected else "fp32")
    args, machine = common.start_bench(common.bench_parser("doc"), [])  # benches that time both record neither
    assert not hasattr(args, "precision") and "precision" not in machine
