import pytest
import torch

from hf_compress_prompt.methods.layer_scores import angular_distance, block_influence


@pytest.mark.parametrize(
    "turn, bi, angle",
    [
        (lambda h: h * 3.0, 0.0, 0.0),  # same direction, any length
        (lambda h: torch.stack([-h[..., 1], h[..., 0]], -1), 1.0, 0.5),  # a right angle
        (lambda h: -h, 2.0, 1.0),  # opposite
    ],
)
def test_scores_on_known_rotations(turn, bi, angle):
    h = torch.randn(2, 7, 2)
    assert block_influence(h, turn(h)) == pytest.approx(bi, abs=1e-5)
    assert angular_distance(h, turn(h)) == pytest.approx(angle, abs=1e-3)


def test_a_layer_that_changes_more_scores_higher():
    h = torch.randn(4, 16, 32)
    small, large = h + 0.1 * torch.randn_like(h), h + 2.0 * torch.randn_like(h)
    assert block_influence(h, small) < block_influence(h, large)
    assert angular_distance(h, small) < angular_distance(h, large)
