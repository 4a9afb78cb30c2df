"""Random layers with correlated inputs, so the Hessian is far from diagonal (as in real models)."""

import pytest
import torch

from hf_compress_prompt.methods.hessian import HessianAccumulator


@pytest.fixture
def layer():
    """``(W, X, H)``: a (64, 128) weight, 1024 correlated input tokens and their Hessian ``2 X^T X / n``."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) / 128**0.5
    X = torch.randn(1024, 128, generator=g) @ (torch.eye(128) + 2 * mix)  # (n, in)
    X[:, 5] *= 10  # a few outlier channels, as LLM activations have
    X[:, 77] *= 6
    acc = HessianAccumulator(128)
    acc.add_batch(X)
    return W, X, acc.H
