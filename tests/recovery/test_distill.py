"""Recovery by distillation: the loss is KL(teacher || student) over real positions, a prompt trained against a
teacher moves the student's distributions towards it, validation stays the corpus loss, bad teachers fail early."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import recovery_prompt_of
from hf_compress_prompt.recovery.data import TokenWindows
from hf_compress_prompt.recovery.distill import distillation_loss
from hf_compress_prompt.recovery.train import recover

from test_train import FAST, _windows  # tests/recovery is on sys.path (pytest rootdir-less import)


@pytest.fixture
def teacher_and_student():
    """A tiny Llama (the teacher) and a copy with every block weight perturbed (a stand-in for compression)."""
    from builders import build_steerable_llama

    teacher = build_steerable_llama()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, p in student.model.layers.named_parameters():
            if p.ndim == 2:
                p.add_(0.1 * torch.randn_like(p))
    return teacher, student


def _kl(student, teacher, windows):
    with torch.no_grad():
        return distillation_loss(student(windows).logits, teacher(windows).logits).item()


def test_loss_is_the_kl_divergence_over_real_positions():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    student = torch.randn(2, 3 + 5, 11)  # 3 virtual positions first: the last 5 are compared
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    p, log_p, log_q = teacher.softmax(-1), teacher.log_softmax(-1), student[:, 3:].log_softmax(-1)
    per_position = (p * (log_p - log_q)).sum(-1)  # (2, 5)
    expected = per_position[mask.bool()].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, mask), expected)
    assert distillation_loss(teacher, teacher).abs() < 1e-6  # identical distributions
    soft = distillation_loss(student, teacher, mask, temperature=2.0)
    q2, p2 = F.log_softmax(student[:, 3:] / 2, -1), F.log_softmax(teacher / 2, -1)
    torch.testing.assert_close(soft, 4 * (p2.exp() * (p2 - q2)).sum(-1)[mask.bool()].mean())
    with pytest.raises(UserInputError, match="vocabulary"):
        distillation_loss(student[..., :10], teacher)


def test_prompt_trained_against_the_teacher_moves_the_student_towards_it(teacher_and_student, byte_tokenizer):
    teacher, student = teacher_and_student
    held_out = _windows(4, seed=1)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _kl(student, teacher, held_out)
    result = recover(student, byte_tokenizer, max_steps=12, teacher=teacher, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(_windows(4)), **FAST)
    assert recovery_prompt_of(student) is result.prompt
    after = _kl(student, teacher, held_out)  # the attached prompt applies
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # the teacher is untouched
    assert all(p.grad is None for p in teacher.parameters())
    meta = result.prompt.metadata
    assert meta["loss"].startswith("KL") and meta["teacher"] is not None


def test_validation_is_the_corpus_loss_not_the_kl(teacher_and_student, byte_tokenizer):
    teacher, student = teacher_and_student
    valid = _windows(2, seed=3)  # one batch of 2: Trainer's eval loss is that batch's mean token loss
    result = recover(student, byte_tokenizer, max_steps=4, teacher=teacher, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(valid), **FAST)
    with torch.no_grad():
        corpus = student(valid, labels=valid).loss.item()  # with the best (attached) prompt
    assert math.isclose(result.best_perplexity, math.exp(corpus), rel_tol=1e-4)
    assert not math.isclose(result.best_perplexity, math.exp(_kl(student, teacher, valid)), rel_tol=1e-2)


def test_bad_teachers_fail_before_training(teacher_and_student, byte_tokenizer):
    from builders import build_other_llama

    teacher, student = teacher_and_student
    other = build_other_llama()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    data = {"train_dataset": TokenWindows(_windows()), "eval_dataset": TokenWindows(_windows(4))}
    with pytest.raises(UserInputError, match="another model"):
        recover(student, byte_tokenizer, max_steps=2, teacher=student, **data, **FAST)
    with pytest.raises(UserInputError, match="vocabulary"):
        recover(student, byte_tokenizer, max_steps=2, teacher=other, **data, **FAST)
    assert recovery_prompt_of(student) is None
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in student.parameters())
