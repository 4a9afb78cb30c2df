"""Knowledge-intensive tasks: scoring rules, data readers, batching that does not change answers, and the
side-by-side runner with LLM-KICK's "holds" rule; on tiny models and small local data files."""

from __future__ import annotations


import pytest
import torch

from hf_compress_prompt.errors import MissingResourceError, UserInputError
from hf_compress_prompt.evaluation.tasks import TaskModel, TaskReport, evaluate_tasks, get_task, holds, list_tasks
from hf_compress_prompt.evaluation.tasks import data as task_data
from hf_compress_prompt.evaluation.tasks.retrieval_qa import cnn_cloze_questions, token_f1
from hf_compress_prompt.evaluation.tasks.scoring import alias_hit, normalize_answer, rouge
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt

from builders import TRIVIA


class ScriptedLM(TaskModel):
    """A TaskModel whose answers are scripted, to check a task's scoring apart from any model."""

    def __init__(self, tokenizer, answer, letter=None):
        super().__init__(torch.nn.Linear(1, 1), tokenizer, progress=False)
        self.answer, self.letter = answer, letter

    def generate(self, prompts, max_new_tokens, stop=(), desc=""):
        return [self.answer(p) for p in prompts]

    def choice_logprobs(self, prompts, choices, desc=""):
        scores = torch.zeros(len(prompts), len(choices))
        for i, p in enumerate(prompts):
            scores[i, "ABCD".index(self.letter(p))] = 1.0
        return scores


