"""Ensemble distillation (FedDF) and the choice of the served fusion method."""

import numpy as np
import pytest
import torch

from fedfuse.config import DataConfig, config_from_dict
from fedfuse.data.datasets import load_dataset, split_transfer
from fedfuse.errors import ConfigError, DataError
from fedfuse.fusion.distill import distill, kl_to_teacher, soften
from fedfuse.fusion.result import choose_method
from fedfuse.fusion.soft_vote import brier_statistics, member_briers
from fedfuse.models.registry import build_model, set_standardization
from fedfuse.models.training import make_loader, make_optimizer, predict_proba, train_epochs


@pytest.fixture(scope="module")
def digits():
    data = load_dataset(DataConfig(source="digits"))
    return data


def fitted(arch: str, data, seed: int):
    model = build_model(arch, data.schema, seed=seed)
    set_standardization(model, data.X.mean(0), data.X.std(0) + 1e-6)
    loader = make_loader(data.X[:600], data.y[:600], 32, seed=seed)
    train_epochs(model, loader, make_optimizer(model, 0.1, 0.9, 0.0), epochs=3)
    return model


def test_the_student_learns_the_teachers_predictions_without_labels(digits):
    """A fresh MLP distilled from a trained logreg on 800 unlabeled inputs agrees with
    it on 397 inputs neither saw; the held-out KL falls; the input model is untouched."""
    teacher_model = fitted("logreg", digits, seed=1)
    X_transfer, X_unseen = digits.X[600:1400], digits.X[1400:]
    teacher = predict_proba(teacher_model, X_transfer)
    student = build_model("mlp", digits.schema, seed=2)
    set_standardization(student, digits.X.mean(0), digits.X.std(0) + 1e-6)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    agree_before = (predict_proba(student, X_unseen).argmax(1)
                    == predict_proba(teacher_model, X_unseen).argmax(1)).mean()
    taught, report = distill(student, X_transfer, teacher, steps=300, lr=3e-3,
                             temperature=1.0, seed=0)
    agree = (predict_proba(taught, X_unseen).argmax(1)
             == predict_proba(teacher_model, X_unseen).argmax(1)).mean()
    assert agree_before < 0.3 and agree > 0.85
    assert report.holdout_kl < 0.5 * report.start_kl
    assert 0 < report.best_step <= 300 and report.transfer_examples == 800
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_distillation_is_deterministic_for_a_seed(digits):
    teacher = predict_proba(fitted("logreg", digits, seed=1), digits.X[:200])
    student = build_model("logreg", digits.schema, seed=4)
    runs = [distill(student, digits.X[:200], teacher, steps=20, lr=1e-2, temperature=2.0,
                    seed=9)[0].state_dict() for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_distillation_refuses_mismatched_inputs(digits):
    student = build_model("logreg", digits.schema, seed=4)
    with pytest.raises(ValueError, match="10 transfer inputs but 9 teacher rows"):
        distill(student, digits.X[:10], np.full((9, 10), 0.1), steps=1, lr=1e-3,
                temperature=1.0, seed=0)


def test_kl_loss_is_zero_at_the_teacher_and_softening_flattens():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    logits = torch.log(torch.as_tensor(p, dtype=torch.float32))
    target = torch.as_tensor(soften(p, 2.0), dtype=torch.float32)
    assert float(kl_to_teacher(logits, target, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(logits, torch.as_tensor(p[::-1].copy(), dtype=torch.float32),
                               1.0)) > 0.5
    np.testing.assert_allclose(soften(p, 1.0), p, atol=1e-12)
    flat = soften(p, 4.0)
    assert (flat.max(1) < p.max(1)).all() and np.allclose(flat.sum(1), 1.0)


def test_member_briers_are_each_members_own_score():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 60)
    probas = [rng.dirichlet(np.ones(4), 60) for _ in range(3)]
    A, b = brier_statistics(probas, y)
    direct = [((p - np.eye(4)[y]) ** 2).sum(1).mean() for p in probas]
    np.testing.assert_allclose(member_briers(A, b, 60), direct, rtol=1e-12)


@pytest.mark.parametrize("requested,soft,student,chosen", [
    ("auto", 0.20, 0.15, "distill"),
    ("auto", 0.20, 0.25, "soft_vote"),
    ("auto", 0.20, 0.20, "soft_vote"),  # a tie keeps the ensemble
    ("auto", 0.20, None, "soft_vote"),
    ("distill", 0.10, 0.30, "distill"),  # asked for: served even if worse
    ("distill", 0.10, None, "soft_vote"),  # no site scored the student
    ("soft_vote", 0.30, 0.10, "soft_vote"),
])
def test_the_served_method(requested, soft, student, chosen):
    briers = {"soft_vote": soft, **({} if student is None else {"distill": student})}
    assert choose_method(requested, briers) == chosen


def test_transfer_split_is_seeded_disjoint_and_label_free(digits):
    test, transfer = split_transfer(digits, 0.25, seed=5)
    assert len(transfer) == round(0.25 * len(digits)) and len(test) + len(transfer) == len(digits)
    again_test, again_transfer = split_transfer(digits, 0.25, seed=5)
    np.testing.assert_array_equal(transfer, again_transfer)
    rows = {r.tobytes() for r in test.X}
    assert not any(r.tobytes() in rows for r in transfer if
                   (digits.X == r).all(1).sum() == 1)  # unique rows go to one side only
    assert isinstance(transfer, np.ndarray)  # inputs only: no labels travel with them
    assert split_transfer(digits, 0.0, seed=5) == (digits, None)
    with pytest.raises(DataError, match="leaves 1 for transfer"):
        split_transfer(digits.subset(np.arange(10)), 0.1, seed=5)


def test_fusion_config_is_checked():
    base = {"name": "x", "cohorts": [{"arch": "mlp", "clients": 3}]}
    with pytest.raises(ConfigError, match="fusion.unlabeled_fraction: method \"distill\""):
        config_from_dict({**base, "fusion": {"method": "distill"}})
    with pytest.raises(ConfigError, match="fusion.student: 'cnn' is not a cohort's"):
        config_from_dict({**base, "fusion": {"student": "cnn"}})
    cfg = config_from_dict({**base, "fusion": {"unlabeled_fraction": 0.5}})
    assert cfg.fusion.method == "auto"


@pytest.mark.parametrize("briers,requested,chosen", [
    ({"soft_vote": 0.20, "stack": 0.18, "distill": 0.19}, "auto", "stack"),
    ({"soft_vote": 0.20, "stack": 0.19, "distill": 0.18}, "auto", "distill"),
    ({"soft_vote": 0.18, "stack": 0.18, "distill": 0.18}, "auto", "soft_vote"),
    ({"soft_vote": 0.20, "stack": 0.18, "distill": 0.18}, "auto", "stack"),  # tie: earlier
    ({"soft_vote": 0.10, "stack": 0.30}, "stack", "stack"),
    ({"soft_vote": 0.10}, "stack", "soft_vote"),  # no site scored the head
])
def test_the_served_method_among_three(briers, requested, chosen):
    assert choose_method(requested, briers) == chosen
