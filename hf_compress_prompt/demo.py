"""The main job on the embedded default: load SmolLM2-135M-Instruct, measure perplexity, generate a line.

Until compression and recovery land (issues 3 and 6), the demo evaluates the default dense model; those issues
extend it with compressed and recovered rows in the same table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ._logging import get_logger
from .data import eval_tokens, load_rows
from .errors import MissingResourceError
from .evaluation import PerplexityResult, perplexity
from .models import load_model_and_tokenizer

__all__ = ["DemoResult", "demo_datasets", "run_demo"]

logger = get_logger(__name__)

DEMO_PROMPT = "The capital of France is"


@dataclass
class DemoResult:
    model: str
    load_seconds: float
    rows: list[tuple[str, str, PerplexityResult]]  # (dataset, mode, result)
    prompt: str
    completion: str


def demo_datasets() -> list[str]:
    """WikiText-2 and PTB test when a copy is reachable (local folder or Hub), else the Wikipedia sample in gensim."""
    available = []
    for name in ("wikitext2", "ptb"):
        try:
            load_rows(name, "test")
        except MissingResourceError as exc:
            logger.info("demo: %s", exc)
        else:
            available.append(name)
    return available or ["wiki_sample"]


def run_demo(
    model: str | None = None,
    *,
    datasets: list[str] | None = None,
    windows: int = 4,
    seqlen: int = 2048,
    modes: tuple[str, ...] = ("bf16",),
    progress: bool = True,
) -> DemoResult:
    """Runs the demo and returns its figures.

    Args:
        model (`str`, *optional*): defaults to the embedded SmolLM2-135M-Instruct.
        datasets (`list[str]`, *optional*): defaults to :func:`demo_datasets`.
        windows (`int`, *optional*, defaults to 4): windows of ``seqlen`` tokens per dataset.
        seqlen (`int`, *optional*, defaults to 2048): window length.
        modes (`tuple[str, ...]`, *optional*, defaults to `("bf16",)`): any of ``"fp32"`` and ``"bf16"`` (autocast).
    """
    start = time.perf_counter()
    lm, tokenizer = load_model_and_tokenizer(model)
    load_seconds = time.perf_counter() - start
    rows = []
    for name in datasets or demo_datasets():
        ids = eval_tokens(name, tokenizer, "test")
        for mode in modes:
            result = perplexity(
                lm, ids, seqlen=seqlen, max_windows=windows, autocast_bf16=mode == "bf16", progress=progress,
                desc=f"{name} {mode}",
            )
            rows.append((name, mode, result))
    inputs = tokenizer(DEMO_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return DemoResult(model or "SmolLM2-135M-Instruct (embedded)", load_seconds, rows, DEMO_PROMPT, completion)
