"""The main job on the embedded default: compress SmolLM2-135M-Instruct, train a short recovery prompt, and show
perplexity dense / compressed / recovered; then save the packed model with its prompt, load it back with
``AutoModelForCausalLM.from_pretrained`` and generate.

Compression and prompt training run on the fake-quantized weights (``pack=False``: the same numbers as the packed
layers' exact reference ops, and fast matmuls for the long windows); the model is packed before saving, and the
reloaded model generates through the packed layers' CPU kernels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ._logging import get_logger
from .autocast import bf16_matmul_is_fast
from .compressors import CalibrationConfig, Recipe
from .compressors.presets import list_presets, preset_steps
from .data import eval_tokens, load_rows, training_corpus
from .errors import MissingResourceError, UserInputError
from .evaluation import PerplexityResult, perplexity
from .models import load_model_and_tokenizer

__all__ = ["DemoResult", "default_mode", "demo_datasets", "run_demo"]

logger = get_logger(__name__)

DEMO_PROMPT = "The capital of France is"


DEMO_RECIPE = "gptq-w3-g64"  # any preset of hf_compress_prompt.compressors.presets works


@dataclass
class DemoResult:
    model: str
    load_seconds: float
    rows: list[tuple[str, str, PerplexityResult]]  # (dataset, "dense" / "compressed" / "recovered" or a mode, result)
    prompt: str
    completion: str  # the dense model's
    recipe: str | None = None
    compress_seconds: float = 0.0
    train_seconds: float = 0.0
    train_steps: int = 0
    saved_to: str | None = None
    reloaded_completion: str | None = None  # the saved compressed model + prompt, loaded back with from_pretrained
    kernels: list[str] | None = None
    train_dataset: str | None = None  # the corpus calibration and prompt training used (c4, or the offline fallback)
    baseline_validation: float | None = None  # prompt-training validation perplexity before training (no prompt)
    best_validation: float | None = None  # ... and with the best prompt


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


def _check_settings(recipe: str | None, *, windows: int, seqlen: int, modes: tuple[str, ...], steps: int,
                    num_virtual_tokens: int, train_seqlen: int, learning_rate: float, nsamples: int, dataset: str,
                    datasets: list[str] | None) -> None:
    """Every setting of :func:`run_demo` checked before the model loads: a bad one fails in a second, not minutes
    into the run."""
    from .data import get_corpus

    if recipe is not None and recipe not in list_presets():
        raise UserInputError(f"recipe {recipe!r}: choose one of {', '.join(list_presets())} or none")
    for name, value in (("windows", windows), ("seqlen", seqlen), ("steps", steps),
                        ("num_virtual_tokens", num_virtual_tokens), ("train_seqlen", train_seqlen), ("nsamples", nsamples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserInputError(f"{name}={value!r} must be an integer >= 1")
    if seqlen < 2 or train_seqlen < 2:
        raise UserInputError(f"seqlen={seqlen}, train_seqlen={train_seqlen}: windows need at least 2 tokens")
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise UserInputError(f"learning_rate={learning_rate!r} must be a finite number > 0 (e.g. 3e-2)")
    if not modes or set(modes) - {"fp32", "bf16"}:
        raise UserInputError(f"modes={modes!r}: use 'fp32' and/or 'bf16'")
    for name in [dataset, *(datasets or [])]:
        get_corpus(name)  # an unknown name lists the known ones


def default_mode() -> str:
    """``"bf16"`` (autocast) where this CPU's bf16 matmuls are fast (AVX-512 or AMX: about 2x fp32's speed on
    SmolLM2, the same perplexity), else ``"fp32"`` (an AVX2-only CPU runs bf16 about 5x slower than fp32)."""
    return "bf16" if bf16_matmul_is_fast("cpu") else "fp32"


def _complete(lm, tokenizer, text: str) -> str:
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_demo(
    model: str | None = None,
    *,
    datasets: list[str] | None = None,
    windows: int = 4,
    seqlen: int = 2048,
    modes: tuple[str, ...] | None = None,
    recipe: str | None = DEMO_RECIPE,
    steps: int = 40,
    num_virtual_tokens: int = 100,
    train_seqlen: int = 256,
    learning_rate: float = 3e-2,
    nsamples: int = 32,
    dataset: str = "c4",
    output: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Runs the demo and returns its figures.

    Args:
        model (`str`, *optional*): defaults to the embedded SmolLM2-135M-Instruct.
        datasets (`list[str]`, *optional*): defaults to :func:`demo_datasets`.
        windows (`int`, *optional*, defaults to 4): windows of ``seqlen`` tokens per dataset.
        seqlen (`int`, *optional*, defaults to 2048): window length.
        modes (`tuple[str, ...]`, *optional*): any of ``"fp32"`` and ``"bf16"`` (autocast) for the dense rows; the
            compressed and recovered rows, and the prompt's training, use the first. Defaults to
            :func:`default_mode`'s one.
        recipe (`str`, *optional*, defaults to ``"gptq-w3-g64"``): a preset name
            (:func:`~hf_compress_prompt.compressors.presets.list_presets`); `None` scores the dense model only.
        steps (`int`, *optional*, defaults to 40): prompt-training steps (batch 4 x ``train_seqlen`` C4 tokens).
        learning_rate (`float`, *optional*, defaults to 3e-2): the prompt's AdamW rate; the paper's 1e-3 is for
            30,000 steps, and at tens of steps 3e-2 recovers about 3x more (docs/results/recovery_sweep.md).
        num_virtual_tokens (`int`, *optional*, defaults to 100), train_seqlen (`int`, defaults to 256),
        nsamples (`int`, defaults to 32): prompt length, training window, calibration windows (x 512 tokens).
        dataset (`str`, *optional*, defaults to `"c4"`): the calibration and prompt-training corpus; where C4 is
            unreachable (no data folder, no Hub) the Wikipedia sample's training part inside gensim is used instead,
            said in one line (:func:`~hf_compress_prompt.data.training_corpus`).
        output (`str`, *optional*): where to save the packed model with its prompt (a temporary folder if `None`).
        overwrite (`bool`, *optional*, defaults to `False`): replace a model saved in ``output`` before
            (:func:`~hf_compress_prompt.integrations.checkpoints.check_save_target`, checked before any model work).
    """
    import tempfile

    modes = modes or (default_mode(),)
    _check_settings(recipe, windows=windows, seqlen=seqlen, modes=modes, steps=steps, num_virtual_tokens=num_virtual_tokens,
                    train_seqlen=train_seqlen, learning_rate=learning_rate, nsamples=nsamples, dataset=dataset,
                    datasets=datasets)  # before any model work
    if output is not None:
        from .integrations.checkpoints import check_save_target

        check_save_target(output, overwrite)
    start = time.perf_counter()
    lm, tokenizer = load_model_and_tokenizer(model)
    load_seconds = time.perf_counter() - start
    names = datasets or demo_datasets()
    streams = {name: eval_tokens(name, tokenizer, "test") for name in names}

    def score(label: str, mode: str) -> None:
        for name, ids in streams.items():
            result = perplexity(lm, ids, seqlen=seqlen, max_windows=windows, autocast_bf16=mode == "bf16",
                                progress=progress, desc=f"{name} {label}")
            rows.append((name, label, result))

    rows: list = []
    for mode in modes:  # without a recipe the rows are labelled by mode, as the dense-only demo did
        score(mode if not recipe else "dense" if len(modes) == 1 else f"dense {mode}", mode)
    completion = _complete(lm, tokenizer, DEMO_PROMPT)
    result = DemoResult(model or "SmolLM2-135M-Instruct (embedded)", load_seconds, rows, DEMO_PROMPT, completion)
    if not recipe:
        return result
    from .compressors import compress_
    from .compressors.pack import pack_model
    from .integrations.checkpoints import from_pretrained, save_pretrained
    from .nn import layer_status
    from .recovery.train import RecoveryConfig, recover

    mode = modes[0]
    start = time.perf_counter()
    train_dataset, train_split = training_corpus(dataset)  # C4 unreachable: the offline sample, said in one line
    calibration = CalibrationConfig(dataset=train_dataset, split=train_split, nsamples=nsamples)
    compressed = compress_(lm, Recipe(preset_steps(recipe), calibration), tokenizer=tokenizer, pack=False,
                           progress=progress)
    result.recipe, result.compress_seconds, result.train_dataset = recipe, time.perf_counter() - start, train_dataset
    score("compressed", mode)
    trained = recover(lm, tokenizer, RecoveryConfig(num_virtual_tokens=num_virtual_tokens, seqlen=train_seqlen,
                                                     max_steps=steps, eval_steps=max(1, steps // 2), eval_windows=4,
                                                     learning_rate=learning_rate, dataset=train_dataset,
                                                     bf16=mode == "bf16"))
    result.train_seconds, result.train_steps = trained.seconds, steps
    result.baseline_validation, result.best_validation = trained.baseline_perplexity, trained.best_perplexity
    score("recovered", mode)  # the prompt is attached
    pack_model(lm, compressed)  # the packed runtime layers, keeping the attached prompt
    with tempfile.TemporaryDirectory(prefix="hcp-demo-") as tmp:
        folder = save_pretrained(lm, output or f"{tmp}/model", tokenizer, overwrite=overwrite)
        reloaded = from_pretrained(folder)  # transformers' loader, through the registered quantization method
        result.saved_to = str(folder) if output else None
        result.kernels = sorted(set(layer_status(reloaded).values()))
        result.reloaded_completion = _complete(reloaded, tokenizer, DEMO_PROMPT)
    return result
