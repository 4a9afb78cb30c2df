"""Our models and the LLM-KICK tasks through lm-evaluation-harness: the same scores as our own task runner, with
packed layers and an attached recovery prompt."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'hf_compress_prompt[lm-eval]')")

from hf_compress_prompt.compressors import RTNConfig, compress_  # noqa: E402
from hf_compress_prompt.evaluation.tasks import evaluate_tasks  # noqa: E402
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt  # noqa: E402

OURS = {"kick_factoid_qa": ("factoid_qa", "accuracy", "accuracy,none"),
        "kick_mmlu_0shot": ("mmlu_0shot", "accuracy", "acc,none"),
        "kick_mmlu_5shot": ("mmlu_5shot", "accuracy", "acc,none"),
        "kick_retrieval_qa_closed": ("retrieval_qa", "closed_book_f1", "f1,none"),
        "kick_retrieval_qa_open": ("retrieval_qa", "open_book_f1", "f1,none")}


def test_lm_eval_scores_equal_our_runner_on_a_packed_prompted_model(task_data_dir, tiny_llama, byte_tokenizer):
    import lm_eval

    from hf_compress_prompt.integrations.lm_eval_harness import CompressedLM, task_manager

    compress_(tiny_llama, RTNConfig(bits=4, group_size=64), progress=False)
    attach_recovery_prompt(tiny_llama, RecoveryPrompt(torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.5, {}))
    lm = CompressedLM(pretrained=tiny_llama, tokenizer=byte_tokenizer, batch_size=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(OURS), task_manager=task_manager(include_defaults=False),
                                  bootstrap_iters=0, log_samples=False)
    ours = evaluate_tasks({"m": tiny_llama}, byte_tokenizer, sorted({v[0] for v in OURS.values()}), reference=None,
                          batch_size=1, autocast_bf16=False, progress=False).results["m"]
    for theirs_name, (task, metric, key) in OURS.items():
        assert out["results"][theirs_name][key] == pytest.approx(ours[task].metrics[metric], abs=1e-6), theirs_name


def test_the_kick_group_and_the_model_name_are_registered(task_data_dir):
    from lm_eval.api.registry import get_model

    from hf_compress_prompt.integrations.lm_eval_harness import CompressedLM, task_manager

    assert get_model("hf_compress_prompt") is CompressedLM
    names = task_manager(include_defaults=False).all_tasks
    assert {"kick", "kick_factoid_qa", "kick_mmlu_5shot", "kick_summarization"} <= set(names)
