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


def _folder_with_prompt(tmp_path, tiny_llama, byte_tokenizer):
    from hf_compress_prompt import save_pretrained

    compress_(tiny_llama, RTNConfig(bits=4, group_size=64), progress=False)
    attach_recovery_prompt(tiny_llama, RecoveryPrompt(torch.randn(4, 128, generator=torch.Generator().manual_seed(0)), {}))
    return save_pretrained(tiny_llama, tmp_path / "packed", byte_tokenizer)


def test_a_folder_scores_without_its_saved_prompt_on_request(tmp_path, tiny_llama, byte_tokenizer):
    from hf_compress_prompt import from_pretrained
    from hf_compress_prompt.integrations.lm_eval_harness import CompressedLM

    folder = _folder_with_prompt(tmp_path, tiny_llama, byte_tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    bare = from_pretrained(folder)
    bare.disable_recovery_prompt()
    with torch.no_grad():
        expected = bare(ids).logits
        prompted = from_pretrained(folder)(ids).logits
        for flag in (False, "False"):  # as a Python value and as lm_eval's --model_args text
            lm = CompressedLM(pretrained=str(folder), recovery_prompt=flag, batch_size=1)
            torch.testing.assert_close(lm.model(ids).logits, expected)
        lm = CompressedLM(pretrained=str(folder), batch_size=1)  # the default keeps the prompt
        torch.testing.assert_close(lm.model(ids).logits, prompted)
    assert not torch.allclose(expected, prompted)


@pytest.mark.parametrize("kwargs", [{"recovery_promt": False}, {"no_such_argument": 1}, {"recovery_prompt": "maybe"}])
def test_unknown_or_bad_model_arguments_are_an_error(tmp_path, tiny_llama, byte_tokenizer, kwargs):
    from hf_compress_prompt.errors import UserInputError
    from hf_compress_prompt.integrations.lm_eval_harness import CompressedLM

    with pytest.raises(UserInputError, match="recovery_promt|no_such_argument|maybe"):
        CompressedLM(pretrained=tiny_llama, tokenizer=byte_tokenizer, batch_size=1, **kwargs)
