"""Pushing recovery prompts and compressed models to the Hugging Face Hub with a model card.

Cards are rendered from the templates in ``hf_compress_prompt/hub_cards/`` (package data) with ``huggingface_hub.ModelCard.from_template``, with
valid metadata (``base_model``, ``library_name``, tags, a ``model-index`` of the results given). Everything is
written to a temporary folder and uploaded in one commit; the caller's files are never touched, and a failed
upload raises :class:`HubUploadError` naming the step that failed. The endpoint is ``HF_ENDPOINT`` when set (read
at call time), so uploads can target a private Hub or a local test server. A model with a recovery prompt attached
gets a ``push_to_hub`` that uploads both (:func:`push_compressed_model`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from .._logging import get_logger
from ..errors import UserInputError
from ..formats.schema import RECIPE_CONFIG_KEY
from ..nn import PackedLinear
from ..recovery import RecoveryPrefix, RecoveryPrompt, recovery_prompt_of
from ..recovery.io import write_recovery_prompt
from ..recovery.runtime import register_prompt_method
from .checkpoints import save_pretrained

__all__ = ["HubUploadError", "compressed_model_card", "push_compressed_model", "push_recovery_prompt",
           "recovery_prompt_card"]

logger = get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parents[1] / "hub_cards"  # package data: installed with the wheel
LIBRARY_TAG = "hf-compress-prompt"
DATASET_NAMES = {"wikitext2": ("wikitext", "WikiText-2"), "ptb": ("ptb_text_only", "Penn Treebank"),
                 "c4": ("allenai/c4", "C4")}


class HubUploadError(RuntimeError):
    """An upload to the Hub failed; the message says at which step. Local files are unchanged."""


def _template(name: str) -> Path:
    path = TEMPLATES / name
    if not path.is_file():
        raise FileNotFoundError(f"model-card template {path} is missing (hub_cards/ ships inside the package; reinstall hf_compress_prompt)")
    return path


def _recipe_text(recipe: dict | None) -> str:
    if not recipe:
        return "Not recorded."
    steps = recipe.get("steps", [])
    lines = [f"- `{json.dumps(step, sort_keys=True)}`" for step in steps] or ["- (no steps)"]
    calibration = recipe.get("calibration")
    if calibration:
        lines.append(f"- calibration: `{json.dumps(calibration, sort_keys=True)}`")
    return "\n".join(lines)


def _prompt_recipes_text(meta: dict) -> str:
    """The recipe a prompt was trained on, and those of the models it was trained on at once (a shared prompt)."""
    text = _recipe_text(meta.get("compression_recipe"))
    for i, recipe in enumerate(meta.get("shared_with_recipes") or []):
        text += f"\n\nThe same prompt was trained at once on model {i + 2} of {len(meta['shared_with_recipes']) + 1} " \
                f"(one prompt for all, mean loss):\n\n{_recipe_text(recipe)}"
    return text


def _eval_results(results: dict[str, float] | None, label: str):
    from huggingface_hub import EvalResult

    out = []
    for dataset, value in (results or {}).items():
        dataset_type, dataset_name = DATASET_NAMES.get(dataset, (dataset, dataset))
        out.append(EvalResult(task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name,
                              metric_type="perplexity", metric_name=f"perplexity ({label})", metric_value=float(value)))
    return out or None


def _results_table(results: dict[str, float] | None, baseline: dict[str, float] | None = None) -> str:
    if not results:
        return "No evaluation results were given when this was pushed."
    lines = ["| dataset | perplexity |" + (" without prompt |" if baseline else ""),
             "|---|---|" + ("---|" if baseline else "")]
    for dataset, value in results.items():
        extra = f" {baseline[dataset]:.2f} |" if baseline and dataset in baseline else (" - |" if baseline else "")
        lines.append(f"| {dataset} | {value:.2f} |{extra}")
    return "\n".join(lines)


def recovery_prompt_card(prompt, repo_id: str, *, results: dict[str, float] | None = None,
                         baseline: dict[str, float] | None = None, compressed_model: str | None = None):
    """The model card of a recovery prompt or prefix (``results``: dataset -> perplexity with the prompt;
    ``baseline``: the same without it)."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = prompt.metadata
    base = meta.get("base_model") or None
    training = meta.get("training") or {}
    is_prefix = isinstance(prompt, RecoveryPrefix)
    tensor = prompt.key_values if is_prefix else prompt.embedding
    card_data = ModelCardData(
        base_model=base, library_name="peft", pipeline_tag="text-generation", model_name=repo_id.split("/")[-1],
        tags=[LIBRARY_TAG, *(["prefix-tuning"] if is_prefix else ["prompt-tuning", "soft-prompt"]),
              "compression-recovery"],
        eval_results=_eval_results(results, "with prompt"),
    )
    training_text = (
        f"- data: {training.get('dataset', '?')}, {meta.get('steps', '?')} steps of {training.get('batch_size', '?')} x "
        f"{training.get('seqlen', '?')} tokens, AdamW lr {training.get('learning_rate', '?')}\n"
        f"- initialisation: {training.get('init', '?')}\n"
        f"- best validation perplexity: {meta.get('best_validation_perplexity', '?')} (step {meta.get('best_step', '?')}; "
        f"{meta.get('validation', 'held-out data')})"
    )
    return ModelCard.from_template(
        card_data, template_path=str(_template("recovery_prompt.md")),
        title=f"Recovery {'prefix' if is_prefix else 'prompt'} {repo_id}", num_virtual_tokens=prompt.num_virtual_tokens,
        is_prefix=is_prefix, num_layers=tensor.shape[0], projection=bool(training.get("prefix_projection")),
        hidden_size=meta.get("hidden_size") if is_prefix else tensor.shape[1], parameters=tensor.numel(), base_model=base,
        recipe=_prompt_recipes_text(meta), training=training_text,
        results_table=_results_table(results, baseline), repo_id=repo_id,
        compressed_model=compressed_model or "<your compressed model>",
    )


