"""The transfer matrix: every prompt on every model, cells equal to scoring by hand, attached prompts restored."""

import math

import torch

from hf_compress_prompt.evaluation import perplexity
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, recovery_prompt_of
from hf_compress_prompt.recovery.transfer import evaluate_transfer, gap_closed


def _prompt(seed):
    return RecoveryPrompt(torch.randn(3, 128, generator=torch.Generator().manual_seed(seed)))


def test_matrix_cells_match_direct_scoring(tiny_llama):
    import copy

    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    ids = {"a": torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))}
    prompts = {"p1": _prompt(1), "p2": _prompt(2)}
    keep = _prompt(3)
    attach_recovery_prompt(other, keep)
    matrix = evaluate_transfer(prompts, {"m1": tiny_llama, "m2": other}, ids, dense={"a": 10.0}, seqlen=32)
    assert recovery_prompt_of(other) is keep and recovery_prompt_of(tiny_llama) is None
    attach_recovery_prompt(other, prompts["p2"])
    direct = perplexity(other, ids["a"], seqlen=32, progress=False).perplexity
    assert math.isclose(matrix.with_prompt[("p2", "m2", "a")], direct, rel_tol=1e-6)
    assert matrix.with_prompt[("p1", "m1", "a")] != matrix.without[("m1", "a")]
    assert len(matrix.to_records()) == 4
    assert matrix.to_markdown().count("\n") == 3  # header, rule, two prompts


def test_gap_closed():
    assert gap_closed(10.0, 20.0, 15.0) == 0.5
    assert gap_closed(10.0, 20.0, 10.0) == 1.0
    assert gap_closed(10.0, 20.0, 25.0) == -0.5
    assert gap_closed(10.0, 10.0, 10.0) == 0.0