# ----- scoring ------------------------------------------------------------------------------------------------------
def test_normalization_and_alias_hits():
    assert normalize_answer("  The Antelope, of course! ") == "antelope of course"
    assert alias_hit("It is an antelope.", ["Antelope"])
    assert alias_hit("William Shakespeare wrote it", ["Shakespeare"])
    assert not alias_hit("seahorses", ["horse"])  # word boundaries kept
    assert not alias_hit("", ["Paris"]) and not alias_hit("Paris", ["", "the"])  # empty golds never match
    assert token_f1("the big red dog", "red dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("cat", "dog") == 0.0


def test_rouge_is_one_for_identical_text_and_zero_for_disjoint():
    same = rouge(["The mayor came to the opening."], ["The mayor came to the opening."])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    other = rouge(["zebras gallop quickly"], ["The mayor came to the opening."])
    assert other["rouge1"] == 0.0 and other["rougeL"] == 0.0


# ----- data -----------------------------------------------------------------------------------------------------------
def test_readers_parse_the_local_layout(task_data_dir):
    trivia = task_data.triviaqa()
    assert trivia[0] == {"question": "What type of animal is a dik-dik?", "answer": "Antelope",
                         "aliases": ["Antelope", "Antelopes"]}
    mmlu = task_data.mmlu("dev")
    assert set(mmlu) == {"astronomy", "virology"} and len(mmlu["virology"]) == 5
    assert mmlu["astronomy"][1] == {"question": "astronomy question 1?", "choices": ["one", "two", "three", "four"],
                                    "answer": "B"}
    story = task_data.cnn_dailymail_stories("small")[0]
    assert story["reference"] == "MariaSmall Lopez opens a bakery in Springfield\nThe mayor came to the opening"
    assert "@highlight" not in story["article"]


@pytest.mark.parametrize("content, where", [("{not json\n", ":1 is not valid JSON"),
                                            ('{"context": "Question: q"}\n', ":1 must be a JSON object with keys"),
                                            ("", "holds no records")])
def test_a_malformed_jsonl_file_is_named_in_one_line(tmp_path, content, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserInputError, match=where) as error:
        task_data.triviaqa(path)
    assert "\n" not in str(error.value)


def test_a_malformed_mmlu_row_is_named(task_data_dir):
    (task_data_dir / "mmlu" / "test" / "virology_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(UserInputError, match=r"virology_test.csv:1 must have 6 columns"):
        task_data.mmlu("test", ["virology"])


def test_missing_data_without_the_hub_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(tmp_path))
    with pytest.raises(MissingResourceError, match="could not be read from the Hub"):
        task_data.triviaqa()
    with pytest.raises(MissingResourceError, match="llm-kick"):
        task_data.cnn_dailymail_stories("small")


def test_cloze_questions_blank_a_name_that_the_evidence_contains(task_data_dir):
    rows = cnn_cloze_questions()
    assert len(rows) == 3  # one per story
    for row in rows:
        assert row["answers"][0] in row["context"] and "___" in row["question"]
        assert row["answers"][0].startswith("Maria")  # the two-word name, not the opening word alone


# ----- tasks, scored with scripted answers -------------------------------------------------------------------------
def test_factoid_qa_counts_alias_hits(task_data_dir, byte_tokenizer):
    answers = {"dik-dik": "an antelope, found in Africa", "red planet": "Jupiter", "France": "Paris.",
               "Hamlet": "It was written by shakespeare"}
    lm = ScriptedLM(byte_tokenizer, lambda p: next(v for k, v in answers.items() if k in p))
    result = get_task("factoid_qa").run(lm)
    assert result.samples == 4 and result.score == pytest.approx(0.75)
    assert result.examples[1] == {"question": TRIVIA[1][0], "output": "Jupiter", "gold": "Mars", "hit": False}


def test_mmlu_scores_per_subject_and_builds_shots_from_dev(task_data_dir, byte_tokenizer):
    seen = []

    def letter(prompt):
        seen.append(prompt)
        subject = "astronomy" if "about astronomy" in prompt else "virology"
        i = int(prompt.rsplit("question ", 1)[1].split("?")[0])
        return "ABCD"[i % 4] if subject == "astronomy" else "ABCD"[(i + 1) % 4]  # right, wrong

    result = get_task("mmlu_5shot").run(ScriptedLM(byte_tokenizer, None, letter))
    assert result.groups["astronomy"]["accuracy"] == 1.0 and result.groups["virology"]["accuracy"] == 0.0
    assert result.metrics["accuracy"] == 0.5 and result.samples == 6
    first = seen[0]
    assert first.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert first.count("\nAnswer:") == 6 and first.endswith("astronomy question 0?\nA. one\nB. two\nC. three\nD. four\nAnswer:")
    limited = get_task("mmlu_0shot").run(ScriptedLM(byte_tokenizer, None, letter), limit=1)
    assert limited.samples == 2 and set(limited.groups) == {"astronomy", "virology"}


def test_retrieval_qa_scores_closed_and_open_book(task_data_dir, byte_tokenizer):
    def answer(prompt):  # reads the answer from the evidence only when it is there
        return prompt.split(" opened")[0].split("-- ")[-1] if "Based on these texts" in prompt else "no idea"

    result = get_task("retrieval_qa").run(ScriptedLM(byte_tokenizer, answer))
    assert result.settings["source"] == "cnn_cloze"  # no SQuAD file and no Hub here
    assert result.metrics["open_book_hit"] == 1.0 and result.metrics["closed_book_hit"] == 0.0
    assert result.metrics["open_book_f1"] == 1.0 and result.primary == "open_book_hit"


def test_summarization_uses_the_llm_kick_instruction_and_rouge(task_data_dir, byte_tokenizer):
    prompts = []

    def summary(prompt):
        prompts.append(prompt)
        return " The mayor came to the opening"

    result = get_task("summarization").run(ScriptedLM(byte_tokenizer, summary))
    assert prompts[0].startswith("Summarize the given story in less than 150 words")
    assert prompts[1].startswith("Summarize the given news")  # mid and large, as LLM-KICK
    assert set(result.groups) == {"small", "mid", "large"} and result.samples == 3
    assert 0.3 < result.metrics["rouge1"] < 1.0  # half of the reference, all of the summary


# ----- the model side -----------------------------------------------------------------------------------------------
def test_batched_left_padded_answers_equal_one_at_a_time(tiny_llama, byte_tokenizer):
    prompts = ["Question: what is it?\nThe answer is ", "Hi", "A much longer prompt than the others, to pad."]
    batched = TaskModel(tiny_llama, byte_tokenizer, batch_size=3, autocast_bf16=False, progress=False)
    single = TaskModel(tiny_llama, byte_tokenizer, batch_size=1, autocast_bf16=False, progress=False)
    assert batched.generate(prompts, 6) == single.generate(prompts, 6)
    for choices in (["b", "c", "d"], [" yes", " no"]):  # one token each (one pass); several tokens (a pass each)
        scores = batched.choice_logprobs(prompts, choices)
        torch.testing.assert_close(scores, single.choice_logprobs(prompts, choices), rtol=1e-4, atol=1e-4)
        for j, choice in enumerate(choices):  # the sum of the choice's token log-probabilities, unpadded
            ids = byte_tokenizer(prompts[1] + choice, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(tiny_llama(ids).logits[0].detach(), -1)  # (T, V)
            k = len(choice)
            direct = logp[-k - 1:-1].gather(-1, ids[0, -k:].unsqueeze(-1)).sum()
            torch.testing.assert_close(scores[1, j], direct, rtol=1e-4, atol=1e-4)


def test_an_attached_recovery_prompt_changes_the_scores(tiny_llama, byte_tokenizer):
    lm = TaskModel(tiny_llama, byte_tokenizer, batch_size=2, autocast_bf16=False, progress=False)
    prompts = ["Hello there", "x"]
    plain = lm.choice_logprobs(prompts, ["a", "b"])
    attach_recovery_prompt(tiny_llama, RecoveryPrompt(torch.randn(4, 128) * 0.5, {}))
    prompted = lm.choice_logprobs(prompts, ["a", "b"])
    assert (plain - prompted).abs().max() > 1e-3
    assert lm.generate(prompts, 3) == TaskModel(tiny_llama, byte_tokenizer, batch_size=1, autocast_bf16=False,
                                                progress=False).generate(prompts, 3)


def test_a_model_without_a_tokenizer_is_refused(tiny_llama):
    with pytest.raises(UserInputError, match="no tokenizer"):
        evaluate_tasks({"dense": tiny_llama}, None, ["factoid_qa"])


# ----- the runner ---------------------------------------------------------------------------------------------------
def test_holds_is_a_relative_five_percent_rule():
    assert holds(0.95, 1.0) and not holds(0.949, 1.0) and holds(0.5, 0.5) and holds(0.6, 0.5)


def test_unknown_tasks_and_references_fail_before_any_model_runs(tiny_llama, byte_tokenizer):
    with pytest.raises(UserInputError, match="unknown task 'trivia'; known tasks: factoid_qa"):
        evaluate_tasks({"dense": tiny_llama}, byte_tokenizer, ["trivia"])
    with pytest.raises(UserInputError, match="reference model 'dense' is not among"):
        evaluate_tasks({"small": tiny_llama}, byte_tokenizer, ["factoid_qa"])
    assert set(list_tasks()) >= {"factoid_qa", "mmlu_0shot", "mmlu_5shot", "retrieval_qa", "summarization"}


def test_one_run_scores_every_model_side_by_side(task_data_dir, tiny_llama, byte_tokenizer, tmp_path):
    other = type(tiny_llama)(tiny_llama.config)  # a different random model
    models = {"dense": tiny_llama, "other": other}
    options = {"summarization": {"max_new_tokens": 8}, "factoid_qa": {"max_new_tokens": 4}}
    run = lambda: evaluate_tasks(models, byte_tokenizer, limit=2, batch_size=2, progress=False,  # noqa: E731
                                 task_options=options)
    report = run()
    assert set(report.results) == {"dense", "other"}
    assert set(report.results["dense"]) == {"factoid_qa", "mmlu_0shot", "mmlu_5shot", "retrieval_qa", "summarization"}
    for results in report.results.values():
        for r in results.values():
            assert all(0.0 <= v <= 1.0 for v in r.metrics.values())
    assert report.scores() == run().scores()  # deterministic
    assert set(report.holds()) == {"other"}
    table = report.to_markdown()
    assert "| mmlu_0shot (accuracy, n=4) |" in table and ("(holds)" in table or "(drops)" in table)
    again = TaskReport.load(report.save(tmp_path / "report.json"))
    assert again.scores() == report.scores() and again.holds() == report.holds()


def test_task_options_are_checked(tiny_llama, byte_tokenizer):
    with pytest.raises(UserInputError, match="has no option 'max_tokens'"):
        evaluate_tasks({"dense": tiny_llama}, byte_tokenizer, ["factoid_qa"],
                       task_options={"factoid_qa": {"max_tokens": 3}})


def test_generation_tasks_use_the_chat_template_when_there_is_one(task_data_dir, byte_tokenizer):
    import copy

    chat = copy.deepcopy(byte_tokenizer)
    chat.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    seen = []
    lm = ScriptedLM(chat, lambda p: seen.append(p) or "Paris")
    get_task("factoid_qa").run(lm, limit=1)
    assert seen[-1] == "<u>Please give answer to this question: What type of animal is a dik-dik?\nThe answer is </u><a>"
    lm.chat_template = False
    get_task("factoid_qa").run(lm, limit=1)
    assert seen[-1].startswith("Please give answer")
