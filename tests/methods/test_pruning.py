import pytest
import torch

from builders import output_error
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.methods.hessian import HessianAccumulator
from hf_compress_prompt.methods.magnitude import magnitude_prune
from hf_compress_prompt.methods.masks import parse_sparsity
from hf_compress_prompt.methods.rtn import rtn_quantize
from hf_compress_prompt.methods.sparsegpt import sparsegpt_prune
from hf_compress_prompt.methods.wanda import wanda_prune


def _prune(method, W, H, sparsity):
    if method == "sparsegpt":
        return sparsegpt_prune(W, H, sparsity)[:2]
    if method == "wanda":
        return wanda_prune(W, torch.diagonal(H) / 2, sparsity)
    return magnitude_prune(W, sparsity)


METHODS = ["sparsegpt", "wanda", "magnitude"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
def test_unstructured_sparsity_is_exact_per_layer(layer, method, sparsity):
    W, _, H = layer
    pruned, mask = _prune(method, W, H, sparsity)
    assert bool((pruned[mask] == 0).all())
    if method == "wanda":  # Wanda compares within rows: every row prunes int(cols * sparsity)
        assert bool((mask.sum(1) == int(128 * sparsity)).all())
    else:
        assert int(mask.sum()) == int(W.numel() * sparsity)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_patterns_are_exact(layer, method, n, m):
    W, _, H = layer
    pruned, mask = _prune(method, W, H, f"{n}:{m}")
    runs_pruned = mask.reshape(64, 128 // m, m).sum(-1)
    assert bool((runs_pruned == m - n).all())
    nonzero = (pruned != 0).reshape(64, 128 // m, m).sum(-1)
    assert int(nonzero.max()) <= n


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(layer, sparsity):
    W, X, H = layer
    errors = {method: output_error(W, _prune(method, W, H, sparsity)[0], X) for method in METHODS}
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] and errors["wanda"] < 0.8 * errors["magnitude"]


def test_two_four_costs_more_than_fifty_percent_unstructured(layer):
    W, X, H = layer
    assert output_error(W, sparsegpt_prune(W, H, 0.5)[0], X) < output_error(W, sparsegpt_prune(W, H, "2:4")[0], X)


def test_wanda_equals_a_direct_reference():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    X = torch.tensor([[1.0, 0.0, 1.0, 0.5], [1.0, 2.0, 1.0, 0.5], [1.0, 0.0, 1.0, 0.5]])  # (tokens, in)
    acc = HessianAccumulator(4)
    acc.add_batch(X)
    pruned, mask = wanda_prune(W, acc.channel_sq_norm, 0.5)
    # ||X_j|| = [sqrt 3, 2, sqrt 3, sqrt .75]; row 0 scores [1.73, 4, 5.20, 3.46] -> prune cols 0 and 3;
    # row 1 scores [6.93, 6, 3.46, 0.87] -> prune cols 2 and 3.
    assert mask.tolist() == [[True, False, False, True], [False, False, True, True]]
    assert pruned.tolist() == [[0.0, -2.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0]]


def test_magnitude_keeps_the_largest_weights():
    W = torch.tensor([[0.1, -5.0, 0.2, 3.0], [-0.3, 0.05, 4.0, -1.0]])
    pruned, _ = magnitude_prune(W, 0.5)  # the 4 smallest |w| of the layer
    assert pruned.tolist() == [[0.0, -5.0, 0.0, 3.0], [0.0, 0.0, 4.0, -1.0]]
    pruned, _ = magnitude_prune(W, "2:4")
    assert pruned.tolist() == [[0.0, -5.0, 0.0, 3.0], [0.0, 0.0, 4.0, -1.0]]


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_joint_sparse_and_4bit(layer, sparsity):
    W, X, H = layer
    pruned, mask, qw = sparsegpt_prune(W, H, sparsity, bits=4, group_size=32)
    deq = qw.dequantize()
    torch.testing.assert_close(pruned, deq)  # the returned weight is the quantized one
    assert bool((deq[mask] == 0).all()) and int(mask.sum()) == W.numel() // 2
    naive = rtn_quantize(magnitude_prune(W, sparsity)[0], 4, 32).dequantize()
    sparse_only = sparsegpt_prune(W, H, sparsity)[0]
    assert output_error(W, sparse_only, X) < output_error(W, deq, X) < 0.5 * output_error(W, naive, X)


@pytest.mark.parametrize(
    "value, pattern",
    [
        (1.5, r"sparsity=1.5 is outside \(0, 1\)"),
        (0, r"sparsity=0 is outside \(0, 1\)"),
        ("4:2", r"sparsity='4:2' needs 0 < N < M"),
        ("a:b", r"is not of the form N:M"),
        ("half", r"neither a fraction nor N:M"),
    ],
)
def test_bad_sparsity_is_rejected(value, pattern):
    with pytest.raises(UserInputError, match=pattern):
        parse_sparsity(value)


@pytest.mark.parametrize("method", METHODS)
def test_nm_needs_a_divisible_width(method):
    W, H = torch.randn(4, 18), torch.eye(18)
    with pytest.raises(UserInputError, match=r"2:8 sparsity needs in_features divisible by 8, but in_features=18"):
        _prune(method, W, H, "2:8")
