"""Does a prompt transfer? Perplexity of every (model, evaluation set) with no prompt and with each prompt.

Rows are prompts (where each was trained: compression setting and data), columns are target models and evaluation
sets; each cell holds the perplexity without and with the prompt and the fraction of the target's gap to the
dense model that the prompt closes (when a dense reference is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..evaluation import perplexity
from .prefix import RecoveryPrefix
from .runtime import RecoveryPrompt, attach_recovery_prompt, detach_recovery_prompt, recovery_prompt_of

__all__ = ["TransferMatrix", "evaluate_transfer", "gap_closed"]


def gap_closed(dense: float, compressed: float, recovered: float) -> float:
    """Fraction of the perplexity gap to dense that recovery closes: 1 = back to dense, 0 = no change, < 0 worse."""
    gap = compressed - dense
    return (compressed - recovered) / gap if gap != 0 else 0.0


@dataclass
class TransferMatrix:
    """``without[(model, dataset)]``: perplexity with no prompt; ``with_prompt[(prompt, model, dataset)]``: with
    that prompt; ``dense[dataset]``: the dense model's perplexity, if given."""

    prompts: list[str]
    models: list[str]
    datasets: list[str]
    without: dict[tuple[str, str], float] = field(default_factory=dict)
    with_prompt: dict[tuple[str, str, str], float] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)

    def gap_closed(self, prompt: str, model: str, dataset: str) -> float | None:
        if dataset not in self.dense:
            return None
        return gap_closed(self.dense[dataset], self.without[(model, dataset)], self.with_prompt[(prompt, model, dataset)])

    def to_records(self) -> list[dict]:
        rows = []
        for p in self.prompts:
            for m in self.models:
                for d in self.datasets:
                    rows.append({"prompt": p, "model": m, "dataset": d, "without": self.without[(m, d)],
                                 "with": self.with_prompt[(p, m, d)], "gap_closed": self.gap_closed(p, m, d)})
        return rows

    def to_markdown(self) -> str:
        """One row per prompt; one column per (model, dataset): ``without -> with`` (gap closed)."""
        columns = [(m, d) for m in self.models for d in self.datasets]
        head = "| prompt trained on | " + " | ".join(f"{m} / {d}" for m, d in columns) + " |"
        lines = [head, "|" + "---|" * (len(columns) + 1)]
        for p in self.prompts:
            cells = []
            for m, d in columns:
                closed = self.gap_closed(p, m, d)
                extra = f" ({100 * closed:.0f}% of gap)" if closed is not None else ""
                cells.append(f"{self.without[(m, d)]:.2f} -> {self.with_prompt[(p, m, d)]:.2f}{extra}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_transfer(
    prompts: dict[str, RecoveryPrompt | RecoveryPrefix],
    models: dict[str, nn.Module],
    datasets: dict[str, object],
    *,
    dense: dict[str, float] | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    autocast_bf16: bool = False,
) -> TransferMatrix:
    """Perplexity of each model on each evaluation set, without a prompt and with each prompt.

    Args:
        prompts: name (where it was trained) -> prompt (or prefix: one trained for a model of the same cache layout).
        models: name (the target compression setting) -> model.
        datasets: name -> evaluation token ids `(1, N)` (e.g. ``eval_tokens("wikitext2", tokenizer)``).
        dense: dataset name -> the dense model's perplexity, for the fraction of the gap closed.
        seqlen, max_windows, autocast_bf16: passed to :func:`~hf_compress_prompt.evaluation.perplexity`.

    A prompt already attached to a model is put back afterwards.
    """

    def score(model, ids) -> float:
        return perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, autocast_bf16=autocast_bf16,
                          progress=False).perplexity

    result = TransferMatrix(list(prompts), list(models), list(datasets), dense=dict(dense or {}))
    for m, model in models.items():
        previous = recovery_prompt_of(model)
        detach_recovery_prompt(model)
        try:
            for d, ids in datasets.items():
                result.without[(m, d)] = score(model, ids)
            for p, prompt in prompts.items():
                attach_recovery_prompt(model, prompt)
                for d, ids in datasets.items():
                    result.with_prompt[(p, m, d)] = score(model, ids)
                detach_recovery_prompt(model)
        finally:
            detach_recovery_prompt(model)
            if previous is not None:
                attach_recovery_prompt(model, previous)
    return result
