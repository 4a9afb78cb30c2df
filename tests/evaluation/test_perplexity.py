import math
from types import SimpleNamespace

import pytest
import torch

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.evaluation import perplexity

VOCAB = 260


def _hand_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """exp(mean NLL) over all windows, one window and one position at a time."""
    nlls = []
    windows = ids.numel() // seqlen
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * seqlen : (w + 1) * seqlen]
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)  # (T, V)
            for t in range(seqlen - 1):
                nlls.append(-log_probs[t, window[t + 1]].item())
    return math.exp(sum(nlls) / len(nlls))


def _stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_equals_a_hand_computation(tiny_model):
    ids = _stream(3 * 32 + 7)  # three windows and a tail that must be dropped
    result = perplexity(tiny_model, ids, seqlen=32, progress=False)
    assert result.windows == 3 and result.tokens == 96 and result.predicted_tokens == 93
    assert result.available_tokens == 103
    assert result.perplexity == pytest.approx(_hand_perplexity(tiny_model, ids[0], 32), rel=1e-5)


def test_batch_size_and_max_windows(tiny_llama):
    ids = _stream(5 * 16, seed=1)
    one = perplexity(tiny_llama, ids, seqlen=16, progress=False)
    batched = perplexity(tiny_llama, ids, seqlen=16, batch_size=2, progress=False)
    assert batched.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert len(batched.window_seconds) == 5
    first_two = perplexity(tiny_llama, ids, seqlen=16, max_windows=2, progress=False)
    assert first_two.windows == 2
    assert first_two.perplexity == pytest.approx(_hand_perplexity(tiny_llama, ids[0, :32], 16), rel=1e-5)


def test_bf16_autocast_stays_close_to_fp32(tiny_llama):
    ids = _stream(2 * 64, seed=2)
    fp32 = perplexity(tiny_llama, ids, seqlen=64, progress=False)
    bf16 = perplexity(tiny_llama, ids, seqlen=64, autocast_bf16=True, progress=False)
    assert bf16.autocast_bf16 and bf16.perplexity == pytest.approx(fp32.perplexity, rel=2e-2)


class _Oracle(torch.nn.Module):
    """Logits that put all mass on a chosen token: uniform (``sharp=0``) or on the true next token of ``stream``."""

    def __init__(self, stream: torch.Tensor, sharp: float):
        super().__init__()
        self.stream, self.sharp = stream, sharp
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        nxt = torch.roll(input_ids, -1, dims=1)  # works because windows are cut from one known stream
        logits.scatter_(2, nxt[..., None], self.sharp)
        return SimpleNamespace(logits=logits)


def test_uniform_model_scores_the_vocabulary_size_and_a_perfect_model_scores_one():
    ids = _stream(4 * 16)
    assert perplexity(_Oracle(ids, 0.0), ids, seqlen=16, progress=False).perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert perplexity(_Oracle(ids, 100.0), ids, seqlen=16, progress=False).perplexity == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "ids, kwargs, pattern",
    [
        (torch.zeros(2, 64, dtype=torch.long), {}, r"shape \(2, 64\)"),
        (torch.zeros(1, 10, dtype=torch.long), {"seqlen": 16}, r"has 10 tokens, fewer than one window of seqlen=16"),
        (torch.zeros(1, 64, dtype=torch.long), {"seqlen": 1024}, r"exceeds the model's max_position_embeddings=512"),
        (torch.zeros(1, 64, dtype=torch.long), {"seqlen": 16, "max_windows": 0}, r"max_windows=0"),
        (torch.zeros(1, 64, dtype=torch.long), {"seqlen": 16, "batch_size": 0}, r"batch_size=0"),
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_llama, ids, kwargs, pattern):
    with pytest.raises(UserInputError, match=pattern):
        perplexity(tiny_llama, ids, progress=False, **kwargs)


def test_per_window_nll_gives_the_first_windows_perplexity(tiny_llama):
    ids = _stream(4 * 16, seed=3)
    full = perplexity(tiny_llama, ids, seqlen=16, progress=False)
    first = perplexity(tiny_llama, ids, seqlen=16, max_windows=2, progress=False)
    assert len(full.window_nll) == 4
    assert full.first_windows(2) == pytest.approx(first.perplexity, rel=1e-9)
    assert full.first_windows(4) == pytest.approx(full.perplexity, rel=1e-9)
