"""Perplexity exactly as GPTQ, SparseGPT and Wanda measure it.

The test split is joined (``"\\n\\n"`` for WikiText-2, see :mod:`hf_compress_prompt.data`), tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped). Each window is scored on
its own, with no context carried over; perplexity is the exponential of the mean next-token negative
log-likelihood over all predicted tokens (``seqlen - 1`` per window). With equal windows this equals GPTQ's
``exp(sum(window_mean_nll * seqlen) / (windows * seqlen))``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..autocast import resolve_bf16
from ..errors import UserInputError

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """What one perplexity measurement used and gave."""

    perplexity: float
    mean_nll: float  # nats per predicted token
    windows: int
    seqlen: int
    tokens: int  # tokens fed to the model: windows * seqlen
    predicted_tokens: int  # windows * (seqlen - 1)
    available_tokens: int  # length of the whole tokenized split
    seconds: float
    autocast_bf16: bool
    window_seconds: tuple[float, ...] = ()  # wall time per window (a batch's time split evenly over its windows)
    window_nll: tuple[float, ...] = ()  # mean NLL of each window, in order

    def first_windows(self, count: int) -> float:
        """Perplexity over the first ``count`` windows of this same run (windows are equal, so means combine)."""
        nll = self.window_nll[:count]
        return math.exp(sum(nll) / len(nll))

    @property
    def median_window_seconds(self) -> float:
        return statistics.median(self.window_seconds) if self.window_seconds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_second": self.tokens_per_second,
            "median_window_seconds": self.median_window_seconds,
        }

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} over {self.windows} windows x {self.seqlen} tokens "
            f"({self.tokens} of {self.available_tokens} tokens, {self.tokens_per_second:.0f} tokens/s)"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    autocast_bf16: bool | None = False,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Scores a causal LM on a token stream in non-overlapping windows.

    Args:
        model (`torch.nn.Module`): a causal LM whose forward takes ``input_ids`` and returns ``.logits``.
        input_ids (`torch.LongTensor` of shape `(1, N)` or `(N,)`): the whole tokenized split.
        seqlen (`int`, *optional*, defaults to 2048): window length.
        max_windows (`int`, *optional*): score only the first this many windows (all by default).
        batch_size (`int`, *optional*, defaults to 1): windows per forward pass; the result does not depend on it.
        autocast_bf16 (`bool`, *optional*, defaults to `False`): run the forward under bf16 autocast (the loss is
            always computed in fp32); `None`: where the model's device runs bf16 matmuls fast
            (:func:`~hf_compress_prompt.autocast.bf16_matmul_is_fast`), else fp32.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        desc (`str`, *optional*): the progress bar's label.

    Returns:
        `PerplexityResult`
    """
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise UserInputError(f"input_ids has shape {tuple(input_ids.shape)}; pass one stream of shape (1, N) or (N,)")
    if seqlen < 2:
        raise UserInputError(f"seqlen={seqlen} is too short; use seqlen >= 2 (2048 is the standard)")
    if batch_size < 1:
        raise UserInputError(f"batch_size={batch_size}; use batch_size >= 1")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise UserInputError(f"seqlen={seqlen} exceeds the model's max_position_embeddings={limit}; use seqlen <= {limit}")
    available = input_ids.numel()
    windows = available // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise UserInputError(f"max_windows={max_windows}; use max_windows >= 1 or leave it unset for all windows")
        windows = min(windows, max_windows)
    if windows == 0:
        raise UserInputError(f"the stream has {available} tokens, fewer than one window of seqlen={seqlen}; lower seqlen")

    device = _model_device(model)
    autocast_bf16 = resolve_bf16(autocast_bf16, device)
    windowed = input_ids[: windows * seqlen].view(windows, seqlen)  # (W, T)
    window_seconds: list[float] = []
    window_nll: list[float] = []
    start = time.perf_counter()
    with tqdm(total=windows, desc=desc, unit="window", disable=not progress) as bar:
        for first in range(0, windows, batch_size):
            batch_start = time.perf_counter()
            batch = windowed[first : first + batch_size].to(device)  # (B, T)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            shift_logits = logits[:, :-1, :].float()  # (B, T-1, V): position t predicts token t+1
            shift_labels = batch[:, 1:]  # (B, T-1)
            token_nll = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none"
            ).view(shift_labels.shape)  # (B, T-1)
            window_nll += token_nll.double().mean(dim=1).tolist()
            window_seconds += [(time.perf_counter() - batch_start) / batch.shape[0]] * batch.shape[0]
            bar.update(batch.shape[0])
    seconds = time.perf_counter() - start
    predicted = windows * (seqlen - 1)
    mean_nll = sum(window_nll) / windows  # equal windows: the mean of window means is the token mean
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        windows=windows,
        seqlen=seqlen,
        tokens=windows * seqlen,
        predicted_tokens=predicted,
        available_tokens=available,
        seconds=seconds,
        autocast_bf16=autocast_bf16,
        window_seconds=tuple(window_seconds),
        window_nll=tuple(window_nll),
    )