def compressed_model_card(model: nn.Module, repo_id: str, *, results: dict[str, float] | None = None):
    """The model card of a compressed model (``results``: dataset -> perplexity of the pushed model)."""
    from huggingface_hub import ModelCard, ModelCardData

    formats = sorted({m.fmt.describe() for m in model.modules() if isinstance(m, PackedLinear)})
    prompt = recovery_prompt_of(model)
    base = getattr(model.config, "_name_or_path", None) or None
    base = base if base and not Path(base).exists() else None  # a local path is no Hub id
    card_data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation",
        model_name=repo_id.split("/")[-1], tags=[LIBRARY_TAG, "compressed", *(["soft-prompt"] if prompt else [])],
        eval_results=_eval_results(results, "compressed model"),
    )
    packed = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, PackedLinear)
                 for b in m.buffers())
    return ModelCard.from_template(
        card_data, template_path=str(_template("compressed_model.md")), title=repo_id.split("/")[-1],
        base_model=base, formats=", ".join(formats) or "no packed layers",
        size_note=f"{packed / 1e6:.1f} MB of packed layer tensors", has_prompt=prompt is not None,
        prompt_kind="prefix" if isinstance(prompt, RecoveryPrefix) else "prompt",
        num_virtual_tokens=prompt.num_virtual_tokens if prompt else 0,
        recipe=_recipe_text(getattr(model.config, RECIPE_CONFIG_KEY, None)),
        results_table=_results_table(results), repo_id=repo_id,
    )


def _upload(folder: Path, repo_id: str, *, token, private, commit_message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as exc:
        raise HubUploadError(f"pushing to {repo_id}: creating the repository failed ({type(exc).__name__}: {exc}); "
                             "nothing local was changed") from exc
    try:
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    except Exception as exc:
        raise HubUploadError(f"pushing to {repo_id}: uploading the files failed ({type(exc).__name__}: {exc}); "
                             "nothing local was changed") from exc
    logger.info("pushed %s", getattr(info, "commit_url", repo_id))
    return str(getattr(info, "commit_url", info))


def push_recovery_prompt(prompt_or_model, repo_id: str, *, results: dict[str, float] | None = None,
                         baseline: dict[str, float] | None = None, compressed_model: str | None = None,
                         token: str | None = None, private: bool | None = None,
                         commit_message: str = "Upload recovery prompt") -> str:
    """Uploads a recovery prompt (a :class:`~hf_compress_prompt.recovery.RecoveryPrompt` or
    :class:`~hf_compress_prompt.recovery.RecoveryPrefix`, or the one attached to a model) in PEFT format with its metadata and a model card; returns the commit URL.

    Raises:
        UserInputError: a model without an attached prompt.
        HubUploadError: the upload failed (which step, and why).
    """
    model = None
    prompt = prompt_or_model
    if not isinstance(prompt, (RecoveryPrompt, RecoveryPrefix)):
        model, prompt = prompt_or_model, recovery_prompt_of(prompt_or_model)
        if prompt is None:
            raise UserInputError("this model has no recovery prompt attached; train one with recover() first")
    card = recovery_prompt_card(prompt, repo_id, results=results, baseline=baseline, compressed_model=compressed_model)
    with tempfile.TemporaryDirectory(prefix="hcp-push-") as tmp:
        folder = write_recovery_prompt(prompt, Path(tmp) / "prompt", model)
        card.save(str(folder / "README.md"))
        return _upload(folder, repo_id, token=token, private=private, commit_message=commit_message)


def push_compressed_model(model: nn.Module, repo_id: str, tokenizer=None, *, results: dict[str, float] | None = None,
                          token: str | None = None, private: bool | None = None,
                          commit_message: str = "Upload compressed model") -> str:
    """Uploads a compressed model (packed weights, its recovery prompt if attached, the tokenizer) with a model
    card; returns the commit URL."""
    card = compressed_model_card(model, repo_id, results=results)
    with tempfile.TemporaryDirectory(prefix="hcp-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", tokenizer)
        card.save(str(folder / "README.md"))
        return _upload(folder, repo_id, token=token, private=private, commit_message=commit_message)


@register_prompt_method("push_to_hub")
def _push_with_prompt(model: nn.Module, repo_id: str, *, tokenizer=None, results: dict | None = None,
                      token: str | None = None, private: bool | None = None, commit_message: str | None = None,
                      **unsupported):
    """``push_to_hub`` of a model with a recovery prompt attached: the model, its prompt and this package's model
    card go up in one commit (:func:`push_compressed_model`)."""
    if unsupported:
        raise UserInputError(f"push_to_hub of a model with a recovery prompt does not take {sorted(unsupported)}; "
                             "it takes tokenizer, results, token, private and commit_message")
    return push_compressed_model(model, repo_id, tokenizer, results=results, token=token, private=private,
                                 commit_message=commit_message or "Upload compressed model with recovery prompt")
